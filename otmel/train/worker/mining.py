"""Mined hard negatives: the current model's top-k wrong entities for every training mention, in parallel.

Every rank encodes its exactly-once share of the KG (pooled vectors only: what the cheap first-stage score of
`otmel.model.first_stage` needs) and the shares are all-gathered, so each rank holds the compact KG (Ne x a few d).
Each rank then encodes its exactly-once share of the training mentions, scores them against the whole KG with
the first-stage score (a few matrix products, no pairwise OT), drops the gold and keeps the top k. The
(m_index, rows) pairs are all-gathered into one (N_train, k) table, identical on every rank. Cost per refresh:
one forward pass over the KG and the training split, split across the ranks.

Like `otmel.train.worker.distributed`, no Ray here: the caller passes its loaders, the world size and its device
(`otmel.train.worker.devices`: the batches are moved there, the scores and the top k computed there); the table comes
back on the CPU, where the training batches get their hard negatives before they are moved.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch

from otmel.data.hard_negatives import NO_ENTITY, hard_negative_seed
from otmel.data.loaders import eval_loader, kg_loader
from otmel.data.manifest import num_entities, split_counts
from otmel.data.transforms import Preprocessor
from otmel.model import OTMEL, EntityFeatures
from otmel.model.encoder import image_size_of
from otmel.model.first_stage import FirstStage, first_stage_scores
from otmel.model.modes import eval_mode
from otmel.runconfig import DataConfig, TrainConfig
from otmel.train.worker.devices import model_device, to_device
from otmel.train.worker.distributed import all_gather_uneven
from otmel.train.worker.evaluate import empty_batch


def _compact(e: EntityFeatures) -> EntityFeatures:
    """Only the pooled vectors (the first-stage score's inputs), not the token-level matcher queries."""
    return EntityFeatures(t=e.t, ids=e.ids, has_image=e.has_image, v=e.v, g=e.g)


@torch.no_grad()
def compact_kg(model: OTMEL, kg_batches: Iterable[dict[str, torch.Tensor]], world_size: int,
               image_size: int, device: torch.device | str | None = None) -> EntityFeatures:
    """The whole KG's pooled vectors on every rank, on `device` (default: the model's)."""
    device = device if device is not None else model_device(model)
    parts = [_compact(model.encode_entities(to_device(b, device))) for b in kg_batches]
    if not parts:
        empty = empty_batch("e", model.cfg.max_len, image_size, device)
        parts = [_compact(model.encode_entities(empty)).select(slice(0, 0))]
    return all_gather_uneven(EntityFeatures.cat(parts), world_size)


@torch.no_grad()
def mine_hard_negatives(
    model: OTMEL,
    kg_batches: Iterable[dict[str, torch.Tensor]],
    train_batches: Iterable[dict[str, torch.Tensor]],
    *,
    k: int,
    n_train: int,
    world_size: int,
    image_size: int,
    first_stage: FirstStage = "summary",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n_train, k) long table of KG rows, row `m_index`: the k best-scoring wrong entities, best first. Encoded and
    scored on `device` (default: the model's); the table is on the CPU."""
    device = device if device is not None else model_device(model)
    with eval_mode(model):
        kg = compact_kg(model, kg_batches, world_size, image_size, device)
        k_eff = min(k, max(len(kg) - 1, 0))
        idx = [torch.zeros(0, dtype=torch.long, device=device)]
        rows = [torch.zeros(0, k, dtype=torch.long, device=device)]
        for b in train_batches:
            b = to_device(b, device)
            m = model.encode_mentions(b)
            s = first_stage_scores(model, m, kg, first_stage)  # (B, Ne)
            s = s.masked_fill(kg.ids.unsqueeze(0) == b["e_index"].long().unsqueeze(1), float("-inf"))
            top = torch.topk(s, k_eff, dim=1).indices  # (B, k_eff)
            r = torch.full((len(s), k), NO_ENTITY, dtype=torch.long, device=device)
            r[:, :k_eff] = kg.ids[top]
            idx.append(b["m_index"].long())
            rows.append(r)
        m_index = all_gather_uneven(torch.cat(idx), world_size).cpu()
        found = all_gather_uneven(torch.cat(rows), world_size).cpu()
    table = torch.full((n_train, k), NO_ENTITY, dtype=torch.long)
    table[m_index] = found
    return table


def combine_tables(*tables: torch.Tensor | None) -> torch.Tensor | None:
    """Candidate tables side by side (columns of the first first); None where none is given."""
    present = [t for t in tables if t is not None]
    return torch.cat(present, 1) if present else None




class HardNegativeSchedule:
    """The training loop's hard negatives (`train.hard_negatives`): the candidate table of each epoch (lexical
    once, mined when due) and the per-step draw. The mined table is checkpointed (`state_tensors` / `restore`),
    so a run resumed inside an epoch uses the table that epoch started with."""

    def __init__(self, train: TrainConfig, data: DataConfig, preprocessor: Preprocessor, rank: int,
                 world_size: int, device: torch.device | str | None = None) -> None:
        from otmel.data.hard_negatives import EntityStore, HardNegatives, lexical_table

        t = train
        self.train, self.data, self.pre, self.rank, self.world = train, data, preprocessor, rank, world_size
        self.device = device  # where mining encodes (the worker's device; None: the model's)
        shards = Path(data.shards)
        self.n_train = split_counts(shards)["train"]
        self.hard = HardNegatives(EntityStore(shards), preprocessor, t.hard_per_mention, num_entities(shards))
        self.lexical = lexical_table(shards, t.hard_pool) if t.hard_negatives in ("lexical", "both") else None
        self.mined: torch.Tensor | None = None
        self.mined_epoch = -1

    def due(self, epoch: int) -> bool:
        t = self.train
        return t.hard_negatives in ("mined", "both") and epoch >= t.mine_start and \
            (epoch - t.mine_start) % t.mine_every == 0

    def start_epoch(self, model: OTMEL, epoch: int) -> dict[str, float]:
        """Mine if due (and not already mined for this epoch, e.g. restored); set the epoch's table."""
        out: dict[str, float] = {}
        if self.due(epoch) and self.mined_epoch != epoch:
            t0 = time.perf_counter()
            shards, kw = Path(self.data.shards), dict(
                batch_size=self.train.eval_batch_size, rank=self.rank, world_size=self.world,
                num_workers=self.data.num_workers)
            self.mined = mine_hard_negatives(
                model, kg_loader(shards, self.pre, **kw), eval_loader(shards, "train", self.pre, **kw),
                k=self.train.hard_pool, n_train=self.n_train, world_size=self.world,
                image_size=image_size_of(model.cfg), first_stage=self.train.mine_first_stage, device=self.device)
            self.mined_epoch = epoch
            out["hard/mine_seconds"] = time.perf_counter() - t0
        table = combine_tables(self.mined, self.lexical)
        if table is not None:
            self.hard.set_table(table)
            out["hard/candidates_per_mention"] = float((table != NO_ENTITY).sum(1).float().mean())
        return out

    def augment(self, batch: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, torch.Tensor]:
        """The CPU batch from the loader with its hard-negative entity rows appended (before it is moved)."""
        return self.hard.augment(batch, hard_negative_seed(self.train.seed, epoch, self.rank, step))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.mined is None:
            return {}
        return {"mined": self.mined, "mined_epoch": torch.tensor([self.mined_epoch])}

    def restore(self, extra: dict[str, torch.Tensor]) -> None:
        if "mined" in extra:
            self.mined, self.mined_epoch = extra["mined"].long(), int(extra["mined_epoch"][0])


__all__ = ["HardNegativeSchedule", "combine_tables", "compact_kg", "mine_hard_negatives"]
