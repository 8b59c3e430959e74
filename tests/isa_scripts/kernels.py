"""Run under an emulated CPU (`qemu-x86_64 -cpu Haswell`): the integer GEMM forms the lowerings emit, as
this CPU's onnxruntime and OpenVINO kernels compute them. Writes an npz of results for the test to check."""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxruntime as ort


def model(nodes, inputs, constants):
    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                              v.shape) for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def ort_run(m, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def main(data: str, out: str) -> None:
    given = dict(np.load(data))
    a, key = given["a"], given["key"]
    cases = [(a, given["full"]), (np.ascontiguousarray(a[:, given["order"]]), given["paired"])]   # as given, rearranged
    one = {"sa": np.array(1, np.float32), "sb": np.array(1, np.float32), "za": np.array(128, np.uint8)}
    results = {}
    for index, (rows, w) in enumerate(cases):   # linear: uint8 activations x int8 weights (U8S8)
        node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb", "za"], ["y"], domain="com.microsoft")
        results[f"ort_linear_{index}"] = ort_run(model([node], {"a": rows}, one | {"b": w}), {"a": rows})
    # attention: an activation as B, int8 (the VNNI form) and uint8 with zero point 128 (portable, U8U8)
    for name, b, extra in (("s8", key, {}), ("u8", (key.astype(np.int16) + 128).astype(np.uint8),
                                            {"zb": np.array(128, np.uint8)})):
        inputs = ["a", "b", "sa", "sb", "za"] + list(extra)
        node = helper.make_node("MatMulIntegerToFloat", inputs, ["y"], domain="com.microsoft")
        results[f"ort_attention_{name}"] = ort_run(model([node], {"a": a, "b": b}, one | extra), {"a": a, "b": b})
    try:
        import openvino as ov
    except ImportError:
        ov = None
    if ov is not None:   # OpenVINO reads Q/DQ ONNX: int8 weights behind a DQ, activations behind Q/DQ pairs
        core = ov.Core()
        for index, (rows, w) in enumerate(cases):
            x = rows.astype(np.float32) - 128
            nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                     helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
                     helper.make_node("MatMul", ["xd", "wd"], ["y"])]
            constants = {"w": w, "s": np.array(1, np.float32), "z": np.array(128, np.uint8),
                         "sw": np.ones(w.shape[1], np.float32), "zw": np.zeros(w.shape[1], np.int8)}
            compiled = core.compile_model(core.read_model(model(nodes, {"x": x}, constants).SerializeToString(), b""),
                                          "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            results[f"ov_linear_{index}"] = compiled({"x": x})[compiled.output(0)]
        x = a.astype(np.float32) - 128
        x4, k4 = x.reshape(1, 1, *x.shape), key.astype(np.float32).reshape(1, 1, *key.shape)   # batched, as attention
        for name, zero in (("s8", np.array(0, np.int8)), ("u8", np.array(128, np.uint8))):
            nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                     helper.make_node("QuantizeLinear", ["k", "s", "zk"], ["kq"]),
                     helper.make_node("DequantizeLinear", ["kq", "s", "zk"], ["kd"]),
                     helper.make_node("MatMul", ["xd", "kd"], ["y"])]
            constants = {"s": np.array(1, np.float32), "z": zero, "zk": np.array(0, np.int8)}
            m = model(nodes, {"x": x4, "k": k4}, constants)
            compiled = core.compile_model(core.read_model(m.SerializeToString(), b""), "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f32"})
            results[f"ov_attention_{name}"] = compiled({"x": x4, "k": k4})[compiled.output(0)].reshape(len(x), -1)
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
