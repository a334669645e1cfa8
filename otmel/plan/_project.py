"""`otmel plan`: measure the configured model on this machine, then project the run onto the user's GPUs.

    plan = make_plan(cfg, Hardware(gpus=4, gpu_memory=80 * GiB, tflops=312, mfu=0.35), DatasetSize.of(cfg))
    # or: measured = measure(cfg); project(cfg, hw, data, measured) for each GPU type / batch (no re-measuring)

Per-GPU peak = model states (`otmel.plan._states`, ZeRO stage of the config's DeepSpeed JSON, world = gpus)
+ activations (`otmel.plan._fit.StepModel` at the config's per-GPU batch, pool and matcher chunk) + an allowance
(`ALLOWANCE`: the CUDA context and cuBLAS / NCCL workspaces, which no tensor shows, and the caching allocator's
fragmentation). Time of a step = matmul FLOPs / (tflops x mfu) + the other operators' bytes / (bandwidth x
`BANDWIDTH_EFFICIENCY`) (otmel/plan/_counters.py): a projection at stated utilisations, not a measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from otmel.data.manifest import MANIFEST, split_counts
from otmel.errors import ConfigError
from otmel.link.ann import ANN_KINDS
from otmel.plan._fit import PROBES, StepModel, fit
from otmel.plan._index_size import EntityShapes, entity_shapes, index_size
from otmel.plan._states import ModelStates, largest_layer_params, model_states
from otmel.plan._step import EvalCost, Probe, build_probe_model, eval_cost, synthetic_batch, tower_flops, train_probe
from otmel.runconfig import RunConfig

GiB = 1024**3
CONTEXT_BYTES = 1 * GiB  # CUDA context + library workspaces per GPU process
FRAGMENTATION = 0.10  # the caching allocator's slack, as a share of the activations
BANDWIDTH_EFFICIENCY = 0.6  # share of the GPU's memory bandwidth an unfused elementwise kernel sustains
ALLOWANCE = f"{CONTEXT_BYTES // GiB} GiB CUDA context and workspaces + {FRAGMENTATION:.0%} of the activations"

# Table 5 of the paper (train / valid / test mentions, KG entities, entities with an image).
PAPER_DATASETS: dict[str, dict[str, int]] = {
    "richpediamel": {"train": 12463, "dev": 1780, "test": 3562, "kg": 160933, "kg_images": 86769},
    "wikimel": {"train": 18092, "dev": 2585, "test": 5169, "kg": 109976, "kg_images": 67195},
    "wikidiverse": {"train": 11351, "dev": 1664, "test": 2078, "kg": 132460, "kg_images": 67309},
}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory: int  # bytes
    tflops: float  # dense bf16 (or fp32) TFLOP/s of one GPU
    mfu: float  # the share of it the matmuls achieve (assumed)
    bandwidth: float = 2039.0  # GB/s of one GPU's memory (an A100 80GB SXM)


@dataclass(frozen=True)
class DatasetSize:
    train: int
    dev: int
    test: int
    kg: int
    kg_images: int
    source: str

    @classmethod
    def of(cls, cfg: RunConfig, overrides: dict[str, int] | None = None) -> DatasetSize:
        """The packed shards' manifest when there is one, else the paper's Table 5 for its three datasets;
        `overrides` (train / dev / test / kg / kg_images) win over both."""
        counts: dict[str, int] = {}
        source = ""
        manifest = Path(cfg.data.shards) / MANIFEST
        if manifest.is_file():
            c = split_counts(Path(cfg.data.shards))
            counts = {"train": c["train"], "dev": c["dev"], "test": c["test"], "kg": c["kg"], "kg_images": c["kg"]}
            source = f"{manifest} (every entity assumed to have an image)"
        elif cfg.name in PAPER_DATASETS:
            counts, source = dict(PAPER_DATASETS[cfg.name]), f"the paper's Table 5 ({cfg.name})"
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        counts |= given
        if given:
            source = (source + " + " if source else "") + "command line"
        missing = [k for k in ("train", "dev", "test", "kg") if k not in counts]
        if missing:
            raise ConfigError(f"no dataset size for config {cfg.name!r}: no manifest at {manifest} and not a paper "
                              f"dataset; pack it (otmel pack) or pass --train-mentions/--dev-mentions/"
                              f"--test-mentions/--kg-entities")
        counts.setdefault("kg_images", counts["kg"])
        return cls(source=source, **{k: int(counts[k]) for k in ("train", "dev", "test", "kg", "kg_images")})


@dataclass
class Plan:
    config: str
    model: dict[str, Any]  # parameters, shapes, precision
    hardware: dict[str, Any]
    dataset: dict[str, Any]
    layout: dict[str, Any]  # per-GPU batch, pool, chunk, ZeRO stage
    probes: list[dict[str, Any]]
    step_model: dict[str, float]
    memory: dict[str, int]  # per GPU: params, grads, optimizer, towers, matcher, other, allowance, peak
    fits: bool
    max_batch: int  # the largest per-GPU batch that fits (0: not even 1)
    flops: dict[str, float]
    seconds: dict[str, float]
    index: list[dict[str, Any]]
    check: dict[str, Any] | None = None
    assumptions: list[str] = field(default_factory=list)
    measured_on: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _ds_json(cfg: RunConfig) -> dict[str, Any]:
    with open(cfg.train.deepspeed_config) as f:
        return dict(json.load(f))


def _precision_bf16(cfg: RunConfig) -> tuple[bool, bool]:
    """(activations in bf16, model states in DeepSpeed's bf16 layout) of `cfg` on a GPU, as `train.precision`
    resolves there (`otmel.train.worker.precision`: bf16 weights under DeepSpeed, else bf16 autocast)."""
    from otmel.train.worker.precision import resolve_precision

    p = resolve_precision(cfg.train.precision, use_gpu=True, strategy=cfg.train.strategy, ds_config=_ds_json(cfg))
    return p.engine == "bf16" or p.autocast_dtype == torch.bfloat16, p.engine == "bf16"


def towers_name(cfg: RunConfig) -> str:
    """What the towers are: `model.pretrained`, or the separate `text_model` (+ `vision_model`)."""
    m = cfg.model
    if not m.text_model:
        return m.pretrained
    return m.text_model + (f" + {m.vision_model}" if m.use_images and m.vision_model else " (text only)")


def _stage(cfg: RunConfig) -> int:
    return int(_ds_json(cfg).get("zero_optimization", {}).get("stage", 0)) if cfg.train.strategy == "deepspeed" else 0


def _layout(cfg: RunConfig, b: int, gpus: int) -> tuple[int, int, int]:
    """(tower rows, pool columns, matcher chunk) of a worker with `b` mentions."""
    hard = cfg.train.hard_per_mention if cfg.train.hard_negatives != "none" else 0
    entities = b * (1 + hard)
    P = entities * gpus if cfg.train.negatives == "global" else entities
    return b + entities, P, min(cfg.model.match_chunk, P)


def _activations(step: StepModel, cfg: RunConfig, b: int, gpus: int) -> dict[str, int]:
    rows, P, c = _layout(cfg, b, gpus)
    towers, matcher = step.towers(rows), step.matcher(b, P, c)
    act = max(0.0, step.m0) + towers + matcher
    return {"towers": int(towers), "matcher": int(matcher), "other": int(max(0.0, step.m0)),
            "allowance": int(CONTEXT_BYTES + FRAGMENTATION * act)}


def _peak(states: ModelStates, act: dict[str, int]) -> int:
    return states.total + sum(act.values())


@dataclass
class Measurements:
    """What `measure` found on this machine: enough to project onto any GPUs, batch and pool (`project`)."""

    device: str  # where the probes ran
    bf16: bool  # activations (the measured module) in bf16
    states_bf16: bool  # model states in DeepSpeed's bf16 layout (16-bit weights, fp32 master)
    zero_stage: int
    params: int
    trainable: int
    largest_layer: int
    image_size: int
    probes: list[Probe]
    step: StepModel
    unit: EvalCost
    towers: dict[str, float]  # forward + backward FLOPs per sample of each tower
    shapes: EntityShapes
    check: dict[str, Any] | None


def measure(cfg: RunConfig, check_batch: int | None = None, progress: Any = None, device: str = "cpu"
            ) -> Measurements:
    """Build the configured model at full size with random weights on `device`; run the `PROBES` training steps, the
    evaluation's unit costs and the towers alone; with `check_batch`, one more step at that batch (a pool of 2
    workers, the configured chunk) beside the fit's projection of it."""
    say = progress or (lambda _msg: None)
    bf16, states_bf16 = _precision_bf16(cfg)
    say(f"building {towers_name(cfg)} at full size with random weights ({'bf16' if bf16 else 'fp32'}, {device})")
    model = build_probe_model(cfg.model, bf16, device=device)
    probes: list[Probe] = []
    for b, P, c in PROBES:
        say(f"training step: batch {b}, pool {P}, matcher chunk {c}")
        probes.append(train_probe(model, b, P, c, timed=(b, P, c) == PROBES[1]))
    step = fit(probes)
    check = None
    if check_batch:
        _, P, c = _layout(cfg, check_batch, 2)
        say(f"check: training step at batch {check_batch}, pool {P}, chunk {c}")
        got = train_probe(model, check_batch, P, c)
        want = step.activations(check_batch, P, c)
        check = {"b": check_batch, "P": P, "c": c, "measured_bytes": got.peak_bytes, "projected_bytes": int(want),
                 "error": (want - got.peak_bytes) / max(got.peak_bytes, 1),
                 "measured_flops": got.flops, "projected_flops": step.flops(check_batch, P)}
    one_entity = {k: v[:1] for k, v in synthetic_batch(model, 1).items() if k.startswith("e_")}
    return Measurements(
        device=device, bf16=bf16, states_bf16=states_bf16, zero_stage=_stage(cfg),
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_layer=largest_layer_params(model), image_size=model.encoder.image_size if cfg.model.use_images else 0,
        probes=probes, step=step, unit=eval_cost(model),
        towers={k: v / 2 for k, v in tower_flops(model, 2).items()}, shapes=entity_shapes(model, one_entity),
        check=check)


