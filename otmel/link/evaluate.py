"""Evaluating the linking modes on a packed split: metrics, wall time, and top-1 agreement between modes.

Ranks (rank 1 = best; ties pessimistic, as `otmel.metrics`):
- exhaustive: rank of the gold entity among all entities by S_O.
- two-stage: the ranking the linker returns: the K re-ranked candidates by S_O, then every other entity by
  its first-stage score. The gold rank is 1 + #{candidates scoring >= gold} when the gold is a candidate,
  else K + 1 + #{non-candidates whose first-stage score >= the gold's}.
Top-1 predictions break exact ties by the lower KG row in both modes.

When the exhaustive pass runs, a *sweep* can also be derived from it exactly, for any list of K and first
stages: the two-stage top-1 at K is the best S_O among the first-stage top-K, so agreement(K) and H@1(K)
need no further OT (`sweep_ks`). The real two-stage pass checks this against its own re-ranked scores.

`terms=True` also ranks the KG by each term of the score on its own (`TERM_NAMES`): which part of the model
carries the ranking, measured on the trained checkpoint without retraining anything.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from otmel.checkpoints import LoadedCheckpoint, load_checkpoint_model
from otmel.data.manifest import read_manifest, shard_infos
from otmel.data.shards import iter_shard
from otmel.link.index import EntityIndex
from otmel.link.index_build import load_or_build
from otmel.link.linker import check_options
from otmel.link.ranking import first_stage_chunks, rerank, retrieve, score_all, top_k
from otmel.metrics import gold_ranks, metrics_from_ranks
from otmel.model import EntityFeatures, MentionFeatures
from otmel.model.encoder import build_preprocessor
from otmel.model.first_stage import FirstStage, FirstStageQuery, mention_queries, stable_topk


def read_split(shards: str | Path, split: str, pre: Any, *, limit: int | None = None, seed: int = 0
               ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The mentions of a packed split as one batch (`m_*`, `e_index` = gold row, `m_index`) and their JSON
    records. `limit`: a seeded random subset of that many mentions (kept in split order); only those are
    decoded and preprocessed."""
    shards = Path(shards)
    infos = shard_infos(shards, split, read_manifest(shards))
    total = sum(s.samples for s in infos)
    if total == 0:
        raise ValueError(f"{shards}: the {split} split is empty")
    chosen = None
    if limit is not None and limit < total:
        chosen = set(random.Random(seed).sample(range(total), limit))
    items, metas, pos = [], [], 0
    for info in infos:
        for sample in iter_shard(shards / info.name, expected_samples=info.samples, expected_bytes=info.bytes):
            if chosen is None or pos in chosen:
                meta = json.loads(sample["json"])
                item = pre.mention({**meta, "image": sample.get("m.jpg")})
                item["e_index"] = torch.tensor(meta["e_index"], dtype=torch.long)
                item["m_index"] = torch.tensor(meta["m_index"], dtype=torch.long)
                items.append(item)
                metas.append(meta)
            pos += 1
    return default_collate(items), metas


@torch.no_grad()
def encode_mentions(loaded: LoadedCheckpoint, batch: dict[str, torch.Tensor], batch_size: int = 64
                    ) -> MentionFeatures:
    n = len(batch["m_index"])
    parts = [loaded.model.encode_mentions({k: v[s:s + batch_size] for k, v in batch.items()})
             for s in range(0, n, batch_size)]
    return MentionFeatures.cat(parts)


TERM_NAMES: dict[str, str] = {
    "S_F": "fusion score <g_m, g_e>",
    "S_T": "text matching (CA half + pooled half) / 2",
    "S_V": "image matching (pairs where both images exist; else 0)",
    "cos_t": "pooled text embeddings alone <t_m, t_e>",
    "ca_t": "text CA half alone cos(pool(A H_m), t_e) = 2 S_T - cos_t",
}


def term_scores(full: dict[str, torch.Tensor], m: MentionFeatures, e: EntityFeatures) -> dict[str, torch.Tensor]:
    """Each term of the score (`TERM_NAMES`) that this model has, as (Bm, Be), from `full_scores` output."""
    out: dict[str, torch.Tensor] = {k: full[k] for k in ("S_F", "S_T", "S_V") if k in full}
    if "S_T" in full:
        cos = m.t @ e.t.t()  # (Bm, Be)
        out["cos_t"], out["ca_t"] = cos, 2 * full["S_T"] - cos
    return out


