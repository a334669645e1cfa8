#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite, slow end-to-end runs included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu
.venv/bin/ruff check otmel ray_jobs bench tests
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
