"""Markdown tables of bench/index.py's results (runs/bench/index-{a,b,c}.json) for docs/benchmarks.md.

    .venv/bin/python bench/index_report.py [--dir runs/bench]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ms(d: dict, key: str) -> str:
    return f"{d[key]['p50_ms']:.2f} / {d[key]['p99_ms']:.2f}"


def table_a(r: dict) -> str:
    out = [f"(a) {r['entities']:,} entities encoded end to end in {r['encode_s']:.0f} s (2 Ray workers), "
           f"{r['mentions']} test mentions; K = 128 re-ranked, k = 10.", "",
           "| first stage | build (s) | ANN on disk | recall@10 | recall@128 | top-1 agreement | H@1 | ΔH@1 (points) "
           "| first stage p50 / p99 ms, batch 1 | batch 64 (per mention) | end to end p50 / p99 ms, batch 1 "
           "| batch 64 (per mention) | first-stage speed-up (p50, b1) | RSS MB (anon + file) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, x in r["per_kind"].items():
        after = x["rss_mb"]["after"]
        out.append(f"| {kind} | {x['build_s']:.0f} | {x['ann_bytes'] / 2**20:.0f} MB | {x['recall@10']:.4f} | "
                   f"{x['recall@128']:.4f} | {100 * x['top1_agreement']:.2f}% | {100 * x['H@1']:.2f} | "
                   f"{x['dH@1_points']:+.2f} | {_ms(x, 'first_stage_b1')} | {_ms(x, 'first_stage_b64')} | "
                   f"{_ms(x, 'end_to_end_b1')} | {_ms(x, 'end_to_end_b64')} | {x['first_stage_speedup_b1']:.1f}x | "
                   f"{after['VmRSS']:.0f} ({after['RssAnon']:.0f} + {after['RssFile']:.0f}) |")
    store = r["store_bytes"]
    out += ["", "Store on disk: " + ", ".join(f"`{k}` {v / 2**20:,.0f} MB" for k, v in sorted(store.items())
                                               if v > 2**20)]
    return "\n".join(out)


def table_b(r: dict) -> str:
    n = r["bytes"]
    total = sum(n.values())
    after = r["rss_mb"]["after"]
    lines = [f"(b) {10 ** 6 * r['copies']:,} entities ({r['copies']} copies of the 1M, noise {r['noise']}), IVF-PQ.",
             "",
             "| written (s) | IVF-PQ build (s) | on disk | recall@10 | recall@128 | first stage p50 / p99 ms b1 "
             "| b64 | end to end p50 / p99 ms b1 | b64 | exact first stage ms / mention "
             "| Linker RSS MB (anon + file) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {r.get('write_s', float('nan')):.0f} | {r['ann_build_s']:.0f} | {total / 2**30:.1f} GB | "
             f"{r['recall@10']:.4f} | {r['recall@128']:.4f} | {_ms(r, 'first_stage_b1')} | "
             f"{_ms(r, 'first_stage_b64')} | {_ms(r, 'end_to_end_b1')} | {_ms(r, 'end_to_end_b64')} | "
             f"{r['exact_first_stage_ms_per_mention_b']:.0f} | {after['VmRSS']:.0f} ({after['RssAnon']:.0f} + "
             f"{after['RssFile']:.0f}) |", "",
             "On disk: " + ", ".join(f"`{k}` {v / 2**30:.2f} GB" for k, v in sorted(n.items()) if v > 2**28)]
    return "\n".join(lines)


def table_c(r: dict) -> str:
    return (f"(c) `--add` of {r['added']:,} entities to {r['entities'] - r['added']:,}: {r['add_s']:.1f} s vs a full "
            f"rebuild of {r['entities']:,} in {r['rebuild_s']:.1f} s ({r['rebuild_s'] / r['add_s']:.0f}x); "
            f"top-10 lists identical for {100 * r['identical_top10']:.1f}% of {r['mentions']} mentions, "
            f"max |ΔS_O| {r['max_abs_S_O_diff']:.2e}.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="runs/bench")
    d = Path(p.parse_args().dir)
    for part, fn in (("a", table_a), ("b", table_b), ("c", table_c)):
        f = d / f"index-{part}.json"
        if f.exists():
            r = json.loads(f.read_text())
            print(fn(r))
            print(f"\nCommand: `{r['command']}`\n")


if __name__ == "__main__":
    main()
