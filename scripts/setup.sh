#!/usr/bin/env bash
# Create .venv and install otmel with its dev extras. torch is installed FIRST as the pinned CPU build
# (torch==2.13.0): otherwise a fresh resolver pulls the newest CUDA build (several GB) in as a dependency.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[dev]"
echo "otmel installed in $(pwd)/.venv"
