"""`clamp-attention-mask`: Softmax(scores + mask) -> Softmax(scores + Max(mask, -60))."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from qdq_compiler import ir
from qdq_compiler.lower import LowerConfig
from qdq_compiler.pipeline import PIPELINES, PassContext, get_pass, run_pipeline
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, run_model

B, H, S, D = 2, 3, 16, 8


def attention_scores_graph(layers: int = 2) -> gs.Graph:
    """`layers` masked softmaxes of Q·K^T, all reading one B×1×1×S additive mask."""
    nodes, outputs = [], []
    for i in range(layers):
        nodes += [helper.make_node("MatMul", ["q", "kt"], [f"s{i}"], name=f"qk{i}"),
                  helper.make_node("Mul", [f"s{i}", "scale"], [f"scaled{i}"], name=f"scale{i}"),
                  helper.make_node("Add", [f"scaled{i}", "mask"], [f"masked{i}"], name=f"mask{i}"),
                  helper.make_node("Softmax", [f"masked{i}"], [f"p{i}"], name=f"softmax{i}", axis=-1)]
        outputs.append(helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, [B, H, S, S]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, H, S, D]),
                                           helper.make_tensor_value_info("kt", TensorProto.FLOAT, [B, H, D, S]),
                                           helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, S])],
                              outputs, [helper.make_tensor("scale", TensorProto.FLOAT, [], [D ** -0.5])])
    return gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_masked_keys_get_a_negligible_probability_and_attended_keys_are_unchanged():
    graph = attention_scores_graph()
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((B, H, S, D)) * 2).astype(np.float32)
    kt = (rng.standard_normal((B, H, D, S)) * 2).astype(np.float32)
    keep = np.ones((B, 1, 1, S), bool)
    keep[0, ..., 5:] = keep[1, ..., 11:] = False
    mask = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)   # BERT's padding fill
    feeds = {"q": q, "kt": kt, "mask": mask}
    before = run_model(graph, feeds)
    result = get_pass("clamp-attention-mask")(graph, PassContext(LowerConfig()))
    assert result.modified and result.stats == {"masks_clamped": 1, "softmax_inputs": 2}
    clamps = [n for n in graph.nodes if n.op == "Max"]
    assert len(clamps) == 1 and ir.scalar(clamps[0].inputs[1]) == -60.0   # one clamp, shared by both layers
    assert all(clamps[0].outputs[0] in n.inputs for n in graph.nodes if n.op == "Add")
    onnx.checker.check_model(ir.to_model(graph), full_check=True)
    after = run_model(graph, feeds)
    # independent restatement: float64 softmax over the attended keys only
    scores = np.einsum("bhsd,bhdt->bhst", q.astype(np.float64), kt.astype(np.float64)) * D ** -0.5
    wide = np.where(keep, scores, -np.inf)
    expected = np.exp(wide - wide.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    masked = np.broadcast_to(~keep, expected.shape)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new[~masked], expected[~masked], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(new[~masked], old[~masked], rtol=1e-6, atol=0)
        assert np.all(new[masked] < 1e-15) and np.all(new[masked] >= 0)
        # a quantized softmax output (levels of 1/127) is the same
        np.testing.assert_array_equal(np.round(new * 127), np.round(old * 127))
    assert not get_pass("clamp-attention-mask")(graph, PassContext(LowerConfig())).modified   # never twice


def test_a_constant_bias_is_not_a_padding_mask():
    graph = attention_scores_graph(1)
    mask = next(t for t in graph.inputs if t.name == "mask")
    graph.inputs.remove(mask)
    add = next(n for n in graph.nodes if n.op == "Add")
    add.inputs[1] = gs.Constant("bias", np.zeros((B, 1, 1, S), np.float32))
    assert not get_pass("clamp-attention-mask")(graph, PassContext(LowerConfig())).modified


def test_lowered_bert_takes_the_clamp_instead_of_the_floor_and_computes_the_same(tmp_path):
    spec = BertSpec(layers=2)
    graph, _ = calibrated_bert(tmp_path, spec)
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][:, 9:] = 0                          # padded keys: the masked softmax
    floored = graph.copy()
    # the mask stays an Add here (mask-key-columns would move it into the GEMM)
    clamping = tuple(p for p in PIPELINES["lower-onnxruntime"] if p != "mask-key-columns")
    records = {r.name: dict(r.stats) for r in run_pipeline(graph, clamping, PassContext(LowerConfig("onnxruntime")),
                                                           verify=True)}
    assert records["clamp-attention-mask"] == {"masks_clamped": 1, "softmax_inputs": spec.layers}
    assert records["floor-softmax-input"] == {"softmaxes_floored": 0}
    assert not any(n.op == "ReduceMax" for n in graph.nodes)
    passes = tuple(p for p in clamping if p != "clamp-attention-mask")
    run_pipeline(floored, passes, PassContext(LowerConfig("onnxruntime")))
    assert sum(n.op == "ReduceMax" for n in floored.nodes) == spec.layers
    np.testing.assert_array_equal(run_model(graph, feeds)[0], run_model(floored, feeds)[0])
