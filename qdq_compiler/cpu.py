"""The host CPU, the integer-kernel form a lowered model assumes, and the arithmetic of x86's int8 kernels.

onnxruntime (MLAS) and OpenVINO (oneDNN) multiply uint8 activations by int8 weights with
VPMADDUBSW on x86 CPUs without VNNI (AVX2, and AVX-512 without VNNI): each pair of products
a[2i]·b[2i] + a[2i+1]·b[2i+1] along the reduction axis is summed into a *saturating* int16
before it is widened to int32 (Intel SDM, PMADDUBSW; onnxruntime's quantization docs, "When and
why do I need to try U8U8?"). With a in [0, 255], a pair overflows only where both weights have
the same sign and |b[2i]| + |b[2i+1]| > 128 (255 · 129 > 32767 ≥ 255 · 128); products of opposite
signs never do. VNNI (VPDPBUSD), AMX and ARM's dot-product kernels sum in int32 and are exact;
onnxruntime's ARM64 kernel without dot products also sums pairs in 16 bits, where only a
(−128)·(−128) pair overflows (symmetric weights never hold −128).

The portable form orders (and where needed splits) each weight's reduction rows so that every pair
is within that bound (`arrange_rows`), the activation's columns gathered to match, so one model
computes the fake-quant model's integers everywhere; the VNNI form (`Isa.VNNI`) does not and is refused off VNNI hosts.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path

import numpy as np

PAIR_LIMIT = 128          # the largest |b0| + |b1| of a same-sign weight pair that 255·(|b0|+|b1|) keeps in int16
INT16_MAX = 32767
ISA_KEY = "qdqc.isa"      # metadata: the kernel form a lowered model needs (absent: portable)


class Isa(str, Enum):
    """The integer kernels a lowered model assumes: PORTABLE is exact on every CPU; VNNI uses full
    int8 weight pairs and integer tricks that only int32-accumulating kernels compute exactly."""

    PORTABLE = "portable"
    VNNI = "vnni"


@dataclass(frozen=True)
class KernelSettings:
    """What the lowering passes read of the kernel form (LowerConfig carries it; calibration: portable)."""

    isa: Isa = Isa.PORTABLE

    @classmethod
    def from_config(cls, config) -> "KernelSettings":
        return cls(getattr(config, "isa", Isa.PORTABLE))


@dataclass(frozen=True)
class HostCpu:
    model: str
    arch: str
    flags: frozenset[str]

    @property
    def features(self) -> dict[str, bool]:
        """The features that decide integer and bf16 kernel speed and exactness."""
        f = self.flags
        if self.arch in ("aarch64", "arm64"):
            return {"neon": "asimd" in f, "dotprod": "asimddp" in f, "i8mm": "i8mm" in f, "bf16": "bf16" in f}
        return {"avx2": "avx2" in f, "avx512": "avx512f" in f and "avx512bw" in f,
                "vnni": self.vnni, "amx": "amx_int8" in f, "bf16": "avx512_bf16" in f or "amx_bf16" in f}

    @property
    def vnni(self) -> bool:
        """int8 dot products summed in int32: x86 VNNI/AMX, ARM64 dot products (SDOT/UDOT). onnxruntime's
        ARM64 kernel without them sums pairs in int16 too (a (−128)·(−128) pair wraps, seen under
        qemu-aarch64 -cpu cortex-a72)."""
        if self.arch in ("aarch64", "arm64"):
            return "asimddp" in self.flags
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    def supports(self, isa: Isa) -> bool:
        return isa is Isa.PORTABLE or self.vnni

    def describe(self) -> str:
        """One line: the model and the ISA features that matter, e.g. 'AMD EPYC (x86_64: avx2 avx512 vnni bf16)'."""
        present = [name for name, on in self.features.items() if on]
        return f"{self.model} ({self.arch}: {' '.join(present) or 'no SIMD features found'})"

    def to_json(self) -> dict:
        return {"model": self.model, "arch": self.arch, **self.features}


def parse_cpuinfo(text: str, arch: str) -> HostCpu:
    """HostCpu from /proc/cpuinfo's text (the first processor's 'model name'/'flags', or ARM's 'Features')."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value
    return HostCpu(model or platform.processor() or arch, arch, frozenset(flags.split()))


# numpy's own CPUID / HWCAP probe (what the executing CPU runs, so also under an emulator, where
# /proc/cpuinfo describes the real machine) -> the /proc/cpuinfo flag names used here
NUMPY_FLAGS = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni",
               "AVX512BF16": "avx512_bf16", "ASIMD": "asimd", "ASIMDDP": "asimddp"}
