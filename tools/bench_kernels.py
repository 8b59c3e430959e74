"""The onnxruntime CPU kernel facts the onnxruntime lowering is built on, measured side by side.

    python tools/bench_kernels.py [--rounds 30] [--batch 8] [--seq 128] [--hidden 384,768]

One process, variants interleaved round by round, intra-op threads 2, spinning off, graph
optimizations off (each variant is exactly the graph named), median / p90 ms:
  residual + LayerNorm: com.microsoft.SkipLayerNormalization (what onnxruntime fuses Add ->
      LayerNormalization into when shapes are known) vs Add + LayerNormalization vs Sum +
      LayerNormalization (the `residual-sum` pass);
  quantizing a smoothed activation: Mul(1/s) + per-tensor QuantizeLinear vs one per-channel
      QuantizeLinear with the 1/s folded into its scale (why the smoothing Mul stays);
  attention scores: MatMulIntegerToFloat + Mul(1/sqrt(d)) vs the factor folded into its scale
      (the `fold-output-scale` pass);
  softmax of masked scores (three quarters of the keys padded, −3.4e38 added): Softmax vs
      Max(x, rowmax − 80) -> Softmax (the `floor-softmax-input` pass) vs Softmax in a session that
      flushes denormals (`session.set_denormal_as_zero`);
  integer GEMM forms (`--sections forms`): FP32 MatMul vs MatMulIntegerToFloat with uint8
      activations (zero point 128) and int8 weights at full range, int8 weights in [-64, 63]
      (7 bits), uint8 weights (zero point 128), and int8 activations with int8 weights; each
      form's largest error against the exact product says whether the host's kernel saturates
      (x86 without VNNI sums pairs of u8*s8 products into int16: VPMADDUBSW).
"""
from __future__ import annotations

import argparse
import statistics
from functools import partial

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qdq_compiler.bench import interleaved, p90


def session(nodes, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray], threads: int,
            flush_denormals: bool = False):
    def info(name, value):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)

    graph = helper.make_graph(nodes, "kernel", [info(k, v) for k, v in inputs.items()],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.UINT8
                                                             if nodes[-1].op_type == "QuantizeLinear"
                                                             else TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if flush_denormals:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), inputs


def race(title: str, variants: dict[str, tuple], rounds: int) -> None:
    times = interleaved({name: partial(sess.run, None, feeds) for name, (sess, feeds) in variants.items()}, rounds)
    first = statistics.median(next(iter(times.values())))
    print(title)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:44} {median:7.3f} ms (p90 {p90(values):7.3f})  {first / median:5.2f}x the first")


