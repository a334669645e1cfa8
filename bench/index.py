"""The entity index at KG scale: exact vs HNSW vs IVF-PQ first stage, the disk-backed store, live updates.

Parameters were fixed before any run (docs/benchmarks.md, "Entity index at scale"):
- K = 128 candidates re-ranked (the linker's default), k = 10 returned; recall@K of the ANN's first-stage top-K
  against the exact first-stage top-K, also at K = 10;
- HNSW M 32, efConstruction 40, efSearch 128; IVF-PQ nlist 4096, m = D / 4 (64 bytes per vector at D 256),
  8 bits, trained on 200k vectors, nprobe 32, refine 2 (fetch 2K, keep K by the exact score);
- latency per mention at batch 1 (every test mention alone) and 64, after 8 untimed warm-up queries; torch and
  faiss with 1 thread; p50 / p99 over the mentions; resident memory measured in a fresh process (`rss` below) after its
  queries: VmRSS, and its anonymous (heap) and file-backed (mapped index files) parts.

Parts:
  (a) `a`: 1M entities encoded end to end (shards/synth-1m: `otmel synth --out data/synth-1m --scale 500 --mentions
      3000` + `otmel pack ... --shard-size 10000`), the demo config's OT checkpoint; the exact index is built with
      `otmel index --store-dtype float16` (2 Ray workers; float16 records so that part b fits the disk, float32
      vectors), HNSW / IVF-PQ
      over the same stored vectors (hard-linked store, ANN built).
  (b) `b`: 10M entities made from the 1M encoded ones (10 copies; copy 0 as encoded, copies 1-9 each perturbed:
      pooled vectors x' = normalise(x + 0.3 n / sqrt(d)), token features q' = q + 0.3 std(q) n, n ~ N(0, I)),
      written by the store's own writer (float16 records and vectors, so that it fits the disk); IVF-PQ;
      retrieval + re-rank.
  (c) `c`: `--add` of 1% more entities vs a full rebuild (100k-entity base, exact first stage): time and answers.

    .venv/bin/python bench/index.py a|b|c|rss [--out runs/bench] ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from otmel.io import atomic_json  # noqa: E402
from otmel.link import EntityIndex, Linker, load_checkpoint_model  # noqa: E402
from otmel.link.ann import AnnParams  # noqa: E402
from otmel.link.evaluate import encode_mentions, read_split  # noqa: E402
from otmel.link.index_build import finish_segment  # noqa: E402
from otmel.model.first_stage import mention_queries  # noqa: E402

HNSW = AnnParams("hnsw", hnsw_m=32, ef_construction=40, ef_search=128)
IVFPQ = AnnParams("ivfpq", nlist=4096, pq_m=0, pq_bits=8, train_size=200_000, nprobe=32, refine=2)
K, TOP = 128, 10


def rss() -> dict[str, float]:
    """This process's resident memory (MB): total, anonymous, file-backed, and the peak."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / 1024
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def derive_ann(exact: Path, out: Path, params: AnnParams) -> float:
    """An index over the same store with another first stage: segment files hard-linked, ANN built; seconds."""
    if (out / "index.json").exists():
        return float(json.loads((out / "index.json").read_text())["segments"][0]["ann"]["seconds"])
    shutil.rmtree(out, ignore_errors=True)
    meta = json.loads((exact / "index.json").read_text())
    for s in meta["segments"]:
        (out / s["dir"]).mkdir(parents=True)
        for f in (exact / s["dir"]).iterdir():
            if not f.name.startswith("ann-"):
                os.link(f, out / s["dir"] / f.name)
        s["ann"] = finish_segment(out / s["dir"], params)
    meta["ann"] = params.to_json()
    atomic_json(out / "index.json", meta)
    return float(sum(s["ann"]["seconds"] for s in meta["segments"]))


def mentions(ckpt: Path, shards: Path, split: str = "test", limit: int | None = None) -> tuple[Any, torch.Tensor]:
    loaded = load_checkpoint_model(ckpt)
    from otmel.model.encoder import build_preprocessor

    batch, _ = read_split(shards, split, build_preprocessor(loaded.config), limit=limit)
    return encode_mentions(loaded, batch), batch["e_index"]


