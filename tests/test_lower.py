import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from qdq_compiler import ir
from qdq_compiler.cpu import overflowing_pairs
from qdq_compiler.evaluate import exact_accumulation
from qdq_compiler.lower import LowerConfig, lower
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, cosine, qdqc, run_model


def calibrated(tmp_path, spec: BertSpec, mode="ft1") -> gs.Graph:
    return calibrated_bert(tmp_path, spec, mode)[0]


def outputs(graph_or_model, names, feeds, optimize=False):
    model = ir.to_model(graph_or_model) if isinstance(graph_or_model, gs.Graph) else graph_or_model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    from qdq_compiler.evaluate import open_session

    session = open_session(model, optimize=optimize)
    known = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in known})


@pytest.mark.parametrize("linear,fused", [("matmul", False), ("gemm_transb", False), ("gemm", True),
                                          ("matmul_transposed", False)])
def test_every_quantized_gemm_becomes_an_integer_gemm(tmp_path, linear, fused):
    spec = BertSpec(layers=2, linear=linear, fused_qkv=fused)
    graph = calibrated(tmp_path, spec)
    float_weights = {t.values.shape for t in graph.tensors().values()
                     if isinstance(t, gs.Constant) and t.values.dtype == np.float32 and t.values.ndim == 2
                     and min(t.values.shape) >= 64 and t.values.shape[0] != spec.vocab
                     and t.values.shape[0] != spec.max_positions}
    assert float_weights  # the GEMM weights, before lowering
    lower(graph, LowerConfig("onnxruntime"), verify=True)
    ops = [n.op for n in graph.nodes]
    per_layer = (4 if fused else 6) + 2
    assert ops.count("MatMulIntegerToFloat") == per_layer * spec.layers
    assert "MatMul" not in ops and "Gemm" not in ops and "DequantizeLinear" not in ops
    left = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.dtype == np.float32
            and t.values.ndim == 2 and t.values.shape in float_weights and t.values.shape[0] not in (
                spec.vocab, spec.max_positions)]
    assert left == []  # no FP32 copy of a quantized weight
    for node in graph.nodes:
        if node.op == "MatMulIntegerToFloat":
            assert node.inputs[0].dtype == np.uint8 and ir.constant(node.inputs[4]) == 128
            weight = ir.constant(node.inputs[1])
            if weight is not None:   # int8 weights whose pairs fit x86's int16 pair sums
                assert weight.dtype == np.int8 and not overflowing_pairs(weight, 0).any()
            else:   # an activation as B (attention): uint8, zero point 128, the U8U8 kernel (exact everywhere)
                assert node.inputs[1].dtype == np.uint8 and ir.constant(node.inputs[5]) == 128


@pytest.mark.parametrize("spec", [BertSpec(layers=2), BertSpec(layers=2, linear="gemm", fused_qkv=True)],
                         ids=["matmul", "gemm"])
def test_lowered_model_is_the_fake_quant_function_accumulated_exactly(tmp_path, spec):
    graph = calibrated(tmp_path, spec)
    fake, exact = ir.to_model(graph), ir.to_model(exact_accumulation(graph))
    lower(graph, LowerConfig("onnxruntime"))
    feeds = example_inputs(spec, batch=16, seq=16, seed=9)
    first = next(n.outputs[0].name for n in gs.import_onnx(fake).nodes
                 if n.op in ("Add", "Gemm") and ("query" in n.name or "qkv" in n.name))
    a, = outputs(fake, [first], feeds)[1:]
    e, = outputs(exact, [first], feeds)[1:]
    b, = outputs(graph, [first], feeds)[1:]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # float32 accumulation vs int32
    assert np.abs(e - b).max() <= 4 * np.finfo(np.float32).eps * np.abs(e).max()  # a rounding or two
    # End to end, a re-quantizer can flip one level on a one-ulp difference (the kernel scales its int32
    # sum in float32, then adds the bias): per sample, the lowered model stays within the flips' reach
    # of the exactly accumulated fake-quant model (a saturating kernel falls to 0.4-0.99).
    low, reference = outputs(graph, [], feeds, optimize=True)[0], outputs(exact, [], feeds)[0]
    assert min(cosine(a, b) for a, b in zip(low, reference)) >= 0.9999