@torch.no_grad()
def run_exhaustive(loaded: LoadedCheckpoint, m: MentionFeatures, index: EntityIndex, gold: torch.Tensor, *,
                   chunk: int = 16, sweep_ks: Sequence[int] = (), sweep_first_stages: Sequence[str] = (),
                   terms: bool = False) -> dict[str, Any]:
    """Full-model scores of every mention against every stored entity (`ranking.score_all`, the linker's exhaustive
    mode; chunks of `chunk` mentions): gold ranks, top-1, the sweep (two-stage outcome per first stage and K,
    derived from these scores) and, with `terms`, the gold ranks by each score term alone (`term_ranks`)."""
    model = loaded.model
    ranks, top1, secs = [], [], 0.0
    kmax = max(sweep_ks, default=0)
    sweep: dict[str, dict[int, list[torch.Tensor]]] = {f: {k: [] for k in sweep_ks} for f in sweep_first_stages}
    term_ranks: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(m), chunk):
        mc, g = m.select(slice(s, s + chunk)), gold[s:s + chunk]
        t0 = time.perf_counter()
        parts = list(score_all(model, index, mc))
        S = torch.cat([sc["S_O"] for _, _, sc in parts], 1).float()  # (B, rows)
        secs += time.perf_counter() - t0
        ranks.append(gold_ranks(S, g))
        if terms and not model.cfg.cls_only:
            per_term: dict[str, list[torch.Tensor]] = {}
            for _, e, sc in parts:
                for name, T in term_scores(sc, mc, e).items():
                    per_term.setdefault(name, []).append(T.float().cpu())
            for name, Ts in per_term.items():
                term_ranks.setdefault(name, []).append(gold_ranks(torch.cat(Ts, 1), g))
        top1.append(stable_topk(S, 1)[1][:, 0])  # ties: the lower row
        for f in sweep_first_stages:
            q = mention_queries(model, mc, f)  # type: ignore[arg-type]
            cheap = torch.cat([sc for _, sc in first_stage_chunks(index, q)], 1)
            _, cand = stable_topk(cheap, kmax)
            for k in sweep_ks:
                c = cand[:, :k].sort(1).values
                sweep[f][k].append(c.gather(1, stable_topk(S.gather(1, c), 1)[1]).squeeze(1))
    out: dict[str, Any] = {"ranks": torch.cat(ranks), "top1": torch.cat(top1), "seconds": secs}
    out["sweep_top1"] = {f: {k: torch.cat(v) for k, v in d.items()} for f, d in sweep.items()}
    out["term_ranks"] = {k: torch.cat(v) for k, v in term_ranks.items()}
    return out


def _first_stage_beyond(index: EntityIndex, query: FirstStageQuery, gold: torch.Tensor, cand: torch.Tensor
                        ) -> torch.Tensor:
    """For each mention: the live non-candidate rows whose exact first-stage score is >= the gold's (the gold
    itself not counted). Two streaming passes over the stored vectors: the gold's score, then the count."""
    gold_s = torch.full((len(gold),), float("nan"))
    for rows, sc in first_stage_chunks(index, query):
        inside = (gold >= rows[0]) & (gold <= rows[-1])
        gold_s[inside] = sc[inside].gather(1, (gold[inside] - rows[0]).unsqueeze(1)).squeeze(1)
    beyond = torch.zeros(len(gold), dtype=torch.long)
    for rows, sc in first_stage_chunks(index, query):
        hit = (sc >= gold_s.unsqueeze(1)) & (rows.unsqueeze(0) != gold.unsqueeze(1))
        local = cand - int(rows[0])  # the candidates' columns in this chunk
        inside = (cand >= 0) & (local >= 0) & (local < len(rows))
        is_cand = torch.zeros_like(hit).scatter_(1, torch.where(inside, local, 0), inside)
        beyond += (hit & ~is_cand).sum(1)
    return beyond


