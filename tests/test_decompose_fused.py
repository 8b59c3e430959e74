"""decompose-fused: each com.microsoft op against onnxruntime running it, on tiny onnx.helper graphs."""
import importlib.util
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq_compiler import ir
from qdq_compiler.errors import ModelError, QdqcNote
from qdq_compiler.pipeline import PassContext, run_pipeline

MS = "com.microsoft"
B, S, D, HEADS = 2, 5, 8, 2
FLOAT, INT32 = TensorProto.FLOAT, TensorProto.INT32


def model_of(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "fused", inputs, outputs, [numpy_helper.from_array(v, k)
                                                                for k, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def decomposed(model):
    graph = ir.from_model(model)
    records = run_pipeline(graph, ("canonicalize", "decompose-fused"), PassContext(None), verify=True)
    return ir.to_model(graph), records[-1]


def assert_same(model, feeds, atol=1e-5):
    """Decompose, then: no com.microsoft node left, onnx.checker passes, every output as onnxruntime's."""
    expected = run(model, feeds)
    lowered, record = decomposed(model)
    assert not [n for n in lowered.graph.node if n.domain == MS]
    onnx.checker.check_model(lowered)
    found = run(lowered, feeds)
    assert len(found) == len(expected)
    for want, got in zip(expected, found):
        assert want.shape == got.shape and want.dtype == got.dtype
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
    return lowered, record


def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- Attention

def attention_model(*, mask=None, attrs=None, sizes=(D, D, D), bias=True, attention_bias=False, opset=17):
    r = rng()
    weight = r.normal(0, 0.3, (D, sum(sizes))).astype(np.float32)
    inits = [("w", weight)]
    inputs = [helper.make_tensor_value_info("x", FLOAT, [B, S, D])]
    names = ["x", "w", ""]
    if bias:
        inits.append(("b", r.normal(0, 0.3, sum(sizes)).astype(np.float32)))
        names[2] = "b"
    names.append("")
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", INT32, list(mask)))
        names[3] = "mask"
    if attention_bias:
        names += ["", "attn_bias"]
        inputs.append(helper.make_tensor_value_info("attn_bias", FLOAT, [1, HEADS, S, S]))
    node = helper.make_node("Attention", names, ["y"], domain=MS, num_heads=HEADS, **(attrs or {}))
    out = helper.make_tensor_value_info("y", FLOAT, None)
    return model_of([node], inputs, [out], inits, opset)


def x_feed():
    return rng().normal(0, 1, (B, S, D)).astype(np.float32)


def test_attention_without_mask_is_three_projections_and_the_bert_core():
    lowered, record = assert_same(attention_model(), {"x": x_feed()})
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert ops["MatMul"] == 5 and ops["Softmax"] == 1 and ops["Add"] == 3 and ops["Mul"] == 1
    assert record.stats["by_op"] == {"Attention": 1}


def test_attention_right_padding_lengths():
    assert_same(attention_model(mask=[B]), {"x": x_feed(), "mask": np.array([3, 5], np.int32)})


@pytest.mark.parametrize("shape", [[B, S], [B, S, S]])
def test_attention_raw_masks(shape):
    mask = (rng().random(shape) > 0.3).astype(np.int32)
    mask[..., 0] = 1
    assert_same(attention_model(mask=shape), {"x": x_feed(), "mask": mask})


def test_attention_settings_unidirectional_scale_filter_value_and_attention_bias():
    model = attention_model(mask=[B, S], attrs={"unidirectional": 1, "scale": 0.3, "mask_filter_value": -50.0},
                            attention_bias=True)
    mask = np.ones((B, S), np.int32)
    mask[1, 3:] = 0
    bias = rng().normal(0, 1, (1, HEADS, S, S)).astype(np.float32)
    assert_same(model, {"x": x_feed(), "mask": mask, "attn_bias": bias})


def test_attention_qkv_hidden_sizes_without_bias():
    model = attention_model(sizes=(D, D, 2 * D), attrs={"qkv_hidden_sizes": [D, D, 2 * D]}, bias=False)
    assert_same(model, {"x": x_feed()})


def test_attention_before_opset_17_gets_the_same_numbers():
    assert_same(attention_model(mask=[B], opset=14), {"x": x_feed(), "mask": np.array([5, 2], np.int32)})


def test_attention_with_past_state_is_a_one_line_error():
    model = attention_model()
    model.graph.node[0].input.append("past")  # inputs: x, w, b, mask_index, past
    model.graph.input.append(helper.make_tensor_value_info("past", FLOAT, [2, B, HEADS, 3, D // HEADS]))
    with pytest.raises(ModelError, match=r"Attention .*past / present state is not supported") as caught:
        decomposed(model)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- MultiHeadAttention

@pytest.mark.parametrize("mask", [None, [B], [B, 7]])
def test_multi_head_attention_cross_attention_with_packed_bias(mask):
    r = rng()
    kv = 7
    inputs = [helper.make_tensor_value_info("q", FLOAT, [B, S, D]),
              helper.make_tensor_value_info("k", FLOAT, [B, kv, D]),
              helper.make_tensor_value_info("v", FLOAT, [B, kv, D])]
    names = ["q", "k", "v", "bias"]
    feeds = {"q": r.normal(0, 1, (B, S, D)).astype(np.float32), "k": r.normal(0, 1, (B, kv, D)).astype(np.float32),
             "v": r.normal(0, 1, (B, kv, D)).astype(np.float32)}
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", INT32, mask))
        names.append("mask")
        feeds["mask"] = np.array([7, 4], np.int32) if len(mask) == 1 else np.array([[1] * 7, [1] * 3 + [0] * 4],
                                                                                     np.int32)
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain=MS, num_heads=HEADS)
    model = model_of([node], inputs, [helper.make_tensor_value_info("y", FLOAT, None)],
                     [("bias", r.normal(0, 0.3, 3 * D).astype(np.float32))])
    assert_same(model, feeds)


# ---------------------------------------------------------------- LayerNorm and GELU

@pytest.mark.parametrize("opset", [17, 14])
@pytest.mark.parametrize("full", [True, False])
def test_skip_layer_norm(opset, full):
    r = rng()
    inits = [("gamma", r.normal(1, 0.1, D).astype(np.float32))]
    names = ["x", "skip", "gamma"]
    outputs = ["y"]
    if full:
        inits += [("beta", r.normal(0, 0.1, D).astype(np.float32)), ("bias", r.normal(0, 0.1, D).astype(np.float32))]
        names += ["beta", "bias"]
        outputs += ["", "", "sum"]
    node = helper.make_node("SkipLayerNormalization", names, outputs, domain=MS, epsilon=1e-3)
    inputs = [helper.make_tensor_value_info(n, FLOAT, [B, S, D]) for n in ("x", "skip")]
    model = model_of([node], inputs, [helper.make_tensor_value_info(n, FLOAT, None) for n in outputs if n],
                     inits, opset)
    feeds = {n: r.normal(0, 2, (B, S, D)).astype(np.float32) for n in ("x", "skip")}
    assert_same(model, feeds)


@pytest.mark.parametrize("op,bias", [("BiasGelu", True), ("Gelu", False), ("FastGelu", True), ("FastGelu", False)])
def test_gelus(op, bias):
    r = rng()
    names = ["x", "bias"] if bias else ["x"]
    node = helper.make_node(op, names, ["y"], domain=MS)
    model = model_of([node], [helper.make_tensor_value_info("x", FLOAT, [B, S, D])],
                     [helper.make_tensor_value_info("y", FLOAT, None)],
                     [("bias", r.normal(0, 1, D).astype(np.float32))] if bias else [])
    lowered, _ = assert_same(model, {"x": r.normal(0, 3, (B, S, D)).astype(np.float32)})
    assert ("Tanh" if op == "FastGelu" else "Erf") in {n.op_type for n in lowered.graph.node}


# ---------------------------------------------------------------- EmbedLayerNormalization

@pytest.mark.parametrize("variant", ["bert", "no-segment-no-mask", "position-ids"])
def test_embed_layer_norm(variant):
    r = rng()
    vocab, positions = 30, 16
    inits = [("word", r.normal(0, 1, (vocab, D)).astype(np.float32)),
             ("position", r.normal(0, 1, (positions, D)).astype(np.float32)),
             ("segment", r.normal(0, 1, (2, D)).astype(np.float32)),
             ("gamma", r.normal(1, 0.1, D).astype(np.float32)), ("beta", r.normal(0, 0.1, D).astype(np.float32))]
    ids = r.integers(0, vocab, (B, S)).astype(np.int32)
    feeds = {"ids": ids}
    inputs = [helper.make_tensor_value_info("ids", INT32, [B, S])]
    names = ["ids", "", "word", "position", "", "gamma", "beta"]
    if variant != "no-segment-no-mask":
        inputs += [helper.make_tensor_value_info(n, INT32, [B, S]) for n in ("segments", "mask")]
        names[1], names[4] = "segments", "segment"
        names.append("mask")
        feeds["segments"] = r.integers(0, 2, (B, S)).astype(np.int32)
        feeds["mask"] = np.array([[1] * S, [1] * 3 + [0] * (S - 3)], np.int32)
    if variant == "position-ids":
        inputs.append(helper.make_tensor_value_info("positions", INT32, [B, S]))
        names.append("positions")
        feeds["positions"] = r.integers(0, positions, (B, S)).astype(np.int32)
    node = helper.make_node("EmbedLayerNormalization", names, ["y", "mask_index", "sum"], domain=MS, epsilon=1e-5)
    outputs = [helper.make_tensor_value_info("y", FLOAT, None),
               helper.make_tensor_value_info("mask_index", INT32, None),
               helper.make_tensor_value_info("sum", FLOAT, None)]
    assert_same(model_of([node], inputs, outputs, inits), feeds)


def test_embeddings_feeding_attention_share_the_mask_index():
    """The optimizer's BERT layout: EmbedLayerNormalization's mask_index (count of ones) read by Attention."""
    r = rng()
    inits = [("word", r.normal(0, 1, (30, D)).astype(np.float32)),
             ("position", r.normal(0, 1, (16, D)).astype(np.float32)),
             ("gamma", np.ones(D, np.float32)), ("beta", np.zeros(D, np.float32)),
             ("w", r.normal(0, 0.3, (D, 3 * D)).astype(np.float32)), ("b", np.zeros(3 * D, np.float32))]
    embed = helper.make_node("EmbedLayerNormalization", ["ids", "", "word", "position", "", "gamma", "beta", "mask"],
                             ["h", "mask_index"], domain=MS)
    attention = helper.make_node("Attention", ["h", "w", "b", "mask_index"], ["y"], domain=MS, num_heads=HEADS)
    inputs = [helper.make_tensor_value_info(n, INT32, [B, S]) for n in ("ids", "mask")]
    model = model_of([embed, attention], inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)
    feeds = {"ids": r.integers(0, 30, (B, S)).astype(np.int32),
             "mask": np.array([[1] * S, [1, 1, 0, 0, 0]], np.int32)}
    assert_same(model, feeds)


# ---------------------------------------------------------------- what is not restated

def test_an_unknown_com_microsoft_op_stays_and_is_reported_in_one_line():
    node = helper.make_node("QuickGelu", ["x"], ["g"], domain=MS, alpha=1.702)
    gelu = helper.make_node("BiasGelu", ["g", "bias"], ["y"], domain=MS)
    model = model_of([node, gelu], [helper.make_tensor_value_info("x", FLOAT, [B, S, D])],
                     [helper.make_tensor_value_info("y", FLOAT, [B, S, D])], [("bias", np.ones(D, np.float32))])
    feeds = {"x": rng().normal(0, 1, (B, S, D)).astype(np.float32)}
    with pytest.warns(QdqcNote, match="QuickGelu x1"):
        lowered, record = decomposed(model)
    assert [n.op_type for n in lowered.graph.node if n.domain == MS] == ["QuickGelu"]
    assert record.stats["kept"] == {"QuickGelu": 1} and record.stats["by_op"] == {"BiasGelu": 1}
    (warning,) = record.diagnostics
    assert "QuickGelu x1" in warning.message and "\n" not in warning.message
    np.testing.assert_allclose(run(lowered, feeds)[0], run(model, feeds)[0], atol=1e-5)


def test_a_graph_without_fused_ops_is_left_alone():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = model_of([node], [helper.make_tensor_value_info("x", FLOAT, [B, S, D])],
                     [helper.make_tensor_value_info("y", FLOAT, None)])
    _, record = decomposed(model)
    assert record.modified is False and record.stats == {"decomposed": 0}


# ---------------------------------------------------------------- the real MiniLM through onnxruntime's optimizer

@pytest.fixture(scope="module")
def optimized_minilm(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxruntime.transformers import optimizer

    from qdq_compiler.hf_export import export

    folder = tmp_path_factory.mktemp("fused")
    plain = export("minilm", folder / "minilm.onnx", exporter="torchscript", opset=17)
    fused = optimizer.optimize_model(str(plain), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    fused.save_model_to_file(str(folder / "minilm.fused.onnx"))
    return plain, folder / "minilm.fused.onnx"


@pytest.mark.slow
def test_optimized_minilm_matches_every_layer_and_compiles_for_both_targets(optimized_minilm, tmp_path):
    """onnxruntime's BERT fusions (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu) undone:
    the same numbers as the fused model, all 6 layers matched as in the plain export, both targets lowered,
    the TensorRT one parsed by TensorRT's ONNX parser and built by TensorRT-RTX (INT8 attention in every layer)."""
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.check import check_graph
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.evaluate import cosines, embeddings, open_session
    from qdq_compiler.hf_export import corpus, encode
    from qdq_compiler.insert import insert
    from qdq_compiler.lower import LowerConfig, lower

    plain, fused = optimized_minilm
    ops = Counter(n.op_type for n in onnx.load(fused).graph.node if n.domain == MS)
    assert ops == {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
    feeds = encode(corpus("evaluation")[:64])
    reference = embeddings(open_session(fused), feeds)

    graph = ir.load(fused)
    result = insert(graph, InsertConfig("ft1"), verify=True)
    assert len(result.match.layers) == 6 and result.match.rejections == () and result.match.unmatched_gemms == ()
    assert len(result.plan.quantizers) == 84 and not result.plan.fallback
    assert not [n for n in graph.nodes if n.domain == MS]
    record = next(r for r in result.records if r.name == "decompose-fused")
    assert record.stats["decomposed"] == 25 and record.stats["kept"] == {}
    expected_graph = ir.load(plain)
    expected = insert(expected_graph, InsertConfig("ft1"))
    assert [layer.activation.kind for layer in result.match.layers] == \
        [layer.activation.kind for layer in expected.match.layers]

    # the same recipe on the plain export: the decomposed model must quantize as well (MSE calibration
    # on 64 sentences; `compile`'s defaults reach 0.998 mean on 1000, README)
    data = tmp_path / "calib.npz"
    np.savez(data, **encode(corpus("calibration")[:64]))
    fidelity = []
    trt_graph = None
    for model, compiled in ((fused, graph), (plain, expected_graph)):
        calibrate(compiled, Dataset(data, model_inputs(compiled)), CalibrationConfig("mse", progress=False))
        trt_graph = trt_graph or compiled.copy()
        lower(compiled, LowerConfig("onnxruntime"))
        fidelity.append(cosines(embeddings(open_session(model), feeds),
                                embeddings(open_session(ir.to_model(compiled)), feeds)))
    found, plain_found = fidelity
    assert found.mean() > 0.98 and found.min() > 0.95
    assert abs(found.mean() - plain_found.mean()) < 0.005

    lower(trt_graph, LowerConfig("tensorrt"))
    assert check_graph(trt_graph) == []
    assert not [n for n in trt_graph.nodes if n.domain == MS]
    path = ir.save(trt_graph, tmp_path / "minilm.fused.trt.onnx")
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        from qdq_compiler.trt_parse import parse

        parsed = parse(path)
        assert parsed.ok, parsed.errors[:3]
        from qdq_compiler.engine_build import EngineConfig, build_engine

        built = build_engine(path, tmp_path / "int8.plan", EngineConfig(backend="tensorrt-rtx", int8=True))
        assert built["attention_quantized"] == built["attention_fused_int8"] == 6
        assert built["quantized_gemms"] == built["int8_gemms"] == 48


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "BiasGelu", "Attention"])
def test_float16_models_stay_float16(op):
    """Constants the decomposition makes take the node's float type (the optimizer's float16=True models)."""
    r = rng()
    f16 = TensorProto.FLOAT16
    names = {"SkipLayerNormalization": ["x", "skip", "gamma", "beta", "bias"], "BiasGelu": ["x", "bias"],
             "Attention": ["x", "w", "b", "mask"]}[op]
    values = {"gamma": r.normal(1, 0.1, D), "beta": r.normal(0, 0.1, D), "bias": r.normal(0, 0.1, D),
              "w": r.normal(0, 0.3, (D, 3 * D)), "b": r.normal(0, 0.3, 3 * D)}
    node = helper.make_node(op, names, ["y"], domain=MS, **({"num_heads": HEADS} if op == "Attention" else {}))
    inputs = [helper.make_tensor_value_info(n, f16, [B, S, D]) for n in names if n in ("x", "skip")]
    feeds = {n: r.normal(0, 1, (B, S, D)).astype(np.float16) for n in names if n in ("x", "skip")}
    if "mask" in names:
        inputs.append(helper.make_tensor_value_info("mask", INT32, [B]))
        feeds["mask"] = np.array([5, 3], np.int32)
    model = model_of([node], inputs, [helper.make_tensor_value_info("y", f16, [B, S, D])],
                     [(n, values[n].astype(np.float16)) for n in names if n in values])
    assert_same(model, feeds, atol=4e-3)
