import re
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import ir
from qdq_compiler.check import check_graph
from qdq_compiler.config import InsertConfig
from qdq_compiler.insert import insert, report, summary
from qdq_compiler.pipeline import PassContext, run_pipeline
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import cosine, graph_of, run_model

# Quantizers per layer for a separate-QKV layer: FT's sites, one quantizer per distinct tensor.
#   GEMM inputs 4 (LN output shared by Q/K/V) + BMM inputs 4 + weights 6          = 14 (ft1)
#   ft2: + 6 GEMM outputs; residual skips are the LN outputs already quantized  = 20
#   ft3: + QK^T                                                                  = 21
#   trt: ft1 + 2 residual local branches, + 1 final output for the model         = 16 (+1)
PER_LAYER = {"ft1": 14, "ft2": 20, "ft3": 21, "trt": 16}


def inserted(spec=BertSpec(), mode="ft1"):
    graph = graph_of(spec)
    result = insert(graph, InsertConfig(mode), verify=True)
    return graph, result


@pytest.mark.parametrize("mode", ["ft1", "ft2", "ft3", "trt"])
def test_each_mode_places_exactly_its_sites(mode):
    spec = BertSpec(layers=3)
    graph, result = inserted(spec, mode)
    expected = PER_LAYER[mode] * 3 + (mode == "trt")
    assert len(result.plan.quantizers) == expected
    ops = Counter(n.op for n in graph.nodes)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == expected
    kinds = Counter(site.split(".", 2)[-1] for q in result.plan.quantizers for site in q.sites)
    assert kinds["q"] == kinds["softmax.output"] == kinds["qkv.input"] == kinds["ffn2.input"] == 3
    assert (kinds["query.gemm_output"] == 3) == (mode in ("ft2", "ft3"))
    assert (kinds["qk.output"] == 3) == (mode == "ft3")
    assert (kinds["residual1.local"] == 3) == (mode == "trt")
    assert (kinds["residual2"] == 3) == (mode in ("ft2", "ft3", "trt"))
    assert (kinds["output"] == 1) == (mode == "trt")
    names = [site for q in result.plan.quantizers for site in q.sites]
    assert all(re.fullmatch(r"layer\.[0-2]\.[a-z0-9_.]+", site) for site in names)
    assert check_graph(graph) == []


def test_layer_norm_output_is_quantized_once_for_q_k_v_and_the_residual_stays_float_in_ft1():
    graph, result = inserted(BertSpec(), "ft1")
    layer = result.match.layers[1]
    tensors = graph.tensors()
    ln_out = tensors[layer.input]
    quantizers = [n for n in ln_out.outputs if n.op == "QuantizeLinear"]
    assert len(quantizers) == 1
    dequantized = quantizers[0].outputs[0].outputs[0].outputs[0]
    readers = {id(n) for n in dequantized.outputs}
    assert {id(layer.linears()[r].node) for r in ("query", "key", "value")} <= readers
    residual = layer.attention_residual.add
    assert ln_out in residual.inputs and dequantized not in residual.inputs
    site = report(result, InsertConfig("ft1"))["layers"][1]["sites"]["qkv.input"]
    assert site["tensor"] == layer.input and site["shared_with"] == []   # one site, one quantizer, three readers
    assert len(result.plan.by_site()["layer.1.qkv.input"].uses) == 3


def test_ft2_residual_reads_the_shared_quantized_tensor():
    graph, result = inserted(BertSpec(), "ft2")
    layer = result.match.layers[0]
    residual = layer.attention_residual.add
    assert any(ir.producer(t) is not None and ir.producer(t).op == "DequantizeLinear" for t in residual.inputs)


# canonicalize folds MatMul(x, Transpose(W)) into a [K, N] weight: axis 1
@pytest.mark.parametrize("linear,axis", [("matmul", 1), ("gemm_transb", 0), ("gemm", 1), ("matmul_transposed", 1)])
def test_ft1_weights_are_per_channel_on_the_output_channel(linear, axis):
    graph, result = inserted(BertSpec(linear=linear), "ft1")
    weights = [n for n in graph.nodes if n.op == "QuantizeLinear" and isinstance(n.inputs[0], gs.Constant)]
    assert len(weights) == 12
    for q in weights:
        values, scale = q.inputs[0].values, q.inputs[1].values
        assert q.attrs["axis"] == axis
        expected = np.abs(values).max(axis=1 - axis) / 127
        np.testing.assert_allclose(scale, expected, rtol=1e-6)
        assert q.inputs[2].values.dtype == np.int8 and not q.inputs[2].values.any()


