import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import ir
from qdq_compiler.calibrate import CalibrationConfig, calibrate, float_network, model_inputs
from qdq_compiler.config import InsertConfig
from qdq_compiler.data import Dataset
from qdq_compiler.insert import insert
from qdq_compiler.smooth import SmoothConfig, smooth, smooth_sites, smoothed_before, smoothing_factors
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


def test_attention_output_input_is_smoothed_through_the_value_projection(setup):
    spec, graph, data = setup
    records = smooth_keeping_float_output(spec, graph, data, SmoothConfig(0.85, through_value=True))
    assert records[1].stats["sites_folded"] == 2   # one per layer, exact in float (checked above)
    # no runtime op: the only per-channel Muls are the six of the GEMM-input sites
    assert sum(n.op == "Mul" and n.name.endswith("::smooth") for n in graph.nodes) == 6
    # a second smoothing run leaves the folded sites alone
    again = smooth(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False),
                   SmoothConfig(0.85, through_value=True))
    assert [r.name for r in again] == ["smooth-gemm-inputs"] and not again[0].modified
    assert smoothed_before(graph) == 6   # what calibrate's line gives as the reason


def planted_context_outliers(graph: gs.Graph) -> None:
    """Value channels 3 and 17 ×25, the output GEMM's rows for them ÷25: the same float network, with
    outlier channels in the attention context (as SmoothQuant reports for real models)."""
    from qdq_compiler.smooth import reader_weight, value_fold_sites

    for site in value_fold_sites(graph):
        value = graph.tensors()[site.value.weight]
        columns = value.values.copy()
        columns[:, [3, 17]] *= 25.0
        value.values = columns
        bias = site.value.bias_add.inputs[1]
        boosted = bias.values.copy()
        boosted[[3, 17]] *= 25.0
        bias.values = boosted
        weight, axis = reader_weight(site.reader)
        rows = weight.values.copy()
        rows[[3, 17], :] /= 25.0
        assert axis == 0
        weight.values = rows


def quantized_cosine(spec, graph, data, config: SmoothConfig) -> float:
    feeds = example_inputs(spec, batch=8, seq=16, seed=11)
    reference = run_model(float_network(graph, []), feeds)[0]
    calibration = CalibrationConfig("max", progress=False)
    smooth(graph, Dataset(data, model_inputs(graph)), calibration, config)
    calibrate(graph, Dataset(data, model_inputs(graph)), calibration)
    return cosine(run_model(graph, feeds)[0], reference)


def test_folding_through_the_value_reduces_the_error_of_context_outliers(setup):
    spec, graph, data = setup
    planted_context_outliers(graph)
    plain = graph.copy()
    ir.metadata(plain).update(ir.metadata(graph))
    without = quantized_cosine(spec, plain, data, SmoothConfig(0.85))
    assert quantized_cosine(spec, graph, data, SmoothConfig(0.85, through_value=True)) > without


def test_shift_is_exact_in_float_and_folded_into_the_biases(setup):
    spec, graph, data = setup
    records = smooth_keeping_float_output(spec, graph, data, SmoothConfig(0.85, shift=True))
    assert records[0].stats["sites_shifted"] == 6
    assert sum(n.op == "Sub" and n.name.endswith("::shift") for n in graph.nodes) == 6


def offset_bert(spec: BertSpec) -> gs.Graph:
    """LayerNorm outputs with large per-channel offsets (beta), the asymmetry OS+ removes."""
    graph = gs.import_onnx(build_bert(spec))
    for node in graph.nodes:
        if node.op == "LayerNormalization":
            beta = node.inputs[2].values.copy()
            beta[[2, 5, 11, 20]] = [6.0, -5.0, 7.0, 4.0]
            node.inputs[2] = gs.Constant(node.inputs[2].name + "_offsets", beta)
    return graph


@pytest.mark.parametrize("weights", ["nearest", "gptq"])
def test_shift_reduces_the_error_of_offset_channels(tmp_path, weights):
    from qdq_compiler import api

    spec = BertSpec(layers=2)
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=3))
    feeds = example_inputs(spec, batch=8, seq=16, seed=11)
    model = ir.to_model(offset_bert(spec))
    reference = run_model(model, feeds)[0]
    inserted = api.insert(model)
    found = {}
    for shift in (False, True):
        result = api.calibrate(inserted.model, data, method="max", smooth=SmoothConfig(0.5, shift=shift),
                               weights=weights, quiet=True)
        found[shift] = cosine(run_model(result.model, feeds)[0], reference)
    assert found[True] > found[False]


