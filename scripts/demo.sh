#!/usr/bin/env bash
# The embedded default, from a fresh clone: set up .venv, then train on a local Ray (2 CPU workers,
# DeepSpeed over gloo) on the bundled synthetic benchmark (generated and packed on first use),
# evaluate over the whole KG and print the final table. Extra arguments are run-config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
exec .venv/bin/otmel train "$@"