def make_plan(cfg: RunConfig, hw: Hardware, data: DatasetSize, check_batch: int | None = None,
              progress: Any = None) -> Plan:
    """`project(cfg, hw, data, measure(cfg, check_batch, progress))`."""
    return project(cfg, hw, data, measure(cfg, check_batch, progress))


def project(cfg: RunConfig, hw: Hardware, data: DatasetSize, m: Measurements) -> Plan:
    """The run of `cfg` (its per-GPU batch, negatives, chunk, epochs) on `hw` (see the module docstring)."""
    step, unit, shapes, bf16, stage, trainable = m.step, m.unit, m.shapes, m.bf16, m.zero_stage, m.trainable
    b, gpus = cfg.train.batch_size, hw.gpus
    states = model_states(trainable, stage, gpus, m.states_bf16, m.largest_layer)
    act = _activations(step, cfg, b, gpus)
    peak = _peak(states, act)
    max_batch = 0
    for cand in range(1, 1 << 14):  # peak grows monotonically with the batch
        if _peak(states, _activations(step, cfg, cand, gpus)) > hw.gpu_memory:
            break
        max_batch = cand
    rows, P, c = _layout(cfg, b, gpus)
    step_flops = step.flops(b, P, rows)
    rate, bw = hw.tflops * 1e12 * hw.mfu, hw.bandwidth * 1e9 * BANDWIDTH_EFFICIENCY  # one GPU

    def seconds(cost: tuple[float, float]) -> float:
        return cost[0] / rate + cost[1] / bw

    step_s = seconds((step_flops, step.traffic(b, P, rows)))
    epoch_s = math.ceil(data.train / (b * gpus)) * step_s

    def eval_s(mentions: int) -> float:  # the KG and the mentions split over the GPUs
        parts = ((data.kg, unit.per_entity), (mentions, unit.per_mention), (mentions * data.kg, unit.per_pair))
        return sum(n * seconds(cost) for n, cost in parts) / gpus

    evals = math.ceil(cfg.train.epochs / cfg.train.eval_every)
    index = [asdict(index_size(kind, shapes, data.kg, data.kg_images, float(shapes.input_len)))
             for kind in ANN_KINDS]
    return Plan(
        config=cfg.name,
        model={"pretrained": towers_name(cfg), "params": m.params, "trainable": trainable,
               "largest_layer": m.largest_layer, "precision": "bf16" if bf16 else "fp32", "max_len": cfg.model.max_len,
               "hidden_dim": cfg.model.hidden_dim, "image_size": m.image_size},
        hardware=asdict(hw), dataset=asdict(data),
        layout={"batch_per_gpu": b, "gpus": gpus, "tower_rows": rows, "pool": P, "match_chunk": c,
                "zero_stage": stage, "negatives": cfg.train.negatives, "match_checkpoint": cfg.model.match_checkpoint},
        probes=[asdict(p) for p in m.probes],
        step_model=asdict(step),
        memory={"params": int(states.params), "grads": int(states.grads), "optimizer": int(states.optimizer),
                "gathered_layer": int(states.gathered_layer), "model_states": states.total, **act, "peak": peak},
        fits=peak <= hw.gpu_memory, max_batch=max_batch,
        flops={"per_step": step_flops, "per_sample": step_flops / b,
               "text_tower_per_sample": m.towers.get("text", 0.0),
               "vision_tower_per_sample": m.towers.get("vision", 0.0),
               "traffic_per_step": step.traffic(b, P, rows), "eval_per_entity": unit.per_entity[0],
               "eval_per_mention": unit.per_mention[0], "eval_per_pair": unit.per_pair[0],
               "eval_traffic_per_pair": unit.per_pair[1]},
        seconds={"step": step_s, "epoch": epoch_s, "dev_eval": eval_s(data.dev), "test_eval":
                 eval_s(data.test), "run": cfg.train.epochs * epoch_s + evals * eval_s(data.dev) + eval_s(data.test),
                 "this_machine_step": m.probes[1].seconds},
        measured_on=m.device,
        index=index, check=m.check,
        assumptions=[f"matmuls at {hw.mfu:.0%} of {hw.tflops:g} TFLOP/s per GPU, other operators at "
                     f"{BANDWIDTH_EFFICIENCY:.0%} of {hw.bandwidth:g} GB/s, unfused", f"allowance: {ALLOWANCE}",
                     "every text at max_len tokens and every image present (worst case)",
                     "the GPU side only: data loading (2 JPEG decodes per sample) and checkpoint writes not counted",
                     f"index: at most {shapes.input_len} text tokens and ~32 bytes of QID + name per entity"],
    )
