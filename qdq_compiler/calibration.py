"""Streaming calibration collectors and the amax maths (pytorch-quantization semantics).

A collector takes one batch at a time and keeps no activations: the running
max |x| and a histogram of |x| (pytorch-quantization's `calib/histogram.py`: 2048 bins on [0, first
max], grown by whole bins of the same width when a later batch exceeds the
range). `compute_amax` is a pure function of (counts, edges) implementing its
entropy, MSE and percentile amax exactly.
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
    AUTO = "auto"   # per tensor, the candidate minimizing its layer's output error (auto_method.py)


# ---------------------------------------------------------------- collectors

def _magnitudes(batch: np.ndarray, inplace: bool) -> tuple[np.ndarray, float, int]:
    """|x| over the finite values as float32, its max, and how many values were not finite."""
    values = np.asarray(batch, dtype=np.float32).ravel()
    values = np.abs(values, out=values) if inplace and values.flags.writeable else np.abs(values)
    top = float(values.max()) if values.size else 0.0
    if math.isfinite(top):
        return values, top, 0
    finite = np.isfinite(values)
    values = values[finite]
    return values, float(values.max()) if values.size else 0.0, int(finite.size - finite.sum())


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

    def _grow(self, needed: int) -> None:
        """Extend by whole bins of the same width (up to MAX_BINS)."""
        needed = min(needed, MAX_BINS)
        if needed > len(self.counts):
            grown = np.zeros(needed, np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def collect(self, batch: np.ndarray, *, inplace: bool = False) -> None:
        """Histogram one batch; `inplace` lets it reuse the batch's buffer (saves a copy)."""
        values, top, bad = _magnitudes(batch, inplace)
        self.nonfinite += bad
        self.elements += values.size
        if not values.size:
            return
        self.amax = max(self.amax, top)
        first = self.width == 0.0
        if first:
            if top < MIN_RANGE:
                self.zeros += values.size
                return
            self.width = top / self.num_bins
            self.counts = np.zeros(self.num_bins, np.int64)
            self.counts[0] += self.zeros
            self.zeros = 0
        # Bin k holds [k·width, (k+1)·width); only the first batch's maximum, which sits on the
        # top edge, is counted in the last bin (torch.histc). A value's bin never depends on the
        # current range otherwise, so shards histogrammed on one grid merge exactly.
        inverse = np.float32(1.0 / self.width)
        with np.errstate(over="ignore"):
            scaled = np.multiply(values, inverse, out=values)
            needed = np.floor(np.float32(top) * inverse) + 1   # the same float32 op the values get
        bins = self.num_bins if first else int(min(needed, MAX_BINS))
        self._grow(bins)  # whole bins of the same width, as pytorch's ceil(max / width)
        if first or needed > MAX_BINS:  # before the cast: float32 overflow to inf is possible
            np.minimum(scaled, np.float32(len(self.counts) - 1), out=scaled)
        index = scaled.astype(np.intp)
        self.counts += np.bincount(index, minlength=len(self.counts))

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
    if method == "auto":
        raise ValueError("'auto' chooses among methods per tensor (qdq_compiler.auto_method), it has no amax")
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
    # empty bins add nothing to the error: sum over the others, divide by every bin (the mean)
    filled = np.flatnonzero(counts)
    points, weights = centers[filled], counts[filled].astype(np.float32)
    best, best_error = candidates[0], np.inf
    for chunk in np.array_split(candidates, max(1, len(candidates) * len(filled) // (1 << 20))):
        amax = centers[chunk][:, None]
        scale = np.float32(bound) / amax            # fake_tensor_quant: scale = bound / amax
        quantized = np.clip(np.rint(points[None, :] * scale), low, bound) / scale
        with np.errstate(over="ignore"):   # ranges near float32's max (1e38): such candidates err at inf
            errors = ((quantized - points[None, :]) ** 2 * weights[None, :]).sum(axis=1) / np.float32(len(centers))
        index = int(np.argmin(errors))              # first minimum
        if errors[index] < best_error:  # strictly: an equal later chunk keeps the first minimum
            best, best_error = chunk[index], errors[index]
    return float(centers[best])


def _amax_entropy(counts, edges, num_bits, unsigned, start_bin, stride) -> float:
    """KL(P||Q) for every candidate from prefix sums: O(levels) per candidate, not O(bins).

    Candidate i keeps bins [0, i). Bin j falls in quantization level floor(levels·j / i) (exactly
    digitize(j, linspace(0, i, levels + 1)) - 1: k·i/levels is exact in binary floating point), so
    level L spans bins [ceil(L·i/levels), ceil((L+1)·i/levels)). Q spreads each level's count W_L
    evenly over its N_L non-empty bins; P is the kept bins with the outlier count added to the
    last one. With T = total and p_j, q_j unnormalized,
        KL = Σ p_j log p_j / T - log T - Σ p_j log q_j / T + log Σ q_j,
        Σ_{j<i} b_j log q_j = Σ_L W_L log(W_L / N_L).
    """
    n = len(counts)
    if n < start_bin:
        return float(edges[-1])
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    total = bins.sum()
    levels = 1 << (num_bits - 1 + int(unsigned))
    prefix = np.concatenate([[0.0], np.cumsum(bins)])
    filled = np.concatenate([[0], np.cumsum(bins != 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        prefix_xlogx = np.concatenate([[0.0], np.cumsum(np.where(bins > 0, bins * np.log(bins), 0.0))])
    every = np.arange(start_bin, n + 1, stride)
    parts = []
    # candidates in chunks: [candidates, levels] arrays stay a few MB even for a grown histogram (128K bins)
    for kept in np.array_split(every, max(1, len(every) // 4096)):
        with np.errstate(divide="ignore", invalid="ignore"):
            bounds = (np.arange(levels + 1)[None, :] * kept[:, None] + levels - 1) // levels
            weight = np.diff(prefix[bounds], axis=1)
            members = np.diff(filled[bounds], axis=1)
            level_terms = np.where(members > 0, weight * np.log(weight / members), 0.0).sum(axis=1)
            last, tail = bins[kept - 1], total - prefix[kept]
            p_last = last + tail
            sum_p_log_p = prefix_xlogx[kept - 1] + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
            last_level_mean = weight[:, -1] / members[:, -1]
            sum_p_log_q = level_terms + np.where(tail > 0, tail * np.log(last_level_mean), 0.0)
            q_total = prefix[kept]
            part = sum_p_log_p / total - np.log(total) - sum_p_log_q / total + np.log(q_total)
        part[((tail > 0) & (last == 0)) | (q_total == 0)] = math.inf
        parts.append(part)
    divergences = np.concatenate(parts)
    final = len(divergences) - 1 - int(np.argmin(divergences[::-1]))   # last minimum
    return float(edges[final * stride + start_bin])


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

    from .ir import write_bytes_atomic

    arrays = {"names": np.array(list(collectors), dtype=np.str_)}
    for i, c in enumerate(collectors.values()):
        arrays[f"{i}.counts"] = c.counts
        arrays[f"{i}.scalars"] = np.array([c.width, c.amax], np.float64)
        arrays[f"{i}.integers"] = np.array([c.num_bins, c.zeros, c.elements, c.nonfinite], np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def load_states(path) -> dict[str, HistogramCollector]:
    """Collector states written by `save_states`, checked: anything else is a QdqcError naming the file."""
    from pathlib import Path

    from .data import Npz
    from .errors import QdqcError, UsageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a statistics .npz")
    with Npz(path) as data:
        try:
            names = [str(n) for n in data["names"]]
            if len(set(names)) != len(names):
                raise ValueError("a tensor is listed twice")
            states = {}
            for i, name in enumerate(names):
                scalars, integers, counts = data[f"{i}.scalars"], data[f"{i}.integers"], data[f"{i}.counts"]
                if scalars.shape != (2,) or integers.shape != (4,) or counts.ndim != 1:
                    raise ValueError(f"tensor '{name}': unexpected array shapes")
                width, amax = (float(v) for v in scalars)
                num_bins, zeros, elements, nonfinite = (int(v) for v in integers)
                if not (math.isfinite(width) and math.isfinite(amax) and width >= 0 and amax >= 0) \
                        or not 0 < num_bins <= MAX_BINS or len(counts) > MAX_BINS \
                        or min(zeros, elements, nonfinite) < 0 or (counts.size and counts.min() < 0) \
                        or not np.issubdtype(counts.dtype, np.integer):
                    raise ValueError(f"tensor '{name}': values out of range")
                states[name] = HistogramCollector(num_bins, width, counts.astype(np.int64), zeros, amax, elements,
                                                  nonfinite)
        except KeyError as exc:
            raise QdqcError(f"{path}: not a qdqc statistics file (no array {exc})") from None
        except (ValueError, TypeError) as exc:
            raise QdqcError(f"{path}: not a qdqc statistics file ({exc})") from None
    return states


def merge_state_files(paths) -> dict[str, HistogramCollector]:
    """The exact merge of several `--shard` runs' states; refuses a file given twice, states of another
    model and states on another bin grid."""
    from pathlib import Path

    from .errors import QdqcError, UsageError
    from .ir import same_file

    paths = [Path(p) for p in paths]
    for i, path in enumerate(paths):
        for earlier in paths[:i]:
            if same_file(path, earlier):
                raise UsageError(f"{path}: listed twice (its samples would count double)")
    merged = None
    for path in paths:
        states = load_states(path)
        if merged is None:
            merged = states
            continue
        if set(states) != set(merged):
            raise QdqcError(f"{path}: its tensors differ from {paths[0]}'s (collected on another model?)")
        for name, collector in states.items():
            try:
                merged[name].merge(collector)
            except ValueError as exc:
                raise QdqcError(f"{path}: tensor '{name}': {exc}") from None
    return merged
