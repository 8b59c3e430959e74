"""QAT exports in, faithful INT8 out: torch fake-quant (pytorch-quantization's export path and
torch.ao FakeQuantize), NVIDIA ModelOpt where it is installed, and onnxruntime's own QDQ output.

The yardstick for "matches the QAT model" is onnxruntime running the QAT ONNX itself, unoptimized;
its optimized run of the same ONNX shows how close two faithful runs are."""
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qdq_compiler import api, ir
from qdq_compiler.check import check_graph, check_types
from qdq_compiler.errors import ModelError, UsageError
from qdq_compiler.graph import is_dequantized, weight_of
from qdq_compiler.patterns import match_encoder
from qdq_compiler.pipeline import PIPELINES, PassContext, run_pipeline
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import qdqc

pytest.importorskip("torch")
pytest.importorskip("transformers")

LAYERS, LINEARS_PER_LAYER = 2, 6
SEQ = 32


def feeds(batch=4, seed=7):
    ids = np.random.default_rng(seed).integers(5, 500, (batch, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def run(model, inputs, optimize=True):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    model = model.model if hasattr(model, "model") else model
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in names})[0].astype(np.float64)


def token_cosines(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def yardstick_and_cosine(qat_path, lowered):
    inputs = feeds()
    reference = run(qat_path, inputs, optimize=False)
    return token_cosines(run(qat_path, inputs), reference).min(), token_cosines(run(lowered, inputs), reference).min()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The random-weight 2-layer BERT fake-quantized both ways, max-calibrated and exported."""
    from qdq_compiler.qat_export import export_qat

    folder = tmp_path_factory.mktemp("qat")
    data = folder / "calib.npz"
    np.savez(data, **feeds(16, seed=1))
    return {"torch": export_qat("bert", folder / "torch.onnx", style="torch", attn="sdpa", seq=SEQ, norm_inputs=True),
            "torch-ao": export_qat("bert", folder / "ao.onnx", style="torch-ao", seq=SEQ, norm_inputs=True),
            "data": data}


def weight_gemms(model: onnx.ModelProto) -> Counter:
    """GEMMs reading a constant weight (through Q/DQ, Transpose, Cast) by op."""
    graph = ir.import_model(model)
    counts = Counter()
    for node in graph.nodes:
        if node.op == "MatMulIntegerToFloat" and ir.is_constant(node.inputs[1]):
            counts["integer"] += 1
        elif node.op in ("MatMul", "Gemm") and weight_of(node, 1) is not None:
            counts["float"] += 1
    return counts


def quantized_twice(graph: gs.Graph) -> list[str]:
    """Tensors a QuantizeLinear reads that are already the output of a DequantizeLinear (through data movement)."""
    from qdq_compiler.graph import is_dequantized

    return [q.inputs[0].name for q in graph.nodes if q.op == "QuantizeLinear" and is_dequantized(q.inputs[0])]


def test_qat_export_help_gives_its_whole_description(capsys):
    from qdq_compiler.qat_export import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the fixture for qdqc's QAT path, and a way to bring one's own." in text


# ---------------------------------------------------------------- structure as exported

def test_torch_export_has_the_qat_structure_the_issue_describes(exports):
    model = onnx.load(exports["torch"])
    nodes = {o: n for n in model.graph.node for o in n.output}
    transposed = [n for n in model.graph.node if n.op_type == "MatMul" and nodes.get(n.input[1]) is not None
                  and nodes[n.input[1]].op_type == "Transpose"
                  and nodes[nodes[n.input[1]].input[0]].op_type == "DequantizeLinear"]
    assert len(transposed) == LAYERS * LINEARS_PER_LAYER   # weight -> Q -> DQ -> Transpose -> MatMul
    activation_scales = [nodes.get(n.input[1]) for n in model.graph.node if n.op_type == "QuantizeLinear"
                         and "input_quantizer" in n.input[0] + n.output[0]]
    assert activation_scales and all(s is not None and s.op_type == "Constant" for s in activation_scales)
    per_channel = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                   and any(a.name == "axis" and a.i == 0 for a in n.attribute)]
    assert len(per_channel) == LAYERS * LINEARS_PER_LAYER


@pytest.mark.parametrize("style", ["torch", "torch-ao"])
def test_insert_matches_every_layer_and_adds_only_the_missing_attention_quantizers(exports, style):
    graph = ir.load(exports[style])
    before = sum(n.op == "QuantizeLinear" for n in graph.nodes)
    result = api.insert(exports[style])
    inserted = result.graph
    match = match_encoder(inserted)
    assert len(match.layers) == LAYERS and not match.unmatched_gemms
    assert all(lin.weight_quantized and lin.weight_axis == 0 for layer in match.layers
               for lin in layer.linears().values())
    plan = result.report["sites"]
    assert not plan["fallback_generic"]
    # ft1 asks for Q, K^T, softmax and V at the two batched matmuls: the QAT model has none of them
    added = plan["quantizers"]
    assert len(added) == 4 * LAYERS and all(q["kind"] == "activation" for q in added)
    assert {s.split(".", 2)[-1] for q in added for s in q["sites"]} == {"q", "k", "softmax.output", "v"}
    assert sum(n.op == "QuantizeLinear" for n in inserted.nodes) == before + 4 * LAYERS
    assert quantized_twice(inserted) == []
    # every GEMM input and weight site was found already quantized, and said so
    kept = plan["input_quantization"]["sites_already_quantized"]
    assert len(kept) == 2 * LAYERS * LINEARS_PER_LAYER


def test_insert_refuses_to_lower_its_placeholders_and_keep_scales_keeps_the_qat_ones(exports, tmp_path):
    inserted = api.insert(exports["torch"])
    with pytest.raises(UsageError, match=r"8 of \d+ activation quantizers .* calibrate --keep-scales"):
        api.lower(inserted)
    qat = ir.load(exports["torch"])
    run_pipeline(qat, ("qdq-constants",), PassContext())
    original = {(n.op, n.inputs[0].name): ir.constant(n.inputs[1]) for n in qat.nodes if n.op == "QuantizeLinear"}
    calibrated = api.calibrate(inserted, exports["data"], keep_scales=True, quiet=True)
    now = {(n.op, n.inputs[0].name): ir.constant(n.inputs[1]) for n in calibrated.graph.nodes
           if n.op == "QuantizeLinear"}
    assert set(original) < set(now) and len(now) == len(original) + 4 * LAYERS
    for key, scale in original.items():
        np.testing.assert_array_equal(now[key], scale)   # QAT scales, per-channel weights' included
    new = [now[k] for k in set(now) - set(original)]
    assert all(s.size == 1 and float(s) != 1.0 for s in new)
    assert calibrated.report["scales_kept"] >= len(original)
    with pytest.raises(UsageError, match="--keep-scales"):
        api.calibrate(inserted, exports["data"], keep_scales=True, smooth="auto", quiet=True)
    with pytest.raises(UsageError, match="--split widens the model's weights, which --keep-scales keeps"):
        api.calibrate(inserted, exports["data"], keep_scales=True, split=True, quiet=True)
    # the default, as compile's: insert added quantizers to a calibrated model, so its own scales stay
    default = api.calibrate(inserted, exports["data"], quiet=True)
    assert default.model.SerializeToString() == calibrated.model.SerializeToString()
    fresh = api.calibrate(inserted, exports["data"], keep_scales=False, smooth="off", quiet=True)
    assert fresh.report.get("scales_kept", 0) == 0


def test_a_recipe_smoothing_alpha_on_kept_qat_scales_is_refused(exports):
    recipe = {"sites": [{"match": "layer.*.ffn1.input", "smooth": 0.5}]}
    with pytest.raises(UsageError, match=r"sites\[0\].*smooth 0.5 cannot apply.*--no-keep-scales"):
        api.compile(exports["torch"], exports["data"], recipe=recipe, quiet=True)


def test_calibrate_keep_scales_reports_the_scales_the_model_holds(exports):
    calibrated = api.calibrate(api.insert(exports["torch"]), exports["data"], keep_scales=True, quiet=True)
    scale_of = {n.inputs[0].name: ir.constant(n.inputs[1]) for n in calibrated.graph.nodes if n.op == "QuantizeLinear"}
    entries = calibrated.report["calibration"]["tensors"]
    kept = [e for e in entries if e.get("kept")]
    assert len(entries) - len(kept) == 4 * LAYERS   # only what insert added is calibrated
    assert kept and all(e["scale"] == pytest.approx(float(scale_of[e["tensor"]]), rel=1e-6) for e in kept)
    assert all(e["chosen_amax"] == pytest.approx(127 * e["scale"], rel=1e-6) for e in kept)


def test_compile_on_a_qat_export_keeps_its_scales_unless_told_not_to(exports, tmp_path):
    qat = ir.load(exports["torch"])
    run_pipeline(qat, ("qdq-constants",), PassContext())
    original = [float(ir.constant(n.inputs[1])) for n in qat.nodes if n.op == "QuantizeLinear"
                and ir.constant(n.inputs[1]).size == 1]
    compiled = api.compile(exports["torch"], exports["data"], target="tensorrt", quiet=True)
    scales = {float(ir.constant(n.inputs[1])) for n in compiled.graph.nodes if n.op == "QuantizeLinear"
              and ir.constant(n.inputs[1]).size == 1}
    assert compiled.report["scales_kept"] > 0 and compiled.report["smoothing"]["smooth"] == "off"
    assert compiled.report["options"]["split"] is False   # the kept weights are not widened
    assert all(any(abs(s - o) <= 1e-3 * o for s in scales) for o in original)   # FP16 in the TensorRT graph
    fresh = api.compile(exports["torch"], exports["data"], target="tensorrt", keep_scales=False, quiet=True)
    assert fresh.report["scales_kept"] == 0
    with pytest.raises(UsageError, match="--keep-scales"):
        api.compile(exports["torch"], exports["data"], smooth="auto", quiet=True)
    proc = qdqc("compile", exports["torch"], "--data", exports["data"], "-o", tmp_path / "k.onnx")
    assert proc.returncode == 0 and f"calibrated {4 * LAYERS} activation tensors" in proc.stdout
    assert "kept as the model holds them (--keep-scales)" in proc.stdout


def test_the_fallback_on_a_qat_export_names_the_models_own_quantizers_by_site_and_replays(exports):
    decided = api.compile(exports["torch"], exports["data"], fallback_budget=1, samples=4, quiet=True)
    off = [entry["match"] for entry in decided.recipe["sites"] if entry.get("enabled") is False]
    assert len(off) == 1 and off[0].startswith("layer.")   # a site name, not the QAT model's tensor name
    replayed = api.compile(exports["torch"], exports["data"], recipe=decided.recipe, quiet=True)
    assert replayed.model.SerializeToString() == decided.model.SerializeToString()


def test_excluding_a_site_the_qat_model_quantizes_takes_its_quantizer_out(exports, tmp_path):
    source = ir.load(exports["torch"])
    run_pipeline(source, ("qdq-constants",), PassContext())
    result = api.insert(exports["torch"], exclude=["layer.*.ffn2.input", "layer.0.ffn1.weight"])
    sites = result.report["sites"]
    assert len(sites["released_quantizers"]) == LAYERS + 1
    assert "layer.0.ffn2.input" not in sites["site_names"] and "layer.1.ffn1.input" in sites["site_names"]
    layers = match_encoder(result.graph).layers
    for layer in layers:   # the activation reads the float tensor again; the other GEMMs keep their Q/DQ
        assert not is_dequantized(layer.ffn2.node.inputs[0]) and is_dequantized(layer.ffn1.node.inputs[0])
    ffn1 = layers[0].ffn1
    assert not ffn1.weight_quantized and layers[1].ffn1.weight_quantized
    # the weight now holds the values the QAT model computed with: DQ(Q(W)) per output channel
    trained = match_encoder(source).layers[0].ffn1.weight
    weight = next(n for n in source.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == trained)
    values, scale = ir.constant(weight.inputs[0]), ir.constant(weight.inputs[1])
    expected = np.clip(np.rint(values / scale[:, None]), -128, 127) * scale[:, None]
    np.testing.assert_allclose(ir.constant(weight_of(ffn1.node, 1)[0]), expected, rtol=1e-6)
    calibrated = api.calibrate(result, exports["data"], keep_scales=True, quiet=True)
    lowered = api.lower(calibrated, target="onnxruntime", strict=True)   # deliberate: notes, not a --strict failure
    assert weight_gemms(lowered.model) == {"integer": LAYERS * LINEARS_PER_LAYER - LAYERS - 1, "float": LAYERS + 1}
    record = next(r for r in lowered.records if r.name == "report-float-gemms")
    assert record.stats["left_float_by_recipe"] == LAYERS + 1 and record.stats["quantized_gemms_left_float"] == 0


def test_a_recipe_method_on_a_kept_qat_scale_says_it_does_not_apply(exports, tmp_path):
    recipe = {"sites": [{"match": "layer.*.ffn2.input", "method": "mse"}]}
    result = api.insert(exports["torch"], recipe=recipe)
    skipped = result.report["sites"]["calibration_rules_not_applied"]
    assert [s["site"] for s in skipped] == [f"layer.{i}.ffn2.input" for i in range(LAYERS)]
    proc = qdqc("insert", exports["torch"], "--recipe", _write_json(tmp_path / "r.json", recipe),
                "-o", tmp_path / "r.onnx")
    assert proc.returncode == 0 and "does not apply to 2 site(s) the model already quantizes" in proc.stdout
    assert "UnsqueezeElimination" not in proc.stderr   # onnxruntime's optimizer, quiet while canonicalize folds


def _write_json(path, value):
    import json

    path.write_text(json.dumps(value))
    return path


# ---------------------------------------------------------------- lowering

@pytest.mark.parametrize("style,insert", [("torch", False), ("torch", True), ("torch-ao", False)])
def test_onnxruntime_lowering_makes_every_weight_gemm_integer_and_matches_the_qat_model(exports, style, insert):
    model = exports[style]
    if insert:
        model = api.calibrate(api.insert(model), exports["data"], keep_scales=True, quiet=True)
    lowered = api.lower(model, target="onnxruntime")
    assert weight_gemms(lowered.model) == {"integer": LAYERS * LINEARS_PER_LAYER}
    float_gemms = [r for r in lowered.records if r.name == "report-float-gemms"][0]
    assert float_gemms.stats["quantized_gemms_left_float"] == 0 and not float_gemms.diagnostics
    batched = sum(n.op == "MatMulIntegerToFloat" and not ir.is_constant(n.inputs[1]) for n in lowered.graph.nodes)
    assert batched == (2 * LAYERS if insert else 0)
    yardstick, cosine = yardstick_and_cosine(exports[style], lowered)
    assert yardstick > 0.9999
    assert cosine >= (0.99 if insert else 0.9999)   # QAT scales only: the same function, integer kernels


def test_tensorrt_graph_is_type_consistent_loads_parses_and_builds(exports, tmp_path):
    rtx = pytest.importorskip("tensorrt_rtx")   # in the dev extra
    from qdq_compiler.engine_build import EngineConfig, build_engine
    from qdq_compiler.trt_parse import parse

    calibrated = api.calibrate(api.insert(exports["torch"]), exports["data"], keep_scales=True, quiet=True)
    lowered = api.lower(calibrated, target="tensorrt")
    assert check_types(lowered.graph) == [] and check_graph(lowered.graph) == []
    halves = [n for n in lowered.graph.nodes if n.op in ir.QDQ_OPS]
    assert halves and all(ir.constant(n.inputs[1]).dtype == np.float16 for n in halves)
    assert not any(n.op == "Constant" and ir.constant(n.outputs[0]).dtype == np.float32 for n in lowered.graph.nodes)
    _, cosine = yardstick_and_cosine(exports["torch"], lowered)   # onnxruntime loads and runs it
    assert cosine >= 0.99
    path = lowered.save(tmp_path / "qat.trt.onnx")
    parsed = parse(path)
    assert parsed.ok, parsed.errors
    summary = build_engine(path, tmp_path / "qat.plan", EngineConfig(int8=True, fp16=True))
    assert summary["backend"] == "tensorrt-rtx" and summary["version"] == rtx.__version__
    assert summary["int8_gemms"] == summary["quantized_gemms"] == LAYERS * (LINEARS_PER_LAYER + 2)


def test_check_finds_the_broken_graph_of_the_issue(exports):
    """What `lower --target tensorrt` wrote before: FP16 everywhere but the scales held in Constant nodes."""
    graph = ir.load(exports["torch"])
    run_pipeline(graph, ("to-fp16",), PassContext())   # without qdq-constants, as the old pipeline ran
    broken = ir.to_model(graph)
    with pytest.raises(Exception, match="float16|float"):
        ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    found = check_types(graph)
    assert any("DequantizeLinear" in ir.describe(next(n for n in graph.nodes if ir.label(n) == v.node))
               and "scale is float32" in v.message for v in found)
    assert all(v.rule == "types" for v in found)
    assert PIPELINES["lower-tensorrt"][0] == "qdq-constants" and PIPELINES["lower-tensorrt"][-1] == "check-types"


def test_check_cli_reports_type_violations(exports, tmp_path):
    graph = ir.load(exports["torch"])
    run_pipeline(graph, ("to-fp16",), PassContext())
    onnx.save(ir.to_model(graph), tmp_path / "broken.onnx")
    proc = qdqc("check", tmp_path / "broken.onnx")
    assert proc.returncode == 1 and "[types]" in proc.stdout


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_deberta_relative_position_projections_of_a_qat_export_fold_to_constants(tmp_path_factory, target):
    """DeBERTa's pos_key/pos_query projections read the (constant) relative-position table: quantized
    by the QAT export, they compute a constant, folded at lowering instead of left as float GEMMs."""
    from qdq_compiler.qat_export import export_qat

    path = tmp_path_factory.getbasetemp() / "deberta.qat.onnx"
    if not path.exists():
        export_qat("deberta-v2", path, seq=16, samples=8)
    lowered = api.lower(path, target=target, strict=target == "onnxruntime")
    folded = [r for r in lowered.records if r.name == "fold-constant-gemms"][0]
    assert folded.stats["constant_gemms_folded"] == 2 * LAYERS and folded.diagnostics[0].level == "info"
    assert not any("pos_key_proj/MatMul" in n.name or "pos_query_proj/MatMul" in n.name for n in lowered.graph.nodes)
    if target == "onnxruntime":
        inputs = {k: v for k, v in feeds().items() if k != "token_type_ids"}
        reference = run(path, inputs, optimize=False)
        assert token_cosines(run(lowered, inputs), reference).min() > 0.999   # integer kernels: rounding only


# ---------------------------------------------------------------- never silent

def asymmetric_gemm(zero_point: int) -> onnx.ModelProto:
    """x -> Q/DQ (uint8, zero point `zero_point`) -> MatMul(DQ(int8 W)) -> y."""
    w = np.random.default_rng(0).integers(-127, 128, (8, 4)).astype(np.int8)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.UINT8, [], [zero_point]),
             helper.make_tensor("w", TensorProto.INT8, [8, 4], w.ravel().tolist()),
             helper.make_tensor("ws", TensorProto.FLOAT, [4], [0.01, 0.02, 0.03, 0.04]),
             helper.make_tensor("wz", TensorProto.INT8, [4], [0, 0, 0, 0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="gemm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_uint8_zero_point_128_is_made_int8_exactly():
    model = asymmetric_gemm(128)
    x = {"x": np.random.default_rng(1).normal(0, 3, (2, 8)).astype(np.float32)}
    lowered = api.lower(model, target="onnxruntime")
    assert [n.op for n in lowered.graph.nodes if n.op == "MatMulIntegerToFloat"] == ["MatMulIntegerToFloat"]
    np.testing.assert_allclose(run(lowered, x), run(model, x, optimize=False), rtol=1e-5, atol=1e-5)
    trt = api.lower(model, target="tensorrt")
    assert all(ir.constant(n.inputs[2]).dtype == np.int8 for n in trt.graph.nodes if n.op in ir.QDQ_OPS)
    assert check_graph(trt.graph) == []


def test_a_gemm_left_in_float_is_named_and_strict_makes_it_an_error(tmp_path):
    model = asymmetric_gemm(3)
    lowered = api.lower(model, target="onnxruntime")
    warnings = [d for r in lowered.records for d in r.diagnostics if d.level == "warning" and r.name != "pair-weight-rows"]
    assert len(warnings) == 1 and "'gemm'" in warnings[0].message and "uint8 3" in warnings[0].message
    with pytest.raises(ModelError, match="--strict: 1 quantized GEMM.*'gemm'.*zero point"):
        api.lower(model, target="onnxruntime", strict=True)
    with pytest.raises(ModelError, match="asymmetric quantization; TensorRT takes symmetric INT8 only"):
        api.lower(model, target="tensorrt")
    onnx.save(model, tmp_path / "asym.onnx")
    proc = qdqc("lower", tmp_path / "asym.onnx", "-o", tmp_path / "out.onnx", "--quiet")
    assert proc.returncode == 0 and "warning: quantized MatMul 'gemm' left in float" in proc.stderr
    proc = qdqc("lower", tmp_path / "asym.onnx", "-o", tmp_path / "strict.onnx", "--strict")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "strict.onnx").exists()
    proc = qdqc("lower", tmp_path / "asym.onnx", "-o", tmp_path / "t.onnx", "--target", "tensorrt")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "symmetric INT8" in proc.stderr


# ---------------------------------------------------------------- other exporters' shapes

def test_float_casts_and_weight_chains_do_not_hide_a_layer():
    """float->float Casts on the Q/K/V input and weight -> Q -> DQ -> Cast -> Reshape(same) -> Transpose."""
    graph = gs.import_onnx(build_bert(BertSpec(layers=1, linear="matmul_transposed")))
    layer_norm = next(n for n in graph.nodes if n.op == "LayerNormalization")
    normed = layer_norm.outputs[0]
    cast = gs.Variable("normed_cast", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", "noop_cast", {"to": TensorProto.FLOAT}, [normed], [cast]))
    for reader in [n for n in normed.outputs if n.op == "MatMul"]:
        reader.inputs[0] = cast
    transpose = next(n for n in graph.nodes if n.op == "Transpose" and ir.is_constant(n.inputs[0]))
    weight = transpose.inputs[0]
    rows, cols = weight.values.shape
    scale = gs.Constant("w_scale", (np.abs(weight.values).max(axis=1) / 127).astype(np.float32))
    zero = gs.Constant("w_zero", np.zeros(rows, np.int8))
    q, dq, c, r = (gs.Variable(name, dtype=dtype) for name, dtype in
                   (("wq", np.int8), ("wdq", np.float32), ("wc", np.float32), ("wr", np.float32)))
    graph.nodes += [gs.Node("QuantizeLinear", "w_q", {"axis": 0}, [weight, scale, zero], [q]),
                    gs.Node("DequantizeLinear", "w_dq", {"axis": 0}, [q, scale, zero], [dq]),
                    gs.Node("Cast", "w_cast", {"to": TensorProto.FLOAT}, [dq], [c]),
                    gs.Node("Reshape", "w_reshape", {}, [c, gs.Constant("w_shape", np.array([rows, cols]))], [r])]
    transpose.inputs[0] = r
    ir.toposort(graph)
    found = weight_of(transpose.outputs[0].outputs[0], 1)
    assert found is not None and found[0] is weight and found[1] and found[3]
    result = api.insert(ir.to_model(graph))
    assert len(match_encoder(result.graph).layers) == 1
    assert not any(n.op == "Cast" and n.name == "noop_cast" for n in result.graph.nodes)
    assert quantized_twice(result.graph) == []
    assert result.report["sites"]["input_quantization"]["sites_already_quantized"]


def test_onnxruntime_quantize_static_output_lowers_for_both_targets(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    spec = BertSpec(layers=1)
    source = tmp_path / "bert.onnx"
    onnx.save(build_bert(spec), source)
    samples = [example_inputs(spec, batch=1, seq=16, seed=s) for s in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    def quantize(path, symmetric):
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                        extra_options={"ActivationSymmetric": symmetric})
        return path

    symmetric = quantize(tmp_path / "sym.onnx", True)
    zero_points = {int(ir.constant(n.inputs[2])) for n in ir.load(symmetric).nodes
                   if n.op == "QuantizeLinear" and ir.constant(n.inputs[2]).dtype == np.uint8}
    assert zero_points == {128}
    x = example_inputs(spec, batch=2, seq=16, seed=9)
    reference = run(symmetric, x, optimize=False)
    lowered = api.lower(symmetric, target="onnxruntime", strict=True)
    assert weight_gemms(lowered.model) == {"integer": 6}
    assert token_cosines(run(lowered, x), reference).min() > 0.9999
    trt = api.lower(symmetric, target="tensorrt")
    assert check_graph(trt.graph) == []
    assert token_cosines(run(trt, x), reference).min() > 0.999
    asymmetric = quantize(tmp_path / "asym.onnx", False)
    with pytest.raises(ModelError, match="asymmetric quantization; TensorRT takes symmetric INT8 only"):
        api.lower(asymmetric, target="tensorrt")


# ---------------------------------------------------------------- NVIDIA ModelOpt (optional)

def test_modelopt_int8_export_end_to_end(tmp_path, exports):
    pytest.importorskip("modelopt", reason="nvidia-modelopt is an optional test dependency "
                                                               "(pip install -e '.[qat]')")
    # its own process: ModelOpt registers its quantized modules globally when imported
    path = tmp_path / "modelopt.onnx"
    proc = subprocess.run([sys.executable, "-m", "qdq_compiler.qat_export", "bert", "--style", "modelopt",
                           "--seq", str(SEQ), "-o", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = onnx.load(path)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > LAYERS * LINEARS_PER_LAYER and ops["Constant"] > 0
    result = api.insert(path)
    assert len(match_encoder(result.graph).layers) == LAYERS and quantized_twice(result.graph) == []
    assert len(result.report["sites"]["quantizers"]) == 4 * LAYERS
    calibrated = api.calibrate(result, exports["data"], keep_scales=True, quiet=True)
    lowered = api.lower(calibrated, target="onnxruntime", strict=True)
    assert weight_gemms(lowered.model) == {"integer": LAYERS * LINEARS_PER_LAYER}
    yardstick, cosine = yardstick_and_cosine(path, lowered)
    assert yardstick > 0.9999 and cosine >= 0.99
    direct = api.lower(path, target="onnxruntime", strict=True)
    assert yardstick_and_cosine(path, direct)[1] > 0.9999
    trt = api.lower(calibrated, target="tensorrt")
    assert check_graph(trt.graph) == [] and yardstick_and_cosine(path, trt)[1] >= 0.99
