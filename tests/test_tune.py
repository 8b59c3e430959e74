"""End-to-end tuning (`--tune`): the torch executor computes what onnxruntime computes, tuning lowers the
error onnxruntime measures against the float model, values change and the graph does not, and the
errors a user can meet are one line."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import torch

import qdq_compiler
from qdq_compiler import ir
from qdq_compiler.errors import ModelError, UsageError
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs
from qdq_compiler.torch_graph import TorchGraph
from qdq_compiler.tune import TuneConfig

from conftest import calibrated_bert, qdqc, run_model


def torch_outputs(graph, feeds, *, quantized=True):
    net = TorchGraph(graph)
    net.quantize_activations = net.quantize_weights = quantized
    with torch.no_grad():
        return [t.numpy() for t in net({k: torch.from_numpy(v) for k, v in feeds.items()})]


def onnxruntime_values(graph, feeds) -> dict:
    """Every named tensor the graph computes, as onnxruntime computes it (graph optimizations off)."""
    from qdq_compiler.evaluate import open_session

    names = [t.name for n in graph.nodes for t in n.outputs if isinstance(t, gs.Variable) and t.name]
    exposed = graph.copy()
    tensors = exposed.tensors()
    exposed.outputs += [tensors[name] for name in names if tensors[name] not in exposed.outputs]
    ir.unique_node_names(exposed)
    return dict(zip(names, open_session(ir.to_model(exposed), optimize=False).run(names, feeds)))


@pytest.mark.parametrize("spec,mode", [
    (BertSpec(layers=2), "ft1"),
    (BertSpec(layers=1, linear="gemm_transb", norm="decomposed", gelu="tanh", mask="where"), "ft2"),
    (BertSpec(layers=1, linear="gemm", scale="before_q", token_types=False), "trt"),
])
def test_executor_matches_onnxruntime(tmp_path, spec, mode):
    graph, _ = calibrated_bert(tmp_path, spec, mode)
    feeds = example_inputs(spec, batch=3, seq=12, seed=9)
    # node by node, from onnxruntime's inputs: end to end, a last-bit difference can move a value across a
    # rounding boundary of a later quantizer, so the whole graph is compared with its quantizers off
    expected = onnxruntime_values(graph, feeds)
    ours: dict = {}
    with torch.no_grad():
        TorchGraph(graph)({k: torch.from_numpy(v) for k, v in feeds.items()},
                          given={k: torch.from_numpy(v) for k, v in expected.items()}, record=ours)
    tensors = graph.tensors()   # a Q -> DQ pair is one fake-quantizer: the integer tensor between is not made
    assert all(ir.producer(tensors[name]).op == "QuantizeLinear" for name in set(expected) - set(ours))
    assert set(ours) <= set(expected)
    for name, value in ((k, v) for k, v in expected.items() if k in ours):
        assert ours[name].shape == value.shape, name
        assert np.allclose(ours[name].numpy(), value, atol=1e-5 * max(1.0, np.abs(value).max()), rtol=0), name
    quantized_dq = sum(name.endswith("::dequantized") for name in expected)
    assert quantized_dq >= 10   # the quantizers were compared too
    float_ = run_model(build_bert(spec), feeds)[0]   # with the pairs off: the float model
    assert np.allclose(torch_outputs(graph, feeds, quantized=False)[0], float_, atol=1e-4, rtol=0)
    assert np.abs(run_model(graph, feeds)[0] - float_).max() > 1e-3   # quantization is visible at this tolerance


def relative_error(model, reference, feeds):
    """‖out − ref‖² / ‖ref‖² over attended tokens, as onnxruntime computes the outputs."""
    out, ref = run_model(model, feeds)[0], run_model(reference, feeds)[0]
    mask = feeds["attention_mask"].astype(bool)
    return float(((out - ref)[mask] ** 2).sum() / (ref[mask] ** 2).sum())


def test_tuning_lowers_the_error_and_changes_only_values(tmp_path):
    spec = BertSpec(layers=2)
    model, data = tmp_path / "bert.onnx", tmp_path / "calib.npz"
    onnx.save(build_bert(spec), model)
    feeds = example_inputs(spec, batch=32, seq=16, seed=4)
    np.savez(data, **feeds)
    coarse = dict(method="percentile", percentile=99.0, quiet=True)   # clipping scales: room to tune
    plain = qdq_compiler.calibrate(qdq_compiler.insert(model), data, **coarse)
    tuned = qdq_compiler.calibrate(qdq_compiler.insert(model), data, tune=TuneConfig(epochs=4, batch_size=8), **coarse)
    record = tuned.report["tuning"]
    assert record["kept"] and record["loss_after"] < 0.5 * record["loss_before"]
    reference = build_bert(spec)
    assert relative_error(tuned.graph, reference, feeds) < 0.5 * relative_error(plain.graph, reference, feeds)
    assert record["loss_before"] == pytest.approx(relative_error(plain.graph, reference, feeds), rel=0.25)
    # the same nodes reading the same tensors; some constants' values differ
    assert [(n.op, ir.input_names(n)) for n in tuned.graph.nodes] == [(n.op, ir.input_names(n)) for n in plain.graph.nodes]
    changed = [name for name, t in tuned.graph.tensors().items()
               if hasattr(t, "values") and not np.array_equal(t.values, plain.graph.tensors()[name].values)]
    # and the OS+ shifts moved onto the tuned scales' grids
    assert len([n for n in changed if "::shift_offset" not in n]) == record["scales_tuned"] + record["vectors_tuned"]
    assert plain.report["tuning"] == {"tune": "off"}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_each_target_lowers_the_tuned_values_into_the_same_graph(tmp_path, target):
    spec = BertSpec(layers=1)
    model, data = tmp_path / "bert.onnx", tmp_path / "calib.npz"
    onnx.save(build_bert(spec), model)
    np.savez(data, **example_inputs(spec, batch=16, seq=16, seed=4))
    options = dict(target=target, method="percentile", percentile=99.0, quiet=True)
    plain = qdq_compiler.compile(model, data, **options)
    tuned = qdq_compiler.compile(model, data, tune=TuneConfig(epochs=2, batch_size=8), **options)
    assert tuned.report["tuning"]["kept"] and tuned.report["options"]["tune"] == 2
    assert [(n.op, ir.input_names(n)) for n in tuned.graph.nodes] == [(n.op, ir.input_names(n)) for n in plain.graph.nodes]
    constants = lambda graph: [t.values for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant)]  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(constants(tuned.graph), constants(plain.graph)))
    assert all(isinstance(v, np.ndarray) for v in constants(tuned.graph))
    reference = build_bert(spec)
    feeds = example_inputs(spec, batch=16, seq=16, seed=4)
    if target == "onnxruntime":   # the lowered model computes the tuned model's lower error
        assert relative_error(tuned.graph, reference, feeds) < relative_error(plain.graph, reference, feeds)


def test_an_unsupported_op_is_named_in_one_line(tmp_path):
    spec = BertSpec(layers=1)
    model = build_bert(spec)
    hidden = model.graph.output[0]
    model.graph.node.append(onnx.helper.make_node("HardSwish", [hidden.name], ["swished"]))
    model.graph.output[0].name = "swished"
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=8, seq=8))
    with pytest.raises(ModelError) as caught:
        qdq_compiler.calibrate(qdq_compiler.insert(model), data, tune=1, quiet=True)
    assert "does not support op HardSwish" in str(caught.value) and "\n" not in str(caught.value)


def test_option_errors_are_one_line(tmp_path, bert_file, monkeypatch):
    with pytest.raises(UsageError, match="expected off or a number of epochs"):
        TuneConfig.parse("fast")
    with pytest.raises(UsageError, match="--tune needs --data"):
        qdq_compiler.calibrate(qdq_compiler.insert(bert_file), stats=tmp_path / "stats.npz", tune=2)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)   # import torch now raises ImportError
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=4, seq=8))
    with pytest.raises(UsageError, match="--tune needs torch"):
        qdq_compiler.compile(bert_file, data, tune=2)
    assert TuneConfig.parse("off").active is False and TuneConfig.parse(None).active is False


def test_cli_tunes_and_says_so(tmp_path, bert_file):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=16, seq=16, seed=4))
    done = qdqc("compile", bert_file, "--data", data, "--tune", "1", "--output", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    assert "tuned end to end (1 epoch," in done.stdout
    bad = qdqc("compile", bert_file, "--data", data, "--tune", "soon", "--output", tmp_path / "bad.onnx")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--tune 'soon'" in bad.stderr


def test_fake_quantizer_gradients_are_straight_through_and_lsq():
    from qdq_compiler.torch_graph import _FakeQuantize

    x = (torch.linspace(-3.0, 3.0, 41, dtype=torch.float32) + 0.003).requires_grad_()   # no ties at .5
    scale = torch.tensor(0.02, requires_grad=True)
    y = _FakeQuantize.apply(x, scale, torch.tensor(0.0), -128, 127)
    y.backward(torch.ones_like(y))
    for value, found, grad in zip(x.detach().tolist(), y.detach().tolist(), x.grad.tolist()):
        level = round(value / 0.02)   # the same rounding as ONNX, restated one value at a time
        inside = -128 <= level <= 127
        assert found == pytest.approx(min(max(level, -128), 127) * 0.02, abs=1e-6)
        assert grad == (1.0 if inside else 0.0)
    expected = sum((round(v / 0.02) - v / 0.02) if -128 <= round(v / 0.02) <= 127 else min(max(round(v / 0.02), -128), 127)
                   for v in x.detach().tolist())   # LSQ: d/ds of s·clamp(round(x/s))
    assert scale.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