@pytest.mark.parametrize("mode", ["ft2", "trt"])
def test_other_modes_lower_their_gemms_and_keep_other_qdq(tmp_path, mode):
    spec = BertSpec(layers=2)
    graph = calibrated(tmp_path, spec, mode)
    feeds = example_inputs(spec, batch=4, seq=16, seed=2)
    before = run_model(graph, feeds)[0]
    lower(graph, LowerConfig("onnxruntime"), verify=True)
    assert [n.op for n in graph.nodes].count("MatMulIntegerToFloat") == 16
    assert any(n.op == "DequantizeLinear" for n in graph.nodes)  # residual / GEMM-output Q/DQ stay
    assert cosine(run_model(graph, feeds)[0], before) > 0.999


def test_weight_quantizers_left_are_folded_to_int8(tmp_path):
    graph = calibrated(tmp_path, BertSpec(layers=1))
    run_pass(graph, "fold-weight-quantizers")
    weight_dq = [n for n in graph.nodes if n.op == "DequantizeLinear" and ir.is_constant(n.inputs[0])]
    assert len(weight_dq) == 6 and all(ir.constant(n.inputs[0]).dtype == np.int8 for n in weight_dq)
    assert not any(n.op == "QuantizeLinear" and ir.is_constant(n.inputs[0]) for n in graph.nodes)


def test_cli(tmp_path, bert_file):
    proc = qdqc("lower", bert_file)
    assert proc.returncode == 2 and "qdqc insert" in proc.stderr and "Traceback" not in proc.stderr
    assert qdqc("insert", bert_file).returncode == 0
    qdq = tmp_path / "bert.qdq.onnx"
    proc = qdqc("lower", qdq, "--verify")  # placeholder scales: refused, nothing written
    assert proc.returncode == 2 and "not calibrated" in proc.stderr and not (tmp_path / "bert.int8.onnx").exists()
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=4, seq=16, seed=1))
    assert qdqc("calibrate", qdq, "--data", data, "-o", qdq, "--overwrite").returncode == 0
    proc = qdqc("lower", qdq, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bert.int8.onnx").exists() and "gemms_lowered 16" in proc.stdout


def test_compile_runs_insert_calibrate_lower(tmp_path, bert_file):
    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=12, seq=16, seed=1))
    report = tmp_path / "sites.json"
    proc = qdqc("compile", bert_file, "--data", data, "--method", "mse", "--report", report)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "bert.int8.onnx"
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 16 and report.exists()
    feeds = example_inputs(BertSpec(), batch=2, seq=16, seed=8)
    assert cosine(run_model(out, feeds)[0], run_model(bert_file, feeds)[0]) > 0.99
    proc = qdqc("compile", bert_file)
    assert proc.returncode == 2 and "--data" in proc.stderr


# ---------------------------------------------------------------- --target tensorrt

def float_types(graph):
    return {t.name: np.dtype(t.dtype) for t in graph.tensors().values()
            if isinstance(t, gs.Variable) and t.dtype is not None and np.dtype(t.dtype).kind == "f"}


@pytest.mark.parametrize("mode,fusable", [("ft1", 2), ("ft3", 0)])
def test_report_mha_says_a_quantized_qk_output_breaks_fusion(tmp_path, mode, fusable):
    graph = calibrated(tmp_path, BertSpec(layers=2), mode)
    record = next(r for r in lower(graph, LowerConfig("tensorrt")) if r.name == "report-mha")
    assert record.stats["attention_blocks_quantized"] == 2
    assert record.stats["attention_blocks_fusable"] == fusable
    warned = [d for d in record.diagnostics if "will not fuse" in d.message]
    assert len(warned) == 2 - fusable


@pytest.mark.parametrize("norm,opset", [("op", 17), ("decomposed", 13)])
def test_tensorrt_graph_is_fp16_with_fp32_layer_norm(tmp_path, norm, opset):
    spec = BertSpec(layers=2, norm=norm, opset=opset)
    graph = calibrated(tmp_path, spec)
    feeds = example_inputs(spec, batch=4, seq=16, seed=2)
    fake = run_model(graph, feeds)[0]
    records = lower(graph, LowerConfig("tensorrt"), verify=True)
    mha = next(r for r in records if r.name == "report-mha")
    assert mha.stats["head_sizes"] == [16] and mha.stats["attention_blocks_quantized"] == 2
    assert graph.opset == 19
    types = float_types(graph)
    matmuls = [n for n in graph.nodes if n.op == "MatMul"]
    assert len(matmuls) == 16 and all(types[n.outputs[0].name] == np.float16 for n in matmuls)
    norms = [n for n in graph.nodes if n.op in ("LayerNormalization", "ReduceMean")]
    assert norms and all(types.get(n.outputs[0].name, np.float32) == np.float32 for n in norms)
    for dq in (n for n in graph.nodes if n.op == "DequantizeLinear"):
        assert ir.constant(dq.inputs[1]).dtype == np.float16
    weights = [n for n in graph.nodes if n.op == "DequantizeLinear" and ir.is_constant(n.inputs[0])]
    assert len(weights) == 12 and all(ir.constant(n.inputs[0]).dtype == np.int8 for n in weights)
    assert not any(n.op == "QuantizeLinear" and ir.is_constant(n.inputs[0]) for n in graph.nodes)
    (out,) = graph.outputs
    assert out.name == "last_hidden_state" and np.dtype(out.dtype) == np.float32
    from qdq_compiler.check import check_graph

    assert check_graph(graph) == []
    # onnxruntime runs the FP16 graph on CPU too; unoptimized, because its LayerNorm fusion mixes
    # the FP16 input of our Cast with the FP32 island and fails type checking (an onnxruntime issue)
    lowered, = outputs(graph, [], feeds)
    assert cosine(lowered, fake) > 0.99


