"""GPTQ weight rounding: less output error than nearest rounding, the paper's algorithm restated plainly,
scales kept, and the pass on a calibrated synthetic BERT."""
import numpy as np
import pytest

from qdq_compiler import ir
from qdq_compiler.calibrate import CalibrationConfig, refresh_weight_scales
from qdq_compiler.data import Dataset
from qdq_compiler.calibrate import model_inputs
from qdq_compiler.quant import QMAX, fake_quantize
from qdq_compiler.synthetic import BertSpec, example_inputs
from qdq_compiler.weight_rounding import apply_gptq, gptq, gptq_targets

from conftest import calibrated_bert, cosine, run_model


def problem(seed=0, rows=64, cols=24, tokens=512):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, rows)) * np.exp(rng.standard_normal(rows))  # uneven channels
    x[:, :4] += 3.0 * rng.standard_normal((tokens, 1))                            # correlated ones
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    scale = np.abs(w).max(axis=0) / QMAX
    return x, w, scale


def plain_gptq(w, h, scale, damp=0.01):
    """Algorithm 1 of the paper with no blocking and no reordering tricks beyond act order, element by element."""
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = np.array(w, np.float64)[order].copy(), np.array(h, np.float64)[order][:, order].copy()
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i in range(len(w)):
        for j in range(w.shape[1]):
            q[i, j] = np.clip(np.rint(w[i, j] / scale[j]), -QMAX, QMAX) * scale[j]
        error = (w[i] - q[i]) / u[i, i]
        for k in range(i + 1, len(w)):
            w[k] -= u[i, k] * error
    return q[np.argsort(order)]


def test_gptq_is_the_papers_algorithm():
    x, w, scale = problem()
    h = x.T @ x
    ours, plain = gptq(w, h, scale, block=16), plain_gptq(w, h, scale)
    full = np.abs(plain).max(axis=0) >= (QMAX - 0.5) * scale  # columns that kept an element at ±127
    assert full.sum() >= len(full) // 2
    assert np.allclose(ours[:, full], plain[:, full], atol=1e-5)
    assert np.array_equal(ours[:, ~full], fake_quantize(w, scale * QMAX)[:, ~full])  # the fixed-point rule
    assert np.array_equal(gptq(w, h, scale, block=16), gptq(w, h, scale, block=128))  # lazy batches change nothing


@pytest.mark.parametrize("seed", range(4))
def test_gptq_output_error_is_below_nearest_rounding(seed):
    x, w, scale = problem(seed)
    rounded = gptq(w, x.T @ x, scale)
    nearest = fake_quantize(w, scale * QMAX)
    error = np.sum((x @ w - x @ rounded) ** 2)
    assert error < 0.9 * np.sum((x @ w - x @ nearest) ** 2)
    integers = rounded / scale
    assert np.allclose(integers, np.rint(integers), atol=1e-3) and np.abs(integers).max() <= QMAX + 1e-3
    assert np.allclose(np.abs(rounded).max(axis=0), scale * QMAX, rtol=1e-5)  # scales stay a fixed point


def test_dead_inputs_and_one_scale_for_all_columns():
    x, w, scale = problem(rows=16, cols=8)
    x[:, 3] = 0
    one = np.float32(np.abs(w).max() / QMAX)   # per tensor (ft2/trt modes): most columns never reach ±127
    rounded = gptq(w, x.T @ x, one)
    assert np.isfinite(rounded).all() and np.allclose(rounded / one, np.rint(rounded / one), atol=1e-3)
    assert np.abs(rounded).max() == pytest.approx(QMAX * one)          # the tensor's amax is kept
    nearest = fake_quantize(w, one * QMAX)
    assert np.sum((x @ w - x @ rounded) ** 2) < np.sum((x @ w - x @ nearest) ** 2)  # and GPTQ still acts


@pytest.mark.parametrize("mode", ["ft1", "ft2"])   # per-channel weights; per-tensor with Q, K, V sharing one scale
def test_pass_on_a_calibrated_bert_lowers_error_and_keeps_scales(tmp_path, mode):
    spec = BertSpec(layers=2)
    graph, data = calibrated_bert(tmp_path, spec, mode, batch=32)
    targets = gptq_targets(graph)
    assert len(targets) == 2 * 6
    before = {q.name: q.inputs[1].values.copy() for q, _ in targets}
    nearest = ir.to_model(graph)
    records = apply_gptq(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False))
    assert records[0].stats == {"weights_rounded": 12, "linear_layers": 12, "skipped": 0}
    for q, _ in targets:
        assert np.array_equal(q.inputs[1].values, before[q.name])
    refresh_weight_scales(graph)  # recomputing scales from the rounded weights changes nothing
    for q, _ in targets:
        assert np.allclose(q.inputs[1].values, before[q.name], rtol=1e-6)
    feeds = example_inputs(spec, batch=16, seq=16, seed=9)
    from qdq_compiler.calibrate import float_network

    (reference,) = run_model(float_network(ir.load(ir.save(graph, tmp_path / "x.onnx")), []), feeds)  # Q/DQ off
    (with_nearest,) = run_model(nearest, feeds)
    (with_gptq,) = run_model(graph, feeds)
    assert np.sum((with_gptq - reference) ** 2) < np.sum((with_nearest - reference) ** 2)
    assert cosine(with_gptq, reference) > 0.99


def test_weights_option_is_checked_like_the_cli():
    from qdq_compiler.errors import UsageError
    from qdq_compiler.weight_rounding import parse_rounding

    assert parse_rounding(None, True) == "gptq" and parse_rounding(None, False) == "nearest"
    with pytest.raises(UsageError, match="--weights 'round'"):
        parse_rounding("round", True)
    with pytest.raises(UsageError, match="--weights gptq needs --data"):
        parse_rounding("gptq", False)
