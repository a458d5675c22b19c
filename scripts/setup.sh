#!/usr/bin/env bash
# Create ./.venv and install patchddm_fast with its test extras. CPU torch 2.13 is
# installed first and pinned, so no later requirement pulls a multi-GB CUDA build
# (on a GPU machine, install your CUDA torch first and skip that line).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