def gemm_forms(rng, rows: int, depth: int, width: int, rounds: int, threads: int) -> None:
    """The integer GEMM forms the onnxruntime lowering can choose between, timed and checked for exactness."""
    node = helper.make_node
    x = rng.integers(-127, 128, (rows, depth)).astype(np.int32)       # a symmetric int8 activation
    full = rng.integers(-128, 128, (depth, width)).astype(np.int32)
    seven = rng.integers(-64, 64, (depth, width)).astype(np.int32)
    exact = {"full": x.astype(np.float64) @ full, "seven": x.astype(np.float64) @ seven}
    ones = {"sa": np.array(1, np.float32), "sb": np.array(1, np.float32)}
    forms = {
        "FP32 MatMul": ([node("MatMul", ["a", "b"], ["y"])], x.astype(np.float32), full.astype(np.float32), {},
                        "full"),
        "u8 x s8, weights 8-bit": (None, (x + 128).astype(np.uint8), full.astype(np.int8),
                                   {"za": np.array(128, np.uint8)}, "full"),
        "u8 x s8, weights 7-bit": (None, (x + 128).astype(np.uint8), seven.astype(np.int8),
                                   {"za": np.array(128, np.uint8)}, "seven"),
        "u8 x u8 (weights zero point 128)": (None, (x + 128).astype(np.uint8), (full + 128).astype(np.uint8),
                                             {"za": np.array(128, np.uint8), "zb": np.array(128, np.uint8)}, "full"),
        "s8 x s8": (None, x.astype(np.int8), full.astype(np.int8), {}, "full"),
    }
    variants, reference = {}, {}
    for name, (nodes, a, b, zeros, which) in forms.items():
        inputs = ["a", "b", "sa", "sb", "za" if "za" in zeros else "", "zb" if "zb" in zeros else ""]
        while not inputs[-1]:
            inputs.pop()
        nodes = nodes or [node("MatMulIntegerToFloat", inputs, ["y"], domain="com.microsoft")]
        constants = ({} if name.startswith("FP32") else ones | zeros) | {"b": b}
        variants[name] = session(nodes, {"a": a}, constants, threads)
        reference[name] = exact[which]
    print(f"integer GEMM forms, {rows}x{depth} @ {depth}x{width} (largest error against the exact product)")
    for name, (sess, feeds) in variants.items():
        got = sess.run(None, feeds)[0].astype(np.float64)
        error = np.abs(got - reference[name]).max() / np.abs(reference[name]).max()
        print(f"  {name:44} {'exact' if error < 1e-6 else f'max relative error {error:.1%}'}")
    race("  timings", variants, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", default="384,768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="fusions,forms", help="fusions, forms or both (comma-separated)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    node = helper.make_node
    sections = set(args.sections.split(","))
    if "forms" in sections:
        for depth, width in ((384, 1536), (1536, 384)):
            gemm_forms(rng, args.batch * args.seq, depth, width, args.rounds, args.threads)
    if "fusions" not in sections:
        return
    for hidden in map(int, args.hidden.split(",")):
        shape = (args.batch, args.seq, hidden)
        x, r = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
        gamma = {"g": np.ones(hidden, np.float32), "b": np.zeros(hidden, np.float32)}
        norm = node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12)
        race(f"residual + LayerNorm, {shape}", {
            "SkipLayerNormalization": session([node("SkipLayerNormalization", ["x", "r", "g", "b"], ["y"],
                                                    domain="com.microsoft", epsilon=1e-12)],
                                              {"x": x, "r": r}, gamma, args.threads),
            "Add + LayerNormalization": session([node("Add", ["x", "r"], ["s"]), norm], {"x": x, "r": r}, gamma,
                                                args.threads),
            "Sum + LayerNormalization (residual-sum)": session([node("Sum", ["x", "r"], ["s"]), norm],
                                                               {"x": x, "r": r}, gamma, args.threads),
        }, args.rounds)
        smooth = (rng.random(hidden, np.float32) + 0.5)
        scale, zero = np.array(0.05, np.float32), np.array(128, np.uint8)
        race(f"quantize a smoothed activation, {shape}", {
            "Mul(1/s) + QuantizeLinear": session([node("Mul", ["x", "m"], ["xm"]),
                                                  node("QuantizeLinear", ["xm", "scale", "zero"], ["y"])],
                                                 {"x": x}, {"m": smooth, "scale": scale, "zero": zero}, args.threads),
            "per-channel QuantizeLinear (1/s in scale)": session(
                [node("QuantizeLinear", ["x", "scale", "zero"], ["y"], axis=2)], {"x": x},
                {"scale": (scale / smooth).astype(np.float32), "zero": np.full(hidden, 128, np.uint8)}, args.threads),
        }, args.rounds)
    heads, head = 12, 32
    q = rng.integers(0, 256, (args.batch, heads, args.seq, head), dtype=np.uint8)
    k = rng.integers(-127, 128, (args.batch, heads, head, args.seq), dtype=np.int8)
    scales = {"sa": np.array(0.02, np.float32), "sb": np.array(0.03, np.float32), "za": np.array(128, np.uint8)}
    gemm = node("MatMulIntegerToFloat", ["q", "k", "sa", "sb", "za"], ["y"], domain="com.microsoft")
    race(f"attention scores Q·K^T, {q.shape[:3] + (args.seq,)}", {
        "MatMulIntegerToFloat + Mul(1/sqrt(d))": session(
            [node("MatMulIntegerToFloat", ["q", "k", "sa", "sb", "za"], ["s"], domain="com.microsoft"),
             node("Mul", ["s", "c"], ["y"])], {"q": q, "k": k},
            scales | {"c": np.array(head ** -0.5, np.float32)}, args.threads),
        "MatMulIntegerToFloat, factor in its scale": session([gemm], {"q": q, "k": k}, scales, args.threads),
    }, args.rounds)
    scores = rng.standard_normal((args.batch, heads, args.seq, args.seq), np.float32) * 3
    scores[..., args.seq // 4:] += np.finfo(np.float32).min   # padded keys, as BERT masks them
    softmax = node("Softmax", ["x"], ["y"], axis=-1)
    race(f"softmax of masked scores, {scores.shape}", {
        "Softmax": session([softmax], {"x": scores}, {}, args.threads),
        "Max(x, rowmax - 80) -> Softmax": session(
            [node("ReduceMax", ["x"], ["m"], axes=[-1], keepdims=1), node("Add", ["m", "floor"], ["f"]),
             node("Max", ["x", "f"], ["xf"]), node("Softmax", ["xf"], ["y"], axis=-1)],
            {"x": scores}, {"floor": np.array(-80, np.float32)}, args.threads),
        "Softmax, session flushing denormals": session([softmax], {"x": scores}, {}, args.threads, True),
    }, args.rounds)

if __name__ == "__main__":
    main()
