#!/usr/bin/env bash
# One command: set up, then train and sample the PatchDDM demo on built-in phantoms (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
patchddm demo --out "${1:-demo_out}"
