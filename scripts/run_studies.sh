#!/usr/bin/env bash
# The issue-12 seed studies (docs/studies/PLAN.md), interleaved seed-major so that every stop leaves paired
# seeds of both studies. Resumable: re-run it and finished trials are skipped (otmel study reads rows.jsonl).
# Then (unless MELBENCH=0) the real-data study: OT vs CLS vs A1 with the MiniLM tower on MELBench Richpedia-MEL,
# 3 seeds at the budget of docs/results.md (2 epochs; ~15-20 min a trial on 2 cores).
# Tables: runs/studies/{fidelity-synth,sets-synth,melbench-rp}/summary.md. Usage: bash scripts/run_studies.sh [SEEDS...]
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu
OTMEL=${OTMEL:-.venv/bin/otmel}
COMMON=(train.progress=false wandb.enabled=false)
# The finished trials are committed (docs/studies/data/NAME/{plan.json,rows.jsonl}); a fresh checkout resumes from
# them instead of re-running what an earlier session finished.
for name in fidelity-synth sets-synth melbench-rp; do
    if [ ! -e "runs/studies/$name/rows.jsonl" ] && [ -e "docs/studies/data/$name/rows.jsonl" ]; then
        mkdir -p "runs/studies/$name"
        cp "docs/studies/data/$name/plan.json" "docs/studies/data/$name/rows.jsonl" "runs/studies/$name/"
    fi
done
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2 3 4)
for s in "${seeds[@]}"; do
    $OTMEL study --name fidelity-synth --variants OT,A1,KD,CLS,O1,O2,LREG --seeds "$s" \
        --pairs OT-A1,OT-CLS,KD-OT,KD-A1,LREG-OT,OT-O1,OT-O2 "${COMMON[@]}"
    $OTMEL study --config configs/synth-sets.yaml --name sets-synth --variants OT,A1,O1,CLS --seeds "$s" \
        --pairs OT-A1,OT-O1,OT-CLS,A1-CLS "${COMMON[@]}"
    if [ "$s" = "1" ] && [ ! -e runs/sweeps/reg-synth-e3-probe/ranked.md ]; then
        $OTMEL tune --search configs/search/reg.yaml --name reg-synth-e3-probe train.epochs=3 wandb.enabled=false
    fi
done
if [ "${MELBENCH:-1}" = "1" ]; then
    $OTMEL study --config configs/melbench-richpedia.yaml --name melbench-rp --variants OT,CLS,A1 --seeds 0-2 \
        --pairs OT-CLS,OT-A1,A1-CLS train.epochs=2 train.eval_every=2 "${COMMON[@]}"
fi
