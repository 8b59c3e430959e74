import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import api, ir
from qdq_compiler.calibrate import CalibrationConfig, calibrate, float_network, model_inputs
from qdq_compiler.channel_split import extra_channels, split_counts, split_sites
from qdq_compiler.config import InsertConfig
from qdq_compiler.data import Dataset
from qdq_compiler.errors import QdqcNote, UsageError
from qdq_compiler.insert import insert
from qdq_compiler.patterns.blocks import linear_at
from qdq_compiler.pipeline import PassContext, run_pipeline
from qdq_compiler.smooth import SmoothConfig, reader_weight, smooth
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import cosine, qdqc, run_model

SPEC = BertSpec(layers=2)


def steps_squared(weight: np.ndarray, counts: np.ndarray) -> float:
    """sum over output channels of the largest |weight| (each row divided by its copies), squared."""
    return float(((np.abs(weight) / counts[:, None]).max(axis=0) ** 2).sum())


def test_copies_go_to_the_rows_that_set_the_steps():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 16))
    weight[5] *= 40.0
    weight[9] *= 12.0
    counts = split_counts(weight, 16)
    assert counts.min() == 1 and counts.sum() <= 64 + 16
    assert counts[5] > counts[9] > 1                       # the larger outlier row gets more copies
    assert np.count_nonzero(counts > 1) <= 4
    assert steps_squared(weight, counts) < steps_squared(weight, np.ones(64)) / 10


def test_no_copies_when_no_row_stands_out():
    weight = np.where(np.random.default_rng(1).random((32, 8)) < 0.5, -1.0, 1.0)   # every row reaches the max
    assert (split_counts(weight, 16) == 1).all()


def test_extra_channels_keep_tile_friendly_widths():
    assert [extra_channels(w) for w in (256, 1536, 3072, 4096)] == [16, 32, 64, 96]


def ffn_outlier_bert(spec: BertSpec) -> gs.Graph:
    """A BERT whose GELU outputs carry a few large channels (FFN1 columns scaled up), as trained BERTs'
    FFN2 inputs do: smoothing then moves them into a few large FFN2 weight rows."""
    graph = gs.import_onnx(build_bert(spec))
    for node in graph.nodes:
        if node.op == "MatMul" and "intermediate" in node.name:
            weight = node.inputs[1]
            values = weight.values.copy()
            values[:, [3, 40, 77]] *= 30.0
            node.inputs[1] = gs.Constant(weight.name + "_outliers", values)
    return graph


@pytest.fixture
def smoothed(tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=16, seq=16, seed=3))
    graph = ffn_outlier_bert(SPEC)
    insert(graph, InsertConfig("ft1"))
    dataset = Dataset(data, model_inputs(graph))
    smooth(graph, dataset, CalibrationConfig(progress=False), SmoothConfig(0.85, shift=True))
    calibrate(graph, dataset, CalibrationConfig("max", progress=False))
    return graph, data


def ffn1_widths(graph: gs.Graph) -> list[int]:
    return [reader_weight(n)[0].values.shape[1] for n in graph.nodes if n.op == "MatMul" and "intermediate" in n.name]


def test_split_is_exact_in_float_and_widens_ffn1(smoothed):
    graph, _ = smoothed
    feeds = example_inputs(SPEC, batch=4, seq=16, seed=8)
    before = run_model(float_network(graph, []), feeds)[0]
    assert len(split_sites(graph)) == 2                  # FFN2 of each layer; Q/K/V/FFN1 read LayerNorms
    record, = run_pipeline(graph, ("split-outlier-channels",), PassContext(None), verify=True)
    assert record.stats == {"sites_split": 2, "channels_added": 2 * extra_channels(SPEC.ffn)}
    np.testing.assert_allclose(run_model(float_network(graph, []), feeds)[0], before, rtol=1e-4, atol=1e-4)
    assert ffn1_widths(graph) == [SPEC.ffn + extra_channels(SPEC.ffn)] * 2
    run_model(graph, feeds)                              # the quantized graph runs at its new width
    assert split_sites(graph) == []                      # never split twice


def ffn2_outputs(graph: gs.Graph, feeds, keep_weights: bool) -> list[np.ndarray]:
    """FFN2's biased outputs with every activation in float: weights as the model holds them (GPTQ stores
    them rounded) and, with `keep_weights`, through their quantizers (nearest rounding stores them float)."""
    ffn2 = [linear_at(n) for n in graph.nodes if n.op == "MatMul" and "output" in n.name and "attention" not in n.name]
    names = [linear.output for linear in ffn2]
    weights = [n for n in graph.nodes if n.op == "QuantizeLinear" and isinstance(n.inputs[0], gs.Constant)]
    return run_model(float_network(graph, names, keep=weights if keep_weights else ()), feeds)[-len(names):]


