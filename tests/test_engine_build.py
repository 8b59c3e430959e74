"""build-engine: real engines built here by TensorRT-RTX's ahead-of-time builder (no GPU), the summary
read from the builder's own log, backend and device-library choice, and the one-line errors."""
import json
import sys
import types

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import engine_evidence, ir
from qdq_compiler.engine_build import (EngineConfig, build_engine, builder_config, check_precisions,
                                       network_from_onnx, profile_shapes, select_backend, summary_line)
from qdq_compiler.errors import QdqcError, UsageError
from qdq_compiler.synthetic import BertSpec, build_bert

from conftest import calibrated_bert, qdqc

rtx = pytest.importorskip("tensorrt_rtx")  # in the dev extra: these tests build real engines


def graph():
    return gs.import_onnx(build_bert(BertSpec(layers=1)))


def test_profiles_default_to_opt_1x128_and_max_32x512():
    shapes = profile_shapes(graph(), EngineConfig())
    assert shapes["input_ids"] == ((1, 1), (1, 128), (32, 512))
    shapes = profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": "8x384"}))
    assert shapes["input_ids"] == ((1, 1), (8, 384), (32, 512))
    shapes = profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": "64x384"}))
    assert shapes["input_ids"] == ((1, 1), (64, 384), (64, 512))
    # the other inputs share the symbolic dims (batch, sequence): one --shapes entry sets them all
    assert shapes["attention_mask"] == shapes["token_type_ids"] == shapes["input_ids"]


def test_profiles_refuse_unknown_inputs_and_say_where_a_default_came_from():
    with pytest.raises(UsageError, match="--max-shapes: the model has no input 'ids'; its inputs are input_ids"):
        profile_shapes(graph(), EngineConfig(max_shapes={"ids": (1, 128)}))
    with pytest.raises(UsageError, match="set --max-shapes"):
        profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": (8, 1024)}))


def test_profiles_refuse_contradictions():
    with pytest.raises(UsageError, match="contradicts"):
        profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": (1, 2, 3)}))
    with pytest.raises(UsageError, match="min <= opt <= max"):
        profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": (1, 600)}))


def test_precision_promises_are_checked():
    plain = graph()
    with pytest.raises(UsageError, match="--int8.*lower --target tensorrt"):
        check_precisions(plain, EngineConfig(int8=True))
    with pytest.raises(UsageError, match="--fp16"):
        check_precisions(plain, EngineConfig(fp16=True))
    check_precisions(plain, EngineConfig())


def test_config_takes_strings_as_the_cli_does(tmp_path):
    config = EngineConfig(baseline=str(tmp_path / "f.plan"), compute_capabilities="8.6, 8.9,",
                          max_shapes={"input_ids": "8x256"})
    assert config.baseline == tmp_path / "f.plan" and config.compute_capabilities == ("8.6", "8.9")
    assert config.max_shapes == {"input_ids": (8, 256)}


def test_config_validation():
    with pytest.raises(UsageError, match="--backend"):
        EngineConfig(backend="cuda")
    with pytest.raises(UsageError, match="--compute-capability '9.0'.*Hopper"):
        EngineConfig(compute_capabilities=("9.0",))
    with pytest.raises(UsageError, match="TensorRT-RTX setting"):
        EngineConfig(backend="tensorrt", compute_capabilities=("8.6",))


# ---------------------------------------------------------------- reading the builder's evidence

LOG_LAYER = ("Name: _gemm_mha_v2_myl0_7, LayerType: kgen, Inputs: [ { Name: a, Dimensions: [4,-1,16], Datatype: Int8, "
             "Format: (Arbitrary) x }, { Name: m, Dimensions: [1,1,1,-1], Datatype: Half, Format: (Linear) y }], "
             "Constants: [ { Name: c, Datatype: Float, Format: z }], Outputs: [ { Name: o, Datatype: Int8, Format: w }], "
             "TacticName: _gemm_mha_v2_0x3c, StreamId: 0, Metadata: [ONNX Layer: l0/QK][ONNX Layer: l0/Softmax]"
             "[ONNX Layer: l0/AV]")


