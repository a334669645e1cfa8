"""Evaluation over the whole KG, in parallel across workers.

1. Each rank encodes its share of the KG once (the KG stream gives every entity to exactly one rank):
   entity features stay where they were computed, so no rank ever holds the whole KG's features.
2. Each rank encodes its share of the split's mentions; the mention features are all-gathered (a split has
   far fewer mentions than the KG has entities).
3. Every rank scores all mentions against its entities, chunked. The rank holding a mention's gold entity
   contributes its gold score (all-reduce MAX); then each rank counts its non-gold entities scoring
   >= the gold score (all-reduce SUM): rank = 1 + count, the pessimistic tie rule of `otmel.metrics`.

With world_size 1 every collective is skipped, so the same code runs in tests and single-process tools.

Devices: every batch goes to `device` (the worker's; by default the model's) through
`otmel.train.worker.devices.to_device`; features, scores, the gold scores and the counts stay there, and a tensor
that goes through a collective is moved where the backend takes it (`distributed.collective_device`: no copy for
NCCL on a GPU, gloo on the CPU). The ranks come back on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from otmel.metrics import metrics_from_ranks
from otmel.model import OTMEL, EntityFeatures, MentionFeatures
from otmel.model.encoder import image_size_of
from otmel.model.modes import eval_mode
from otmel.train.worker.devices import model_device, to_device
from otmel.train.worker.distributed import all_gather_uneven, collective_device


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType, world_size: int) -> torch.Tensor:
    """`t` reduced over the ranks (in place where the backend takes `t`'s device), on `t`'s device."""
    if world_size > 1:
        home, t = t.device, t.to(collective_device(t.device))
        dist.all_reduce(t, op=op)
        t = t.to(home)
    return t


@torch.no_grad()
def encode_kg(model: OTMEL, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None = None
              ) -> EntityFeatures | None:
    """This rank's entities' features, encoded on `device` (default: the model's), kept there."""
    device = device if device is not None else model_device(model)
    parts = [model.encode_entities(to_device(b, device)) for b in batches]
    return EntityFeatures.cat(parts) if parts else None


def empty_batch(side: str, max_len: int, image_size: int, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """A one-row placeholder batch of mentions (`side="m"`) or entities (`"e"`) on `device` (HF attention cannot run
    on zero rows): a rank whose share of a small split or KG is empty encodes it and keeps zero rows, so it still
    joins the gathers with the right shapes."""
    batch = {
        f"{side}_input_ids": torch.ones(1, max_len, dtype=torch.long, device=device),
        f"{side}_attention_mask": torch.ones(1, max_len, dtype=torch.long, device=device),
        f"{side}_pixel_values": torch.zeros(1, 3, image_size, image_size, device=device),
        f"{side}_image_mask": torch.zeros(1, dtype=torch.bool, device=device),
        "e_index": torch.zeros(1, dtype=torch.long, device=device),
    }
    if side == "m":
        batch["m_index"] = torch.zeros(1, dtype=torch.long, device=device)
    return batch


@torch.no_grad()
def encode_split(
    model: OTMEL, batches: Iterable[dict[str, torch.Tensor]], world_size: int, image_size: int = 224,
    device: torch.device | str | None = None,
) -> tuple[MentionFeatures, torch.Tensor, torch.Tensor]:
    """All mentions of a split on every rank: (features, gold rows, m_index), in m_index order, on `device`
    (default: the model's)."""
    device = device if device is not None else model_device(model)
    feats, gold, index = [], [], []
    for b in batches:
        b = to_device(b, device)
        feats.append(model.encode_mentions(b))
        gold.append(b["e_index"].long())
        index.append(b["m_index"].long())
    if not feats:
        b = empty_batch("m", model.cfg.max_len, image_size, device)
        feats, gold, index = [model.encode_mentions(b).select(slice(0, 0))], [b["e_index"][:0]], [b["m_index"][:0]]
    m = MentionFeatures.cat(feats)
    g, i = torch.cat(gold), torch.cat(index)
    if world_size > 1:
        m, g, i = all_gather_uneven(m, world_size), all_gather_uneven(g, world_size), all_gather_uneven(i, world_size)
    order = torch.argsort(i)
    return m.select(order), g[order], i[order]


@torch.no_grad()
def gold_ranks_distributed(
    model: OTMEL,
    mentions: MentionFeatures,
    gold: torch.Tensor,  # (M,) gold entity rows
    entities: EntityFeatures | None,  # this rank's share of the KG
    world_size: int,
    mention_chunk: int = 64,
    keep_scores_limit: int = 50_000_000,
) -> torch.Tensor:
    """(M,) pessimistic ranks of each gold entity among all entities of all ranks, on the features' device.

    Two passes over (mention chunk x local entities): the first finds the gold scores, the second counts
    competitors. Score blocks are kept between the passes when M x E_local <= `keep_scores_limit`, else
    recomputed with the same chunking, so both passes see bitwise-identical scores (exact ties stay ties).
    The gold scores, the found flags and the counts are built on the mention features' device (a rank with no
    entities joins the collectives with tensors there too)."""
    M = len(gold)
    device = mentions.t.device
    gold = gold.to(device)
    neg_inf = torch.finfo(torch.float32).min
    gold_score = torch.full((M,), neg_inf, device=device)
    chunks = [slice(s, s + mention_chunk) for s in range(0, M, mention_chunk)]

    def block(sl: slice) -> torch.Tensor:
        assert entities is not None
        return model.score(mentions.select(sl), entities).S_O.float()  # (c, E_local)

    found = torch.zeros(M, device=device)  # 1 where some rank holds the mention's gold entity
    keep = entities is not None and M * len(entities) <= keep_scores_limit
    kept: list[torch.Tensor] = []
    if entities is not None:
        for sl in chunks:
            S = block(sl)
            is_gold = gold[sl].unsqueeze(1) == entities.ids.unsqueeze(0)  # (c, E_local)
            # as otmel.metrics: a NaN gold score counts as -inf, a NaN competitor as +inf (never helps the gold)
            gold_score[sl] = torch.where(is_gold, torch.nan_to_num(S, nan=neg_inf), neg_inf).amax(1)
            found[sl] = is_gold.any(1).float()
            if keep:
                kept.append(S)
    gold_score = _all_reduce(gold_score, dist.ReduceOp.MAX, world_size)
    found = _all_reduce(found, dist.ReduceOp.MAX, world_size)  # a NaN gold score is a worst rank, not a missing gold
    if bool((found == 0).any()):
        missing = gold[found == 0][:5].tolist()
        raise RuntimeError(f"gold entities missing from the KG stream (rows {missing}...): KG shards incomplete?")
    count = torch.zeros(M, dtype=torch.long, device=device)
    if entities is not None:
        for k, sl in enumerate(chunks):
            S = torch.nan_to_num(kept[k] if keep else block(sl), nan=float("inf"))
            competitor = gold[sl].unsqueeze(1) != entities.ids.unsqueeze(0)
            count[sl] = ((gold_score[sl].unsqueeze(1) <= S) & competitor).sum(1)
    return _all_reduce(count, dist.ReduceOp.SUM, world_size) + 1


@torch.no_grad()
def evaluate_split(
    model: OTMEL,
    kg_batches: Iterable[dict[str, torch.Tensor]],
    mention_batches: Iterable[dict[str, torch.Tensor]],
    world_size: int,
    entities: EntityFeatures | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of one split over the whole KG, computed on `device` (default: the model's); the ranks are returned
    on the CPU. Pass `entities` (on `device`) to reuse a KG cache across splits."""
    device = device if device is not None else model_device(model)
    with eval_mode(model):
        if entities is None:
            entities = encode_kg(model, kg_batches, device)
        mentions, gold, _ = encode_split(model, mention_batches, world_size, image_size_of(model.cfg), device)
        ranks = gold_ranks_distributed(model, mentions, gold, entities, world_size).cpu()
    return metrics_from_ranks(ranks), ranks
