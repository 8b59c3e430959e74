"""Real torch.onnx exports: MiniLM with its real weights, and other BERT-family shapes."""
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qdq_compiler import ir  # noqa: E402
from qdq_compiler.check import check_graph  # noqa: E402
from qdq_compiler.config import InsertConfig  # noqa: E402
from qdq_compiler.hf_export import export  # noqa: E402
from qdq_compiler.insert import insert  # noqa: E402
from qdq_compiler.lower import LowerConfig, lower  # noqa: E402

from conftest import run_model  # noqa: E402

MINILM = [("torchscript", 13, "eager"), ("torchscript", 17, "eager"), ("dynamo", 18, "eager"),
          ("torchscript", 14, "sdpa"), ("dynamo", 18, "sdpa")]
FAMILIES = [(family, exporter, opset)
            for family in ("bert", "distilbert", "roberta", "electra", "mpnet")
            for exporter, opset in (("torchscript", 17), ("dynamo", 18))]
# per layer, separate QKV (see test_insert.PER_LAYER)
PER_LAYER = {"ft1": 14, "ft2": 20, "ft3": 21, "trt": 16}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(family, exporter, opset, attn="eager"):
        key = (family, exporter, opset, attn)
        if key not in cache:
            cache[key] = export(family, folder / f"{family}-{exporter}-{opset}-{attn}.onnx",
                                exporter=exporter, opset=opset, attn=attn)
        return cache[key]

    return get


def feeds_for(graph, seq=12):
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in graph.inputs:
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(5, 500, (2, seq), dtype=np.int64)
        elif tensor.name == "attention_mask":
            feeds[tensor.name] = np.ones((2, seq), np.int64)
            feeds[tensor.name][1, seq // 2:] = 0
        else:
            feeds[tensor.name] = np.zeros((2, seq), np.int64)
    return feeds


@pytest.mark.parametrize("exporter,opset,attn", MINILM)
def test_minilm_exports_match_every_layer_in_every_mode(exports, exporter, opset, attn):
    path = exports("minilm", exporter, opset, attn)
    feeds = feeds_for(ir.load(path))
    for mode, per_layer in PER_LAYER.items():
        graph = ir.load(path)
        result = insert(graph, InsertConfig(mode), verify=True)
        assert len(result.match.layers) == 6 and result.match.rejections == ()
        assert result.match.unmatched_gemms == ()
        assert len(result.plan.quantizers) == per_layer * 6 + (mode == "trt")
        assert check_graph(graph) == []
        (out,) = run_model(graph, feeds)
        assert out.shape == (2, 12, 384) and np.isfinite(out).all()


@pytest.mark.parametrize("family,exporter,opset", FAMILIES)
def test_bert_family_exports_match(exports, family, exporter, opset):
    graph = ir.load(exports(family, exporter, opset))
    result = insert(graph, InsertConfig("ft1"), verify=True)
    assert len(result.match.layers) == 2 and result.match.rejections == ()
    assert len(result.plan.quantizers) == 2 * PER_LAYER["ft1"]
    scale_positions = Counter(layer.attention.scale_position for layer in result.match.layers)
    assert len(scale_positions) == 1
    if family == "electra":  # its embeddings projection is a linear layer outside the encoder layers
        assert len(result.match.unmatched_gemms) == 1
    else:
        assert result.match.unmatched_gemms == ()
    assert check_graph(graph) == []
    (out,) = run_model(graph, feeds_for(graph))
    assert np.isfinite(out).all()
    records = {r.name: r.stats for r in lower(graph, LowerConfig("onnxruntime"), verify=True,
                                                            require_calibrated=False)}
    assert records["lower-onnxruntime"]["gemms_lowered"] == 2 * 8  # 6 weight GEMMs + 2 batched per layer
    assert records["fold-output-scale"]["scales_folded"] == 2  # the score scale of each layer
    assert records["residual-sum"]["adds_into_layernorm"] == 2 * 2 + 1  # two residuals per layer, the embeddings
    (lowered,) = run_model(graph, feeds_for(graph))
    assert np.isfinite(lowered).all()


def test_minilm_calibrated_on_real_sentences_is_close_to_fp32(exports, tmp_path):
    """ft1 + MSE calibration on 128 real sentences; fidelity on 200 others (cosine of mean-pooled
    embeddings). The README's main job runs the full 256 / 1000 split."""
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.data import Dataset
    from qdq_compiler.evaluate import cosines, embeddings, open_session
    from qdq_compiler.hf_export import corpus, encode

    path = exports("minilm", "torchscript", 17)
    data = tmp_path / "calib.npz"
    np.savez(data, **encode(corpus("calibration")[:128]))
    graph = ir.load(path)
    insert(graph, InsertConfig("ft1"))
    placeholder = ir.to_model(graph)
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("mse", progress=False))
    assert check_graph(graph) == []
    feeds = encode(corpus("evaluation")[:200])
    reference = embeddings(open_session(path), feeds)
    found = cosines(reference, embeddings(open_session(ir.to_model(graph)), feeds))
    before = cosines(reference, embeddings(open_session(placeholder), feeds))
    assert found.mean() > 0.98 and found.min() > 0.9
    assert before.mean() < 0.9


