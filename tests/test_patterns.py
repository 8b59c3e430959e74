"""Layer patterns as data: the registry, the named sites every family exposes."""
import pytest

from qdq_compiler import patterns
from qdq_compiler.patterns import LayerPattern, match_encoder, register_pattern
from qdq_compiler.patterns.blocks import Walk
from qdq_compiler.patterns.records import SITE_NAMES
from qdq_compiler.synthetic import BertSpec

from conftest import graph_of


def test_the_families_are_registered_once():
    families = [p.family for p in patterns.patterns()]
    assert "bert-post-ln" in families and len(families) == len(set(families))
    with pytest.raises(ValueError, match="already registered"):
        register_pattern(LayerPattern("bert-post-ln", "again", lambda tensors, softmax, walk: None))


@pytest.mark.parametrize("spec", [BertSpec(), BertSpec(fused_qkv=True, linear="gemm", norm="decomposed")])
def test_every_matched_layer_exposes_the_named_sites_on_tensors_of_the_graph(spec):
    graph = graph_of(spec)
    match = match_encoder(graph)
    tensors = graph.tensors()
    assert match.family == "bert-post-ln" and len(match.layers) == spec.layers
    for layer in match.layers:
        sites = layer.sites()
        assert tuple(sites) == SITE_NAMES
        assert all(name in tensors for name in sites.values())
        # the sites are where the walk says: Q·K^T reads q and k, the context matmul reads the probabilities
        assert layer.attention.bmm1.inputs[0].name == sites["q"] and layer.attention.bmm2.inputs[0].name == \
            sites["softmax.output"]
    # one layer's output is the next one's input
    for before, after in zip(match.layers, match.layers[1:]):
        assert before.sites()["output"] == after.sites()["qkv.input"]


def test_a_registered_pattern_is_tried_and_its_rejection_named():
    """Adding a family is registering a pattern: match_encoder tries it on every Softmax."""
    calls = []

    def never(tensors, softmax, walk: Walk):
        calls.append(softmax)
        walk.fail("not this family")

    register_pattern(LayerPattern("test-never", "a family that never matches", never))
    try:
        graph = graph_of(BertSpec())
        assert len(match_encoder(graph).layers) == 2   # post-LN BERT still matches first
        assert calls == []
    finally:
        del patterns.PATTERNS["test-never"]


def test_a_softmax_no_family_matches_says_why_for_each_family():
    import numpy as np
    import onnx_graphsurgeon as gs

    def never(tensors, softmax, walk: Walk):
        walk.fail("not this family")

    register_pattern(LayerPattern("test-never", "a family that never matches", never))
    try:
        x = gs.Variable("x", dtype=np.float32, shape=[2, 4])
        y = gs.Variable("y", dtype=np.float32, shape=[2, 4])
        graph = gs.Graph(nodes=[gs.Node("Softmax", "lonely", inputs=[x], outputs=[y])], inputs=[x], outputs=[y],
                         opset=17)
        (rejection,) = match_encoder(graph).rejections
        assert rejection.reason.startswith("bert-post-ln: softmax input has no producer")
        assert "test-never: not this family" in rejection.reason
    finally:
        del patterns.PATTERNS["test-never"]
