"""amax maths against plain restatements of pytorch-quantization's algorithms (`calib/histogram.py`),
and the collectors' properties."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qdq_compiler.calibration import MAX_BINS, HistogramCollector, compute_amax


# ---------------------------------------------------------------- plain restatements (loops, no shortcuts)

def reference_percentile(counts, edges, percentile):
    total = sum(counts)
    running = 0.0
    for index, count in enumerate(counts):
        running += count / total
        if running >= percentile / 100:
            return edges[index]
    return edges[len(counts)]


def reference_mse(counts, edges, start_bin=128, bound=127):
    edges = [np.float32(e) for e in edges]
    centers = [np.float32((edges[i] + edges[i + 1]) / np.float32(2)) for i in range(len(counts))]
    best, best_error = None, None
    for i in range(start_bin, len(centers)):
        amax = centers[i]
        scale = np.float32(bound) / amax
        error = 0.0
        for center, count in zip(centers, counts):
            q = min(max(round(float(center * scale)), -bound), bound)  # Python round: half to even
            error += (float(np.float32(q) / scale) - float(center)) ** 2 * count
        error /= len(centers)
        if best_error is None or error < best_error * (1 - 1e-6):
            best, best_error = i, error
    return float(centers[best])


def reference_entropy(counts, edges, start_bin=128, levels=128):
    bins = [float(c) for c in counts]
    bins[0] = bins[1]
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, levels + 1)
        level = [int(np.searchsorted(space, j, side="right")) - 1 for j in range(i)]
        sums, members = [0.0] * levels, [0] * levels
        for j in range(i):
            if bins[j] != 0:
                sums[level[j]] += bins[j]
                members[level[j]] += 1
        q = [sums[level[j]] / members[level[j]] if bins[j] != 0 else 0.0 for j in range(i)]
        p = bins[:i]
        p[-1] += sum(bins[i:])
        p_total, q_total = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = math.inf if qj == 0 else kl + pj / p_total * math.log((pj / p_total) / (qj / q_total))
        divergences.append(kl)
    smallest = min(divergences)
    last = max(k for k, d in enumerate(divergences) if d == smallest)
    return edges[last + start_bin]


# ---------------------------------------------------------------- fixed histograms

def long_tail_histogram():
    """|x| of a Gaussian bulk plus a sparse long tail: the methods disagree clearly."""
    rng = np.random.default_rng(7)
    values = np.concatenate([np.abs(rng.standard_normal(200_000)), rng.uniform(4, 40, 60)])
    collector = HistogramCollector()
    collector.collect(values)
    return collector.counts, collector.edges


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99, 99.999])
def test_percentile_matches_the_reference(percentile):
    counts, edges = long_tail_histogram()
    assert compute_amax(counts, edges, "percentile", percentile=percentile) == \
        pytest.approx(reference_percentile(counts, edges, percentile), rel=1e-12)


def test_mse_matches_the_reference():
    counts, edges = long_tail_histogram()
    assert compute_amax(counts, edges, "mse") == pytest.approx(reference_mse(counts, edges), rel=1e-6)


def test_entropy_matches_the_reference():
    counts, edges = long_tail_histogram()
    assert compute_amax(counts, edges, "entropy") == pytest.approx(reference_entropy(counts, edges), rel=1e-12)


def test_the_methods_disagree_on_a_long_tail():
    counts, edges = long_tail_histogram()
    found = {m: compute_amax(counts, edges, m, percentile=99.99) for m in ("max", "percentile", "mse", "entropy")}
    assert found["max"] == pytest.approx(40, rel=0.01)
    assert found["entropy"] < found["percentile"] < found["max"]
    assert found["mse"] < found["max"]
    assert min(abs(a - b) for a, b in [(found["mse"], found["percentile"]), (found["mse"], found["entropy"]),
                                       (found["percentile"], found["entropy"])]) > 1.0


def test_small_hand_made_histogram():
    counts = np.array([5, 0, 3, 2] + [0] * 124 + [1, 4, 0, 2])
    edges = np.arange(len(counts) + 1, dtype=np.float64) * 0.5
    assert compute_amax(counts, edges, "max") == edges[-1]
    assert compute_amax(counts, edges, "percentile", percentile=50) == edges[reference_index(counts, 0.5)]
    assert compute_amax(counts, edges, "entropy") == pytest.approx(reference_entropy(counts, edges))
    assert compute_amax(counts, edges, "mse") == pytest.approx(reference_mse(counts, edges), rel=1e-6)


def reference_index(counts, share):
    running = 0
    for i, c in enumerate(counts):
        running += c
        if running / sum(counts) >= share:
            return i


def test_unknown_method_and_bad_edges_raise():
    counts, edges = long_tail_histogram()
    with pytest.raises(ValueError):
        compute_amax(counts, edges, "median")
    with pytest.raises(ValueError, match="edges"):
        compute_amax(counts, edges[:-1], "max")


# ---------------------------------------------------------------- collector properties

batches = st.lists(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=50),
                   min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(first=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40),
       left=batches, right=batches)
def test_merging_shards_equals_collecting_everything(first, left, right):
    """Shards share the first batch's grid (what --shard does); merged = one collector over all."""
    assume(max(abs(v) for v in first) > 1e-30)  # the grid comes from a batch with a range
    whole, a, b = HistogramCollector(), HistogramCollector(), HistogramCollector()
    for collector in (whole, a):
        collector.collect(np.array(first, np.float32))
    grid = HistogramCollector()
    grid.collect(np.array(first, np.float32))
    b.width, b.counts = grid.width, np.zeros_like(grid.counts)
    for batch in left:
        whole.collect(np.array(batch, np.float32))
        a.collect(np.array(batch, np.float32))
    for batch in right:
        whole.collect(np.array(batch, np.float32))
        b.collect(np.array(batch, np.float32))
    a.merge(b)
    assert a.width == whole.width and a.amax == whole.amax and a.elements == whole.elements
    np.testing.assert_array_equal(a.counts, whole.counts)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_growth_keeps_the_bin_width_and_counts_everything(data):
    collector = HistogramCollector()
    widths = []
    for batch in data:
        collector.collect(np.array(batch, np.float32))
        if collector.width:
            widths.append(collector.width)
    assert len(set(widths)) <= 1
    assert collector.counts.sum() + collector.zeros == sum(len(b) for b in data)
    if collector.width:
        covered = len(collector.counts) * collector.width >= collector.amax
        assert covered or len(collector.counts) == MAX_BINS
        assert len(collector.counts) >= collector.num_bins


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1e3, allow_nan=False, width=32), min_size=200, max_size=2000),
       st.floats(50, 99.9), st.floats(0.01, 0.09))
