#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite, slow end-to-end runs included.
# `--fast`: the inner loop, without the slow end-to-end runs (-m "not slow"). Other arguments go to pytest,
# e.g. `bash scripts/test.sh tests/test_link.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu
args=()
for a in "$@"; do
    if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
.venv/bin/ruff check otmel ray_jobs bench tests
.venv/bin/mypy
# 2 workers, each running one fixed group of whole test modules in a fixed order (tests/conftest.py): the slow
# end-to-end runs wait on processes and sockets much of the time, so two of them share the 2 cores well
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=25 "${args[@]}"
