import itertools

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler.bert import match_encoder
from qdq_compiler.config import InsertConfig
from qdq_compiler.insert import insert
from qdq_compiler.synthetic import LINEAR_STYLES, BertSpec

from conftest import graph_of

# (norm, gelu, scale, mask, fused_qkv, opset, token_types): each exporter style at least once
STYLES = [
    ("op", "erf", "after_mul", "add", False, 17, True),
    ("decomposed", "tanh", "after_div", "where", True, 13, False),
    ("op", "op", "before_q", "add", False, 20, True),
    ("decomposed", "erf", "split", "where", False, 18, True),
    ("op", "tanh", "folded", "add", True, 17, False),
]
ACTIVATION_KIND = {"erf": "gelu-erf", "tanh": "gelu-tanh", "op": "gelu-op"}
SCALE_POSITION = {"after_mul": "after_bmm", "after_div": "after_bmm", "before_q": "before_bmm",
                  "split": "before_bmm", "folded": "folded"}


@pytest.mark.parametrize("linear,style", list(itertools.product(LINEAR_STYLES, STYLES)))
def test_every_exporter_style_matches_every_layer(linear, style):
    norm, gelu, scale, mask, fused, opset, token_types = style
    spec = BertSpec(layers=3, linear=linear, norm=norm, gelu=gelu, scale=scale, mask=mask, fused_qkv=fused,
                    opset=opset, token_types=token_types)
    match = match_encoder(graph_of(spec))
    assert match.rejections == ()
    assert len(match.layers) == 3
    for index, layer in enumerate(match.layers):
        assert layer.index == index
        assert layer.fused_qkv == fused
        assert layer.attention.scale_position == SCALE_POSITION[scale]
        assert len(layer.attention.scale) == {"split": 2, "folded": 0}.get(scale, 1)
        assert layer.attention.mask is not None
        assert layer.attention_norm.kind == layer.ffn_norm.kind == norm
        assert layer.activation.kind == ACTIVATION_KIND[gelu]
        ops = {lin.op for lin in layer.linears().values()}
        assert ops == ({"Gemm"} if linear.startswith("gemm") else {"MatMul"})
    assert match.layers[1].input == match.layers[0].output
    assert match.unmatched_gemms == ()


@pytest.mark.parametrize("linear,axis", [("matmul", 1), ("gemm", 1), ("gemm_transb", 0), ("matmul_transposed", 0)])
def test_weight_output_axis_follows_the_weight_layout(linear, axis):
    graph = graph_of(BertSpec(linear=linear))
    layer = match_encoder(graph).layers[0]
    tensors = graph.tensors()
    for lin in layer.linears().values():
        assert lin.weight_axis == axis
        out_features = tensors[lin.weight].values.shape[axis]
        assert out_features in (64, 256)


def test_matching_never_mutates_the_graph():
    graph = graph_of(BertSpec(linear="gemm", fused_qkv=True))
    before = [(n.name, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    match_encoder(graph)
    assert [(n.name, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes] == before


def with_head(spec: BertSpec) -> gs.Graph:
    """The encoder plus a pooler-like linear layer on the output."""
    graph = graph_of(spec)
    out = graph.outputs[0]
    weight = gs.Constant("pooler.weight", np.ones((spec.hidden, 3), np.float32))
    pooled = gs.Variable("pooled", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", "pooler/MatMul", inputs=[out, weight], outputs=[pooled]))
    graph.outputs.append(pooled)
    return graph


def test_a_linear_outside_the_layers_is_unmatched_with_a_reason():
    match = match_encoder(with_head(BertSpec()))
    assert len(match.layers) == 2
    why = {node.name: reason for node, reason in match.unmatched_gemms}
    assert "outside every matched encoder layer" in why["pooler/MatMul"]


def test_a_broken_layer_is_rejected_and_its_gemms_say_why():
    graph = graph_of(BertSpec(layers=2))
    # make layer 1's attention-output residual Add a Sub: no longer a post-LN BERT layer
    residual = next(n for n in graph.nodes if n.name.startswith("layer.1/attention/Residual"))
    residual.op = "Sub"
    match = match_encoder(graph)
    assert len(match.layers) == 1
    (rejection,) = match.rejections
    assert "residual" in rejection.reason
    bmm1 = next(n.name for n in graph.nodes if n.name.startswith("layer.1/attention/QK"))
    why = {node.name: reason for node, reason in match.unmatched_gemms}
    assert "rejected" in why[bmm1] and "residual" in why[bmm1]


def test_qat_style_qdq_is_seen_through():
    graph = graph_of(BertSpec(linear="matmul"))
    insert(graph, InsertConfig("trt"))
    match = match_encoder(graph)
    assert len(match.layers) == 2 and match.rejections == ()
    assert all(lin.weight_quantized for lin in match.layers[0].linears().values())