def test_shifted_quantizers_keep_their_site_names(setup):
    from qdq_compiler import carried

    _, graph, data = setup
    smooth(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False), SmoothConfig(0.85, shift=True))
    names = carried.quantizer_sites(graph)
    shifted = [tensor for tensor in names if "::centred" in tensor]
    assert len(shifted) == 6 and all(names[tensor] for tensor in shifted)
    assert {site.split(".", 2)[2] for tensor in shifted for site in names[tensor]} >= {"ffn1.input", "ffn2.input"}


def shifted_and_calibrated(setup):
    spec, graph, data = setup
    dataset = Dataset(data, model_inputs(graph))
    smooth(graph, dataset, CalibrationConfig(progress=False), SmoothConfig(0.85, shift=True))
    calibrate(graph, dataset, CalibrationConfig(progress=False))
    return spec, graph


def test_shifts_move_onto_the_quantizer_grid_keeping_the_float_network(setup):
    from qdq_compiler.smooth import align_shifts

    spec, graph = shifted_and_calibrated(setup)
    feeds = example_inputs(spec, batch=4, seq=16, seed=8)
    before = run_model(float_network(graph, []), feeds)[0]
    assert align_shifts(graph) == 6
    np.testing.assert_allclose(run_model(float_network(graph, []), feeds)[0], before, rtol=1e-4, atol=1e-4)
    for sub in (n for n in graph.nodes if n.op == "Sub" and "::shift" in n.name):
        step = float(ir.constant(sub.outputs[0].outputs[0].inputs[1]))
        steps = sub.inputs[1].values / step
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_layernorm_shifts_fold_into_beta_and_the_residual_biases(setup):
    from qdq_compiler.pipeline import PassContext, run_pipeline

    spec, graph = shifted_and_calibrated(setup)
    feeds = example_inputs(spec, batch=4, seq=16, seed=8)
    before = run_model(float_network(graph, []), feeds)[0]
    shifts = lambda: [n for n in graph.nodes if n.op == "Sub" and "::shift" in n.name]  # noqa: E731
    assert len(shifts()) == 6
    record, = run_pipeline(graph, ("shift-into-layernorm",), PassContext(None), verify=True)
    # two LayerNorm outputs per layer (Q/K/V and FFN1 inputs) fold; the GELU output (FFN2) keeps its Sub
    assert record.stats == {"shifts_folded": 4, "shifts_kept": 0}
    assert [ir.producer(ir.producer(s.inputs[0]).inputs[0]).op for s in shifts()] == ["Mul", "Mul"]
    np.testing.assert_allclose(run_model(float_network(graph, []), feeds)[0], before, rtol=1e-4, atol=1e-4)


def test_a_layernorm_output_read_elsewhere_keeps_its_shift(setup):
    from qdq_compiler.pipeline import PassContext, run_pipeline

    _, graph = shifted_and_calibrated(setup)
    first = next(n for n in graph.nodes if n.op == "Sub" and "::shift" in n.name
                 and ir.producer(ir.producer(n.inputs[0]).inputs[0]).op == "LayerNormalization")
    graph.outputs.append(ir.producer(first.inputs[0]).inputs[0])   # the LayerNorm output is a model output too
    record, = run_pipeline(graph, ("shift-into-layernorm",), PassContext(None))
    assert record.stats == {"shifts_folded": 3, "shifts_kept": 1}
    assert first in graph.nodes


def test_shifts_come_with_gptq_weights_by_default(tmp_path):
    from qdq_compiler import api

    spec = BertSpec(layers=2)
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=3))
    inserted = api.insert(build_bert(spec))
    shifted = lambda result: result.report["smoothing"]["sites_shifted"]  # noqa: E731
    assert shifted(api.calibrate(inserted, data, quiet=True)) == 6                       # GPTQ: on
    assert shifted(api.calibrate(inserted, data, weights="nearest", quiet=True)) == 0    # nearest: off
    assert shifted(api.calibrate(inserted, data, shift=False, quiet=True)) == 0
    with pytest.warns(UserWarning, match="rounding error then multiplies"):
        assert shifted(api.calibrate(inserted, data, weights="nearest", shift=True, quiet=True)) == 6