def test_percentile_is_monotone(values, low, step):
    collector = HistogramCollector()
    collector.collect(np.array(values + [1.0], np.float32))
    counts, edges = collector.counts, collector.edges
    assert compute_amax(counts, edges, "percentile", percentile=low) <= \
        compute_amax(counts, edges, "percentile", percentile=min(100, low + step * 10))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.5, 20))
def test_each_result_is_one_of_its_candidates(seed, tail):
    rng = np.random.default_rng(seed)
    collector = HistogramCollector()
    collector.collect(np.concatenate([rng.standard_normal(5000), [tail]]).astype(np.float32))
    counts, edges = collector.counts, collector.edges
    centers = (edges[1:].astype(np.float32) + edges[:-1].astype(np.float32)) / np.float32(2)
    assert compute_amax(counts, edges, "percentile", percentile=99.9) in edges
    assert compute_amax(counts, edges, "entropy") in edges[128:]
    assert np.float32(compute_amax(counts, edges, "mse")) in centers[128:]


def test_extreme_fill_values_do_not_break_the_histogram():
    collector = HistogramCollector()
    collector.collect(np.array([0.5, -1.0, 2.0], np.float32))
    width = collector.width
    collector.collect(np.array([-3.4e38, 1.0], np.float32))
    assert len(collector.counts) == MAX_BINS and collector.width == width
    assert collector.counts[-1] == 1 and collector.amax == pytest.approx(3.4e38)
    collector.collect(np.array([np.inf, np.nan, 1.0], np.float32))
    assert collector.nonfinite == 2 and collector.counts.sum() == 6


def test_all_zero_tensor_then_values():
    collector = HistogramCollector()
    collector.collect(np.zeros(10, np.float32))
    assert collector.width == 0 and collector.zeros == 10
    collector.collect(np.array([1.0, 2.0], np.float32))
    assert collector.counts[0] == 10 and collector.counts.sum() == 12