def time_index(linker: Linker, m: Any, threads1: int = 1, threads64: int = 1) -> dict[str, Any]:
    """First-stage and end-to-end latency per mention at batch 1 and 64 (after 8 warm-up queries that are not
    timed); the answers at batch 64. One thread by default: on 2 shared cores a second OpenMP thread that gets
    descheduled stalls every parallel op."""
    import faiss

    idx, model = linker.index, linker.model
    out: dict[str, Any] = {}
    q_all = mention_queries(model, m, "summary")
    faiss.omp_set_num_threads(threads1)
    torch.set_num_threads(threads1)
    for i in range(min(8, len(m))):  # warm-up: first touches of the mapped files, allocator, faiss
        linker.rank(m.select(slice(i, i + 1)), k=TOP, candidates=K)
    faiss.omp_set_num_threads(threads1)
    torch.set_num_threads(threads1)
    fs1, e2e1 = [], []
    for i in range(len(m)):
        t0 = time.perf_counter()
        idx.search(q_all.select(slice(i, i + 1)), K)
        fs1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        linker.rank(m.select(slice(i, i + 1)), k=TOP, candidates=K)
        e2e1.append(time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads64)
    torch.set_num_threads(threads64)
    fs64, e2e64, rows, hits = [], [], [], []
    for s in range(0, len(m), 64):
        mc = m.select(slice(s, s + 64))
        t0 = time.perf_counter()
        _, r = idx.search(q_all.select(slice(s, s + 64)), K)
        fs64 += [(time.perf_counter() - t0) / len(mc)] * len(mc)
        t0 = time.perf_counter()
        h = linker.rank(mc, k=TOP, candidates=K)
        e2e64 += [(time.perf_counter() - t0) / len(mc)] * len(mc)
        rows.append(r)
        hits += h
    for name, xs in (("first_stage_b1", fs1), ("end_to_end_b1", e2e1), ("first_stage_b64", fs64),
                     ("end_to_end_b64", e2e64)):
        out[name] = {"p50_ms": 1e3 * pct(xs, 50), "p99_ms": 1e3 * pct(xs, 99)}
    out["rows"] = torch.cat(rows)
    out["top1"] = torch.tensor([h[0].row for h in hits])
    return out


def rss_of(ckpt: Path, index: Path, shards: Path, n: int, search: dict[str, int] | None = None) -> dict[str, float]:
    """Resident memory of a fresh process holding a Linker of `index` after linking n test mentions."""
    cmd = [sys.executable, __file__, "rss", "--checkpoint", str(ckpt), "--index", str(index), "--shards",
           str(shards), "--n", str(n), "--search", json.dumps(search or {})]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cmd_rss(args: argparse.Namespace) -> None:
    m, _ = mentions(args.checkpoint, args.shards, limit=args.n)  # encoded before the index is opened
    torch.set_num_threads(1)
    base = rss()
    linker = Linker(load_checkpoint_model(args.checkpoint), EntityIndex.load(args.index))
    linker.search = json.loads(args.search)
    loaded = rss()
    for i in range(len(m)):
        linker.rank(m.select(slice(i, i + 1)), k=TOP, candidates=K)
    print(json.dumps({"before": base, "loaded": loaded, "after": rss()}))