def test_ft2_weights_are_per_tensor_and_q_k_v_share_the_largest_scale():
    graph, result = inserted(BertSpec(), "ft2")
    layer = result.match.layers[0]
    tensors = graph.tensors()
    scales = []
    for role in ("query", "key", "value"):
        weight = tensors[layer.linears()[role].weight]
        (q,) = [n for n in weight.outputs if n.op == "QuantizeLinear"]
        assert "axis" not in q.attrs and q.inputs[1].values.shape == ()
        scales.append(float(q.inputs[1].values))
    largest = max(np.abs(tensors[layer.linears()[r].weight].values).max() for r in ("query", "key", "value"))
    assert scales == [pytest.approx(largest / 127)] * 3


def test_trt_keeps_the_graph_output_name_and_quantizes_it():
    graph, _ = inserted(BertSpec(), "trt")
    (out,) = graph.outputs
    assert out.name == "last_hidden_state"
    assert ir.producer(out).op == "DequantizeLinear"


def test_gemm_bias_is_split_for_the_after_gemm_site_and_stays_exact():
    spec = BertSpec(linear="gemm_transb")
    graph = graph_of(spec)
    feeds = example_inputs(spec)
    reference = run_model(build_bert(spec), feeds)[0]

    class Ft2:
        sites = InsertConfig("ft2").sites

    run_pipeline(graph, ("split-gemm-bias",), PassContext(Ft2()), verify=True)
    assert all(len(n.inputs) == 2 for n in graph.nodes if n.op == "Gemm")
    np.testing.assert_allclose(run_model(graph, feeds)[0], reference, rtol=1e-5, atol=1e-5)
    _, result = inserted(spec, "ft2")
    assert result.plan.skipped == ()
    assert sum(site.endswith("gemm_output") for q in result.plan.quantizers for site in q.sites) == 12


@pytest.mark.parametrize("mode", ["ft1", "ft2", "ft3", "trt", "generic"])
def test_inserted_model_runs_with_placeholder_scales(mode):
    spec = BertSpec(linear="gemm", fused_qkv=True, norm="decomposed", opset=13, mask="where")
    feeds = example_inputs(spec)
    reference = run_model(build_bert(spec), feeds)[0]
    graph, _ = inserted(spec, mode)
    (out,) = run_model(graph, feeds)
    assert out.shape == reference.shape and np.isfinite(out).all()
    assert cosine(out, reference) > 0.5


def test_weight_only_quantization_is_close_to_float():
    """With activation Q/DQ removed, what is left is exactly the weight quantization error."""
    spec = BertSpec()
    feeds = example_inputs(spec)
    reference = run_model(build_bert(spec), feeds)[0]
    graph, result = inserted(spec, "ft1")
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]:
        dq = q.outputs[0].outputs[0]
        for reader in list(dq.outputs[0].outputs):
            reader.inputs[reader.inputs.index(dq.outputs[0])] = q.inputs[0]
    graph.cleanup()
    assert cosine(run_model(graph, feeds)[0], reference) > 0.999


def test_a_model_with_qdq_keeps_them_and_is_never_quantized_twice():
    graph, first = inserted(BertSpec(), "ft1")
    before = Counter(n.op for n in graph.nodes)
    second = insert(graph, InsertConfig("ft1"), verify=True)
    assert Counter(n.op for n in graph.nodes) == before
    assert second.input_qdq == {"DequantizeLinear": 28, "QuantizeLinear": 28}
    assert len({e.site for e in second.plan.existing}) == sum(len(q.sites) for q in first.plan.quantizers)
    assert summary(second, InsertConfig("ft1")).splitlines()[1] == \
        "mode ft1: no quantizer added (the model quantizes every site already)"
    # a different mode adds only the sites that were not there
    third = insert(graph, InsertConfig("trt"), verify=True)
    assert Counter(n.op for n in graph.nodes)["QuantizeLinear"] == 28 + 2 * 2 + 1
    assert next(r for r in third.records if r.name == "insert-qdq").stats["qdq_pairs_inserted"] == 5


