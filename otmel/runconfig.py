"""The run configuration: one YAML per dataset (`configs/NAME.yaml`) plus `section.key=value` overrides.

Loading is strict: an unknown or mistyped key fails at start-up with the key named, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from otmel.config import ModelConfig
from otmel.errors import ConfigError, InputFileError, UnknownKeyError, did_you_mean


def _require(section: str, rules: dict[str, tuple[bool, str]], obj: object) -> None:
    """Raise one ConfigError naming every key of `section` whose rule fails."""
    bad = [f"'{section}.{k}' must be {rule}, got {getattr(obj, k)!r}" for k, (ok, rule) in rules.items() if not ok]
    if bad:
        raise ConfigError("invalid config: " + "; ".join(bad))


@dataclass
class DataConfig:
    source: str = "data/synth"  # the raw dataset folder, packed into `shards` when those are absent
    format: Literal["cleaned", "melbench", "jsonl"] = "cleaned"
    shards: str = "shards/synth"  # packed WebDataset shards with manifest.json
    # Generate the synthetic benchmark into `source` when it is absent (the embedded default only).
    synth_if_missing: bool = False
    synth_seed: int = 0
    synth_scale: float = 1.0
    # "standard", or "sets": the set-matching benchmark of the paper's hypothesis (otmel/data/synth_sets.py)
    synth_mode: Literal["standard", "sets"] = "standard"
    split_seed: int = 0  # MELBench's seeded 70/10/20 split
    num_workers: int = 1  # DataLoader worker processes per training worker (decode + preprocessing)
    shuffle_buffer: int = 1000
    # Every shard's sha256 (and size) is checked as it is read, before its first sample reaches the model.
    # "fail": a bad shard stops the run with its name; "skip": a bad *training* shard is skipped for the rest of
    # the run (warned, counted as data/skipped_shards in results.json and W&B). Evaluation shards always fail.
    integrity: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        _require("data", {"num_workers": (self.num_workers >= 0, ">= 0"),
                          "shuffle_buffer": (self.shuffle_buffer >= 1, ">= 1"),
                          "synth_scale": (self.synth_scale > 0, "> 0")}, self)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32  # per worker: the global negative pool is batch_size * num_workers
    lr: float = 1e-3
    # LR of the layers trained from scratch (projections, fusion, matchers, logit scale) when the towers are
    # pretrained: fine-tuning LRs (~5e-5) leave freshly initialised heads under-trained in a short run.
    # None: everything at `lr`. The schedule scales both groups alike.
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 20
    seed: int = 0
    steps_per_epoch: int | None = None  # default: the train split once per epoch over the global batch
    negatives: Literal["local", "global"] = "global"
    gather_with_grad: bool = True  # global pool exactly equivalent to one big batch (see distributed.py)
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    # CPU only: DeepSpeed's JIT-built shared-memory all-reduce. Off: gloo, no compiler, no build lock that a
    # killed worker can leave behind (otmel/train/worker/ds_ops.py); on: loaded under an flock, stale lock cleared.
    deepspeed_shm: bool = False
    # "auto": the DeepSpeed JSON's bf16 on GPU (the paper configs ask for it), fp32 on CPU, where DeepSpeed runs
    # fp32. "bf16": on GPU the JSON's bf16 (enabled even if the JSON lacks it); on CPU (and with ddp) fp32 weights and
    # optimizer with every forward pass under bf16 autocast, so the bf16 path is exercised without a GPU. "fp32":
    # no autocast, bf16 / fp16 dropped from the JSON everywhere (otmel/train/worker/precision.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_clip: float = 1.0
    eval_every: int = 1  # validate every N epochs (and after the last)
    eval_batch_size: int = 64
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: one per epoch)
    # A step whose loss is NaN / Inf on any rank is skipped on every rank (no backward, no optimizer or LR step; the
    # weights stay as they were) and counted (train/nonfinite_steps); this many in a row stop the run with an
    # error naming the step and the loss terms (0: stop at the first one).
    max_nonfinite_steps: int = 10
    progress: bool = True  # progress bars on rank 0
    # Hard negatives (otmel/data/hard_negatives.py), off for the paper-faithful configs: per mention, add
    # `hard_per_mention` KG entities drawn from its `hard_pool` best candidates: "lexical" (homonyms of the gold,
    # then the string matcher's ranking of the surface form), "mined" (the model's own top wrong entities, mined
    # every `mine_every` epochs from epoch `mine_start`, 0-based), or "both" (their union).
    hard_negatives: Literal["none", "lexical", "mined", "both"] = "none"
    hard_per_mention: int = 1
    hard_pool: int = 16
    mine_every: int = 1
    mine_start: int = 0
    mine_first_stage: Literal["summary", "cls", "fusion"] = "summary"  # the cheap score that mines

    def __post_init__(self) -> None:
        pos = ("epochs", "batch_size", "eval_every", "eval_batch_size")
        rules = {k: (getattr(self, k) >= 1, ">= 1") for k in pos}
        rules |= {
            "lr": (self.lr > 0, "> 0"),
            "head_lr": (self.head_lr is None or self.head_lr > 0, "> 0 or null"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "steps_per_epoch": (self.steps_per_epoch is None or self.steps_per_epoch >= 1, ">= 1 or null"),
            "grad_clip": (self.grad_clip > 0, "> 0"),
            "checkpoint_every": (self.checkpoint_every >= 0, ">= 0 (0: once per epoch)"),
            "max_nonfinite_steps": (self.max_nonfinite_steps >= 0, ">= 0"),
            "precision": (self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
        }
        if self.hard_negatives != "none":
            rules |= {"hard_per_mention": (self.hard_per_mention >= 1, ">= 1"),
                      "hard_pool": (self.hard_pool >= self.hard_per_mention, ">= train.hard_per_mention"),
                      "mine_every": (self.mine_every >= 1, ">= 1"), "mine_start": (self.mine_start >= 0, ">= 0")}
        _require("train", rules, self)


@dataclass
class ScalingConfig:
    # Ray Train workers: N, or [MIN, MAX] for an elastic run that starts once MIN are placed, grows to MAX as
    # nodes arrive and shrinks on node loss, resuming from the newest checkpoint at each resize
    # (docs/scale-out.md, "Elastic training and preemption").
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Elastic runs only: what stays fixed when the world changes. "per_worker": each worker's batch stays
    # `train.batch_size`, so the global batch and the global negative pool shrink and grow with the world (a
    # worker never needs more memory than it was sized for). "global": the global batch stays batch_size * MAX
    # (each of W workers takes floor(batch_size * MAX / W)), so the loss sees the same pool at any size, capped by
    # `max_batch_per_worker` (the memory a worker has; past it the global batch shrinks).
    elastic_batch: Literal["per_worker", "global"] = "per_worker"
    max_batch_per_worker: int | None = None  # None: no cap
    # Elastic runs only: how often (seconds) Ray Train looks for room to grow a healthy run
    # (ScalingConfig.elastic_resize_monitor_interval_s); each growth restarts the workers from a checkpoint.
    resize_check_s: float = 60.0

    def __post_init__(self) -> None:
        n = self.num_workers
        ok = (isinstance(n, int) and n >= 1) or (isinstance(n, list) and len(n) == 2
                                                 and all(isinstance(x, int) and not isinstance(x, bool) for x in n)
                                                 and 1 <= n[0] <= n[1])
        _require("scaling", {
            "num_workers": (ok, ">= 1 (one Ray Train worker at least), or [MIN, MAX] with 1 <= MIN <= MAX"),
            "cpus_per_worker": (self.cpus_per_worker >= 1, ">= 1"),
            "max_batch_per_worker": (self.max_batch_per_worker is None or self.max_batch_per_worker >= 1,
                                     ">= 1 or null"),
            "resize_check_s": (self.resize_check_s >= 0, ">= 0"),
        }, self)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list) and self.num_workers[0] != self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def describe(self) -> str:
        """'2' or '1-2 (elastic)': the worker count as the run's header prints it."""
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.max_workers)


