#!/usr/bin/env bash
# Build an aarch64 (ARM64) sandbox under .arm64/ for running onnxruntime's aarch64 CPU build
# under qemu-user, so tests can compare model outputs on ARM64 against x86.
#
#   .arm64/sysroot/  Debian 12 (bookworm) arm64 python3.11 + the shared libraries it and onnxruntime
#                    need, unpacked from Debian's .debs with `dpkg -x` (nothing is installed on the host;
#                    apt runs with a private config/state under .arm64/apt, so the host's apt and dpkg
#                    state -- architectures, lists, status -- are left untouched).
#   .arm64/site/     aarch64 wheels of onnxruntime, numpy and onnxruntime's import-time dependencies.
#   .arm64/run       wrapper: `.arm64/run script.py args...` (or `.arm64/run -c CODE`) runs the aarch64
#                    python under `qemu-aarch64 -L .arm64/sysroot` with PYTHONPATH=.arm64/site.
#                    QEMU_CPU (e.g. cortex-a72, neoverse-n1, max) picks the emulated CPU; default "max".
#
# Needs: qemu-aarch64 (apt-get install qemu-user), apt-get, dpkg, and .venv/bin/pip (for `pip download`).
# Idempotent: a second run with everything in place does nothing but print the run prefix.
# Rebuild from scratch with `rm -rf .arm64`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD/.arm64"
SYSROOT="$ROOT/sysroot"
SITE="$ROOT/site"
ORT_VERSION="1.32.0"
NUMPY_VERSION="2.4.6"   # same as the x86 .venv, so both sides run the same numpy
STAMP_SYS="$ROOT/.sysroot.done"
STAMP_SITE="$ROOT/.site-ort${ORT_VERSION}-np${NUMPY_VERSION}.done"

# Debian arm64 packages to unpack; apt resolves their dependencies (Depends/Pre-Depends, no Recommends).
DEB_PKGS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 libc6 zlib1g libffi8 libssl3
          libexpat1 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 ca-certificates)
# Pulled in by the resolver via libpython3.11-minimal but not needed to run python; skipped.
DEB_SKIP=" dpkg tar debconf perl-base openssl "

log() { echo "arm64_env: $*" >&2; }

if ! command -v qemu-aarch64 >/dev/null; then
    log "qemu-aarch64 not found; install it with: apt-get install -y qemu-user"
    exit 1
fi
QEMU="$(command -v qemu-aarch64)"

