"""Every encoder family on random-weight transformers exports: every layer matched by its pattern,
every GEMM inside the layers quantized, the onnxruntime model within cosine 0.99 of FP32, the
TensorRT target parsed and built by TensorRT-RTX (its CPU-only ahead-of-time builder)."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qdq_compiler import carried, ir  # noqa: E402
from qdq_compiler.config import InsertConfig  # noqa: E402
from qdq_compiler.graph import is_dequantized  # noqa: E402
from qdq_compiler.hf_export import IMAGE_SIZE, export  # noqa: E402
from qdq_compiler.insert import insert  # noqa: E402
from qdq_compiler.lower import LowerConfig, lower  # noqa: E402

from conftest import cosine, run_model  # noqa: E402

# family -> (pattern family, exporters that export it, GEMMs outside the layers: the embeddings' own)
FAMILIES = {
    "vit": ("pre-ln", ("torchscript", "dynamo"), ["Conv"]),          # patch embedding
    "deit": ("pre-ln", ("torchscript", "dynamo"), ["Conv"]),
    "albert": ("bert-post-ln", ("torchscript", "dynamo"), ["MatMul"]),        # embedding -> hidden projection
    "xlm-roberta": ("bert-post-ln", ("torchscript", "dynamo"), []),
    "modernbert": ("modernbert", ("torchscript", "dynamo"), []),
    "deberta-v2": ("deberta-v2", ("torchscript", "dynamo"), ["MatMul"] * 4),   # relative-position terms, float by rule
}
# GEMMs per layer: linear layers and the two batched matmuls (ModernBERT's QKV is one fused GEMM)
PER_LAYER = {"modernbert": 4 + 2}
# TensorRT fuses INT8 attention only for Q·K^T -> softmax -> ·V; DeBERTa adds its relative terms between
CASES = [(family, exporter) for family, (_, exporters, _) in FAMILIES.items() for exporter in exporters]
SEQ = 16


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family, exporter):
        if (family, exporter) not in cache:
            # the default opset: 17 for TorchScript, 18 for dynamo (ModernBERT's Split needs 18 there)
            cache[family, exporter] = export(family, folder / f"{family}-{exporter}.onnx", exporter=exporter, seq=SEQ)
        return cache[family, exporter]

    return get


def random_feeds(graph, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in graph.inputs:
        if tensor.name == "pixel_values":
            feeds[tensor.name] = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        elif tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(5, 500, (batch, SEQ), dtype=np.int64)
        elif tensor.name == "attention_mask":
            feeds[tensor.name] = np.ones((batch, SEQ), np.int64)
        else:
            feeds[tensor.name] = np.zeros((batch, SEQ), np.int64)
    return feeds


def calibrated(path, tmp_path, mode="ft1"):
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.data import Dataset

    graph = ir.load(path)
    result = insert(graph, InsertConfig(mode), verify=True)
    data = tmp_path / "calib.npz"
    np.savez(data, **random_feeds(graph, 16, seed=1))
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("percentile", progress=False))
    return graph, result


@pytest.mark.parametrize("family,exporter", CASES)
def test_every_layer_matched_and_every_gemm_inside_quantized(exports, family, exporter):
    graph = ir.load(exports(family, exporter))
    result = insert(graph, InsertConfig("ft1"), verify=True)
    match = result.match
    assert match.family == FAMILIES[family][0]
    assert len(match.layers) == 2 and match.rejections == ()
    for layer in match.layers:
        for linear in layer.linears().values():   # activation and weight through a DequantizeLinear
            assert is_dequantized(linear.node.inputs[0]) and is_dequantized(linear.node.inputs[1]), \
                ir.describe(linear.node)
        attention = layer.attention
        assert all(is_dequantized(t) for t in (*attention.bmm1.inputs, *attention.bmm2.inputs))
    # what is left outside the layers is the embeddings' own GEMMs (patch Conv, ALBERT's projection)
    assert sorted(node.op for node, _ in match.unmatched_gemms) == FAMILIES[family][2]
    assert carried.read(graph).family == FAMILIES[family][0]
    if family == "albert":   # one weight shared by both layers (one copy per layer from dynamo): one quantizer
        weights = [q for q in result.plan.quantizers if q.kind.value == "weight"]
        assert len(weights) == 6 and all(len(q.uses) == 2 for q in weights)


@pytest.mark.parametrize("family,exporter", CASES)
def test_onnxruntime_model_is_within_cosine_099_of_fp32(exports, tmp_path, family, exporter):
    path = exports(family, exporter)
    feeds = random_feeds(ir.load(path), 4, seed=7)
    reference = run_model(ir.read_model(path), feeds)[0]
    placeholder = ir.load(path)
    insert(placeholder, InsertConfig("ft1"))
    assert cosine(run_model(placeholder, feeds)[0], reference) < 0.9   # the layers matter in these weights
    graph, _ = calibrated(path, tmp_path)
    lower(graph, LowerConfig("onnxruntime"))
    assert sum(n.op == "MatMulIntegerToFloat" for n in graph.nodes) == 2 * PER_LAYER.get(family, 6 + 2)
    found = cosine(run_model(graph, feeds)[0], reference)
    print(f"{family}/{exporter}: cosine {found:.5f}")
    assert found > 0.99


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensorrt_target_parses_and_builds_with_tensorrt_rtx(exports, tmp_path, family):
    pytest.importorskip("tensorrt_rtx")
    from qdq_compiler.engine_build import EngineConfig, build_engine
    from qdq_compiler.trt_parse import parse

    graph, _ = calibrated(exports(family, "torchscript"), tmp_path)
    lower(graph, LowerConfig("tensorrt"))
    lowered = ir.save(graph, tmp_path / f"{family}.trt.onnx")
    parsed = parse(lowered)
    assert parsed.ok, parsed.errors
    summary = build_engine(lowered, tmp_path / f"{family}.plan", EngineConfig(int8=True, backend="tensorrt-rtx"))
    print(f"{family}: {summary.get('attention_quantized')} attention quantized, "
          f"{summary.get('attention_fused_int8')} fused INT8, {summary.get('int8_gemms')} INT8 GEMMs")
    # DeBERTa too: its relative-position terms enter TensorRT's fused attention as an FP16 bias
    assert summary["attention_blocks"] == summary["attention_quantized"] == summary["attention_fused_int8"] == 2
    assert summary["quantized_gemms"] == summary["int8_gemms"] == 2 * PER_LAYER.get(family, 6 + 2)


def test_deberta_relative_position_rule_is_measured(exports, tmp_path):
    """The rule in patterns/deberta_v2.py: the relative-position matmuls stay float. Measured against
    quantizing them too (generic mode quantizes every MatMul input, those included)."""
    path = exports("deberta-v2", "torchscript")
    feeds = random_feeds(ir.load(path), 4, seed=7)
    reference = run_model(ir.read_model(path), feeds)[0]
    found = {}
    for mode in ("ft1", "generic"):
        folder = tmp_path / mode
        folder.mkdir()
        graph, result = calibrated(path, folder, mode)
        relative = sum(site.startswith("/inner/encoder/layer.") and ("MatMul_1.input" in site or "MatMul_2.input" in site)
                       for q in result.plan.quantizers for site in q.sites)
        lower(graph, LowerConfig("onnxruntime"))
        found[mode] = (cosine(run_model(graph, feeds)[0], reference), relative)
    print(f"deberta-v2 relative terms float (ft1): cosine {found['ft1'][0]:.5f}; "
          f"quantized too (generic): {found['generic'][0]:.5f}")
    assert found["ft1"][1] == 0 and found["generic"][1] > 0
    assert found["ft1"][0] > 0.99 and found["ft1"][0] >= found["generic"][0] - 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mode_places_on_every_family(exports, family):
    """ft2/ft3/trt on each family: every layer placed, a valid model that runs, `check` clean; a site a
    family cannot have (a GEMM output before a bias ModernBERT does not have) is skipped with its reason."""
    from qdq_compiler.check import check_graph

    path = exports(family, "torchscript")
    for mode in ("ft2", "ft3", "trt"):
        graph = ir.load(path)
        result = insert(graph, InsertConfig(mode), verify=True)
        assert len(result.match.layers) == 2 and check_graph(graph) == []
        assert np.isfinite(run_model(graph, random_feeds(graph, 2, seed=3))[0]).all()
        assert all("no separate bias Add" in why for _, why in result.plan.skipped)
        assert bool(result.plan.skipped) == (family == "modernbert" and mode != "trt")
        if mode == "trt":   # the encoder's output: after a pre-LN encoder's final LayerNorm, never before it
            final = result.plan.by_site()["layer.1.output"]
            producer = graph.tensors()[final.tensor].inputs[0]
            while producer.op in ("QuantizeLinear", "DequantizeLinear"):   # a graph output keeps its name
                producer = producer.inputs[0].inputs[0]
            assert producer.op == ("LayerNormalization" if family in ("vit", "deit", "modernbert") else producer.op)
            assert all(u.node is None or u.node.op != "LayerNormalization" for u in final.uses)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gptq_rounds_every_weight_once_whatever_the_family(exports, tmp_path, family):
    """ViT has no attention mask (token rows come from the weight's width), ALBERT shares each weight between
    layers (one rounding over both layers' inputs)."""
    from qdq_compiler.calibrate import CalibrationConfig, model_inputs
    from qdq_compiler.data import Dataset
    from qdq_compiler.weight_rounding import apply_gptq

    graph, result = calibrated(exports(family, "torchscript"), tmp_path)
    weights = [q for q in result.plan.quantizers if q.kind.value == "weight"]
    before = {id(q): q.inputs[0].values.copy() for q in graph.nodes
              if q.op == "QuantizeLinear" and isinstance(q.inputs[0], gs.Constant)}
    records = apply_gptq(graph, Dataset(tmp_path / "calib.npz", model_inputs(graph)), CalibrationConfig(progress=False))
    stats = records[0].stats
    assert stats["weights_rounded"] == stats["linear_layers"] == len(weights) and stats["skipped"] == 0
    changed = sum(not np.array_equal(q.inputs[0].values, before[id(q)]) for q in graph.nodes if id(q) in before)
    assert changed == len(weights)   # every weight moved onto its GPTQ grid
