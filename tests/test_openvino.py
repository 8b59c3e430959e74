"""The OpenVINO target: its graph pass, that OpenVINO loads and runs it, that its INT8 layers run
INT8 (performance counters) and that it computes what our fake-quant model computes."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import qdq_compiler

from qdq_compiler import ir
from qdq_compiler.bench import BenchConfig
from qdq_compiler.cpu import host
from qdq_compiler.errors import QdqcError, UsageError
from qdq_compiler.lower import LowerConfig, lower
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, cosine, qdqc, run_model

pytest.importorskip("openvino")

from qdq_compiler.openvino_backend import OpenVinoRunner, save_ir  # noqa: E402

SPEC = BertSpec(layers=2, hidden=128, heads=4)
LINEARS = 6  # Q, K, V, attention output, FFN1, FFN2 per layer


@pytest.fixture
def calibrated(tmp_path):
    return calibrated_bert(tmp_path, SPEC)[0]


def activation_quantizers(graph):
    return [n for n in graph.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])]


@pytest.mark.parametrize("isa", ["vnni", "portable"])
def test_linear_inputs_become_uint8_and_attention_inputs_stay_int8_in_the_vnni_form(calibrated, isa):
    before = ir.to_model(calibrated)
    feeds = example_inputs(SPEC, batch=2, seq=16, seed=9)
    records = lower(calibrated, LowerConfig("openvino", isa=isa), verify=True)
    stats = {r.name: dict(r.stats) for r in records}
    # per layer: the LayerNorm output (Q, K, V share it), the context, the second LayerNorm output,
    # the GELU output; the four attention batched-matmul inputs (Q, K, P, V) stay int8 in the VNNI form
    # (int8 x int8 pairs saturate without VNNI); the portable form makes the first two (Q, P) uint8
    kept = (4 if isa == "vnni" else 2) * SPEC.layers
    assert stats["unsigned-linear-inputs"] == {"uint8_quantizers": 8 * SPEC.layers - kept, "int8_quantizers_kept": kept}
    for q in activation_quantizers(calibrated):
        readers = [r for dq in q.outputs[0].outputs for r in dq.outputs[0].outputs]
        zero = ir.constant(q.inputs[2])
        if zero.dtype == np.uint8:
            assert zero == 128 and all(dq.inputs[2] is q.inputs[2] for dq in q.outputs[0].outputs)
            assert all(r.op in ("MatMul", "Reshape", "Transpose") for r in readers) or isa == "portable"
        else:
            assert zero.dtype == np.int8 and zero == 0
    weights = [n for n in calibrated.nodes if n.op == "DequantizeLinear" and ir.is_constant(n.inputs[0])]
    assert len(weights) == LINEARS * SPEC.layers and all(ir.constant(n.inputs[0]).dtype == np.int8 for n in weights)
    # the same grid: onnxruntime gives the same numbers before and after (fake-quant, no optimization)
    expected, found = run_model(before, feeds), run_model(calibrated, feeds)
    np.testing.assert_allclose(found[0], expected[0], rtol=0, atol=1e-5)
    onnx.checker.check_model(ir.to_model(calibrated))


def tiny(extra_reader: bool) -> gs.Graph:
    """x -> Q -> DQ -> MatMul(DQ(int8 W)) [and the DQ also read by an Add]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["xd", "x"], ["r"], name="residual"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 8]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])], outputs,
                              [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z"),
                               numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws")])
    return gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("extra_reader,unsigned", [(False, True), (True, False)])
def test_only_quantizers_read_by_linear_layers_alone_become_uint8(extra_reader, unsigned):
    from qdq_compiler.pipeline import PassContext, get_pass

    graph = tiny(extra_reader)
    x = {"x": np.linspace(-8, 8, 16, dtype=np.float32).reshape(2, 8)}   # saturates at both ends
    expected = run_model(graph, x)
    result = get_pass("unsigned-linear-inputs")(graph, PassContext(LowerConfig("openvino", isa="vnni")))
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear")
    assert result.modified is unsigned
    assert ir.constant(q.inputs[2]).dtype == (np.uint8 if unsigned else np.int8)
    assert ir.constant(q.inputs[2]) == (128 if unsigned else 0)
    for found, wanted in zip(run_model(graph, x), expected):   # the same values, saturation included
        np.testing.assert_array_equal(found, wanted)


def test_the_portable_form_keeps_int8_only_where_a_matmul_reads_it_second():
    from qdq_compiler.pipeline import PassContext, get_pass

    graph = tiny(extra_reader=False)
    assert get_pass("unsigned-linear-inputs")(graph, PassContext(LowerConfig("openvino"))).modified
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear")
    assert ir.constant(q.inputs[2]).dtype == np.uint8 and ir.constant(q.inputs[2]) == 128
    graph = tiny(extra_reader=False)
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    matmul.inputs[0], matmul.inputs[1] = matmul.inputs[1], matmul.inputs[0]   # the activation as B
    assert not get_pass("unsigned-linear-inputs")(graph, PassContext(LowerConfig("openvino"))).modified


@pytest.mark.parametrize("isa", ["vnni", "portable"])
def test_openvino_runs_the_target_int8_and_matches_the_fake_quant_model(calibrated, tmp_path, isa):
    fake = ir.to_model(calibrated)
    lower(calibrated, LowerConfig("openvino", isa=isa))
    path = save_ir(ir.to_model(calibrated), tmp_path / "model.xml")
    assert path.exists() and path.with_suffix(".bin").exists()
    runner = OpenVinoRunner(path, threads=2, precision="f32", profile=True)
    feeds = example_inputs(SPEC, batch=2, seq=32, seed=9)
    found = runner.outputs(feeds)[0]
    expected = run_model(fake, feeds)[0]
    assert found.shape == expected.shape
    if isa == "vnni" and not host().vnni:
        return   # the VNNI form saturates on this CPU by design (tests/test_cpu.py checks that under qemu)
    # integer kernels vs float fake-quant: the same grids, a few values one level apart
    assert cosine(found, expected) > 0.9995
    from qdq_compiler.synthetic import build_bert

    float_model = run_model(build_bert(SPEC), feeds)[0]   # quantized, but still the same function
    assert 0.99 < cosine(found, float_model) < cosine(found, expected)
    counters = runner.counters()
    linear = [c for c in counters if c.type.startswith("FullyConnected")]
    assert len(linear) == LINEARS * SPEC.layers
    assert all(c.precision in ("I8", "U8") for c in linear), [(c.name, c.exec_type) for c in linear]
    assert not [c for c in linear if "Legacy" in c.type]   # uint8 inputs: the plugin's brgemm INT8 kernel
    if isa == "vnni":   # the plugin's fused INT8 attention takes int8 inputs
        attention = [c for c in counters if c.type == "Subgraph"]
        assert len(attention) == SPEC.layers and all(c.precision in ("I8", "U8") for c in attention)


def test_an_unquantized_model_has_no_int8_layers(tmp_path):
    from qdq_compiler.synthetic import build_bert

    path = tmp_path / "fp32.onnx"
    onnx.save(build_bert(SPEC), path)
    runner = OpenVinoRunner(path, precision="f32", profile=True)
    runner(example_inputs(SPEC, batch=1, seq=16, seed=1))
    assert [c for c in runner.counters() if c.type.startswith("FullyConnected")]
    assert not [c for c in runner.counters() if c.precision in ("I8", "U8") and c.type.startswith("FullyConnected")]


def test_api_saves_openvino_ir_and_bench_runs_it(tmp_path):
    import qdq_compiler
    from qdq_compiler.bench import bench

    graph, data = calibrated_bert(tmp_path, SPEC)
    result = qdq_compiler.lower(ir.to_model(graph), target="openvino")
    xml = result.save(tmp_path / "m.xml")
    onnx_path = result.save(tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"upper.XML: OpenVINO writes an IR to a lowercase .xml name: use upper.xml"):
        result.save(tmp_path / "upper.XML")   # never ONNX bytes in an .XML file
    summaries = bench([xml, onnx_path], BenchConfig(iterations=2, warmup=1, batch=1, sequence=16, runtime="openvino"))
    assert [len(s.latencies_ms) for s in summaries] == [2, 2]


def test_cli_lower_writes_ir_and_bench_runs_it(tmp_path):
    graph, _ = calibrated_bert(tmp_path, SPEC)
    calibrated_path = tmp_path / "m.calib.onnx"
    onnx.save(ir.to_model(graph), calibrated_path)
    out = tmp_path / "m.ov.xml"
    done = qdqc("lower", calibrated_path, "--target", "openvino", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "unsigned-linear-inputs: uint8_quantizers 12" in done.stdout and out.exists()
    done = qdqc("bench", calibrated_path, out, "--iterations", "2", "--seq", "16", "--runtime", "openvino",
                "--ov-precision", "f32")
    assert done.returncode == 0, done.stderr
    assert "precision f32" in done.stdout and done.stdout.count("Latency:") == 2


@pytest.mark.parametrize("target,name", [("onnxruntime", "m.xml"), ("tensorrt", "m.xml"), ("tensorrt", "M.XML")])
def test_ir_output_is_refused_for_other_targets_before_any_work(tmp_path, target, name):
    graph, _ = calibrated_bert(tmp_path, SPEC)
    calibrated_path = tmp_path / "m.calib.onnx"
    onnx.save(ir.to_model(graph), calibrated_path)
    done = qdqc("lower", calibrated_path, "--target", target, "-o", tmp_path / name)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{name}: an OpenVINO IR (.xml) is written for --target openvino, not {target}" in done.stderr
    assert not (tmp_path / name).exists()
    with pytest.raises(UsageError, match="written for --target openvino"):
        qdq_compiler.lower(calibrated_path, target=target).save(tmp_path / name)


def test_an_uppercase_xml_output_is_refused_before_any_work(tmp_path):
    graph, _ = calibrated_bert(tmp_path, SPEC)
    calibrated_path = tmp_path / "m.calib.onnx"
    onnx.save(ir.to_model(graph), calibrated_path)
    done = qdqc("lower", calibrated_path, "--target", "openvino", "-o", tmp_path / "ov.XML")
    assert done.returncode == 2 and "ov.XML: OpenVINO writes an IR to a lowercase .xml name" in done.stderr
    assert not (tmp_path / "ov.XML").exists()


@pytest.mark.parametrize("args,message", [
    (["--runtime", "tensorflow"], "argument --runtime: invalid choice"),
    (["--ov-precision", "f8"], "argument --ov-precision: invalid choice"),
])
def test_cli_bench_refuses_bad_runtime_options(bert_file, args, message):
    done = qdqc("bench", bert_file, "--iterations", "1", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_bad_openvino_inputs_are_one_line_errors(tmp_path, bert_file):
    bad = tmp_path / "bad.xml"
    bad.write_text("not a model")
    done = qdqc("bench", bad, "--iterations", "1")
    assert done.returncode == 1 and "OpenVINO cannot read it" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(UsageError, match="--runtime 'tvm'"):
        BenchConfig(runtime="tvm")
    with pytest.raises(UsageError, match="--ov-precision 'f8'"):
        BenchConfig(precision="f8")
    with pytest.raises(UsageError, match="written to a .xml"):
        save_ir(bert_file, tmp_path / "m.bin")
    with pytest.raises(QdqcError, match="does not exist"):
        save_ir(bert_file, tmp_path / "missing" / "m.xml")
    with pytest.raises(UsageError, match="no such file"):
        OpenVinoRunner(tmp_path / "none.xml")