@torch.no_grad()
def run_two_stage(loaded: LoadedCheckpoint, m: MentionFeatures, index: EntityIndex, gold: torch.Tensor, *,
                  candidates: int, first_stage: FirstStage = "summary", chunk: int = 64,
                  search: dict[str, int] | None = None) -> dict[str, Any]:
    """Retrieve + re-rank every mention exactly as the linker does (`ranking.retrieve` / `ranking.rerank`: the
    index's own first stage, its ANN when it has one), with the time of each stage. Gold ranks (rank 1 = best,
    ties pessimistic): a candidate gold is 1 + #{other candidates with S_O >= its S_O}; a gold outside the
    candidates ranks after them, by its exact first-stage score among the other live rows."""
    model = loaded.model
    ranks, top1 = [], []
    t_first = t_total = 0.0
    for s in range(0, len(m), chunk):
        mc, g = m.select(slice(s, s + chunk)), gold[s:s + chunk]
        t0 = time.perf_counter()
        cand = retrieve(model, index, mc, candidates, first_stage, search)
        t_first += time.perf_counter() - t0
        S = rerank(model, index, mc, cand)["S_O"].float()
        t_total += time.perf_counter() - t0
        top1.append(top_k(cand, {"S_O": S}, 1)[0][:, 0])
        in_cand = cand.rows == g.unsqueeze(1)  # (B, K)
        Sn = torch.nan_to_num(S, nan=float("inf"))  # a NaN score counts above the gold (pessimistic)
        gold_s = torch.where(in_cand, Sn, float("-inf")).amax(1)
        rank = 1 + ((Sn >= gold_s.unsqueeze(1)) & ~in_cand & cand.valid).sum(1)
        miss = ~in_cand.any(1)
        if miss.any():
            n_cand = cand.valid.sum(1)[miss]
            beyond = _first_stage_beyond(index, cand.query.select(miss), g[miss], cand.rows[miss])
            rank[miss] = n_cand + 1 + beyond
        ranks.append(rank)
    return {"ranks": torch.cat(ranks), "top1": torch.cat(top1), "seconds": t_total, "seconds_first_stage": t_first}


def gold_rows(index: EntityIndex, batch: dict[str, torch.Tensor], metas: list[dict[str, Any]]) -> torch.Tensor:
    """The gold rows of the mentions: their e_index in a pristine index, else looked up by QID ("answer")."""
    if index.pristine:
        return batch["e_index"]
    rows = []
    for meta in metas:
        try:
            rows.append(index.row_of(str(meta["answer"])))
        except KeyError as exc:
            raise ValueError(f"mention {meta.get('id')}: its gold entity {meta.get('answer')} is not in the index "
                             f"{index.path} (removed?): evaluate against an index that has it") from exc
    return torch.tensor(rows, dtype=torch.long)


