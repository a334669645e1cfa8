"""Real training steps and evaluation passes of the configured model at full size, measured on this machine.

One *probe* is one training step exactly as a worker takes it (`OTMEL.forward` with the global negative pool, the
loss, backward; the optimizer's states are model states, counted by `otmel.plan._states`), for a per-worker batch
`b` of mentions, a pool of `P` entity columns (the gold entities of `P / b` workers, gathered as `gather_features`
does) and the matcher chunked over `c` entities, with every text at `model.max_len` tokens and every image present
(the worst case). It returns

- the peak of what the step allocates on top of the model states (`otmel.plan._memory.StorageWatch`), with the
  bytes of the gradients and of autocast's weight copies apart;
- the matmul FLOPs of forward + backward and the bytes every other operator moves (`otmel.plan._counters`);
- the wall time of the step on this machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from otmel.config import ModelConfig
from otmel.loss import OTMELLoss
from otmel.model import OTMEL
from otmel.plan._counters import Traffic, flop_counter
from otmel.plan._memory import StorageWatch
from otmel.train.worker.distributed import gather_features


@dataclass(frozen=True)
class Probe:
    b: int  # mentions per worker
    P: int  # entity columns of the pool (b * workers for global negatives)
    c: int  # matcher chunk (entities scored at once)
    peak_bytes: int  # largest live bytes the step allocated, gradients and weight casts left out
    grad_bytes: int
    weight_cast_bytes: int
    flops: int  # matmul-class FLOPs of forward + backward
    traffic: int  # bytes moved by every other operator (otmel.plan._counters.Traffic)
    seconds: float  # wall time of the step on this machine (0: not timed)

    @property
    def rows(self) -> int:
        """Samples through the towers: b mentions + b gold entities."""
        return 2 * self.b


def synthetic_batch(model: OTMEL, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """b (mention, gold entity) pairs: every text `max_len` real tokens, every image present."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    towers: Any = model.encoder  # HF towers: untyped .config
    vocab = int(towers.text_model.config.vocab_size)
    batch: dict[str, torch.Tensor] = {}
    for p in "me":
        batch[f"{p}_input_ids"] = torch.randint(4, max(5, vocab - 4), (b, cfg.max_len), generator=g)
        batch[f"{p}_attention_mask"] = torch.ones(b, cfg.max_len, dtype=torch.long)
        if cfg.use_images:
            size = model.encoder.image_size
            batch[f"{p}_pixel_values"] = torch.randn(b, 3, size, size, generator=g)
        batch[f"{p}_image_mask"] = torch.full((b,), cfg.use_images)
    batch["e_index"] = torch.arange(b)
    batch["m_index"] = torch.arange(b)
    device = model.logit_scale.device  # where the model is (`build_probe_model(..., device=)`)
    return {k: v.to(device) for k, v in batch.items()}


def _copies(t: torch.Tensor, with_grad: bool, n: int) -> list[torch.Tensor]:
    """Stand-in for an all-gather over n workers: this worker's tensor and n - 1 others (other entities' features)."""
    def other(i: int) -> torch.Tensor:
        if t.is_floating_point():
            return t.detach().clone().add_(i + 1)
        return t.clone() if t.dtype == torch.bool else t + (i + 1) * len(t)  # masks as they are, distinct entity ids

    return [t, *(other(i) for i in range(n - 1))]


@contextlib.contextmanager
def _chunk(model: OTMEL, c: int) -> Iterator[None]:
    matchers = [m for m in (getattr(model, "match_t", None), getattr(model, "match_v", None)) if m is not None]
    old = [m.chunk for m in matchers]
    for m in matchers:
        m.chunk = c
    try:
        yield
    finally:
        for m, o in zip(matchers, old, strict=True):
            m.chunk = o


