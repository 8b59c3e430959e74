"""The plan travels with the model: insert stores it in metadata_props, later stages read it."""
import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import carried, ir
from qdq_compiler.config import InsertConfig
from qdq_compiler.errors import ModelError
from qdq_compiler.insert import insert
from qdq_compiler.lower import LowerConfig
from qdq_compiler.pipeline import PassContext, run_pipeline
from qdq_compiler.synthetic import BertSpec

from conftest import graph_of


def saved_and_loaded(graph: gs.Graph, tmp_path) -> gs.Graph:
    return ir.load(ir.save(graph, tmp_path / "model.onnx"))


def report_mha(graph: gs.Graph):
    return run_pipeline(graph, ("report-mha",), PassContext(LowerConfig("tensorrt")))[0]


@pytest.mark.parametrize("mode", ["ft1", "ft2", "trt"])
def test_insert_stores_family_mode_and_every_site_and_they_survive_save_and_load(tmp_path, mode):
    graph = graph_of(BertSpec(layers=3))
    result = insert(graph, InsertConfig(mode))
    plan = carried.read(saved_and_loaded(graph, tmp_path))
    assert plan.family == "bert-post-ln" and plan.mode == mode and len(plan.layers) == 3
    assert [dict(layer.named_sites) for layer in plan.layers] == [layer.sites() for layer in result.match.layers]
    expected = {site: q.tensor for q in result.plan.quantizers for site in q.sites}
    assert dict(plan.sites) == expected and len(expected) > 0
    tensors = graph.tensors()
    for layer in plan.layers:   # what the batched matmuls read is dequantized (ft1/ft2/trt quantize BMM inputs)
        assert all(ir.producer(tensors[name]).op == "DequantizeLinear" for name in layer.attention.values())


def test_other_metadata_of_the_input_model_is_kept(tmp_path):
    import onnx

    from qdq_compiler.synthetic import build_bert

    model = build_bert(BertSpec())
    model.metadata_props.add(key="author", value="someone")
    graph = ir.from_model(model)
    insert(graph, InsertConfig("ft1"))
    reloaded = onnx.load(str(ir.save(graph, tmp_path / "m.onnx")))
    keys = {p.key: p.value for p in reloaded.metadata_props}
    assert keys["author"] == "someone" and json.loads(keys[carried.PLAN_KEY])["format"] == carried.FORMAT


def break_residuals(graph: gs.Graph) -> int:
    """A later rewrite the matcher does not understand: the skip of every residual Add goes through
    Neg(Neg(x)) (exact), so 'the attention residual adds the layer input' no longer matches."""
    broken = 0
    for add in [n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2
                and not any(ir.is_constant(t) for t in n.inputs)]:
        skip = add.inputs[0]
        once = gs.Variable(f"{skip.name}::neg1", dtype=np.float32)
        twice = gs.Variable(f"{skip.name}::neg2", dtype=np.float32)
        graph.nodes += [gs.Node("Neg", f"{add.name}::neg1", inputs=[skip], outputs=[once]),
                        gs.Node("Neg", f"{add.name}::neg2", inputs=[once], outputs=[twice])]
        add.inputs[0] = twice
        broken += 1
    ir.toposort(graph)
    return broken


def test_later_stages_read_the_plan_not_the_matcher(tmp_path):
    from conftest import calibrated_bert

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=2))
    assert break_residuals(graph) > 0
    record = report_mha(graph)
    assert record.stats["layers_from"] == "metadata" and record.stats["attention_blocks_quantized"] == 2
    # the same model without the record: matching is all there is, and it no longer finds the layers
    del ir.metadata(graph)[carried.PLAN_KEY]
    record = report_mha(graph)
    assert record.stats["layers_from"] == "matched" and record.stats["attention_blocks_quantized"] == 0


def test_a_model_without_the_record_falls_back_to_matching(tmp_path):
    from conftest import calibrated_bert

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=2))
    with_plan = carried.encoder_layers(graph)
    del ir.metadata(graph)[carried.PLAN_KEY]
    matched = carried.encoder_layers(graph)
    assert (with_plan.source, matched.source) == ("metadata", "matched")
    for a, b in zip(with_plan.layers, matched.layers, strict=True):
        assert {r: t.name for r, t in a.attention.items()} == {r: t.name for r, t in b.attention.items()}
        assert a.bmm1 is b.bmm1
        assert [id(n) for n in a.activation.nodes] == [id(n) for n in b.activation.nodes]


def test_a_plan_whose_tensors_are_gone_is_matched_again_and_says_so(tmp_path):
    graph = graph_of()
    insert(graph, InsertConfig("ft1"))
    plan = carried.read(graph)
    layer = plan.layers[0]
    gone = carried.CarriedLayer(0, {**layer.attention, "query": "no-such-tensor"}, layer.activation, layer.output,
                                layer.named_sites)
    carried.store(graph, carried.CarriedPlan(plan.family, plan.mode, (gone, *plan.layers[1:]), plan.sites))
    found = carried.encoder_layers(graph)
    assert found.source == "matched" and "no-such-tensor" in found.note and len(found.layers) == 2


def test_an_unreadable_record_is_one_line():
    graph = graph_of()
    ir.metadata(graph)[carried.PLAN_KEY] = '{"format": 1, "layers": ['
    with pytest.raises(ModelError, match=r"^metadata 'qdqc.plan' is unreadable \(JSONDecodeError") as info:
        carried.read(graph)
    assert "\n" not in str(info.value)
    ir.metadata(graph)[carried.PLAN_KEY] = '{"format": 99}'
    with pytest.raises(ModelError, match="format 99"):
        carried.read(graph)


def test_generic_placement_records_its_mode_and_no_family_when_nothing_matched():
    import onnx

    graph = graph_of()
    insert(graph, InsertConfig("generic"))
    plan = carried.read(graph)
    assert plan.family == "bert-post-ln" and len(plan.layers) == 2 and plan.mode == "generic"
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = ir.from_model(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [weight]),
        opset_imports=[onnx.helper.make_opsetid("", 17)]))
    insert(graph, InsertConfig("ft1"))
    plan = carried.read(graph)
    assert plan.family is None and plan.layers == () and set(plan.sites) == {"y.input0", "y.input1"}


def test_smoothing_reads_the_gemm_input_sites_from_the_plan():
    from qdq_compiler.smooth import smooth_sites

    graph = graph_of()
    insert(graph, InsertConfig("ft1"))
    assert len(smooth_sites(graph)) == 6   # per layer: the QKV input, FFN1 input, FFN2 input
    plan = carried.read(graph)
    dropped = plan.sites["layer.1.ffn2.input"]
    sites = {site: tensor for site, tensor in plan.sites.items() if tensor != dropped}
    carried.store(graph, carried.CarriedPlan(plan.family, plan.mode, plan.layers, sites))
    found = smooth_sites(graph)
    assert len(found) == 5 and dropped not in {s.tensor for s in found}
    del ir.metadata(graph)[carried.PLAN_KEY]   # no plan (older qdqc, QAT export): every GEMM-only quantizer
    assert len(smooth_sites(graph)) == 6