def test_minilm_int8_engine_builds_here_with_attention_fused_in_every_layer(exports, tmp_path):
    """The real MiniLM, lowered for TensorRT, through TensorRT-RTX's CPU-only ahead-of-time builder:
    every layer's attention one INT8 engine layer, every quantized GEMM INT8, weights well under
    half of the FP32 engine's (embeddings stay FP16)."""
    pytest.importorskip("tensorrt_rtx")
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.data import Dataset
    from qdq_compiler.engine_build import EngineConfig, build_engine
    from qdq_compiler.hf_export import corpus, encode

    path = exports("minilm", "torchscript", 17)
    data = tmp_path / "calib.npz"
    np.savez(data, **encode(corpus("calibration")[:32]))
    graph = ir.load(path)
    insert(graph, InsertConfig("ft1"))
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("max", progress=False))
    lower(graph, LowerConfig("tensorrt"))
    lowered = ir.save(graph, tmp_path / "minilm.trt.onnx")
    fp32 = build_engine(path, tmp_path / "fp32.plan", EngineConfig(backend="tensorrt-rtx"))
    int8 = build_engine(lowered, tmp_path / "int8.plan", EngineConfig(int8=True, baseline=tmp_path / "fp32.plan"))
    assert int8["attention_quantized"] == int8["attention_fused_int8"] == 6
    assert int8["quantized_gemms"] == int8["int8_gemms"] == 48
    assert int8["weights_bytes"] < 0.5 * fp32["weights_bytes"] and int8["baseline"]["weights_ratio"] < 0.5


@pytest.mark.parametrize("naming", ["empty", "repeated"])
def test_minilm_without_unique_node_names_matches_the_same(exports, naming):
    """Empty and repeated node names are legal ONNX (onnx.helper graphs, several converters): the real
    MiniLM must match and quantize exactly as with its own names, and its lowered model must load."""
    import onnx
    import onnx_graphsurgeon as gs

    path = exports("minilm", "torchscript", 17)
    named = ir.load(path)
    expected = insert(named, InsertConfig("ft1"))
    model = onnx.load(path)
    for index, node in enumerate(model.graph.node):
        node.name = "" if naming == "empty" else f"node{index % 5}"
    graph = gs.import_onnx(model)
    result = insert(graph, InsertConfig("ft1"), verify=True)
    assert len(result.match.layers) == len(expected.match.layers) == 6 and not result.plan.fallback
    assert [q.tensor for q in result.plan.quantizers] == [q.tensor for q in expected.plan.quantizers]
    assert len(result.plan.quantizers) == PER_LAYER["ft1"] * 6
    (out,) = run_model(named, feeds_for(named))
    lower(graph, LowerConfig("onnxruntime"), require_calibrated=False)
    assert run_model(graph, feeds_for(graph))[0].shape == out.shape