@dataclass
class RunSection:
    storage: str = "runs"  # Ray Train storage path (local folder, or s3://... on a cluster)
    name: str | None = None  # run name; default: the config name plus a timestamp
    max_failures: int = 1  # worker failures tolerated (Ray Train FailureConfig)
    # Node preemptions (a drained spot node, counted apart from failures: FailureConfig.max_preemption_failures)
    # the run restarts from; -1: any number.
    max_preemptions: int = -1
    # Every this many training steps all workers ask Ray Train whether a node of theirs is being drained
    # (`ray.train.get_preemption_info`, a barrier across the workers); on a notice they write a just-in-time
    # checkpoint and keep training. 0: never ask (a preempted node then loses up to one checkpoint interval).
    preemption_check_every: int = 10
    keep_checkpoints: int = 2
    ray_address: str | None = None  # None: join RAY_ADDRESS / the job's cluster, else start a local Ray
    # "quiet": header, one progress bar and one line per epoch, the final table; worker output, Ray's report dumps
    # and library warnings go to RUN_DIR/logs/ (otmel/train/driver/console.py, otmel/train/worker/progress.py).
    # "verbose": everything on the console.
    console: Literal["quiet", "verbose"] = "quiet"

    def __post_init__(self) -> None:
        _require("run", {"max_failures": (self.max_failures >= -1, ">= -1 (-1: retry forever)"),
                         "max_preemptions": (self.max_preemptions >= -1, ">= -1 (-1: any number)"),
                         "preemption_check_every": (self.preemption_check_every >= 0, ">= 0 (0: never)"),
                         "keep_checkpoints": (self.keep_checkpoints >= 2, ">= 2 (while the newest is written, "
                                              "or if it is found corrupt, the one before it must still exist)")},
                 self)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "otmel"
    group: str | None = None
    # "auto": online only when an API key is configured (WANDB_API_KEY or a netrc login), else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


