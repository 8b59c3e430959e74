import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler.engine_build import (EngineConfig, builder_config, check_precisions, layer_summary,
                                       network_from_onnx, profile_shapes)
from qdq_compiler.errors import UsageError
from qdq_compiler.synthetic import BertSpec, build_bert

from conftest import qdqc


def graph():
    return gs.import_onnx(build_bert(BertSpec(layers=1)))


def test_profiles_default_to_batch_1_seq_128_and_512():
    shapes = profile_shapes(graph(), EngineConfig())
    assert shapes["input_ids"] == ((1, 1), (1, 128), (1, 512))
    shapes = profile_shapes(graph(), EngineConfig(opt_shapes={"input_ids": (8, 384)}))
    assert shapes["input_ids"] == ((1, 1), (8, 384), (8, 512)) and shapes["attention_mask"][1] == (1, 128)


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


def test_layer_summary_counts_precisions_and_attention():
    layers = [{"Name": "gemm", "Outputs": [{"Format/Datatype": "Int8"}]},
              {"Name": "fmha", "LayerType": "CaskMHA", "Inputs": [{"Format/Datatype": "Int8"}]},
              {"Name": "ln", "Outputs": [{"Format/Datatype": "Half"}]},
              {"Name": "cast", "Outputs": [{"Format/Datatype": "Float"}]}]
    assert layer_summary(layers) == {"layers": 4, "by_precision": {"INT8": 2, "FP16": 1, "FP32": 1},
                                     "int8_attention_layers": 1}


def test_network_and_profile_with_tensorrts_parser(tmp_path):
    """The TensorRT-RTX Python API matches TensorRT's for parsing and builder configuration."""
    trt = pytest.importorskip("tensorrt_rtx")
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(build_bert(BertSpec(layers=1)), path)
    logger = trt.Logger(trt.Logger.ERROR)
    builder, network, _ = network_from_onnx(trt, path, logger)
    assert network.num_inputs == 3 and network.num_layers > 10
    settings = builder_config(trt, builder, profile_shapes(graph(), EngineConfig()), EngineConfig(workspace_mib=64))
    assert settings.num_optimization_profiles == 1


def test_cli_without_tensorrt_is_one_line(tmp_path, bert_file):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "m.plan")
    assert proc.returncode == 1 and "pip install 'qdqc[gpu]'" in proc.stderr and "Traceback" not in proc.stderr
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "m.plan", "--int8")
    assert proc.returncode == 2 and "lower --target tensorrt" in proc.stderr
    proc = qdqc("build-engine", bert_file, "-o", tmp_path / "m.plan", "--opt-level", "9")
    assert proc.returncode == 2 and "--opt-level" in proc.stderr


@pytest.mark.tensorrt
def test_builds_an_int8_engine_on_a_gpu(tmp_path):
    """Runs only where TensorRT and a GPU exist."""
    pytest.importorskip("tensorrt")
    from qdq_compiler import ir
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.engine_build import build_engine
    from qdq_compiler.insert import insert
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import example_inputs

    spec = BertSpec(layers=2)
    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(spec, batch=8, seq=16))
    g = gs.import_onnx(build_bert(spec))
    insert(g, InsertConfig("ft1"))
    calibrate(g, Dataset(data, model_inputs(g)), CalibrationConfig(progress=False))
    lower(g, LowerConfig("tensorrt"))
    model = ir.save(g, tmp_path / "m.trt.onnx")
    summary = build_engine(model, tmp_path / "m.plan", EngineConfig(int8=True, fp16=True))
    assert summary["by_precision"].get("INT8", 0) > 0
