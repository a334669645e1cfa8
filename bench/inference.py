"""Inference benchmarks, measured side by side in one run on the same data:

(a) whole-KG prediction time of the OT model vs the ATT model (variant A1) vs the KD model: the time to score
    every mention of a split against the cached features of the whole KG (target OT / ATT <= 1.3; the paper's
    Table 4 has 1.99). Same shapes (the checkpoint's config), random weights, same mentions and KG; each model's
    KG features are encoded once, before timing. Repeats interleaved across models, best reported.
(b) two-stage vs exhaustive linking on a KG of >= 50k entities with a trained checkpoint (target: >= 20x faster,
    >= 99% top-1 agreement, H@1 within 0.3 points): one exhaustive pass over a seeded subset of test mentions,
    from which agreement and H@1 are derived for every K and first-stage score (exact: the two-stage top-1 at
    K is the best full score among the first-stage top K), then real two-stage passes at a few K, timed.

    .venv/bin/python bench/inference.py [--part a|b|all] [--threads 1] [--limit 300] [--out runs/bench-inference.json]

Defaults: (a) shards/synth dev split (2,000 entities); (b) shards/synth25 (50,000 entities; `otmel synth --out
data/synth25 --scale 25` + `otmel pack data/synth25 --format cleaned --out shards/synth25 --shard-size 2000`),
its index built with 2 Ray workers into data/index-synth25 (reused when its checkpoint hash matches), and the
checkpoint of runs/default-1 (trained on the scale-1 benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from otmel.link import EntityIndex, build_index, load_checkpoint_model  # noqa: E402
from otmel.link.evaluate import encode_mentions, read_split, run_exhaustive, run_two_stage  # noqa: E402
from otmel.link.index import EntityIndexError  # noqa: E402
from otmel.link.report import LABELS, time_variants  # noqa: E402
from otmel.metrics import metrics_from_ranks  # noqa: E402


def part_a(args: argparse.Namespace) -> dict:
    base = load_checkpoint_model(args.checkpoint).config
    if args.a_config:
        import yaml

        from otmel.config import ModelConfig

        kv = dict(item.split("=", 1) for item in args.a_config.split(","))
        base = ModelConfig.from_dict({**base.to_dict(), **{k: yaml.safe_load(v) for k, v in kv.items()}})
    print(f"\n(a) prediction time per variant: {args.shards_a} {args.split_a} split, whole KG; config of "
          f"{args.checkpoint} {args.a_config or ''} (tiny_width {base.tiny_width}, hidden {base.hidden_dim}, "
          f"image {base.tiny_image_size}/{base.tiny_patch_size}), random weights", flush=True)
    extra = {"OT+dense": ("OT", dense_ot)}
    res = time_variants(base, args.shards_a, args.split_a, ("OT", "A1", "KD"), repeats=args.repeats, extra=extra,
                        chunk=args.chunk_a, device=args.device)
    print(f"{res['mentions']} mentions x {res['entities']} entities, best of {args.repeats} interleaved repeats, "
          f"on {args.device} ({res['threads']} torch thread(s)), {args.chunk_a} mentions per scoring call; "
          "'OT+dense': the OT model with the factored inference path off")
    print(f"{'variant':<30} {'best s':>8} {'median s':>9} {'us/pair':>8} {'vs ATT':>7}")
    att = res["variants"]["A1"]["best"]
    for v, r in res["variants"].items():
        name = LABELS.get(v, LABELS.get(v.split("+")[0], v) + " (dense plans)")
        print(f"{name:<30} {r['best']:8.2f} {r['median']:9.2f} {r['us_per_pair']:8.2f} {r['best'] / att:6.2f}x")
    print(f"OT / ATT = {res['ratios']['OT/ATT']:.2f} (target <= 1.3; paper 1.99), KD / ATT = "
          f"{res['ratios']['KD/ATT']:.2f}; OT with dense plans / ATT = {res['ratios']['OT+dense/ATT']:.2f}")
    return res


@contextlib.contextmanager
def dense_ot():  # type: ignore[no-untyped-def]
    """The OT model's dense inference path (plans written), for comparison with the factored default."""
    from otmel.model.matching import UnimodalMatcher

    UnimodalMatcher.factored_inference = False
    try:
        yield
    finally:
        UnimodalMatcher.factored_inference = True


def _index(args: argparse.Namespace, loaded) -> tuple[EntityIndex, float | None]:  # type: ignore[no-untyped-def]
    try:
        index = EntityIndex.load(args.index_b, loaded.sha256, loaded.path)
        index.check_kg(args.shards_b)
        print(f"reusing the index {args.index_b} (built in {index.meta['build']['seconds']:.0f} s with "
              f"{index.meta['build']['workers']} workers)", flush=True)
        return index, None
    except EntityIndexError:
        pass
    t0 = time.perf_counter()
    index = build_index(loaded, args.shards_b, args.index_b, workers=args.workers, progress=True)
    return index, time.perf_counter() - t0