def test_log_layer_line_is_parsed_field_by_field():
    layer = engine_evidence.layer_from_text(LOG_LAYER)
    assert layer == engine_evidence.EngineLayer("_gemm_mha_v2_myl0_7", "kgen", ("INT8", "FP16"), ("INT8",),
                                                "_gemm_mha_v2_0x3c", ("l0/QK", "l0/Softmax", "l0/AV"))
    assert layer.int8  # constants (Float) are not inputs


def test_read_log_takes_memory_attention_and_layers():
    messages = ["Total Activation Memory: 8717312 bytes", "Total Weights Memory: 140164 bytes",
                "Found l0/QK to be part of self-attention pattern.", "Found l0/QK to be part of self-attention pattern.",
                "Layers:\n" + LOG_LAYER + "\nName: x, LayerType: gemm, Inputs: [], Constants: [], Outputs: [], "
                "TacticName: t, StreamId: 0, Metadata: "]
    log = engine_evidence.read_log(messages)
    assert (log["weights_bytes"], log["activation_bytes"]) == (140164, 8717312)
    assert log["attention_pattern_nodes"] == ["l0/QK"] and [layer.name for layer in log["layers"]] == \
        ["_gemm_mha_v2_myl0_7", "x"]


def test_inspector_json_layers_read_like_log_lines():
    record = {"Name": "fmha", "LayerType": "CaskMHA", "Inputs": [{"Name": "q", "Format/Datatype": "Int8"}],
              "Outputs": [{"Name": "o", "Format/Datatype": "Row major linear FP16 format"}],
              "TacticName": "t", "Metadata": "[ONNX Layer: a][ONNX Layer: b]"}
    layer = engine_evidence.layer_from_inspector(record)
    assert (layer.inputs, layer.outputs, layer.onnx_nodes) == (("INT8",), ("FP16",), ("a", "b"))


def test_a_plain_dense_layer_named_attention_is_not_fused_attention(tmp_path):
    """The old heuristic counted any INT8 layer mentioning 'attention'; coverage of Q·K^T, softmax and ·V
    by one engine layer is what counts now."""
    g, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    block = engine_evidence.attention_blocks(g)[0]
    assert block.quantized
    dense = engine_evidence.EngineLayer("layer.0/attention/output/MatMul", "gemm", ("INT8",), ("FP16",), "t",
                                        ("layer.0/attention/output/MatMul", block.scores))
    split = [engine_evidence.EngineLayer("a", "gemm", ("INT8",), ("FP16",), "t", (block.scores, block.softmax)),
             engine_evidence.EngineLayer("b", "gemm", ("INT8",), ("FP16",), "t", (block.context,))]
    fused = engine_evidence.EngineLayer("mha", "kgen", ("INT8",), ("INT8",), "t", tuple(block.nodes()))
    assert engine_evidence.summarize(g, {}, [dense])["attention_fused"] == 0
    assert engine_evidence.summarize(g, {}, split)["attention_fused"] == 0
    summary = engine_evidence.summarize(g, {}, [fused])
    assert (summary["attention_fused"], summary["attention_fused_int8"]) == (1, 1)
    assert engine_evidence.summarize(g, {}, [])["attention_fused"] is None  # no records: unknown, not zero


# ---------------------------------------------------------------- real builds (TensorRT-RTX, CPU only)

@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """FP32 and lowered INT8 engines of a 2-layer synthetic BERT, built by TensorRT-RTX here."""
    from qdq_compiler.lower import LowerConfig, lower

    folder = tmp_path_factory.mktemp("engines")
    spec = BertSpec(layers=2, hidden=128, heads=2, vocab=512)
    fp32 = folder / "bert.onnx"
    onnx.save(build_bert(spec), fp32)
    g, _ = calibrated_bert(folder, spec)
    lower(g, LowerConfig("tensorrt"))
    int8 = ir.save(g, folder / "bert.trt.onnx")
    fp32_summary = build_engine(fp32, folder / "fp32.plan", EngineConfig(backend="tensorrt-rtx"))
    int8_summary = build_engine(int8, folder / "int8.plan",
                                EngineConfig(int8=True, fp16=True, baseline=folder / "fp32.plan"))
    return folder, fp32_summary, int8_summary


