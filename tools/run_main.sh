#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default (real all-MiniLM-L6-v2, real sentences).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python tools/main_job.py "$@"