def _recall(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return float(np.mean([len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b, strict=True)]))


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    exact = out / "index-1m-exact"
    res: dict[str, Any] = {"kg": str(args.shards), "checkpoint": str(args.checkpoint)}
    if not (exact / "index.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "otmel.cli", "index", "--checkpoint", str(args.checkpoint), "--kg",
                        str(args.shards), "--out", str(exact), "--workers", "2", "--no-progress", "--store-dtype",
                        "float16"], check=True)
        res["exact_build_s"] = time.perf_counter() - t0
    meta = json.loads((exact / "index.json").read_text())
    res["encode_s"] = meta["build"]["encode_seconds"]
    res["entities"] = meta["counts"]["entities"]
    builds = {"exact": 0.0, "hnsw": derive_ann(exact, out / "index-1m-hnsw", HNSW),
              "ivfpq": derive_ann(exact, out / "index-1m-ivfpq", IVFPQ)}
    m, gold = mentions(args.checkpoint, args.shards, limit=args.limit)
    loaded = load_checkpoint_model(args.checkpoint)
    per: dict[str, Any] = {}
    for kind in ("exact", "hnsw", "ivfpq"):
        path = out / f"index-1m-{kind}"
        linker = Linker(loaded, EntityIndex.load(path))
        t = time_index(linker, m)
        size = sum(f.stat().st_size for f in path.rglob("ann-*.faiss"))
        per[kind] = {"build_s": builds[kind], "ann_bytes": size, "H@1": float((t["top1"] == gold).float().mean()),
                     **{k: v for k, v in t.items() if k not in ("rows", "top1")}, "_rows": t["rows"],
                     "_top1": t["top1"]}
        per[kind]["rss_mb"] = rss_of(args.checkpoint, path, args.shards, 64)
        print(kind, json.dumps({k: v for k, v in per[kind].items() if not k.startswith("_")}), flush=True)
    ex = per["exact"]
    for kind, r in per.items():
        r["recall@128"] = _recall(r["_rows"], ex["_rows"], K)
        r["recall@10"] = _recall(r["_rows"], ex["_rows"], 10)
        r["top1_agreement"] = float((r.pop("_top1") == ex["_top1"]).float().mean()) if kind != "exact" else 1.0
        r["dH@1_points"] = 100 * (r["H@1"] - ex["H@1"])
        r["first_stage_speedup_b1"] = ex["first_stage_b1"]["p50_ms"] / r["first_stage_b1"]["p50_ms"]
    for r in per.values():
        r.pop("_rows", None)
        r.pop("_top1", None)
    res["mentions"] = len(gold)
    res["per_kind"] = per
    seg = exact / meta["segments"][0]["dir"]
    res["store_bytes"] = {f.name: f.stat().st_size for f in seg.iterdir()}
    return res


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    """10M entities from the 1M encoded ones (module docstring), IVF-PQ."""
    from otmel.link.index_build import share_files
    from otmel.link.store import SegmentWriter

    out = Path(args.out)
    src = EntityIndex.load(out / "index-1m-exact")
    big = out / "index-10m-ivfpq"
    res: dict[str, Any] = {"copies": args.copies, "noise": 0.3}
    n1 = src.rows
    if not (big / "index.json").exists():
        shutil.rmtree(big, ignore_errors=True)
        seg_dir = big / "seg-0000"
        t0 = time.perf_counter()
        writer = SegmentWriter(seg_dir, n1 * args.copies, "float16", "float16")
        gen = torch.Generator().manual_seed(0)
        chunk = 8192
        for c in range(args.copies):
            for s in range(0, n1, chunk):
                rows = np.arange(s, min(s + chunk, n1))
                f = src.gather(rows)
                if c:
                    f = _perturb(f, gen)
                vec = torch.cat([f.g, f.t, f.v], 1).numpy()  # the demo model's entity vector layout [g | t | v]
                ids = np.asarray(src.segments[0].input_ids[rows])
                qids = [f"{src.qid(int(r))}-c{c}" for r in rows]
                writer.write(rows + c * n1, f, vec, ids, qids, [src.name(int(r)) for r in rows])
            print(f"copy {c} written, {time.perf_counter() - t0:.0f} s", flush=True)
        writer.close()
        res["write_s"] = time.perf_counter() - t0
        ann = finish_segment(seg_dir, IVFPQ)
        meta = json.loads((out / "index-1m-exact" / "index.json").read_text())
        meta["segments"] = [{"dir": "seg-0000", "rows": n1 * args.copies, "kg": meta["kg"], "ann": ann}]
        meta["ann"] = IVFPQ.to_json()
        meta["layout"] = {**meta["layout"], "dtype": "float16"}
        meta["counts"] = {**meta["counts"], "entities": n1 * args.copies, "rows": n1 * args.copies}
        share_files(big)
        atomic_json(big / "index.json", meta)
        res["ann_build_s"] = ann["seconds"]
    else:
        res["ann_build_s"] = json.loads((big / "index.json").read_text())["segments"][0]["ann"]["seconds"]
    res["bytes"] = {f.name: f.stat().st_size for f in (big / "seg-0000").iterdir()}
    m, _ = mentions(args.checkpoint, args.shards, limit=args.limit)
    linker = Linker(load_checkpoint_model(args.checkpoint), EntityIndex.load(big))
    t = time_index(linker, m)
    res.update({k: v for k, v in t.items() if k not in ("rows", "top1")})
    # recall against the exact first stage over the 10M vectors (a streaming pass; a subset of mentions)
    exact = EntityIndex.load(big)
    exact.params = AnnParams("exact")
    from otmel.link.ann import SegmentSearcher

    exact.searchers = [SegmentSearcher(s.folder, s.vectors, s.has_image, exact.params, None) for s in exact.segments]
    sub = m.select(slice(0, args.recall_n))
    q = mention_queries(linker.model, sub, "summary")
    t0 = time.perf_counter()
    _, r_ex = exact.search(q, K)
    res["exact_first_stage_ms_per_mention_b"] = 1e3 * (time.perf_counter() - t0) / len(sub)
    r_ann = t["rows"][:args.recall_n]
    res["recall@128"] = _recall(r_ann, r_ex, K)
    res["recall@10"] = _recall(r_ann, r_ex, 10)
    res["rss_mb"] = rss_of(args.checkpoint, big, args.shards, 64)
    return res


