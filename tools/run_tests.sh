#!/usr/bin/env bash
# Set up .venv, the emulated CPUs (qemu-user: x86 without VNNI, ARM64) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
bash tools/setup_isa.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest -q "$@"