def test_shift_option_is_validated(tmp_path):
    from qdq_compiler import api
    from qdq_compiler.errors import UsageError

    spec = BertSpec(layers=1)
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=4, seq=8, seed=3))
    inserted = api.insert(build_bert(spec))
    with pytest.raises(UsageError, match="shift='no': expected True, False or None"):
        api.calibrate(inserted, data, shift="no", quiet=True)
    with pytest.raises(UsageError, match="it needs smoothing"):     # nothing to centre: said, not ignored
        api.calibrate(inserted, data, smooth="off", shift=True, quiet=True)
    stats = tmp_path / "stats.npz"
    api.calibrate(inserted, data, stats=stats, quiet=True)
    with pytest.raises(UsageError, match="keeps the model's shifts"):
        api.calibrate(inserted, stats=stats, shift=False, quiet=True)


def test_shared_zero_biases_are_shifted_through_copies(tmp_path):
    """Exporters deduplicate equal constants: a random-weight model's zero biases and betas are one tensor."""
    from qdq_compiler import api

    spec = BertSpec(layers=2)
    graph = gs.import_onnx(build_bert(spec))
    zero = gs.Constant("shared_zeros", np.zeros(spec.hidden, np.float32))
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.values.shape == (spec.hidden,) and node.op in ("Add", "LayerNormalization") \
                    and (node.op == "Add" or i == 2):
                node.inputs[i] = zero
    model = ir.to_model(graph)
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=3))
    feeds = example_inputs(spec, batch=4, seq=16, seed=8)
    result = api.compile(model, data, quiet=True)
    assert result.report["smoothing"]["sites_shifted"] == 6
    folded, = [r["stats"] for r in result.report["lowering"] if r["pass"] == "shift-into-layernorm"]
    assert folded == {"shifts_folded": 4, "shifts_kept": 0}
    assert cosine(run_model(result.model, feeds)[0], run_model(model, feeds)[0]) > 0.99


def test_recalibrating_from_statistics_keeps_the_shifts_on_the_new_grid(tmp_path):
    from qdq_compiler import api

    spec = BertSpec(layers=1)
    data, stats = tmp_path / "calib.npz", tmp_path / "stats.npz"
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=3))
    calibrated = api.calibrate(api.insert(build_bert(spec)), data, stats=stats, quiet=True)
    again = api.calibrate(calibrated, stats=stats, method="max", quiet=True)
    subs = [n for n in again.graph.nodes if n.op == "Sub" and "::shift" in n.name]
    assert len(subs) == 3
    for sub in subs:
        steps = sub.inputs[1].values / float(ir.constant(sub.outputs[0].outputs[0].inputs[1]))
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_cli_shift_flag_forces_or_drops_the_shifts(bert_file, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=8, seq=16, seed=3))
    forced = qdqc("compile", bert_file, "--data", data, "--weights", "nearest", "--shift", "-o", tmp_path / "a.onnx")
    assert forced.returncode == 0, forced.stderr
    assert "shifted" in forced.stdout and "rounding error then multiplies" in forced.stderr
    dropped = qdqc("compile", bert_file, "--data", data, "--no-shift", "-o", tmp_path / "b.onnx")
    assert dropped.returncode == 0 and "shifted" not in dropped.stdout, dropped.stderr


def test_weights_shared_by_layers_are_not_smoothed_for_one_of_them(tmp_path):
    """ALBERT: every layer reads the same weights; smoothing one layer's input would rescale them for all."""
    from qdq_compiler import api

    spec = BertSpec(layers=2)
    graph = outlier_bert(spec)
    linears = [n for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    first, second = linears[:len(linears) // 2], linears[len(linears) // 2:]
    for a, b in zip(first, second):
        b.inputs[1] = a.inputs[1]
    model = ir.to_model(graph)
    data = example_inputs(spec, batch=16, seq=16, seed=3)
    result = api.compile(model, data, quiet=True)
    assert result.report["smoothing"]["sites_smoothed"] == 0
    assert result.report["smoothing"]["shared_weight_sites"] == 6   # QKV, FFN1 and FFN2 inputs of both layers
    feeds = example_inputs(spec, batch=4, seq=16, seed=8)
    assert cosine(run_model(result.model, feeds)[0], run_model(model, feeds)[0]) > 0.99