def test_int8_engine_is_built_with_attention_fused_in_every_layer(engines):
    folder, _, summary = engines
    plan = folder / "int8.plan"
    assert plan.stat().st_size == summary["engine_bytes"] > 100_000
    assert summary["backend"] == "tensorrt-rtx" and summary["version"] == rtx.__version__
    assert summary["attention_blocks"] == summary["attention_quantized"] == 2
    assert summary["attention_fused"] == summary["attention_fused_int8"] == 2
    assert summary["quantized_gemms"] == 2 * 8 and summary["int8_gemms"] == summary["quantized_gemms"]
    record = json.loads((folder / "int8.plan.layers.json").read_text())
    assert record["summary"] == summary
    mha = [layer for layer in record["layers"] if {"QK", "Softmax", "AV"} <= {n.rsplit("/", 1)[-1].split("_")[0]
                                                                                  for n in layer["onnx_nodes"]}]
    assert len(mha) == 2 and all("INT8" in layer["inputs"] for layer in mha)


def test_int8_weights_are_under_half_of_the_fp32_engines(engines):
    _, fp32, int8 = engines
    assert fp32["weights_bytes"] > 0 and fp32["attention_quantized"] == 0 and fp32["int8_layers"] == 0
    assert int8["weights_bytes"] < 0.5 * fp32["weights_bytes"]
    assert int8["baseline"]["weights_ratio"] == pytest.approx(int8["weights_bytes"] / fp32["weights_bytes"], abs=1e-4)
    assert "weights 0." in summary_line(int8) and "attention fused 2/2 (INT8 2/2)" in summary_line(int8)


def test_cli_builds_and_prints_the_summary_line(tmp_path, engines):
    folder, _, _ = engines
    proc = qdqc("build-engine", folder / "bert.trt.onnx", "-o", tmp_path / "m.plan", "--int8",
                "--compute-capability", "8.6,8.9", "--timing-cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "tensorrt-rtx" in proc.stdout and "attention fused 2/2 (INT8 2/2)" in proc.stdout
    assert "--timing-cache ignored" in proc.stderr and not (tmp_path / "cache").exists()
    summary = json.loads((tmp_path / "m.plan.layers.json").read_text())["summary"]
    assert summary["compute_capabilities"] == ["8.6", "8.9"]


def test_baseline_from_another_model_is_refused_and_quantized_baselines_are_named(tmp_path, engines):
    folder, _, _ = engines
    other = tmp_path / "other.onnx"
    model = build_bert(BertSpec(layers=1))
    model.graph.input[0].name = "ids"
    for node in model.graph.node:
        node.input[:] = ["ids" if name == "input_ids" else name for name in node.input]
    onnx.save(model, other)
    with pytest.raises(UsageError, match="built from a model with inputs"):
        build_engine(other, tmp_path / "o.plan", EngineConfig(baseline=folder / "fp32.plan"))
    summary = build_engine(folder / "bert.trt.onnx", tmp_path / "q.plan", EngineConfig(baseline=folder / "int8.plan"))
    assert summary["baseline"]["float"] is False and "of the quantized" in summary_line(summary)
    assert summary["profile"]["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [32, 512]}


def test_long_sequences_warn_about_int8_fused_attention(tmp_path, engines):
    folder, _, _ = engines
    proc = qdqc("build-engine", folder / "bert.trt.onnx", "-o", tmp_path / "m.plan", "--max-shapes", "input_ids:1x640")
    assert proc.returncode == 0 and "qdqc: warning: max sequence 640 > 512" in proc.stderr
    assert "max 1x640" in proc.stdout  # the profile line shows every input's (shared) dims


def test_output_folder_is_checked_before_building(tmp_path, bert_file):
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "missing" / "m.plan")
    assert proc.returncode == 1 and "does not exist" in proc.stderr  # the CLI's check, before TensorRT loads
    with pytest.raises(UsageError, match="no such folder"):             # the library's own
        build_engine(bert_file, tmp_path / "missing" / "m.plan", EngineConfig())


def test_int8_on_an_unlowered_graph_is_refused(tmp_path, bert_file):
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "m.plan", "--int8")
    assert proc.returncode == 2 and "lower --target tensorrt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.plan").exists()
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "m.plan", "--opt-level", "9")
    assert proc.returncode == 2 and "--opt-level" in proc.stderr


