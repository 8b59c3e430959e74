"""Streaming calibration collectors and the amax maths (pytorch-quantization semantics).

A collector takes one batch at a time and keeps no activations: the running
max |x| and a histogram of |x| (REFERENCE.md §2.2: 2048 bins on [0, first
max], grown by whole bins of the same width when a later batch exceeds the
range). `compute_amax` is a pure function of (counts, edges) implementing
§2.3–2.5 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

METHODS = ("max", "percentile", "mse", "entropy")
DEFAULT_BINS = 2048
# A later batch far past the range (a -3.4e38 mask fill) would need astronomically many bins of
# the first width: the range stops growing at 64x the first one and farther values count in
# the last bin (the exact running max is still kept). Width never changes, so merges stay exact.
MAX_BINS = 64 * DEFAULT_BINS
# Ranges below this are treated as all-zero (float32 bin widths would be denormal).
MIN_RANGE = 1e-30


class Method(str, Enum):
    MAX = "max"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


# ---------------------------------------------------------------- collectors

def _magnitudes(batch: np.ndarray) -> tuple[np.ndarray, int]:
    """|x| as float32 over the finite values, and how many were not finite."""
    values = np.abs(np.asarray(batch, dtype=np.float32).ravel())
    finite = np.isfinite(values)
    if finite.all():
        return values, 0
    return values[finite], int(values.size - finite.sum())


@dataclass
class HistogramCollector:
    num_bins: int = DEFAULT_BINS
    width: float = 0.0                 # bin width, fixed by the first non-zero batch
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    zeros: int = 0                     # values seen before any range existed (all zero)
    amax: float = 0.0
    elements: int = 0
    nonfinite: int = 0

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1, dtype=np.float64) * self.width

    def _grow(self, top: float) -> None:
        """Extend by whole bins of the same width so the range covers `top` (up to MAX_BINS)."""
        needed = min(math.ceil(top / self.width), MAX_BINS)
        if needed > len(self.counts):
            grown = np.zeros(needed, np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def collect(self, batch: np.ndarray) -> None:
        values, bad = _magnitudes(batch)
        self.nonfinite += bad
        self.elements += values.size
        if not values.size:
            return
        top = float(values.max())
        self.amax = max(self.amax, top)
        if self.width == 0.0:
            if top < MIN_RANGE:
                self.zeros += values.size
                return
            self.width = top / self.num_bins
            self.counts = np.zeros(self.num_bins, np.int64)
            self.counts[0] += self.zeros
            self.zeros = 0
        elif top > len(self.counts) * self.width:
            self._grow(top)
        self.counts += self._bin(values, len(self.counts))

    def _bin(self, values: np.ndarray, bins: int) -> np.ndarray:
        # torch.histc on [0, bins*width]: floor(x / width), the top edge into the last bin
        with np.errstate(over="ignore"):
            scaled = values * np.float32(1.0 / self.width)
        np.minimum(scaled, np.float32(bins - 1), out=scaled)  # also catches float32 overflow to inf
        return np.bincount(scaled.astype(np.int64), minlength=bins)

    def merge(self, other: "HistogramCollector") -> None:
        """Add another collector's histogram. Exact when both share the bin width (same first
        batch, see `qdqc calibrate --shard`): the range grows by whole bins, counts add."""
        self.elements += other.elements
        self.nonfinite += other.nonfinite
        self.amax = max(self.amax, other.amax)
        if other.width == 0.0:
            if self.width == 0.0:
                self.zeros += other.zeros
            else:
                self.counts[0] += other.zeros
            return
        if self.width == 0.0:
            zeros = self.zeros
            self.width, self.counts, self.zeros = other.width, other.counts.copy(), 0
            self.counts[0] += zeros
            return
        if not math.isclose(self.width, other.width, rel_tol=1e-12):
            raise ValueError(f"histograms have different bin widths ({self.width:.6g} vs {other.width:.6g}): "
                             "collect shards with --shard K/N so they share the first batch's grid")
        if len(other.counts) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(len(other.counts) - len(self.counts), np.int64)])
        self.counts[: len(other.counts)] += other.counts


# ---------------------------------------------------------------- amax maths (pure)

def compute_amax(counts: np.ndarray, edges: np.ndarray, method: str, *, percentile: float = 99.99,
                 num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1) -> float:
    """The clipping threshold `method` picks from a histogram of |x| (pytorch-quantization semantics).

    max: the right edge of the last non-empty bin; percentile: the left edge of the first bin whose
    cumulative share reaches `percentile`; mse: the bin center minimizing the count-weighted
    fake-quantization error (first minimum); entropy: the right edge of the kept range minimizing
    KL(P||Q) (last minimum).
    """
    counts = np.asarray(counts)
    edges = np.asarray(edges, dtype=np.float64)
    if counts.ndim != 1 or len(edges) != len(counts) + 1:
        raise ValueError(f"edges must have len(counts) + 1 = {len(counts) + 1} entries, got {len(edges)}")
    if counts.sum() <= 0:
        raise ValueError("empty histogram")
    method = Method(method).value
    if method == "max":
        return float(edges[np.flatnonzero(counts)[-1] + 1])
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        return _amax_percentile(counts, edges, percentile)
    if method == "mse":
        return _amax_mse(counts, edges, num_bits, unsigned, start_bin, stride)
    return _amax_entropy(counts, edges, num_bits, unsigned, start_bin, stride)


def _amax_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    cdf = np.cumsum(counts / counts.sum())
    index = int(np.searchsorted(cdf, percentile / 100))
    return float(edges[min(index, len(edges) - 1)])


def _amax_mse(counts, edges, num_bits, unsigned, start_bin, stride) -> float:
    edges = edges.astype(np.float32)  # the reference runs in float32 (on CUDA)
    centers = (edges[1:] + edges[:-1]) / np.float32(2)
    candidates = np.arange(start_bin, len(centers), stride)
    if not len(candidates):
        return float(centers[-1])
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1
    low = 0.0 if unsigned else -bound
    weights = counts.astype(np.float32)
    best, best_error = candidates[0], np.inf
    for chunk in np.array_split(candidates, max(1, len(candidates) // 256)):
        amax = centers[chunk][:, None]
        scale = np.float32(bound) / amax            # fake_tensor_quant: scale = bound / amax
        quantized = np.clip(np.rint(centers[None, :] * scale), low, bound) / scale
        errors = ((quantized - centers[None, :]) ** 2 * weights[None, :]).mean(axis=1)
        index = int(np.argmin(errors))              # first minimum
        if errors[index] < best_error:  # strictly: an equal later chunk keeps the first minimum
            best, best_error = chunk[index], errors[index]
    return float(centers[best])


def _amax_entropy(counts, edges, num_bits, unsigned, start_bin, stride) -> float:
    if len(counts) < start_bin:
        return float(edges[-1])
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    total = bins.sum()
    levels = 1 << (num_bits - 1 + int(unsigned))
    tail = np.concatenate([np.cumsum(bins[::-1])[::-1], [0.0]])  # tail[i] = sum(bins[i:])
    divergences = []
    kept = range(start_bin, len(bins) + 1, stride)
    for i in kept:
        level = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        head = bins[:i]
        full = head != 0
        sums = np.bincount(level[full], weights=head[full], minlength=levels)
        sizes = np.bincount(level[full], minlength=levels)
        q = np.zeros(i)
        q[full] = sums[level[full]] / sizes[level[full]]
        p = head.copy()
        p[-1] += tail[i]
        if round(q.sum() + tail[i]) != round(total) or round(p.sum()) != round(total):
            raise RuntimeError("entropy calibration lost counts")
        divergences.append(_kl(p, q))
    divergences = np.asarray(divergences)
    last = len(divergences) - 1 - int(np.argmin(divergences[::-1]))   # last minimum
    return float(edges[last * stride + start_bin])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """scipy.stats.entropy(p, q): both normalized, natural log, inf where q = 0 < p."""
    p = p / p.sum()
    q = q / q.sum()
    nonzero = p > 0
    if np.any(q[nonzero] == 0):
        return math.inf
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))


def amaxes(collector: HistogramCollector, *, percentile: float = 99.99, **kwargs) -> dict[str, float]:
    """Every method's amax from one collector (max is the exact running max, not a bin edge)."""
    if collector.width == 0.0:
        return {m: 0.0 for m in METHODS}
    found = {"max": collector.amax}
    counts, edges = collector.counts, collector.edges
    for method in ("percentile", "mse", "entropy"):
        found[method] = compute_amax(counts, edges, method, percentile=percentile, **kwargs)
    return found


# ---------------------------------------------------------------- state files

def save_states(path, collectors: dict[str, HistogramCollector]) -> None:
    """Every collector's state in one npz (no pickles): names, then per index counts and scalars."""
    import io
    import os
    import tempfile

    arrays = {"names": np.array(list(collectors), dtype=np.str_)}
    for i, c in enumerate(collectors.values()):
        arrays[f"{i}.counts"] = c.counts
        arrays[f"{i}.scalars"] = np.array([c.width, c.amax], np.float64)
        arrays[f"{i}.integers"] = np.array([c.num_bins, c.zeros, c.elements, c.nonfinite], np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qdqc-", dir=directory)
    with os.fdopen(fd, "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)


def load_states(path) -> dict[str, HistogramCollector]:
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        states = {}
        for i, name in enumerate(names):
            width, amax = data[f"{i}.scalars"]
            num_bins, zeros, elements, nonfinite = (int(v) for v in data[f"{i}.integers"])
            states[name] = HistogramCollector(num_bins, float(width), data[f"{i}.counts"].astype(np.int64),
                                              zeros, float(amax), elements, nonfinite)
    return states
