import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler.check import check_graph
from qdq_compiler.config import InsertConfig
from qdq_compiler.insert import insert
from qdq_compiler.synthetic import BertSpec

from conftest import graph_of


def quantized(spec=BertSpec(), mode="ft1") -> gs.Graph:
    graph = graph_of(spec)
    insert(graph, InsertConfig(mode))
    return graph


def first(graph, predicate):
    return next(n for n in graph.nodes if predicate(n))


def is_activation_q(node):
    return node.op == "QuantizeLinear" and not isinstance(node.inputs[0], gs.Constant)


def is_weight_q(node):
    return node.op == "QuantizeLinear" and isinstance(node.inputs[0], gs.Constant)


def rules(graph):
    return {v.rule for v in check_graph(graph)}


@pytest.mark.parametrize("mode", ["ft1", "ft2", "ft3", "trt", "generic"])
def test_inserted_models_are_clean(mode):
    assert check_graph(quantized(BertSpec(norm="decomposed", linear="gemm_transb"), mode)) == []


def test_non_zero_zero_point():
    graph = quantized()
    q = first(graph, is_activation_q)
    q.inputs[2] = gs.Constant("bad_zp", np.array(3, np.int8))
    assert "zero-point" in rules(graph)


def test_missing_zero_point_means_uint8():
    graph = quantized()
    q = first(graph, is_activation_q)
    del q.inputs[2]
    assert "int8-type" in rules(graph)


def test_uint8_zero_point():
    graph = quantized()
    first(graph, is_activation_q).inputs[2] = gs.Constant("u8", np.array(0, np.uint8))
    assert "int8-type" in rules(graph)


@pytest.mark.parametrize("value", [0.0, -1.0, np.inf, np.nan])
def test_scale_must_be_positive_and_finite(value):
    graph = quantized()
    first(graph, is_activation_q).inputs[1] = gs.Constant("bad_scale", np.array(value, np.float32))
    assert "scale-positive" in rules(graph)


def per_channel(q, count, axis):
    q.inputs[1] = gs.Constant(f"{q.name}_vec_scale", np.ones(count, np.float32))
    q.inputs[2] = gs.Constant(f"{q.name}_vec_zp", np.zeros(count, np.int8))
    q.attrs["axis"] = axis


def test_per_channel_activation_is_refused():
    graph = quantized()
    per_channel(first(graph, is_activation_q), 64, 2)
    assert "per-channel-activation" in rules(graph)


def test_per_channel_length_must_match_the_axis():
    graph = quantized()
    q = first(graph, is_weight_q)
    per_channel(q, 5, q.attrs["axis"])
    found = {v.rule: v for v in check_graph(graph)}
    assert "per-channel-length" in found and found["per-channel-length"].node == q.name


def test_axis_on_a_per_tensor_quantizer():
    graph = quantized()
    first(graph, is_activation_q).attrs["axis"] = 1
    assert "axis-on-per-tensor" in rules(graph)


def test_activation_q_must_feed_a_dq():
    graph = quantized()
    q = first(graph, is_activation_q)
    dq = q.outputs[0].outputs[0]
    cast_out = gs.Variable("as_float", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", "sneaky_cast", {"to": 1}, inputs=[q.outputs[0]], outputs=[cast_out]))
    graph.outputs.append(cast_out)
    assert dq is not None
    assert "q-without-dq" in rules(graph)


def wedge_qdq(graph, tensor, prefix):
    """Put a Q/DQ pair on `tensor` for all its readers."""
    readers = list(tensor.outputs)
    q_out, dq_out = gs.Variable(f"{prefix}_q_out", dtype=np.int8), gs.Variable(f"{prefix}_dq_out", dtype=np.float32)
    scale, zero = gs.Constant(f"{prefix}_s", np.array(0.1, np.float32)), gs.Constant(f"{prefix}_z", np.array(0, np.int8))
    graph.nodes += [gs.Node("QuantizeLinear", f"{prefix}_q", inputs=[tensor, scale, zero], outputs=[q_out]),
                    gs.Node("DequantizeLinear", f"{prefix}_dq", inputs=[q_out, scale, zero], outputs=[dq_out])]
    for reader in readers:
        reader.inputs[reader.inputs.index(tensor)] = dq_out


def test_qdq_inside_a_layer_norm_is_flagged():
    graph = quantized(BertSpec(norm="decomposed"))
    sub = first(graph, lambda n: n.op == "Sub" and n.name.startswith("layer.0/attention/LayerNorm"))
    wedge_qdq(graph, sub.outputs[0], "inside_ln")
    found = [v for v in check_graph(graph) if v.rule == "float-region"]
    assert [v.node for v in found] == ["inside_ln_q"] and "LayerNorm" in found[0].message


def test_qdq_inside_gelu_is_flagged():
    graph = quantized(BertSpec(gelu="erf"))
    wedge_qdq(graph, first(graph, lambda n: n.op == "Erf").outputs[0], "inside_gelu")
    assert [v.node for v in check_graph(graph) if v.rule == "float-region"] == ["inside_gelu_q"]


def test_old_opset_is_flagged():
    graph = quantized()
    graph.opset = 12
    assert "opset" in rules(graph)