def test_an_onnxruntime_lowered_graph_is_refused_naming_the_file(tmp_path):
    import qdq_compiler

    g, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    path = qdq_compiler.lower(ir.to_model(g), target="onnxruntime").save(tmp_path / "m.ort.onnx")
    proc = qdqc("build-engine", path, "-o", tmp_path / "m.plan", "--int8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{path}: lowered for onnxruntime (MatMulIntegerToFloat, com.microsoft integer GEMMs)" in proc.stderr
    assert "needs `qdqc lower --target tensorrt`" in proc.stderr and not (tmp_path / "m.plan").exists()


def test_parser_errors_name_their_nodes(tmp_path):
    g, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    q = next(n for n in g.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0]))
    q.inputs[2] = gs.Constant(f"{q.name}::bad_zp", np.array(3, dtype=np.int8))  # TensorRT: symmetric only
    bad = ir.save(g, tmp_path / "bad.onnx")
    proc = qdqc("build-engine", bad, "-o", tmp_path / "m.plan")
    assert proc.returncode == 1 and "parser failed" in proc.stderr and q.name in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.plan").exists()


def test_network_and_profile_with_tensorrts_parser(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build_bert(BertSpec(layers=1)), path)
    logger = rtx.Logger(rtx.Logger.ERROR)
    builder, network, _ = network_from_onnx(rtx, path, logger, rtx=True)
    assert network.num_inputs == 3 and network.num_layers > 10
    settings = builder_config(rtx, builder, profile_shapes(graph(), EngineConfig()),
                              EngineConfig(workspace_mib=64, compute_capabilities=("8.0", "12.0")), rtx=True)
    assert settings.num_optimization_profiles == 1 and settings.num_compute_capabilities == 2
    assert settings.get_compute_capability(1) == rtx.ComputeCapability.SM120


# ---------------------------------------------------------------- backend and device library choice

def hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_auto_falls_back_to_tensorrt_rtx_and_says_why(monkeypatch):
    hide(monkeypatch, "tensorrt")
    backend = select_backend("auto")
    assert backend.name == "tensorrt-rtx" and "TensorRT is not installed" in backend.reason
    with pytest.raises(QdqcError, match="needs TensorRT: pip install 'qdqc\\[gpu\\]'"):
        select_backend("tensorrt")
    hide(monkeypatch, "tensorrt_rtx")
    with pytest.raises(QdqcError, match="TensorRT .* or TensorRT-RTX"):
        select_backend("auto")


def test_auto_takes_tensorrt_only_with_a_gpu(monkeypatch):
    from qdq_compiler import trt_engine

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(trt_engine, "device_library", lambda: types.SimpleNamespace(usable=lambda: False))
    assert select_backend("auto").reason.startswith("no GPU for TensorRT")
    monkeypatch.setattr(trt_engine, "device_library", lambda: types.SimpleNamespace(usable=lambda: True))
    assert select_backend("auto").name == "tensorrt"


def fake_pycuda(monkeypatch):
    package, driver = types.ModuleType("pycuda"), types.ModuleType("pycuda.driver")
    package.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return driver


def test_device_library_prefers_cuda_python_then_pycuda(monkeypatch):
    from qdq_compiler.trt_engine import CudaPython, PyCuda, device_library

    pytest.importorskip("cuda.bindings.runtime")
    driver = fake_pycuda(monkeypatch)
    assert isinstance(device_library(), CudaPython)  # both installed: cuda-python, the default
    hide(monkeypatch, "cuda", "cuda.bindings", "cuda.bindings.runtime")
    chosen = device_library()
    assert isinstance(chosen, PyCuda) and chosen.driver is driver
    hide(monkeypatch, "pycuda", "pycuda.driver")
    with pytest.raises(QdqcError, match="cuda-python .* or pycuda"):
        device_library()


