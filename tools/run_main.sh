#!/usr/bin/env bash
# Set up .venv (dev + bench extras) and run the main job on the embedded default (real all-MiniLM-L6-v2, real sentences).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
# the main job's table has NNCF INT8 rows: the bench extra (nncf) on top of dev; the tests do not need it
.venv/bin/python -m pip install --quiet -e ".[bench]" 2>&1 | grep -v "^WARNING: Location" || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python tools/main_job.py "$@"