def train_probe(model: OTMEL, b: int, P: int, c: int, timed: bool = False) -> Probe:
    """One measured training step (see the module docstring): memory in one pass, FLOPs and traffic in a second
    (the counters would otherwise hold tensors the peak should not see); `timed`: a third, unwatched, for its wall
    time. `P` must be a multiple of `b`."""
    if P % b:
        raise ValueError(f"pool {P} is not a multiple of the batch {b}")
    workers = P // b
    loss_fn = OTMELLoss(model.cfg.kd, model.cfg.kd_weight, model.cfg.kd_target)
    batch = synthetic_batch(model, b)

    def loss() -> torch.Tensor:
        pool = lambda e: gather_features(e, 0, workers, all_gather=lambda t, g: _copies(t, g, workers))  # noqa: E731
        return loss_fn(**model(batch, entity_pool=pool))["loss"]

    model.train()
    seconds = 0.0
    with _chunk(model, c):
        model.zero_grad(set_to_none=True)
        watch = StorageWatch(model, keep=list(batch.values()))
        with watch:
            watch.backward(loss())
        peak, _ = watch.timeline.peak(("activations",))
        grads = sum(int(p.grad.untyped_storage().nbytes()) for p in model.parameters() if p.grad is not None)
        casts = sum(d for k, d in watch.timeline.events if d > 0 and watch.timeline.kind[k] == "weight_casts")
        del watch
        model.zero_grad(set_to_none=True)
        with flop_counter() as fc, Traffic() as traffic:
            loss().backward()
        if timed:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss().backward()
            if batch["m_index"].is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return Probe(b=b, P=P, c=c, peak_bytes=int(peak), grad_bytes=grads, weight_cast_bytes=int(casts),
                 flops=int(fc.get_total_flops()), traffic=traffic.bytes, seconds=seconds)


def tower_flops(model: OTMEL, b: int) -> dict[str, int]:
    """Forward + backward FLOPs of each tower alone on `b` samples, as a training step runs it (the text tower's
    input is its embedding, the vision tower's the pixels, which need no gradient)."""
    batch = synthetic_batch(model, b)
    enc = model.encoder
    runs = {"text": lambda: enc.text_model(input_ids=batch["m_input_ids"], attention_mask=batch["m_attention_mask"])}
    if model.cfg.use_images:
        runs["vision"] = lambda: enc.vision_model(pixel_values=batch["m_pixel_values"])
    out = {}
    for name, run in runs.items():
        with flop_counter() as fc:
            run().last_hidden_state.float().sum().backward()
        out[name] = int(fc.get_total_flops())
    model.zero_grad(set_to_none=True)
    return out


@dataclass(frozen=True)
class EvalCost:
    """Forward cost of a whole-KG evaluation's three parts, per unit: (matmul FLOPs, other operators' bytes)."""

    per_entity: tuple[int, int]  # encoding one KG entity (once per evaluation)
    per_mention: tuple[int, int]  # encoding one mention
    per_pair: tuple[int, int]  # scoring one (mention, entity) pair with the full model


@torch.no_grad()
def eval_cost(model: OTMEL, n_m: int = 2, n_e: int = 4) -> EvalCost:
    model.eval()
    batch = synthetic_batch(model, max(n_m, n_e), seed=1)
    half = {k: v[:n_m] for k, v in batch.items()}
    found: dict[str, Any] = {}
    costs: list[tuple[int, int]] = []
    for what, run in (("e", lambda: model.encode_entities(batch)), ("m", lambda: model.encode_mentions(half)),
                      ("s", lambda: model.score(found["m"], found["e"]))):
        with flop_counter() as fc, Traffic() as traffic:
            found[what] = run()
        costs.append((int(fc.get_total_flops()), traffic.bytes))
    model.train()
    n_all = max(n_m, n_e)
    (fe, be), (fm, bm), (fs, bs) = costs
    return EvalCost(per_entity=(fe // n_all, be // n_all), per_mention=(fm // n_m, bm // n_m),
                    per_pair=(fs // (n_m * n_all), bs // (n_m * n_all)))


def build_probe_model(model_cfg: ModelConfig, bf16: bool, seed: int = 0, device: str = "cpu") -> OTMEL:
    """The configured model with random weights (no weight file read) on `device`; `bf16`: the module in bf16, as
    DeepSpeed's bf16 mode runs it (weights, activations and gradients bf16; the fp32 master weights and Adam states
    are model states, counted by `otmel.plan._states`). Every probe's batch is made on the model's device."""
    torch.manual_seed(seed)
    model = OTMEL(model_cfg, random_init=True)
    return model.to(device=device, dtype=torch.bfloat16 if bf16 else None)
