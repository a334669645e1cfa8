"""The run configuration: one YAML per dataset (`configs/NAME.yaml`) plus `section.key=value` overrides.

Loading is strict: an unknown or mistyped key fails at start-up with the key named, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from otmel.config import ModelConfig


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
    grad_clip: float = 1.0
    eval_every: int = 1  # validate every N epochs (and after the last)
    eval_batch_size: int = 64
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: one per epoch)
    fail_at_step: int | None = None  # fault injection: rank 1 (or 0 alone) exits once at this global step
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
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(f"config keys 'train.lr' and 'train.head_lr' must be > 0, got {self.lr}, {self.head_lr}")
        if self.hard_negatives != "none":
            if self.hard_per_mention < 1 or self.hard_pool < self.hard_per_mention:
                raise ValueError("config keys 'train.hard_per_mention' >= 1 and 'train.hard_pool' >= it are "
                                 f"required, got {self.hard_per_mention} and {self.hard_pool}")
            if self.mine_every < 1 or self.mine_start < 0:
                raise ValueError("config keys 'train.mine_every' >= 1 and 'train.mine_start' >= 0 are required")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass
class RunSection:
    storage: str = "runs"  # Ray Train storage path (local folder, or s3://... on a cluster)
    name: str | None = None  # run name; default: the config name plus a timestamp
    max_failures: int = 1  # worker failures tolerated (Ray Train FailureConfig)
    keep_checkpoints: int = 2
    ray_address: str | None = None  # None: join RAY_ADDRESS / the job's cluster, else start a local Ray


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "otmel"
    group: str | None = None
    # "auto": online only when an API key is configured (WANDB_API_KEY or a netrc login), else offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


@dataclass
class RunConfig:
    name: str = "synth"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides; `variant` picks a preset
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunSection = field(default_factory=RunSection)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def model_config(self) -> ModelConfig:
        kw = dict(self.model)
        return ModelConfig.from_variant(kw.pop("variant", "OT"), **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "")


_SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the field's type, naming the key on error.

    YAML 1.1 reads `3e-4` (no dot) as a string; a float field takes it as the number it means."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"config key {key!r}: {value!r} fits none of {args}")
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key!r}: {value!r} is not a number") from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp in (int, bool, str):
        raise TypeError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"config section {where or '<root>'!r} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise KeyError(f"unknown config key(s) {[where + k for k in unknown]}; known in "
                       f"{where.rstrip('.') or 'the top level'}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        sub = fields[k].default_factory if fields[k].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub()):
            kw[k] = _build(type(sub()), v, f"{where}{k}.")
        else:
            kw[k] = _coerce(v, hints[k], where + k)
    return cls(**kw)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: the embedded default) and apply `a.b=value` overrides (YAML-typed)."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not of the form section.key=value")
        k, v = ov.split("=", 1)
        _set_dotted(raw, k.strip(), yaml.safe_load(v))
    cfg = RunConfig.from_dict(raw)
    cfg.model_config()  # validate the model section now: unknown keys / bad values fail at start-up
    return cfg