# Keys that configs saved by earlier versions (a checkpoint's state.json, results.json) carry with the value that
# made them no-ops: dropped when read, so those runs still load. Any other value is an unknown key.
RETIRED_KEYS: dict[str, dict[str, Any]] = {"train": {"fail_at_step": None}}


@dataclass
class RunConfig:
    name: str = "synth"
    data: DataConfig = field(default_factory=DataConfig)
    # Resolved and validated once, when the config is built; `model_spec` keeps the section as written (`variant`
    # plus the keys set), which is what `to_dict` writes, so that a saved config re-targeted to another variant
    # (a sweep or an ablation setting model.variant) gets that variant's preset and not the old variant's values.
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunSection = field(default_factory=RunSection)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model_spec: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # RunConfig(model={...}): a model section as written
            spec = dict(self.model)
            self.model = ModelConfig.from_variant(spec.pop("variant", "OT"), **spec)
            self.model_spec = dict(self.model_spec or {"variant": self.model.variant, **spec})
        elif not self.model_spec and self.model != ModelConfig():  # a resolved ModelConfig: record all of it
            self.model_spec = self.model.to_dict()

    def model_config(self) -> ModelConfig:
        """The resolved model config (kept for callers of the dict era; the same object as `self.model`)."""
        return self.model

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
             else getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "model_spec")}
        return {**d, "model": dict(self.model_spec)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        spec = d.pop("model", None) or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"config section 'model' must be a mapping, got {type(spec).__name__}")
        if "model_spec" in d:
            raise UnknownKeyError("unknown config key(s) ['model_spec']")
        for sec, retired in RETIRED_KEYS.items():
            if isinstance(d.get(sec), dict):
                d[sec] = {k: v for k, v in d[sec].items() if k not in retired or v != retired[k]}
        cfg: RunConfig = _build(cls, d, "")
        kw = dict(spec)
        cfg.model = ModelConfig.from_variant(kw.pop("variant", "OT"), **kw)
        cfg.model_spec = dict(spec)
        return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the field's type, naming the key on error.

    YAML 1.1 reads `3e-4` (no dot) as a string; a float field takes it as the number it means."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(args)}"
                              f"{did_you_mean(str(value), [str(a) for a in args])}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError):  # ConfigError is a ValueError
                continue
        raise ConfigError(f"config key {key!r}: {value!r} fits none of {args}")
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r}: {value!r} is not a number") from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp in (int, bool, str):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {where.rstrip('.') or '<root>'!r} must be a mapping, got "
                          f"{type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "model_spec"}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        suggestions = "".join(did_you_mean(k, fields).replace("'", "'" + where, 1) if where else did_you_mean(k, fields)
                              for k in unknown)
        raise UnknownKeyError(f"unknown config key(s) {[where + k for k in unknown]}{suggestions}; known in "
                              f"{where.rstrip('.') or 'the top level'}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for k, v in d.items():
        sub = typing.cast("Callable[[], Any] | None",  # `is not MISSING` does not narrow for mypy
                          fields[k].default_factory if fields[k].default_factory is not dataclasses.MISSING else None)
        if sub is not None and dataclasses.is_dataclass(sub()):
            kw[k] = _build(type(sub()), v, f"{where}{k}.")
        else:
            kw[k] = _coerce(v, hints[k], where + k)
    return cls(**kw)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` (any depth) in a raw config mapping, creating the sections it lacks."""
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
    d[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: the embedded default) and apply `a.b=value` overrides (YAML-typed); every value
    is validated here, with its key named (`check_files` checks the files a run reads)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"config file {p} does not exist" if not p.exists() else f"{p} is not a file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise InputFileError(f"config file {p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form section.key=value")
        k, v = ov.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML") from None
        set_dotted(raw, k.strip(), value)
    return RunConfig.from_dict(raw)


def check_files(cfg: RunConfig) -> None:
    """The files a run reads must exist where it is driven (called by every driver before Ray starts; not by
    `load_config`, which also validates configs meant for another machine, e.g. a cluster's)."""
    ds = cfg.train.deepspeed_config
    if cfg.train.strategy == "deepspeed" and "://" not in ds and not Path(ds).is_file():
        raise InputFileError(f"config key 'train.deepspeed_config': file {ds} does not exist")
    shards, src = Path(cfg.data.shards), Path(cfg.data.source)
    if not (shards / "manifest.json").is_file() and not src.exists() and not cfg.data.synth_if_missing:
        raise InputFileError(f"config keys 'data.shards' / 'data.source': no packed shards at {shards} "
                             f"(manifest.json) and no dataset at {src}")