def evaluate(
    checkpoint: str | Path | LoadedCheckpoint,
    shards: str | Path,
    split: str = "test",
    *,
    modes: Sequence[str] = ("exhaustive", "two-stage"),
    candidates: int = 128,
    first_stage: FirstStage = "summary",
    index: str | Path | EntityIndex | None = None,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 0,
    sweep_ks: Sequence[int] = (),
    sweep_first_stages: Sequence[str] = (),
    terms: bool = False,
    progress: bool = False,
    search: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Metrics and wall time of each mode on `split` of the packed `shards` over the whole KG, and the top-1
    agreement between the modes (when both run). `index`: reuse an entity index (its checkpoint and KG must
    match) instead of encoding the KG. `terms`: the exhaustive pass also reports the metrics of ranking by each score
term alone (`TERM_NAMES`). Per-mention results are under `"per_mention"`."""
    for mode in modes:
        check_options(mode=mode)
    check_options(candidates=candidates, first_stage=first_stage)  # the linker's rules, before anything loads
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint_model(checkpoint)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    if isinstance(index, EntityIndex):
        index.check_checkpoint(loaded.sha256, loaded.path)
        idx = index
    else:
        idx = load_or_build(index, shards, loaded, workers=workers, progress=progress)
    if index is not None:
        idx.check_kg(shards)
    t_kg = time.perf_counter() - t0
    if len(idx.dead) and "exhaustive" in modes:
        raise ValueError(f"index {idx.path} has {len(idx.dead)} removed entities: evaluate the exhaustive mode after "
                         f"`otmel index --compact --into {idx.path}` (two-stage skips removed entities)")
    t0 = time.perf_counter()
    batch, metas = read_split(shards, split, build_preprocessor(loaded.config), limit=limit, seed=seed)
    m = encode_mentions(loaded, batch)
    t_m = time.perf_counter() - t0
    gold = gold_rows(idx, batch, metas)
    out: dict[str, Any] = {
        "checkpoint": str(loaded.path), "sha256": loaded.sha256, "variant": loaded.config.variant,
        "shards": str(shards), "split": split, "mentions": len(gold), "entities": len(idx), "limit": limit,
        "first_stage_index": idx.params.kind,
        "seconds": {"kg": t_kg, "kg_from_index": index is not None, "mentions": t_m}, "modes": {},
        "per_mention": {"m_index": batch["m_index"].tolist(), "gold": gold.tolist()},
    }
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == "exhaustive":
            r = run_exhaustive(loaded, m, idx, gold, sweep_ks=sweep_ks, sweep_first_stages=sweep_first_stages,
                               terms=terms)
            info: dict[str, Any] = {}
            if r["term_ranks"]:
                info["terms"] = {k: metrics_from_ranks(v) for k, v in r["term_ranks"].items()}
        elif mode == "two-stage":
            r = run_two_stage(loaded, m, idx, gold, candidates=candidates, first_stage=first_stage, search=search)
            info = {"candidates": candidates, "first_stage": first_stage,
                    "seconds_first_stage": r["seconds_first_stage"]}
        runs[mode] = r
        out["modes"][mode] = {"metrics": metrics_from_ranks(r["ranks"]), "seconds": r["seconds"],
                              "ms_per_mention": 1e3 * r["seconds"] / len(gold), **info}
        out["per_mention"][mode] = {"rank": r["ranks"].tolist(), "top1": r["top1"].tolist()}
    if {"exhaustive", "two-stage"} <= set(runs):
        ex, ts = runs["exhaustive"], runs["two-stage"]
        out["agreement_top1"] = float((ex["top1"] == ts["top1"]).double().mean())
        out["speedup"] = ex["seconds"] / max(ts["seconds"], 1e-9)
    if "exhaustive" in runs and sweep_ks:
        ex = runs["exhaustive"]
        out["sweep"] = {f: {str(k): {"agreement_top1": float((t == ex["top1"]).double().mean()),
                                     "H@1": float((t == gold).double().mean())}
                            for k, t in d.items()} for f, d in ex["sweep_top1"].items()}
    return out


def format_eval(res: dict[str, Any]) -> str:
    """A plain-text table of `evaluate`'s result."""
    lines = [f"{res['split']}: {res['mentions']} mentions x {res['entities']} entities "
             f"(checkpoint {res['sha256'][:12]}, variant {res['variant']})",
             f"{'mode':<12} {'H@1':>7} {'H@3':>7} {'H@5':>7} {'MRR':>7} {'MR':>8} {'seconds':>9} {'ms/mention':>11}"]
    for mode, r in res["modes"].items():
        mt = r["metrics"]
        lines.append(f"{mode:<12} {100 * mt['H@1']:7.2f} {100 * mt['H@3']:7.2f} {100 * mt['H@5']:7.2f} "
                     f"{100 * mt['MRR']:7.2f} {mt['MR']:8.1f} {r['seconds']:9.2f} {r['ms_per_mention']:11.1f}")
    for name, mt in res["modes"].get("exhaustive", {}).get("terms", {}).items():
        lines.append(f"  by {name:<8} {100 * mt['H@1']:7.2f} {100 * mt['H@3']:7.2f} {100 * mt['H@5']:7.2f} "
                     f"{100 * mt['MRR']:7.2f} {mt['MR']:8.1f}   ({TERM_NAMES[name]})")
    if "two-stage" in res["modes"]:
        r = res["modes"]["two-stage"]
        lines.append(f"two-stage: K = {r['candidates']} candidates by the {r['first_stage']!r} first stage "
                     f"({r['seconds_first_stage']:.2f} s of retrieval)")
    if "agreement_top1" in res:
        lines.append(f"top-1 agreement {100 * res['agreement_top1']:.2f}%, two-stage {res['speedup']:.1f}x faster")
    s = res["seconds"]
    lines.append(f"KG features {s['kg']:.1f} s ({'index' if s['kg_from_index'] else 'encoded'}), "
                 f"mentions encoded in {s['mentions']:.1f} s")
    return "\n".join(lines)