build_sysroot() {
    local apt="$ROOT/apt" tmp="$ROOT/sysroot.tmp"
    rm -rf "$apt" "$tmp"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d" "$apt/debs" "$tmp"
    : > "$apt/status"
    # Same mirrors as the host (deb822 and/or one-line format), read by a private apt instance.
    cp /etc/apt/sources.list.d/*.sources "$apt/sources.list.d/" 2>/dev/null || true
    if [ -s /etc/apt/sources.list ]; then cp /etc/apt/sources.list "$apt/sources.list.d/host.list"; fi
    if ! ls "$apt/sources.list.d/"* >/dev/null 2>&1; then
        printf 'deb http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            > "$apt/sources.list.d/debian.list"
    fi
    cat > "$apt/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State "$apt";
Dir::State::Lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$apt/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Acquire::Languages "none";
APT::Install-Recommends "false";
APT::Sandbox::User "root";
EOF
    export APT_CONFIG="$apt/apt.conf"
    apt-get -qq update >"$apt/update.log" 2>&1 || { cat "$apt/update.log" >&2; log "apt-get update (arm64, private state) failed"; exit 1; }
    # Resolve the dependency closure against an empty status file, then download exactly those versions.
    local sim pkgs=()
    sim="$(apt-get -s -qq install "${DEB_PKGS[@]}" 2>&1)" || { echo "$sim" >&2; log "dependency resolution failed"; exit 1; }
    while read -r name ver; do
        case "$DEB_SKIP" in *" $name "*) continue ;; esac
        pkgs+=("$name=$ver")
    done < <(echo "$sim" | sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1 \2/p')
    [ "${#pkgs[@]}" -gt 0 ] || { echo "$sim" >&2; log "no packages resolved"; exit 1; }
    (cd "$apt/debs" && apt-get -qq download "${pkgs[@]}" >"$apt/download.log" 2>&1) \
        || { cat "$apt/download.log" >&2; log "apt-get download failed"; exit 1; }
    unset APT_CONFIG
    local deb
    for deb in "$apt/debs/"*.deb; do dpkg -x "$deb" "$tmp"; done
    # ld.so finds libraries in the multiarch dirs without an ld.so.cache; provide an empty one anyway
    # so the guest loader never falls back to the host's (x86) /etc/ld.so.cache.
    mkdir -p "$tmp/etc"
    : > "$tmp/etc/ld.so.cache"
    [ -x "$tmp/usr/bin/python3.11" ] || { log "python3.11 missing from unpacked sysroot"; exit 1; }
    rm -rf "$SYSROOT" "$apt/debs" "$apt/cache" "$apt/lists"
    mv "$tmp" "$SYSROOT"
    touch "$STAMP_SYS"
}

build_site() {
    local whl="$ROOT/wheels" pip="$PWD/.venv/bin/pip" out
    [ -x "$pip" ] || pip="$(command -v pip3)"
    rm -rf "$whl" "$SITE.tmp"
    mkdir -p "$whl"
    local plat=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64
                --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
                --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
    out="$("$pip" download --quiet --disable-pip-version-check --dest "$whl" "${plat[@]}" \
            "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION" 2>&1)" \
        || { echo "$out" >&2; log "pip download of aarch64 wheels failed"; exit 1; }
    out="$("$pip" install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
            --target "$SITE.tmp" "${plat[@]}" "$whl"/*.whl 2>&1)" \
        || { echo "$out" >&2; log "pip install --target of aarch64 wheels failed"; exit 1; }
    rm -rf "$SITE" "$SITE.tmp/bin" "$whl"
    mv "$SITE.tmp" "$SITE"
    rm -f "$ROOT"/.site-*.done
    touch "$STAMP_SITE"
}

write_cpuinfo() {
    # qemu-user 7.x passes the host's (x86) /proc/cpuinfo through to the guest; onnxruntime's bundled
    # pytorch/cpuinfo finds no ARM cores in it and segfaults while loading onnxruntime_pybind11_state.
    # qemu's -L prefix is applied to every absolute path the guest opens, so a file at
    # <sysroot>/proc/cpuinfo shadows the host one. It describes Cortex-A72 cores (MIDR 0x410fd083):
    # cpuinfo force-enables dotprod/fp16 for newer MIDRs (A55/A76/N1...) whatever the HWCAPs say, which
    # SIGILLs on e.g. QEMU_CPU=cortex-a72; for an A72 MIDR it takes every ISA feature (dotprod, i8mm,
    # sve, ...) from the HWCAPs that qemu derives from the emulated CPU (QEMU_CPU, default "max").
    local n=1 possible i
    possible="$(cat /sys/devices/system/cpu/possible 2>/dev/null || echo 0)"
    n=$(( ${possible##*[-,]} + 1 ))
    mkdir -p "$SYSROOT/proc"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 50.00\n' "$i"
        printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n'
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done > "$SYSROOT/proc/cpuinfo.tmp"
    mv "$SYSROOT/proc/cpuinfo.tmp" "$SYSROOT/proc/cpuinfo"
}

write_runner() {
    local tmp="$ROOT/run.tmp"
    cat > "$tmp" <<'EOF'
#!/usr/bin/env bash
# Run the aarch64 python3.11 (Debian bookworm) with aarch64 onnxruntime/numpy under qemu-user.
# Usage: .arm64/run script.py args...   |   .arm64/run -c CODE   (QEMU_CPU=<cpu> picks the emulated CPU)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cpu=()
if [ -n "${QEMU_CPU:-}" ]; then cpu=(-cpu "$QEMU_CPU"); fi
# Start from a clean environment: no host PYTHON*/VIRTUAL_ENV/LD_* settings leak into the guest.
exec env -i HOME="${HOME:-/root}" PATH=/usr/bin:/bin LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    ${OMP_NUM_THREADS:+OMP_NUM_THREADS="$OMP_NUM_THREADS"} \
    PYTHONPATH="$here/site" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONHASHSEED="${PYTHONHASHSEED:-0}" \
    QEMU_BIN "${cpu[@]}" -L "$here/sysroot" "$here/sysroot/usr/bin/python3.11" -s "$@"
EOF
    sed -i "s#QEMU_BIN#$QEMU#" "$tmp"
    chmod +x "$tmp"
    mv "$tmp" "$ROOT/run"
}

mkdir -p "$ROOT"
[ -f "$STAMP_SYS" ] && [ -x "$SYSROOT/usr/bin/python3.11" ] || build_sysroot
[ -s "$SYSROOT/proc/cpuinfo" ] || write_cpuinfo
[ -f "$STAMP_SITE" ] && [ -d "$SITE/onnxruntime" ] || build_site
[ -x "$ROOT/run" ] && grep -q "$QEMU" "$ROOT/run" || write_runner
echo "aarch64 python + onnxruntime $ORT_VERSION (qemu-user); run scripts with:"
echo "$ROOT/run"
