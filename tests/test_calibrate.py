import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from qdq_compiler import ir
from qdq_compiler.calibrate import CalibrationConfig, activation_quantizers, calibrate, model_inputs
from qdq_compiler.calibration import load_states
from qdq_compiler.config import InsertConfig
from qdq_compiler.data import Dataset
from qdq_compiler.errors import QdqcError
from qdq_compiler.insert import insert
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import cosine, qdqc, run_model

SPEC = BertSpec(layers=2)


def dataset_feeds(samples=24, seed=1, full_mask=False):
    feeds = example_inputs(SPEC, batch=samples, seq=16, seed=seed)
    if full_mask:
        feeds["attention_mask"][:] = 1
    return feeds


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "bert.onnx"
    onnx.save(build_bert(SPEC), model)
    graph = ir.load(model)
    insert(graph, InsertConfig("ft2"))
    qdq = ir.save(graph, tmp_path / "bert.qdq.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, **dataset_feeds(full_mask=True))
    return model, qdq, data


def tensor_max(model_path, tensor, feeds):
    """max |tensor| over the data, read straight from the float model (no qdqc code involved)."""
    model = onnx.load(model_path)
    model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    outputs = run_model(model, feeds)
    return float(np.abs(outputs[-1]).max())


def test_max_calibration_writes_max_over_127(files, tmp_path):
    model, qdq, data = files
    out = tmp_path / "max.onnx"
    assert qdqc("calibrate", qdq, "--data", data, "--smooth", "off", "--method", "max", "-o", out,
                "--batch-size", "5").returncode == 0
    graph = ir.load(out)
    feeds = dict(np.load(data))
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name.startswith("layer.0/ffn/gelu"))
    expected = tensor_max(model, q.inputs[0].name, feeds) / 127
    assert float(q.inputs[1].values) == pytest.approx(expected, rel=1e-6)
    dq = q.outputs[0].outputs[0]
    assert dq.inputs[1] is q.inputs[1]


def test_fused_qkv_group_takes_the_largest_member(files, tmp_path):
    model, qdq, data = files
    out = tmp_path / "max.onnx"
    assert qdqc("calibrate", qdq, "--data", data, "--smooth", "off", "--method", "max", "-o", out).returncode == 0
    graph = ir.load(out)
    groups = activation_quantizers(graph).groups
    qkv = next(members for name, members in groups.items() if name.startswith("layer.0.qkv.bmm_input"))
    assert len(qkv) == 3
    feeds = dict(np.load(data))
    largest = max(tensor_max(model, t, feeds) for t in qkv)
    scale = graph.tensors()[next(n for n in groups if n.startswith("layer.0.qkv.bmm_input"))].values
    assert float(scale) == pytest.approx(largest / 127, rel=1e-6)


def test_stats_recompute_equals_a_direct_run_and_report_has_every_method(files, tmp_path):
    _, qdq, data = files
    stats, report = tmp_path / "stats.npz", tmp_path / "calib.json"
    direct = tmp_path / "direct.onnx"
    assert qdqc("calibrate", qdq, "--data", data, "--smooth", "off", "--method", "entropy", "-o", direct,
                "--stats", stats, "--report", report).returncode == 0
    again = tmp_path / "again.onnx"
    proc = qdqc("calibrate", qdq, "--stats", stats, "--method", "entropy", "-o", again)
    assert proc.returncode == 0 and "no smoothing (it needs --data)" in proc.stdout
    assert scales_of(direct) == scales_of(again)
    data_report = json.loads(report.read_text())
    entry = data_report["tensors"][0]
    assert set(entry["amax"]) == {"max", "percentile", "mse", "entropy"} and entry["samples"] == 24
    assert entry["chosen_amax"] >= entry["amax"]["entropy"] - 1e-12
    assert entry["max"] == entry["amax"]["max"]


def scales_of(path):
    return {t.name: t.values.tolist() for t in ir.load(path).tensors().values()
            if isinstance(t, gs.Constant) and t.name.endswith("::scale")}


def test_statistics_of_a_smoothed_run_describe_the_smoothed_model(files, tmp_path):
    """By default calibrate smooths, so its statistics are of the smoothed model's tensors: recomputing
    works from its output, and the unsmoothed model is refused with the reason."""
    _, qdq, data = files
    stats, direct, again = tmp_path / "stats.npz", tmp_path / "direct.onnx", tmp_path / "again.onnx"
    proc = qdqc("calibrate", qdq, "--data", data, "--method", "mse", "-o", direct, "--stats", stats)
    assert proc.returncode == 0 and "smooth auto" in proc.stdout and "percentile" not in proc.stdout
    assert any(n.op_type == "Mul" and n.name.endswith("::smooth") for n in onnx.load(direct).graph.node)
    assert qdqc("calibrate", direct, "--stats", stats, "--method", "mse", "-o", again).returncode == 0
    assert scales_of(direct) == scales_of(again)
    proc = qdqc("calibrate", qdq, "--stats", stats, "-o", tmp_path / "x.onnx")
    assert proc.returncode == 1 and "smoothed" in proc.stderr and "Traceback" not in proc.stderr
    proc = qdqc("calibrate", direct, "--stats", stats, "--smooth", "auto", "-o", tmp_path / "y.onnx")
    assert proc.returncode == 2 and "--smooth needs --data" in proc.stderr


