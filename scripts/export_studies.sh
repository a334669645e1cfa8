#!/usr/bin/env bash
# Write the tables of every seed study under RUNS/studies/ (default runs/) into docs/studies/NAME.md, from its
# plan.json and rows.jsonl (`otmel study --report`), so they can be committed while the studies run.
# Usage: bash scripts/export_studies.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
for plan in "$runs"/studies/*/plan.json; do
    [ -e "$plan" ] || continue
    name=$(basename "$(dirname "$plan")")
    .venv/bin/otmel study --name "$name" --report "docs/studies/$name.md" "run.storage=$runs"
    mkdir -p "docs/studies/data/$name"  # the finished trials, so a fresh checkout resumes the study
    cp "$runs/studies/$name/plan.json" "$runs/studies/$name/rows.jsonl" "docs/studies/data/$name/"
done
