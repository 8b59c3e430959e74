#!/usr/bin/env bash
# The CPUs the suite checks the integer kernels on, whatever this machine is: Debian's qemu-user
# (`qemu-x86_64 -cpu Haswell`: AVX2 without AVX-512 or VNNI) and an aarch64 sandbox with onnxruntime's
# aarch64 wheel (tools/arm64_env.sh). Quiet on success.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    apt_get() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo apt-get "$@"; fi; }
    (apt_get install -y -qq qemu-user >/dev/null 2>&1 || { apt_get update -qq >/dev/null 2>&1 &&
        apt_get install -y -qq qemu-user >/dev/null 2>&1; }) || {
        echo "setup_isa: could not install qemu-user (apt-get): the emulated-CPU tests will be skipped" >&2; exit 0; }
fi
bash tools/arm64_env.sh >/dev/null 2>&1 || echo "setup_isa: tools/arm64_env.sh failed: the ARM64 tests will be skipped" >&2
