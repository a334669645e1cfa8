"""Counts and ambiguity measures of a synthetic benchmark plan (`otmel.data.synth_plan.SynthPlan`), written to
synth_stats.json."""

from __future__ import annotations

from collections import Counter, defaultdict

from otmel.data.synth_plan import SPLITS, SynthEntity, SynthPlan


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def plan_stats(plan: SynthPlan) -> dict:
    """Counts and ambiguity measures of a plan (computed from the plan, never fed to a model).

    Fractions are over linked (non-nil) mentions: `frac_surface_equals_gold_name` (exact string; `_normalised`
    after case folding and whitespace normalisation), `frac_gold_shares_name` (the gold has a homonym),
    `frac_text_ambiguous` (>= 2 entities of the gold's name have every object the sentence names, so name +
    sentence cannot decide), `frac_with_distractor` (the picture shows an object the gold does not have).
    """
    ents = plan.entities
    by_name: dict[str, list[SynthEntity]] = defaultdict(list)
    for e in ents:
        by_name[e.name].append(e)
    by_qid = {e.qid: e for e in ents}
    linked = [m for m in plan.mentions if m.answer != "nil"]
    text_amb = 0
    for m in linked:
        gold = by_qid[m.answer]
        holders = [e for e in by_name[gold.name] if set(m.named) <= set(e.objects)]
        text_amb += len(holders) >= 2
    n = max(1, len(linked))
    per_split = Counter(m.split for m in plan.mentions)
    return {
        "seed": plan.seed,
        "n_entities": len(ents),
        "n_entities_with_image": sum(e.has_image for e in ents),
        "n_names": len(by_name),
        "mean_entities_per_name": round(len(ents) / len(by_name), 4),
        "max_entities_per_name": max(len(v) for v in by_name.values()),
        "n_names_shared": sum(len(v) >= 2 for v in by_name.values()),
        "n_mentions": {split: per_split[split] for split, _ in SPLITS},
        "n_nil": len(plan.mentions) - len(linked),
        "n_mentions_without_image": sum(m.image != "ok" for m in plan.mentions),
        "n_mentions_unreadable_image": sum(m.image == "bad" for m in plan.mentions),
        "frac_surface_equals_gold_name": round(
            sum(m.mention == by_qid[m.answer].name for m in linked) / n, 4),
        "frac_surface_equals_gold_name_normalised": round(
            sum(_norm(m.mention) == _norm(by_qid[m.answer].name) for m in linked) / n, 4),
        "frac_gold_shares_name": round(sum(len(by_name[by_qid[m.answer].name]) >= 2 for m in linked) / n, 4),
        "frac_text_ambiguous": round(text_amb / n, 4),
        "frac_with_distractor": round(
            sum(len(m.objects) > len(by_qid[m.answer].objects) for m in linked) / n, 4),
    }


__all__ = ["plan_stats"]