def test_canonicalize_removes_identities_and_folds_weight_transposes_but_not_qdq():
    spec = BertSpec(linear="matmul_transposed")
    graph = graph_of(spec)
    first = next(n for n in graph.nodes if n.op == "MatMul")
    source = first.inputs[0]
    middle = gs.Variable("through_identity", dtype=np.float32)
    graph.nodes.append(gs.Node("Identity", "extra_identity", inputs=[source], outputs=[middle]))
    first.inputs[0] = middle
    weight_q = gs.Node("QuantizeLinear", "wq", inputs=[gs.Constant("w", np.ones((2, 2), np.float32)),
                                                       gs.Constant("s", np.array(0.5, np.float32))],
                       outputs=[gs.Variable("wq_out", dtype=np.uint8)])
    graph.nodes.append(weight_q)
    graph.outputs.append(weight_q.outputs[0])
    records = run_pipeline(graph, ("canonicalize",), PassContext(InsertConfig()), verify=True)
    assert records[0].stats["identities_removed"] == 2  # ours and the one naming the graph output
    assert not any(n.op == "Identity" for n in graph.nodes)
    assert not any(n.op == "Transpose" and isinstance(n.inputs[0], gs.Constant) for n in graph.nodes)
    assert any(n.name == "wq" for n in graph.nodes)


def test_canonicalize_shares_byte_identical_weights_but_not_scalars():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=[2, 8])
    h, y = gs.Variable("h", dtype=np.float32), gs.Variable("y", dtype=np.float32)
    z = gs.Variable("z", dtype=np.float32)
    graph = gs.Graph(nodes=[gs.Node("MatMul", "mm1", inputs=[x, gs.Constant("w1", weight)], outputs=[h]),
                            gs.Node("MatMul", "mm2", inputs=[h, gs.Constant("w2", weight.copy())], outputs=[y]),
                            gs.Node("Mul", "m1", inputs=[y, gs.Constant("s1", np.array(2, np.float32))], outputs=[z]),
                            gs.Node("Mul", "m2", inputs=[z, gs.Constant("s2", np.array(2, np.float32))],
                                    outputs=[gs.Variable("out", dtype=np.float32)])],
                     inputs=[x], outputs=[], opset=17)
    graph.outputs = [graph.nodes[-1].outputs[0]]
    records = run_pipeline(graph, ("canonicalize",), PassContext(InsertConfig()), verify=True)
    assert records[0].stats["weights_shared"] == 1
    first, second = (n for n in graph.nodes if n.op == "MatMul")
    assert first.inputs[1] is second.inputs[1]
    muls = [n for n in graph.nodes if n.op == "Mul"]
    assert muls[0].inputs[1] is not muls[1].inputs[1]


def test_no_bert_layer_falls_back_to_generic_and_says_so():
    x = gs.Variable("x", dtype=np.float32, shape=[2, 8])
    hidden, out = gs.Variable("h", dtype=np.float32), gs.Variable("y", dtype=np.float32)
    w1 = gs.Constant("w1", np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    w2 = gs.Constant("w2", np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32))
    relu = gs.Variable("r", dtype=np.float32)
    graph = gs.Graph(nodes=[gs.Node("MatMul", "mm1", inputs=[x, w1], outputs=[hidden]),
                            gs.Node("Relu", "relu", inputs=[hidden], outputs=[relu]),
                            gs.Node("MatMul", "mm2", inputs=[relu, w2], outputs=[out])],
                     inputs=[x], outputs=[out], opset=17)
    result = insert(graph, InsertConfig("ft1"), verify=True)
    assert result.plan.fallback
    assert len(result.plan.quantizers) == 4
    assert any("fell back to 'generic'" in d.message for r in result.records for d in r.diagnostics)
    axes = sorted(q.axis for q in result.plan.quantizers if q.axis is not None)
    assert axes == [1, 1]
