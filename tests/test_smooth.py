import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import ir
from qdq_compiler.calibrate import CalibrationConfig, calibrate, float_network, model_inputs
from qdq_compiler.config import InsertConfig
from qdq_compiler.data import Dataset
from qdq_compiler.insert import insert
from qdq_compiler.smooth import SmoothConfig, smooth, smooth_sites, smoothing_factors
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import cosine, qdqc, run_model


def outlier_bert(spec: BertSpec) -> gs.Graph:
    """A BERT whose LayerNorm outputs carry a few large fixed channels, as real BERTs do."""
    graph = gs.import_onnx(build_bert(spec))
    for node in graph.nodes:
        if node.op == "LayerNormalization":
            gamma = node.inputs[1].values.copy()
            gamma[[3, 17]] = 25.0
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_outliers", gamma)
    return graph


@pytest.fixture
def setup(tmp_path):
    spec = BertSpec(layers=2)
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=3))
    graph = outlier_bert(spec)
    insert(graph, InsertConfig("ft1"))
    return spec, graph, data


def test_sites_are_the_gemm_only_quantizers(setup):
    _, graph, _ = setup
    sites = smooth_sites(graph)
    # per layer: LN output -> Q, K, V; LN1 output -> FFN1; GELU output -> FFN2 (the context Q reads a Reshape)
    assert len(sites) == 6
    assert sorted(len(s.readers) for s in sites) == [1, 1, 1, 1, 3, 3]


def smooth_keeping_float_output(spec, graph, data, config: SmoothConfig):
    """Smooth the graph and assert its float network computes what it did before."""
    feeds = example_inputs(spec, batch=4, seq=16, seed=8)
    before = run_model(float_network(graph, []), feeds)[0]
    records = smooth(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False), config,
                     verify=True)
    np.testing.assert_allclose(run_model(float_network(graph, []), feeds)[0], before, rtol=1e-4, atol=1e-4)
    return records


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_is_exact_in_float(setup, alpha):
    spec, graph, data = setup
    records = smooth_keeping_float_output(spec, graph, data, SmoothConfig(alpha))
    assert records[0].stats["sites_smoothed"] == 6
    assert sum(n.op == "Mul" and n.name.endswith("::smooth") for n in graph.nodes) == 6


def test_residual_branch_reads_the_unsmoothed_tensor(setup):
    _, graph, data = setup
    smooth(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False), SmoothConfig())
    residual_adds = [n for n in graph.nodes if n.op == "Add" and "Residual" in n.name]
    for add in residual_adds:
        assert not any(ir.producer(t) is not None and ir.producer(t).op == "Mul" and
                       ir.producer(t).name.endswith("::smooth") for t in add.inputs)


def test_smoothing_helps_on_outlier_channels(setup, tmp_path):
    spec, graph, data = setup
    feeds = example_inputs(spec, batch=8, seq=16, seed=11)
    reference = run_model(float_network(graph, []), feeds)[0]
    plain = graph.copy()
    config = CalibrationConfig("max", progress=False)
    calibrate(plain, Dataset(data, model_inputs(plain)), config)
    smooth(graph, Dataset(data, model_inputs(graph)), config, SmoothConfig(0.85))
    calibrate(graph, Dataset(data, model_inputs(graph)), config)
    assert cosine(run_model(graph, feeds)[0], reference) > cosine(run_model(plain, feeds)[0], reference)


def test_factors():
    factors = smoothing_factors(np.array([4.0, 0.0, 9.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(factors, [2.0, 1.0, 1.0])


def test_cli_validates_smooth(tmp_path, bert_file):
    assert qdqc("insert", bert_file).returncode == 0
    qdq = tmp_path / "bert.qdq.onnx"
    (tmp_path / "s.npz").write_bytes(b"")   # exists: the option is what is wrong
    proc = qdqc("calibrate", qdq, "--stats", tmp_path / "s.npz", "--smooth", "0.8", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "needs --data" in proc.stderr
    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=8, seq=16))
    proc = qdqc("calibrate", qdq, "--data", data, "--smooth", "1.5")
    assert proc.returncode == 2 and "alpha must be in [0, 1]" in proc.stderr
    proc = qdqc("calibrate", qdq, "--data", data, "--smooth", "0.85")
    assert proc.returncode == 0, proc.stderr


def test_smoothed_model_still_matches_and_lowers(setup):
    from qdq_compiler.bert import match_encoder
    from qdq_compiler.lower import LowerConfig, lower

    _, graph, data = setup
    config = CalibrationConfig("max", progress=False)
    smooth(graph, Dataset(data, model_inputs(graph)), config, SmoothConfig())
    calibrate(graph, Dataset(data, model_inputs(graph)), config)
    assert len(match_encoder(graph).layers) == 2
    trt = graph.copy()
    mha = next(r for r in lower(trt, LowerConfig("tensorrt")) if r.name == "report-mha")
    assert mha.stats["attention_blocks_quantized"] == 2
    lower(graph, LowerConfig("onnxruntime"))
    assert sum(n.op == "MatMulIntegerToFloat" for n in graph.nodes) == 16


def test_auto_alpha_is_searched_per_site_and_stays_exact(setup):
    from qdq_compiler.smooth import ALPHA_GRID, best_alpha, site_error

    spec, graph, data = setup
    records = smooth_keeping_float_output(spec, graph, data, SmoothConfig(None))
    assert records[0].stats["sites_smoothed"] == 6
    assert set(records[0].stats["alphas"]) <= set(ALPHA_GRID)
    # best_alpha returns the grid minimum of site_error
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 16)).astype(np.float32)
    rows[:, 3] *= 40
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    activation_max, weight_max = np.abs(rows).max(axis=0), np.abs(weight).max(axis=1)
    errors = {a: site_error(rows, [weight], smoothing_factors(activation_max, weight_max, a)) for a in ALPHA_GRID}
    assert best_alpha(rows, [weight], activation_max) == min(errors, key=errors.get)
    assert min(errors.values()) < site_error(rows, [weight], np.ones(16, np.float32))  # smoothing helps here