def part_b(args: argparse.Namespace) -> dict:
    loaded = load_checkpoint_model(args.checkpoint)
    print(f"\n(b) two-stage vs exhaustive: {args.shards_b}, checkpoint {loaded.path} ({loaded.sha256[:12]})",
          flush=True)
    index, build_s = _index(args, loaded)
    batch, _ = read_split(args.shards_b, "test", loaded_pre(loaded), limit=args.limit, seed=args.seed)
    m = encode_mentions(loaded, batch)
    gold = batch["e_index"]
    print(f"{len(gold)} test mentions (seeded subset) x {len(index)} entities; exhaustive pass ...", flush=True)
    ks = [int(k) for k in args.ks.split(",")]
    ex = run_exhaustive(loaded, m, index, gold, sweep_ks=ks, sweep_first_stages=("summary", "cls", "fusion"))
    ex_m = metrics_from_ranks(ex["ranks"])
    out: dict = {"entities": len(index), "mentions": len(gold), "index_build_seconds": build_s or
                 index.meta["build"]["seconds"], "index_workers": index.meta["build"]["workers"],
                 "exhaustive": {"seconds": ex["seconds"], "metrics": ex_m}, "sweep": {}, "two_stage": {}}
    print(f"exhaustive: {ex['seconds']:.1f} s ({1e3 * ex['seconds'] / len(gold):.0f} ms/mention), "
          f"H@1 {100 * ex_m['H@1']:.2f}, MRR {100 * ex_m['MRR']:.2f}")
    print("\nagreement with exhaustive top-1 / H@1 (%) by first stage and K (derived from the exhaustive scores):")
    print(f"{'K':>6} " + " ".join(f"{f:>17}" for f in ex["sweep_top1"]))
    for k in ks:
        cells = []
        for f, d in ex["sweep_top1"].items():
            agree = float((d[k] == ex["top1"]).double().mean())
            h1 = float((d[k] == gold).double().mean())
            out["sweep"].setdefault(f, {})[k] = {"agreement_top1": agree, "H@1": h1}
            cells.append(f"{100 * agree:8.2f} / {100 * h1:6.2f}")
        print(f"{k:>6} " + " ".join(cells))
    print(f"\nreal two-stage passes ({args.first_stage} first stage):")
    print(f"{'K':>6} {'seconds':>8} {'retrieval s':>11} {'speed-up':>9} {'agree %':>8} {'H@1':>7} {'dH@1':>6} "
          f"{'MRR':>7}")
    for k in [int(k) for k in args.rerank_ks.split(",")]:
        ts = run_two_stage(loaded, m, index, gold, candidates=k, first_stage=args.first_stage)
        mt = metrics_from_ranks(ts["ranks"])
        agree = float((ts["top1"] == ex["top1"]).double().mean())
        speed = ex["seconds"] / ts["seconds"]
        out["two_stage"][k] = {"seconds": ts["seconds"], "seconds_first_stage": ts["seconds_first_stage"],
                               "speedup": speed, "agreement_top1": agree, "metrics": mt,
                               "sweep_consistent": bool((ts["top1"] == ex["sweep_top1"][args.first_stage][k]).all())
                               if k in ks else None}
        print(f"{k:>6} {ts['seconds']:8.2f} {ts['seconds_first_stage']:11.2f} {speed:8.1f}x {100 * agree:8.2f} "
              f"{100 * mt['H@1']:7.2f} {100 * (mt['H@1'] - ex_m['H@1']):+6.2f} {100 * mt['MRR']:7.2f}")
    return out


def loaded_pre(loaded):  # type: ignore[no-untyped-def]
    from otmel.model.encoder import build_preprocessor

    return build_preprocessor(loaded.config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "all"], default="all")
    p.add_argument("--checkpoint", default=str(ROOT / "runs/default-1"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP stalls on a shared machine)")
    p.add_argument("--shards-a", default=str(ROOT / "shards/synth"))
    p.add_argument("--split-a", default="dev")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="(a): where the timed scoring runs (cpu, cuda)")
    p.add_argument("--chunk-a", type=int, default=16, help="(a): mentions per scoring call")
    p.add_argument("--a-config", default="", help="(a): model config overrides, e.g. hidden_dim=96,tiny_patch_size=32")
    p.add_argument("--shards-b", default=str(ROOT / "shards/synth25"))
    p.add_argument("--index-b", default=str(ROOT / "data/index-synth25"))
    p.add_argument("--workers", type=int, default=2, help="Ray actors building the (b) index")
    p.add_argument("--limit", type=int, default=300, help="(b): test mentions (seeded subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--rerank-ks", default="16,64,128")
    p.add_argument("--first-stage", default="summary", choices=["summary", "cls", "fusion"])
    p.add_argument("--out", default=str(ROOT / "runs/bench-inference.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""), flush=True)
    out: dict = {"threads": args.threads, "load_start": os.getloadavg()}
    if args.part in ("a", "all"):
        out["a"] = part_a(args)
    if args.part in ("b", "all"):
        out["b"] = part_b(args)
    out["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nload average at end {os.getloadavg()}; results in {args.out}")


if __name__ == "__main__":
    main()
