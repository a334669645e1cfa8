"""Run reports: the analogues of the paper's Fig. 6 (H@1 on short vs long texts) and Table 4 (prediction time
per variant), as markdown + PNG.

- Fig. 6: each run's checkpoint ranks every mention of a split against the whole KG (exhaustive, full model);
  mentions are bucketed by the token count of their sentence (the model's tokenizer, no special tokens):
  short = at most 20 tokens, long = more (the paper: "more than 20 tokens were classified as long texts").
- Table 4: the time to score all mentions of a split against the whole KG for the variants OT, ATT (A1) and KD,
  with the first run's model config (same shapes; randomly initialised weights: the time does not depend on
  them). Each model's KG features are encoded once (timed separately) and mentions are encoded before timing,
  so the figure is the matching itself, which is what differs between the variants. Repeats are interleaved
  across variants and the best time is reported (the machine may be shared).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from otmel.checkpoints import load_checkpoint_model, resolve_checkpoint, save_model_checkpoint
from otmel.config import VARIANTS, ModelConfig
from otmel.link.evaluate import encode_mentions, read_split, run_exhaustive
from otmel.link.index_build import build_index
from otmel.metrics import metrics_from_ranks
from otmel.model import OTMEL
from otmel.model.encoder import build_preprocessor

SHORT_MAX_TOKENS = 20
TIMING_VARIANTS: tuple[str, ...] = ("OT", "A1", "KD")
LABELS = {"OT": "OT-MEL (OT)", "A1": "ATT (A1)", "KD": "OT-MEL (KD)"}
_VARIANT_KEYS = {k for overrides in VARIANTS.values() for k in overrides}


def variant_config(base: ModelConfig, variant: str) -> ModelConfig:
    """`base` (sizes, encoder, Sinkhorn settings) with the CA / fusion / distillation choices of `variant`."""
    keep = {k: v for k, v in base.to_dict().items() if k not in _VARIANT_KEYS and k != "variant"}
    return ModelConfig.from_variant(variant, **keep)


def sentence_tokens(pre: Any, metas: Sequence[dict[str, Any]]) -> list[int]:
    """Token count of each mention's sentence (the model's tokenizer, no special tokens, no truncation)."""
    return [len(pre.tokenizer(m.get("sentence", ""), add_special_tokens=False)["input_ids"]) for m in metas]


def length_buckets(ranks: torch.Tensor, lengths: Sequence[int], short_max: int = SHORT_MAX_TOKENS
                   ) -> dict[str, dict[str, float]]:
    """H@1 / MRR / count of mentions whose text has <= `short_max` tokens ("short") and more ("long")."""
    lens = torch.tensor(list(lengths))
    out = {}
    for name, sel in ((f"short (<= {short_max} tokens)", lens <= short_max),
                      (f"long (> {short_max} tokens)", lens > short_max)):
        if bool(sel.any()):
            mt = metrics_from_ranks(ranks[sel])
            out[name] = {"mentions": int(sel.sum()), "H@1": mt["H@1"], "MRR": mt["MRR"]}
        else:
            out[name] = {"mentions": 0, "H@1": float("nan"), "MRR": float("nan")}
    return out


def run_shards(run: str | Path) -> str:
    """The packed shard folder a checkpoint was trained on (its run config's `data.shards`)."""
    from otmel.runconfig import RunConfig

    state = json.loads((resolve_checkpoint(run) / "state.json").read_text())
    return RunConfig.from_dict(state["config"]).data.shards


def time_variants(base: ModelConfig, shards: str | Path, split: str = "dev", variants: Sequence[str] = TIMING_VARIANTS,
                  *, limit: int | None = None, repeats: int = 3, seed: int = 0, chunk: int = 16,
                  extra: dict[str, tuple[str, Callable[[], AbstractContextManager]]] | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """Seconds to score every mention of `split` against the whole KG, per variant (see the module docstring).

    `extra` adds timed rows `label -> (variant, context)`: that variant's model scored inside `context()` (e.g. a
    patched kernel), interleaved with the others. Features are encoded on the CPU, then model, features and gold
    rows move to `device` for the timed scoring (CUDA: timed with a synchronisation per chunk)."""
    torch.set_flush_denormal(True)
    pre = build_preprocessor(base)
    batch, _ = read_split(shards, split, pre, limit=limit, seed=seed)
    gold = batch["e_index"]
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            torch.manual_seed(seed)
            loaded = load_checkpoint_model(save_model_checkpoint(Path(tmp) / v, OTMEL(variant_config(base, v))))
            t0 = time.perf_counter()
            index = build_index(loaded, shards, progress=False)
            t_kg = time.perf_counter() - t0
            m = encode_mentions(loaded, batch)
            loaded.model.to(device)
            models[v] = (loaded, index, m.to(device), t_kg)
    gold = gold.to(device)
    rows = {v: (v, contextlib.nullcontext) for v in variants} | dict(extra or {})
    times: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(repeats):
        for label, (v, context) in rows.items():
            loaded, index, m, _ = models[v]
            with context():  # the linker's exhaustive scoring, the store's reads included
                times[label].append(run_exhaustive(loaded, m, index, gold, chunk=chunk)["seconds"])
    n_e = len(next(iter(models.values()))[1])
    out: dict[str, Any] = {"split": split, "mentions": len(gold), "entities": n_e, "repeats": repeats,
                           "threads": torch.get_num_threads(), "device": str(device), "variants": {}}
    for label, (v, _) in rows.items():
        t = times[label]
        out["variants"][label] = {"best": min(t), "median": statistics.median(t), "all": t,
                                  "kg_seconds": models[v][3], "params": models[v][0].model.param_count(),
                                  "us_per_pair": 1e6 * min(t) / (len(gold) * n_e)}
    best = {v: r["best"] for v, r in out["variants"].items()}
    if "A1" in best:
        out["ratios"] = {f"{v}/ATT": best[v] / best["A1"] for v in best if v != "A1"}
    return out


def _plot(path: Path, fig6: dict[str, dict[str, dict[str, float]]], table4: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    buckets = list(next(iter(fig6.values())))
    width = 0.8 / max(len(fig6), 1)
    for i, (label, b) in enumerate(fig6.items()):
        xs = [j + (i - (len(fig6) - 1) / 2) * width for j in range(len(buckets))]
        vals = [100 * b[k]["H@1"] for k in buckets]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, [f"{v:.1f}\n(n={b[k]['mentions']})" for v, k in zip(vals, buckets, strict=True)],
                     fontsize=7)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_ylabel("H@1 (%)")
    ax.set_ylim(0, 115)
    ax.set_title("H@1 by text length (cf. OT-MEL Fig. 6)")
    ax.legend(fontsize=8, loc="upper left")
    paths.append(path / "fig6_token_length.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    vs = list(table4["variants"])
    secs = [table4["variants"][v]["best"] for v in vs]
    bars = ax.barh([LABELS.get(v, v) for v in vs], secs, color="tab:blue")
    att = table4["variants"].get("A1", {}).get("best")
    ax.bar_label(bars, [f"{s:.2f} s" + (f"  ({s / att:.2f}x ATT)" if att else "") for s in secs], fontsize=8)
    ax.set_xlabel(f"seconds to score {table4['mentions']} {table4['split']} mentions x {table4['entities']} entities")
    ax.set_xlim(0, max(secs) * 1.45)
    ax.invert_yaxis()
    ax.set_title("Prediction time per variant (cf. OT-MEL Table 4)")
    paths.append(path / "table4_prediction_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(runs: Sequence[str | Path], out: str | Path | None = None, *, split: str = "test",
           timing_split: str = "dev", timing_limit: int | None = None, variants: Sequence[str] = TIMING_VARIANTS,
           repeats: int = 3, limit: int | None = None, shards: str | Path | None = None) -> Path:
    """Write report.md, report.json, fig6_token_length.png and table4_prediction_time.png into `out` (default:
    the first run's folder + "/report"); returns the markdown path. `shards`: the packed data to evaluate on
    (default: each run's own `data.shards`)."""
    if not runs:
        raise ValueError("give at least one run (or checkpoint) directory")
    for run in runs:  # fail on a bad run before writing anything
        resolve_checkpoint(run)
    out = Path(out) if out is not None else Path(runs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    fig6: dict[str, dict[str, dict[str, float]]] = {}
    overall: dict[str, dict[str, float]] = {}
    base: ModelConfig | None = None
    shards0: str | None = None
    for run in runs:
        loaded = load_checkpoint_model(run)
        data = str(shards) if shards is not None else run_shards(run)
        base, shards0 = base or loaded.config, shards0 or data
        pre = build_preprocessor(loaded.config)
        batch, metas = read_split(data, split, pre, limit=limit)
        r = run_exhaustive(loaded, encode_mentions(loaded, batch), build_index(loaded, data, progress=False),
                           batch["e_index"])
        label = f"{Path(run).name} ({loaded.config.variant})"
        fig6[label] = length_buckets(r["ranks"], sentence_tokens(pre, metas))
        overall[label] = metrics_from_ranks(r["ranks"])
    assert base is not None and shards0 is not None
    table4 = time_variants(base, shards0, timing_split, variants, limit=timing_limit, repeats=repeats)
    pngs = _plot(out, fig6, table4)
    (out / "report.json").write_text(json.dumps({"fig6": fig6, "overall": overall, "table4": table4}, indent=2))
    md = [f"# Report: {', '.join(str(r) for r in runs)}", "",
          f"## H@1 by text length ({split} split, whole KG; cf. the paper's Fig. 6)", "",
          "| run | " + " | ".join(next(iter(fig6.values()))) + " | all |", "| --- |" + " ---: |" * 3]
    for label, b in fig6.items():
        cells = [f"{100 * v['H@1']:.2f} (n={v['mentions']})" for v in b.values()]
        md.append(f"| {label} | " + " | ".join(cells) + f" | {100 * overall[label]['H@1']:.2f} |")
    md += ["", f"![H@1 by text length]({pngs[0].name})", "",
           "## Prediction time per variant (cf. the paper's Table 4)", "",
           f"Scoring all {table4['mentions']} {timing_split} mentions against the whole KG of {table4['entities']} "
           f"entities (cached entity features; best of {repeats} interleaved repeats; torch threads: "
           f"{table4['threads']}; random weights with the run's shapes).", "",
           "| variant | seconds | µs / pair | vs ATT | KG encoding (s, once) |", "| --- | ---: | ---: | ---: | ---: |"]
    for v, r in table4["variants"].items():
        ratio = r["best"] / table4["variants"]["A1"]["best"] if "A1" in table4["variants"] else float("nan")
        md.append(f"| {LABELS.get(v, v)} | {r['best']:.2f} | {r['us_per_pair']:.1f} | {ratio:.2f}x | "
                  f"{r['kg_seconds']:.1f} |")
    md += ["", f"![prediction time]({pngs[1].name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