def test_engine_backend_comes_from_the_sidecar_else_what_is_installed(tmp_path, engines, monkeypatch):
    from qdq_compiler.trt_engine import engine_backend

    folder, _, _ = engines
    assert engine_backend(folder / "int8.plan") == "tensorrt-rtx"
    bare = tmp_path / "bare.plan"
    bare.write_bytes((folder / "int8.plan").read_bytes())
    hide(monkeypatch, "tensorrt")
    assert engine_backend(bare) == "tensorrt-rtx"  # TensorRT missing: the runtime that is installed


def test_running_an_engine_without_a_gpu_is_one_line_naming_the_backend(engines):
    pytest.importorskip("cuda.bindings.runtime")
    from cuda.bindings import runtime

    if int(runtime.cudaFree(0)[0]) == 0:
        pytest.skip("a GPU is present")
    folder, _, _ = engines
    proc = qdqc("bench", folder / "int8.plan", "--iterations", "1")
    assert proc.returncode == 1 and "no usable GPU" in proc.stderr and "(tensorrt-rtx)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.tensorrt
def test_builds_an_int8_engine_with_datacenter_tensorrt_on_a_gpu(tmp_path):
    """Runs only where TensorRT and a GPU exist: the inspector then supplies the layers."""
    pytest.importorskip("tensorrt")
    from qdq_compiler.lower import LowerConfig, lower

    g, _ = calibrated_bert(tmp_path, BertSpec(layers=2))
    lower(g, LowerConfig("tensorrt"))
    model = ir.save(g, tmp_path / "m.trt.onnx")
    summary = build_engine(model, tmp_path / "m.plan", EngineConfig(int8=True, fp16=True, backend="tensorrt"))
    assert summary["backend"] == "tensorrt" and summary["int8_layers"] > 0


def with_nan_guards(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Softmax output guarded as torch's SDPA export does: Where(IsNaN(p), 0, p)."""
    g = gs.import_onnx(model)
    for index, softmax in enumerate([n for n in g.nodes if n.op == "Softmax"]):
        probabilities, readers = softmax.outputs[0], list(softmax.outputs[0].outputs)
        nan = gs.Variable(f"guard{index}/isnan", dtype=np.bool_)
        guarded = gs.Variable(f"guard{index}/out", dtype=np.float32)
        g.nodes += [gs.Node("IsNaN", f"guard{index}/IsNaN", inputs=[probabilities], outputs=[nan]),
                    gs.Node("Where", f"guard{index}/Where", inputs=[nan, gs.Constant(f"guard{index}/zero",
                            np.zeros((), np.float32)), probabilities], outputs=[guarded])]
        for reader in readers:
            reader.inputs[reader.inputs.index(probabilities)] = guarded
    ir.toposort(g)
    return gs.export_onnx(g)


def test_sdpa_nan_guards_are_counted_and_dropped_so_attention_fuses(tmp_path):
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.insert import insert
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import example_inputs

    from conftest import run_model

    spec = BertSpec(layers=2, hidden=128, heads=2, vocab=512)
    g = gs.import_onnx(with_nan_guards(build_bert(spec)))
    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(spec, batch=8, seq=16))
    insert(g, InsertConfig("ft1"))
    calibrate(g, Dataset(data, model_inputs(g)), CalibrationConfig("max", progress=False))
    assert [b.quantized for b in engine_evidence.attention_blocks(g)] == [True, True]  # seen through the guard
    feeds = example_inputs(spec, batch=2, seq=16, seed=1)
    (before,) = run_model(g, feeds)
    records = {r.name: r.stats for r in lower(g, LowerConfig("tensorrt"))}
    assert records["drop-nan-guard"]["nan_guards_dropped"] == 2
    assert not any(n.op in ("IsNaN", "Where") for n in g.nodes)
    (after,) = run_model(g, feeds)
    assert np.isfinite(after).all() and np.abs(after - before).max() < 0.05 * np.abs(before).max()  # FP16 graph
    summary = build_engine(ir.save(g, tmp_path / "m.trt.onnx"), tmp_path / "m.plan", EngineConfig(int8=True))
    assert summary["attention_fused_int8"] == 2 and summary["int8_gemms"] == summary["quantized_gemms"] == 16
