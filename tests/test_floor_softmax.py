"""`floor-softmax-input`: Softmax(x) -> Softmax(Max(x, rowmax - 80)), exact where it matters."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from qdq_compiler import ir
from qdq_compiler.lower import LowerConfig, lower
from qdq_compiler.pipeline import PassContext, get_pass
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, run_model


def softmax_graph(opset: int, axis: int = -1) -> gs.Graph:
    nodes = [helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=axis)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 16])])
    return gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def reference_softmax(x: np.ndarray) -> np.ndarray:
    """float64 softmax over the last axis, rounded once: the independent restatement."""
    wide = x.astype(np.float64)
    e = np.exp(wide - wide.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("opset", [17, 18])
def test_masked_keys_get_at_most_e_to_the_minus_80_and_the_rest_is_unchanged(opset):
    graph = softmax_graph(opset)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 16)) * 4).astype(np.float32)
    masked = np.zeros(x.shape, bool)
    masked[..., 11:] = True
    x[masked] += np.finfo(np.float32).min                   # BERT's padding fill
    x[0, 0, 0, 3] -= 200.0                                  # a real key far below the row max
    before = run_model(graph, {"x": x})[0]
    result = get_pass("floor-softmax-input")(graph, PassContext(LowerConfig()))
    assert result.modified and result.stats == {"softmaxes_floored": 1}
    assert [n.op for n in graph.nodes] == ["ReduceMax", "Add", "Max", "Softmax"]
    onnx.checker.check_model(ir.to_model(graph), full_check=True)
    after = run_model(graph, {"x": x})[0]
    far = masked.copy()
    far[0, 0, 0, 3] = True
    np.testing.assert_array_equal(after[~far], before[~far])    # bit-identical
    assert np.all(after[far] <= 1.9e-35) and np.all(after[far] > 0)   # e^-80 / sum, normal floats
    np.testing.assert_allclose(after, reference_softmax(x), rtol=1e-6, atol=2e-35)
    again = get_pass("floor-softmax-input")(graph, PassContext(LowerConfig()))
    assert not again.modified                                   # never floored twice


def test_softmax_over_another_axis_is_left_alone():
    graph = softmax_graph(17, axis=1)
    assert not get_pass("floor-softmax-input")(graph, PassContext(LowerConfig())).modified


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e4, 50, allow_nan=False, width=32), min_size=2, max_size=40))
def test_floor_never_moves_a_probability_by_more_than_e_to_the_minus_80(row):
    graph = softmax_graph(17)
    x = np.resize(np.array(row, np.float32), (2, 3, 4, 16))
    expected = reference_softmax(x)
    get_pass("floor-softmax-input")(graph, PassContext(LowerConfig()))
    np.testing.assert_allclose(run_model(graph, {"x": x})[0], expected, rtol=1e-5, atol=2e-35)


def test_lowered_bert_is_unchanged_by_the_floor(tmp_path):
    spec = BertSpec(layers=2, mask="where")   # a Where mask: no additive mask for clamp-attention-mask
    graph, _ = calibrated_bert(tmp_path, spec)
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][:, 9:] = 0                          # padded keys: the masked softmax
    without = graph.copy()
    records = lower(graph, LowerConfig("onnxruntime"), verify=True)
    assert {r.name: dict(r.stats) for r in records}["floor-softmax-input"] == {"softmaxes_floored": spec.layers}
    from qdq_compiler.pipeline import PIPELINES, run_pipeline

    passes = tuple(p for p in PIPELINES["lower-onnxruntime"] if p != "floor-softmax-input")
    run_pipeline(without, passes, PassContext(LowerConfig("onnxruntime")))
    np.testing.assert_array_equal(run_model(graph, feeds)[0], run_model(without, feeds)[0])