def test_tensorrt_keep_fp32_softmax_and_gelu(tmp_path):
    graph = calibrated(tmp_path, BertSpec(layers=1, gelu="erf"))
    lower(graph, LowerConfig("tensorrt", frozenset({"LayerNorm", "Softmax", "Gelu"})), verify=True)
    types = float_types(graph)
    assert all(types[n.outputs[0].name] == np.float32 for n in graph.nodes if n.op in ("Softmax", "Erf"))
    with pytest.raises(Exception, match="--keep-fp32 Attention"):
        LowerConfig("tensorrt", frozenset({"Attention"}))


def test_tensorrt_parser_accepts_the_graph_and_rejects_the_onnxruntime_one(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    spec = BertSpec(layers=2)
    for target in ("tensorrt", "onnxruntime"):
        graph = calibrated(tmp_path, spec)
        lower(graph, LowerConfig(target))
        ir.save(graph, tmp_path / f"{target}.onnx")
    proc = qdqc("check", tmp_path / "tensorrt.onnx", "--parse")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TensorRT parser: ok" in proc.stdout and "'HALF': 16" in proc.stdout
    proc = qdqc("check", tmp_path / "onnxruntime.onnx", "--parse")
    assert proc.returncode == 1 and "zero point" in proc.stdout


def lowered_until(tmp_path, spec: BertSpec, last: str) -> gs.Graph:
    from qdq_compiler.pipeline import PIPELINES, PassContext, run_pipeline

    graph = calibrated(tmp_path, spec)
    passes = PIPELINES["lower-onnxruntime"]
    run_pipeline(graph, passes[:passes.index(last)], PassContext(LowerConfig("onnxruntime")), verify=True)
    return graph


def run_pass(graph: gs.Graph, name: str):
    from qdq_compiler.pipeline import PassContext, run_pipeline

    return run_pipeline(graph, (name,), PassContext(LowerConfig("onnxruntime")), verify=True)[0]


@pytest.mark.parametrize("scale", ["after_mul", "after_div"])
def test_attention_score_scale_moves_into_the_integer_gemm(tmp_path, scale):
    spec = BertSpec(layers=2, scale=scale)
    graph = lowered_until(tmp_path, spec, "fold-output-scale")
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    before = run_model(graph, feeds)[0]
    op = "Mul" if scale == "after_mul" else "Div"

    def scalings():
        return [n for n in graph.nodes if n.op == op and "attention/Scale" in n.name]

    assert len(scalings()) == 2
    record = run_pass(graph, "fold-output-scale")
    assert record.stats["scales_folded"] == 2
    assert scalings() == []
    after = run_model(graph, feeds)[0]
    assert cosine(after, before) > 0.99999  # one rounding moved; a rare softmax level may flip


def test_residual_adds_become_sum_so_onnxruntime_keeps_its_fast_layernorm(tmp_path):
    spec = BertSpec(layers=2)
    graph = lowered_until(tmp_path, spec, "residual-sum")
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    before, fused = outputs(graph, [], feeds)[0], run_model(graph, feeds)[0]
    record = run_pass(graph, "residual-sum")
    assert record.stats["adds_into_layernorm"] == 2 * spec.layers + 1  # two per layer and the embeddings
    np.testing.assert_array_equal(outputs(graph, [], feeds)[0], before)  # Sum of two is Add, bit for bit
    np.testing.assert_allclose(run_model(graph, feeds)[0], fused, atol=1e-5)  # LayerNorm vs SkipLayerNorm
    import onnxruntime as ort

    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(ir.to_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 2 * spec.layers + 1