# GPTQ's own compensation already takes part of what the split gives (and the upstream layers' rounding,
# in both, dilutes it here); on MiniLM the split is worth +0.0004 mean cosine with GPTQ
@pytest.mark.parametrize("weights, ratio", [("nearest", 0.8), ("gptq", 0.95)])
def test_split_lowers_ffn2_weight_rounding_error(tmp_path, weights, ratio):
    data = tmp_path / "calib.npz"
    # GPTQ needs more calibration tokens than FFN2 has inputs (256 + 16 copies), or it fits their noise
    np.savez(data, **example_inputs(SPEC, batch=64, seq=16, seed=3))
    feeds = example_inputs(SPEC, batch=8, seq=16, seed=11)
    model = ffn_outlier_bert(SPEC)
    exact = ffn2_outputs(model, feeds, keep_weights=False)
    inserted = api.insert(ir.to_model(model))
    found = {}
    for split in (False, True):   # smoothing, shifts and split are exact in float: only the weights' rounding is left
        result = api.calibrate(inserted.model, data, split=split, weights=weights, quiet=True)
        assert ("sites_split" in result.report["weights"]) == split
        rounded = ffn2_outputs(ir.from_model(result.model), feeds, keep_weights=True)
        found[split] = sum(np.linalg.norm(r - e) for r, e in zip(rounded, exact)) / sum(map(np.linalg.norm, exact))
    assert found[True] < found[False] * ratio, found


def test_a_producer_read_elsewhere_is_not_split(smoothed):
    graph, _ = smoothed
    ffn1 = next(n for n in graph.nodes if n.op == "Add" and "intermediate" in n.name)
    graph.outputs.append(ffn1.outputs[0])                # FFN1's output is also a model output
    assert len(split_sites(graph)) == 1


def test_recalibration_does_not_split_again(tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=16, seq=16, seed=3))
    first = api.calibrate(api.insert(ir.to_model(ffn_outlier_bert(SPEC))).model, data, quiet=True)
    assert first.report["weights"]["sites_split"] == 2
    again = api.calibrate(first.model, data, quiet=True, keep_scales=False)
    assert "sites_split" not in again.report["weights"]
    assert ffn1_widths(ir.from_model(again.model)) == ffn1_widths(ir.from_model(first.model))


def test_split_option_is_a_bool(bert_file, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=4, seq=16, seed=3))
    with pytest.raises(UsageError, match="split='no'"):
        api.compile(bert_file, data, split="no")


def test_cli_reports_and_turns_off_the_split(bert_file, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=8, seq=16, seed=3))
    on = qdqc("compile", bert_file, "--data", data, "-o", tmp_path / "on.onnx")
    assert on.returncode == 0, on.stderr
    assert "outlier channels split: 32 copies over 2 GEMM inputs" in on.stdout + on.stderr
    off = qdqc("compile", bert_file, "--data", data, "-o", tmp_path / "off.onnx", "--no-split")
    assert off.returncode == 0, off.stderr
    assert "split" not in (off.stdout + off.stderr).replace("--no-split", "")


@pytest.mark.parametrize("shared", ["intermediate", "output"])
def test_a_weight_shared_by_layers_is_not_split(tmp_path, shared):
    """ALBERT shares each weight between layers: widening it for one layer would break the other."""
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=8, seq=16, seed=3))
    graph = ffn_outlier_bert(SPEC)
    gemms = [n for n in graph.nodes if n.op == "MatMul" and f"/{shared}" in n.name and "attention" not in n.name]
    gemms[1].inputs[1] = gemms[0].inputs[1]
    insert(graph, InsertConfig("ft1"))
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("max", progress=False))
    assert split_sites(graph) == []


@pytest.mark.parametrize("mode", ["ft2", "ft3"])
def test_split_through_gemm_output_quantizers(tmp_path, mode):
    """ft2/ft3 quantize FFN1's output before its bias: that Q/DQ pair widens with the rest."""
    data = example_inputs(SPEC, batch=16, seq=16, seed=3)
    model = build_bert(SPEC)
    result = api.compile(model, data, mode=mode, quiet=True)
    assert result.report["weights"]["sites_split"] == 2
    feeds = example_inputs(SPEC, batch=2, seq=16, seed=8)
    assert cosine(run_model(result.model, feeds)[0], run_model(model, feeds)[0]) > 0.99


def test_no_split_for_a_float_reader_weight(tmp_path):
    data = example_inputs(SPEC, batch=8, seq=16, seed=3)
    result = api.compile(build_bert(SPEC), data, exclude=["layer.*.ffn2.weight"], quiet=True)
    assert "sites_split" not in result.report["weights"]
    with pytest.warns(QdqcNote, match="--split: nothing split in this model: no GEMM reads"):   # asked for: said
        api.compile(build_bert(SPEC), data, exclude=["layer.*.ffn2.weight"], split=True, quiet=True)


def test_split_asked_of_a_split_model_says_it_was_split_before():
    data = example_inputs(SPEC, batch=8, seq=16, seed=3)
    first = api.calibrate(api.insert(build_bert(SPEC)), data, quiet=True)
    assert first.report["weights"]["sites_split"] == 2
    calibrated = first.model
    with pytest.warns(QdqcNote, match="its channels were split before"):
        api.calibrate(calibrated, data, keep_scales=False, split=True, quiet=True)


def test_a_split_model_without_its_metadata_is_not_split_again(tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(SPEC, batch=16, seq=16, seed=3))
    first = api.calibrate(api.insert(ir.to_model(ffn_outlier_bert(SPEC))).model, data, quiet=True)
    model = first.model
    del model.metadata_props[:]                          # as some tools rewrite models
    again = api.calibrate(model, data, quiet=True, keep_scales=False)
    assert "sites_split" not in again.report["weights"]
    assert ffn1_widths(ir.from_model(again.model)) == [SPEC.ffn + extra_channels(SPEC.ffn)] * 2