def _perturb(f: Any, gen: torch.Generator) -> Any:
    import dataclasses

    import torch.nn.functional as F

    upd = {}
    for k in ("t", "v", "g"):
        x = getattr(f, k)
        noisy = F.normalize(x + 0.3 * torch.randn(x.shape, generator=gen) / x.shape[1] ** 0.5, dim=-1)
        if k == "v":
            noisy = noisy * f.has_image.unsqueeze(1)  # no image: v stays 0
        upd[k] = noisy
    for k in ("q_t", "q_v"):
        x = getattr(f, k)
        if x is not None:
            upd[k] = x + 0.3 * x.std() * torch.randn(x.shape, generator=gen)
    return dataclasses.replace(f, **upd)


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    """--add of 1% more entities vs a full rebuild (exact): shards of the base, of the addition and of both."""
    from otmel.link import build_index
    from otmel.link.index_update import add_to_index

    out = Path(args.out)
    res: dict[str, Any] = {}
    base_dir, full_dir = out / "c-base", out / "c-full"
    for d in (base_dir, full_dir):
        shutil.rmtree(d, ignore_errors=True)
    build_index(args.checkpoint, args.base, base_dir, workers=2, progress=False)
    t0 = time.perf_counter()
    r = add_to_index(base_dir, args.extra, args.checkpoint, workers=2)
    res["add_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_index(args.checkpoint, args.both, full_dir, workers=2, progress=False)
    res["rebuild_s"] = time.perf_counter() - t0
    res["added"] = r["added"]
    a, b = EntityIndex.load(base_dir), EntityIndex.load(full_dir)
    res["entities"] = len(b)
    m, _ = mentions(args.checkpoint, args.base, limit=args.limit)
    loaded = load_checkpoint_model(args.checkpoint)
    ha = Linker(loaded, a).rank(m, k=TOP, candidates=K)
    hb = Linker(loaded, b).rank(m, k=TOP, candidates=K)
    same = [[h.qid for h in x] == [h.qid for h in y] for x, y in zip(ha, hb, strict=True)]
    diff = max(abs(h.S_O - g.S_O) for x, y in zip(ha, hb, strict=True) for h, g in zip(x, y, strict=True))
    res.update({"mentions": len(same), "identical_top10": float(np.mean(same)), "max_abs_S_O_diff": diff})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["a", "b", "c", "rss"])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs/bench/ckpt-OT-s3")
    p.add_argument("--shards", type=Path, default=ROOT / "shards/synth-1m")
    p.add_argument("--index", type=Path, default=None)
    p.add_argument("--out", default=str(ROOT / "runs/bench"))
    p.add_argument("--limit", type=int, default=None, help="test mentions (default: all)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--search", default="{}")
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--recall-n", type=int, default=128)
    p.add_argument("--base", type=Path, default=ROOT / "shards/synth-100k")
    p.add_argument("--extra", type=Path, default=ROOT / "shards/synth-1k-new")
    p.add_argument("--both", type=Path, default=ROOT / "shards/synth-101k")
    args = p.parse_args()
    if args.part == "rss":
        cmd_rss(args)
        return
    res = {"a": part_a, "b": part_b, "c": part_c}[args.part](args)
    res["command"] = " ".join(sys.argv)
    path = Path(args.out) / f"index-{args.part}.json"
    atomic_json(path, res, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