def test_shards_merge_exactly(files, tmp_path):
    _, qdq, data = files
    whole, parts = tmp_path / "whole.npz", [tmp_path / f"s{i}.npz" for i in range(3)]
    assert qdqc("calibrate", qdq, "--data", data, "--stats", whole, "--batch-size", "4", "--smooth", "off",
                "--weights", "nearest", "-o", tmp_path / "w.onnx").returncode == 0   # what a shard collects
    for i, part in enumerate(parts):
        assert qdqc("calibrate", qdq, "--data", data, "--stats", part, "--batch-size", "4", "--shard", f"{i}/3",
                    "-o", tmp_path / f"p{i}.onnx").returncode == 0
    merged = tmp_path / "merged.npz"
    proc = qdqc("calibrate", "merge", *parts, "-o", merged)
    assert proc.returncode == 0, proc.stderr
    a, b = load_states(whole), load_states(merged)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].width == b[name].width and a[name].elements == b[name].elements
        np.testing.assert_array_equal(a[name].counts, b[name].counts)


def test_shards_leave_the_model_as_it_is(files, tmp_path):
    """Smoothing and GPTQ measured on one shard's data would give each shard its own model."""
    _, qdq, data = files
    outputs = [tmp_path / f"p{i}.onnx" for i in range(2)]
    for i, out in enumerate(outputs):
        proc = qdqc("calibrate", qdq, "--data", data, "--batch-size", "4", "--shard", f"{i}/2", "-o", out)
        assert proc.returncode == 0 and "no smoothing" in proc.stdout, proc.stderr
    weights = [{t.name: t.values for t in ir.load(out).tensors().values() if isinstance(t, gs.Constant)
                and t.values.ndim == 2} for out in outputs]
    assert all(np.array_equal(weights[0][name], weights[1][name]) for name in weights[0])
    proc = qdqc("calibrate", qdq, "--data", data, "--shard", "0/2", "--smooth", "auto", "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "--shard collects" in proc.stderr and "Traceback" not in proc.stderr


def test_shards_without_a_shared_grid_refuse_to_merge(files, tmp_path):
    _, qdq, data = files
    other = tmp_path / "other.npz"
    np.savez(other, **dataset_feeds(seed=5))
    for name, source in (("a", data), ("b", other)):
        assert qdqc("calibrate", qdq, "--data", source, "--stats", tmp_path / f"{name}.npz",
                    "-o", tmp_path / f"{name}.onnx").returncode == 0
    proc = qdqc("calibrate", "merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "m.npz")
    assert proc.returncode == 1 and "different bin widths" in proc.stderr and "Traceback" not in proc.stderr


def test_calibrated_model_is_closer_to_float_than_placeholder_scales(files):
    model, qdq, data = files
    feeds = dataset_feeds(samples=8, seed=3)
    reference = run_model(model, feeds)[0]
    placeholder = run_model(qdq, feeds)[0]
    graph = ir.load(qdq)
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("mse", progress=False))
    calibrated = run_model(graph, feeds)[0]
    assert cosine(calibrated, reference) > 0.995 > cosine(placeholder, reference)


def test_trimming_padding_ignores_positions_nobody_attends(tmp_path, files):
    _, qdq, _ = files
    feeds = dataset_feeds()
    feeds["attention_mask"][:, 10:] = 0
    padded = tmp_path / "padded.npz"
    np.savez(padded, **feeds)
    graph = ir.load(qdq)
    dataset = Dataset(padded, model_inputs(graph))
    lengths = {b["input_ids"].shape[1] for b in dataset.batches(8)}
    assert lengths == {10}
    assert {b["input_ids"].shape[1] for b in dataset.batches(8, trim_padding=False)} == {16}


# ---------------------------------------------------------------- data validation

def write(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture
def inputs(files):
    return model_inputs(ir.load(files[1]))


def test_missing_and_extra_keys(tmp_path, inputs):
    feeds = dataset_feeds()
    del feeds["token_type_ids"]
    with pytest.raises(QdqcError, match=r"missing model inputs \['token_type_ids'\]"):
        Dataset(write(tmp_path, **feeds), inputs)
    with pytest.raises(QdqcError, match=r"unexpected arrays \['extra'\]"):
        Dataset(write(tmp_path, **dataset_feeds(), extra=np.zeros(3)), inputs)


def test_dtype_and_shape_mismatch(tmp_path, inputs):
    feeds = dataset_feeds()
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    with pytest.raises(QdqcError, match="'input_ids' is int32, the model wants int64"):
        Dataset(write(tmp_path, **feeds), inputs)
    feeds = dataset_feeds()
    feeds["attention_mask"] = feeds["attention_mask"][:, :, None]
    with pytest.raises(QdqcError, match="'attention_mask' has shape .* rank 2"):
        Dataset(write(tmp_path, **feeds), inputs)


def test_nan_names_the_tensor_and_sample(tmp_path):
    spec = [("x", np.float32, ("batch", 4))]
    from qdq_compiler.data import InputSpec

    inputs = [InputSpec(n, np.dtype(d), s) for n, d, s in spec]
    x = np.ones((6, 4), np.float32)
    x[4, 2] = np.nan
    with pytest.raises(QdqcError, match="tensor 'x': sample 4 contains NaN"):
        Dataset(write(tmp_path, x=x), inputs)
    x[4, 2], x[1, 0] = 1.0, np.inf
    with pytest.raises(QdqcError, match="sample 1 contains Inf"):
        Dataset(write(tmp_path, x=x), inputs)


def test_empty_and_pickled_data_are_refused(tmp_path, inputs):
    empty = {k: v[:0] for k, v in dataset_feeds().items()}
    with pytest.raises(QdqcError, match="no samples"):
        Dataset(write(tmp_path, **empty), inputs)
    feeds = dataset_feeds()
    feeds["input_ids"] = np.array([object()] * 24, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **feeds)
    with pytest.raises(QdqcError, match="without pickle"):
        Dataset(path, inputs)


def test_folder_of_shards(tmp_path, inputs):
    folder = tmp_path / "shards"
    folder.mkdir()
    feeds = dataset_feeds()
    np.savez(folder / "a.npz", **{k: v[:10] for k, v in feeds.items()})
    np.savez(folder / "b.npz", **{k: v[10:] for k, v in feeds.items()})
    dataset = Dataset(folder, inputs)
    assert dataset.samples == 24
    assert sum(len(b["input_ids"]) for b in dataset.batches(4)) == 24
    assert sum(len(b["input_ids"]) for b in dataset.batches(4, limit=13)) == 13


def test_cli_errors_are_one_line(files, tmp_path):
    _, qdq, data = files
    proc = qdqc("calibrate", qdq)
    assert proc.returncode == 2 and "needs --data" in proc.stderr and "Traceback" not in proc.stderr
    proc = qdqc("calibrate", qdq, "--data", tmp_path / "none.npz")
    assert proc.returncode == 2 and "none.npz" in proc.stderr
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    proc = qdqc("calibrate", qdq, "--data", bad)
    assert proc.returncode == 1 and "bad.npz" in proc.stderr and "Traceback" not in proc.stderr
    proc = qdqc("calibrate", qdq, "--data", data, "--percentile", "120")
    assert proc.returncode == 2 and "--percentile" in proc.stderr
    proc = qdqc("calibrate", qdq, "--data", data, "--shard", "3/2")
    assert proc.returncode == 2 and "--shard" in proc.stderr


def test_uncalibratable_model_says_so(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(build_bert(SPEC), path)
    data = tmp_path / "d.npz"
    np.savez(data, **dataset_feeds())
    proc = qdqc("calibrate", path, "--data", data)
    assert proc.returncode == 1 and "qdqc insert" in proc.stderr


def test_an_always_zero_tensor_gets_a_tiny_scale_and_a_warning(files):
    from qdq_compiler.calibrate import apply_scales
    from qdq_compiler.calibration import HistogramCollector

    graph = ir.load(files[1])
    quantizers = activation_quantizers(graph)
    collectors = {}
    for name in quantizers.tensors:
        collectors[name] = HistogramCollector()
        collectors[name].collect(np.ones(10, np.float32))
    zero_group = next(members for members in quantizers.groups.values() if len(members) == 1)
    collectors[zero_group[0]] = HistogramCollector()
    collectors[zero_group[0]].collect(np.zeros(10, np.float32))
    with pytest.warns(UserWarning, match="always zero"):
        reports = apply_scales(graph, collectors, CalibrationConfig("max", progress=False))
    scale = next(r.scale for r in reports if r.tensor == zero_group[0])
    assert 0 < scale < 1e-8


def test_fixed_batch_models_calibrate_in_their_batch(tmp_path):
    spec = BertSpec(layers=1)
    model = build_bert(spec)
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 2
    graph = gs.import_onnx(model)
    insert(graph, InsertConfig("ft1"))
    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(spec, batch=6, seq=16))
    with pytest.warns(UserWarning, match="fixed batch of 2"):
        _, reports, samples, _ = calibrate(graph, Dataset(data, model_inputs(graph)),
                                           CalibrationConfig("max", progress=False))
    assert samples == 6 and reports


def test_ft2_calibrated_model_can_be_copied_and_recalibrated(files, tmp_path):
    """Per-tensor (scalar) scales stay arrays, so graph copies (the calibration network) work."""
    _, qdq, data = files
    graph = ir.load(qdq)
    dataset = Dataset(data, model_inputs(graph))
    calibrate(graph, dataset, CalibrationConfig("max", progress=False))
    assert all(isinstance(t.values, np.ndarray) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    calibrate(graph.copy(), dataset, CalibrationConfig("mse", progress=False))


def test_method_auto_picks_each_tensors_best_candidate(files, tmp_path):
    from qdq_compiler.auto_method import candidates, reader_plans

    _, qdq, data = files
    graph = ir.load(qdq)
    dataset = Dataset(data, model_inputs(graph))
    collectors, reports, _, _ = calibrate(graph, dataset, CalibrationConfig("auto", progress=False))
    assert reports and all("auto" in r.amax for r in reports)
    for report in reports:
        label = report.amax["auto"].split(" ->")[0]
        assert label in candidates(collectors[report.tensor])
    # a linear-layer reader: recompute the layer error of every candidate independently
    fresh = ir.load(qdq)
    tensor = next(r.tensor for r in reports if reader_plans(fresh, r.tensor)[0][0] == "linear")
    from qdq_compiler.calibrate import float_network, session

    values = session(float_network(fresh, [tensor]), ("CPUExecutionProvider",)).run(
        [tensor], next(iter(dataset.batches(16))))[0]
    weight = reader_plans(fresh, tensor)[0][1]
    rows = values.reshape(-1, values.shape[-1])
    rows = rows[np.linspace(0, len(rows) - 1, min(256, len(rows))).astype(int)]

    def error(amax):
        scale = np.float32(amax / 127)
        quantized = np.clip(np.rint(rows / scale), -128, 127) * scale
        return float((((rows - quantized) @ weight).astype(np.float64) ** 2).sum())

    options = candidates(collectors[tensor])
    picked = next(r for r in reports if r.tensor == tensor).amax["auto"].split(" ->")[0]
    assert error(options[picked]) <= min(error(v) for v in options.values()) * (1 + 1e-9)


def test_auto_has_no_single_amax():
    from qdq_compiler.calibration import compute_amax

    with pytest.raises(ValueError, match="per tensor"):
        compute_amax(np.array([1, 2, 3]), np.arange(4.0), "auto")


def test_raw_qat_export_with_constant_node_scales_and_separate_dq_scales(tmp_path):
    """torch writes each Q's and DQ's scale as its own Constant node: calibration must write both, or the
    DQ dequantizes with the stale scale (a wrong model reported as success)."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(np.float32)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))

    nodes = [constant(n, np.array(v, d)) for n, v, d in (("xs", 1.0, np.float32), ("xs_dq", 1.0, np.float32),
                                                          ("xz", 0, np.int8))]
    nodes += [constant("ws", np.full(4, 0.5, np.float32)), constant("ws_dq", np.full(4, 0.5, np.float32)),
              constant("wz", np.zeros(4, np.int8)),
              helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "xs_dq", "xz"], ["xd"]),
              helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"]),      # per channel, default axis 1
              helper.make_node("DequantizeLinear", ["wq", "ws_dq", "wz"], ["wd"]),
              helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(weight, "w")])
    path, data, out = tmp_path / "qat.onnx", tmp_path / "x.npz", tmp_path / "qat.calib.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((16, 8)).astype(np.float32) * 3
    np.savez(data, x=x)
    proc = qdqc("calibrate", path, "--data", data, "--method", "max", "--smooth", "off", "-o", out)
    assert proc.returncode == 0, proc.stderr
    scales = {}
    result = ir.load(out)
    for node in result.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            scales[(node.op, node.inputs[0].name)] = ir.constant(node.inputs[1])
    expected_w = np.abs(weight).max(axis=0) / 127          # one scale per output column (axis 1)
    np.testing.assert_allclose(scales[("QuantizeLinear", "w")], expected_w, rtol=1e-6)
    np.testing.assert_array_equal(scales[("DequantizeLinear", "wq")], scales[("QuantizeLinear", "w")])
    assert float(scales[("QuantizeLinear", "x")]) == pytest.approx(np.abs(x).max() / 127, rel=1e-6)
    np.testing.assert_array_equal(scales[("DequantizeLinear", "xq")], scales[("QuantizeLinear", "x")])
