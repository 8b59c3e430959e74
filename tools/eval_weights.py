"""The weight side of MiniLM's INT8 error: weight roundings and scale choices, with activations float and all INT8.

    python tools/eval_weights.py --folder artifacts [--smooth auto] [--no-shift] [--no-split] [--variants nearest,gptq,...]
                                 [--eval 1000] [--damp 0.01]

One model is smoothed and calibrated on the 256 calibration sentences (the default recipe with nearest
weights); each variant then rounds its weights (symmetric INT8, one scale per output column, the format
every target takes) and is measured on the evaluation sentences against FP32 twice: with only the
weights quantized (every activation quantizer bypassed: the bound the weights set) and lowered for
onnxruntime with everything INT8. Variants:

  nearest       scale max|w|/127, nearest rounding (`--weights nearest`)
  nearest-clip  each column's scale from CLIP_GRID × max|w|/127, the one whose nearest rounding has the
                smallest Hessian-weighted output error (w − q)ᵀH(w − q), H = XᵀX of the quantized inputs
  gptq          max scales, GPTQ rounding (the default)
  gptq-clip     nearest-clip's scales, then GPTQ with them
  gptq-scored   GPTQ at each of SCORED_GRID × max|w|/127, each column keeping the ratio whose GPTQ-rounded
                column has the smallest output error (GPTQ rounds columns independently)
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(16))   # 1.00 .. 0.70
SCORED_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)
VARIANTS = ("nearest", "nearest-clip", "gptq", "gptq-clip", "gptq-scored")


def output_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """(w − q)ᵀ H (w − q) per output column: that output's squared error over the calibration rows."""
    difference = (np.asarray(weight, np.float64) - quantized).astype(np.float32)
    return np.einsum("kn,kn->n", difference, np.asarray(hessian, np.float32) @ difference)


def on_grid(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    from qdq_compiler.quant import QMAX

    return np.clip(np.rint(weight / scale), -QMAX, QMAX) * scale


def pick_per_column(weight, hessian, candidates):
    """(scale, rounded weight) per column: of (scale, rounded) candidates, the smallest output error."""
    best = None
    for scale, rounded in candidates:
        error = output_error(weight, rounded, hessian)
        if best is None:
            best = [error, scale.copy(), rounded.copy()]
            continue
        better = error < best[0]
        best[0] = np.where(better, error, best[0])
        best[1][better], best[2][:, better] = scale[better], rounded[:, better]
    return best[1], best[2]


def set_weight(weight_q, transposed: bool, values: np.ndarray, scale: np.ndarray) -> None:
    """A weight quantizer's values and per-column scale (on its QuantizeLinear and its DequantizeLinears)."""
    weight_q.inputs[0].values = np.ascontiguousarray(values.T if transposed else values).astype(np.float32)
    scale = scale.astype(np.float32).reshape(weight_q.inputs[1].values.shape)
    weight_q.inputs[1].values = scale
    for dq in weight_q.outputs[0].outputs:
        if dq.op == "DequantizeLinear":
            dq.inputs[1].values = scale.copy()


def round_variant(graph, variant: str, hessians: dict) -> None:
    from qdq_compiler.weight_rounding import _oriented, gptq, gptq_targets, round_weights

    targets = gptq_targets(graph)
    if variant == "nearest":
        return
    if variant == "gptq":
        round_weights(graph, hessians, targets)
        return
    for weight_q, readers in targets:
        weight, transposed = _oriented(weight_q)
        scale = np.asarray(weight_q.inputs[1].values, np.float32).reshape(-1)
        if scale.size == 1:
            continue
        hessian = sum(hessians[name] for name in sorted({a.inputs[0].name for a in readers}))
        if variant == "gptq-scored":
            candidates = [(np.full_like(scale, r) * scale, gptq(weight, hessian, scale * np.float32(r)))
                          for r in SCORED_GRID]
        else:
            candidates = [(scale * np.float32(r), on_grid(weight, scale * np.float32(r))) for r in CLIP_GRID]
        chosen, rounded = pick_per_column(weight, hessian, candidates)
        set_weight(weight_q, transposed, rounded if variant != "gptq-clip" else weight, chosen)
    if variant == "gptq-clip":
        round_weights(graph, hessians, targets)   # GPTQ on the clipped scales it finds on the quantizers


def weights_only(graph):
    """A copy with every activation Q->DQ pair bypassed (weights stay fake-quantized)."""
    from qdq_compiler import ir

    copy = graph.copy()
    for q in [n for n in copy.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])]:
        for dq in list(q.outputs[0].outputs):
            for reader in list(dq.outputs[0].outputs):
                for index, value in enumerate(reader.inputs):
                    if value is dq.outputs[0]:
                        reader.inputs[index] = q.inputs[0]
            copy.outputs = [q.inputs[0] if t is dq.outputs[0] else t for t in copy.outputs]
    ir.cleanup(copy)
    return ir.to_model(copy)


def main() -> None:
    import bench_cpu  # tools/
    import qdq_compiler
    from eval_fidelity import metrics
    from qdq_compiler import ir
    from qdq_compiler.calibrate import CalibrationConfig
    from qdq_compiler.data import open_data
    from qdq_compiler.evaluate import embeddings, open_session
    from qdq_compiler.weight_rounding import gptq_targets, input_hessians

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="where minilm.onnx is (exported if missing)")
    parser.add_argument("--smooth", default="auto")
    parser.add_argument("--no-shift", action="store_true", help="without the OS+ channel shifts")
    parser.add_argument("--no-split", action="store_true", help="without FFN2's outlier channel splitting")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--damp", type=float, help="GPTQ's damping, a fraction of H's mean diagonal "
                        "(default: weight_rounding.DAMP)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.damp is not None:
        from qdq_compiler import weight_rounding

        weight_rounding.gptq.__kwdefaults__["damp"] = args.damp   # a measurement knob, not an option of the library
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    model, calibration, evaluation = bench_cpu.minilm_inputs(args.folder, args.eval)
    reference = embeddings(open_session(model), evaluation)
    with warnings.catch_warnings():   # nearest here, the variants re-round: the shifts as the default compile has them
        warnings.filterwarnings("ignore", message="OS\\+ shifts with weights rounded to nearest")
        calibrated = qdq_compiler.calibrate(qdq_compiler.insert(model), calibration, quiet=True, weights="nearest",
                                            smooth=args.smooth, shift=not args.no_shift,
                                            split=not args.no_split).model
    graph = ir.from_model(calibrated)
    hessians = input_hessians(graph, open_data(calibration, graph), CalibrationConfig(progress=False),
                              gptq_targets(graph))
    print(f"{'variant':14} {'weights only: mean':>18} {'p1':>7} {'min':>7} {'R@10':>6} | "
          f"{'all INT8: mean':>14} {'p1':>7} {'min':>7} {'R@10':>6} | rounding s")
    for variant in variants:
        graph = ir.from_model(calibrated)
        started = time.perf_counter()
        round_variant(graph, variant, hessians)
        seconds = time.perf_counter() - started
        alone = metrics(reference, embeddings(open_session(weights_only(graph)), evaluation))
        lowered = qdq_compiler.lower(ir.to_model(graph), target="onnxruntime").model
        full = metrics(reference, embeddings(open_session(lowered), evaluation))
        print(f"{variant:14} {alone['mean']:18.5f} {alone['p1']:.5f} {alone['min']:.5f} {alone['recall@10']:.4f} | "
              f"{full['mean']:14.5f} {full['p1']:.5f} {full['min']:.5f} {full['recall@10']:.4f} | {seconds:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