# flags numpy does not probe: trusted from /proc/cpuinfo only where numpy confirms their base ISA
# (AMX comes with AVX-512); AVX-VNNI without AVX-512 (client CPUs) is then not seen: the VNNI form is
# refused there, which is safe
UNPROBED = {"amx_int8": "avx512f", "amx_bf16": "avx512f", "i8mm": "asimd", "bf16": "asimd"}


def runtime_flags(listed: frozenset[str]) -> frozenset[str]:
    """The ISA flags of the CPU executing this process: numpy's probe where it has one, else `listed`."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as probed
    except ImportError:
        return listed
    found = {flag for key, flag in NUMPY_FLAGS.items() if probed.get(key)}
    return frozenset(found | {flag for flag, base in UNPROBED.items() if flag in listed and base in found})


@cache
def host() -> HostCpu:
    """This machine's CPU: the model name from /proc/cpuinfo (Linux), the ISA as this process sees it."""
    arch = platform.machine().lower()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    listed = parse_cpuinfo(text, arch)
    return HostCpu(listed.model, arch, runtime_flags(listed.flags))


def overflowing_pairs(q: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mask over the pairs (2i, 2i+1) along `axis` of integer weights `q` whose same-sign sum exceeds
    PAIR_LIMIT: the pairs a uint8·int8 VPMADDUBSW can saturate on. Shape: q's with axis halved (rounded up)."""
    first, second = _pairs(np.asarray(q, np.int32), axis)
    return np.moveaxis((first * second > 0) & (np.abs(first) + np.abs(second) > PAIR_LIMIT), 0, axis)


def arrange_rows(q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """An order of the reduction rows of int8 weights `q` [K, N] in which every pair (2i, 2i+1) fits the
    int16 bound, splitting a row into two halves (⌊b/2⌋ and b − ⌊b/2⌋, each within ±64) where no row can
    partner it: (rows [K'], part [K']: 0 whole, 1 and 2 the halves), or None when q's own order fits.
    Gathering the activation's columns by `rows` and the weights by `arranged` gives the same sums."""
    q = np.asarray(q, np.int32)
    if not overflowing_pairs(q, 0).any():
        return None
    peak = np.abs(q).max(axis=1)
    free = np.ones(len(q), bool)
    order: list[tuple[int, int]] = []
    small = np.argsort(peak, kind="stable")                       # partners: the smallest rows first
    for row in np.argsort(-peak, kind="stable"):
        if peak[row] * 2 <= PAIR_LIMIT:
            break                                                 # the rest fit with anything alike
        if not free[row]:
            continue
        free[row] = False
        candidates = small[free[small]]
        clash = (q[candidates] * q[row] > 0) & (np.abs(q[candidates]) + np.abs(q[row]) > PAIR_LIMIT)
        fits = candidates[~clash.any(axis=1)]
        if len(fits):
            free[fits[0]] = False
            order += [(row, 0), (int(fits[0]), 0)]
        else:
            order.append((row, -1))                               # split: its halves pair with small rows
    pairs = [entry for entry in order if entry[1] == 0]
    rest = [(int(r), 0) for r in np.flatnonzero(free)] + [h for r, part in order if part < 0 for h in ((r, 1), (r, 2))]
    rows, parts = zip(*(pairs + rest))
    return np.array(rows, np.int64), np.array(parts, np.int8)


def arranged(q: np.ndarray, rows: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """`q`'s rows in `arrange_rows`' order, halves where it split a row."""
    picked = np.asarray(q, np.int32)[rows]
    lower = np.floor_divide(picked, 2)
    return np.where(parts[:, None] == 1, lower, np.where(parts[:, None] == 2, picked - lower, picked)).astype(np.int8)


def _pairs(q: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.moveaxis(q, axis, 0)
    if values.shape[0] % 2:
        values = np.concatenate([values, np.zeros_like(values[:1])])
    return values[0::2], values[1::2]


def matmul_u8s8(a: np.ndarray, b: np.ndarray, *, saturating: bool) -> np.ndarray:
    """The int32 accumulator of uint8 `a` [M, K] times int8 `b` [K, N]: exact (VNNI, AMX, ARM) or, with
    `saturating`, as VPMADDUBSW computes it (pairs along K summed into saturated int16, then int32)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if not saturating:
        return (a @ b).astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]   # [M, K/2, N]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1).astype(np.int32)
