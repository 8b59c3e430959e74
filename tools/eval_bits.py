"""How much activation precision the task needs, on MiniLM against FP32 (finer activation quantizers).

The default compile's fake-quant MiniLM with its activation quantizers made finer, against FP32 on the
held-out sentences.

    python tools/eval_bits.py --folder artifacts [--bits 9,10] [--kinds softmax.output,v] [--eval 1000]

Each activation quantizer keeps its calibrated clipping range [-128·s, 127·s] and rounds to a step of
s/2^k instead of s (a 16-bit Q/DQ pair after a Clip): "8 + k bits" at the same range. `--kinds` makes
only the sites of those kinds finer (the site names insert gives, `layer.N.KIND`). The weights stay as
the default compile rounded them (INT8, GPTQ); "weights only" bypasses every activation quantizer.
Rows: cosine of the mean-pooled embeddings to FP32 (mean / 1st percentile / min) and recall@10 of
the neighbours each sentence retrieves among the others (tools/eval_fidelity.py's measures).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from qdq_compiler.passes.lower_onnxruntime import MS_DOMAIN  # noqa: E402  (int16 Q/DQ there at any opset)


def finer(model: onnx.ModelProto, extra_bits: int, kinds: set[str] | None) -> tuple[onnx.ModelProto, int]:
    """`model` with its per-tensor int8 activation quantizers (of `kinds`, or all) rounding 2^extra_bits
    times finer over the same range; returns the model and how many quantizers changed."""
    from qdq_compiler import carried, ir

    graph = ir.from_model(model)
    sites = carried.quantizer_sites(graph)
    changed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])]:
        scale, zero = ir.constant(q.inputs[1]), ir.constant(q.inputs[2])
        dequantizers = q.outputs[0].outputs
        if scale.size != 1 or zero.dtype != np.int8 or zero.any() or not dequantizers \
                or any(dq.op != "DequantizeLinear" for dq in dequantizers):
            continue
        if kinds is not None and not any(name.split(".", 2)[-1] in kinds for name in sites.get(q.inputs[0].name, ())):
            continue
        step = float(scale.reshape(()))
        source = q.inputs[0]
        clipped = gs.Variable(f"{source.name}::clipped", dtype=np.float32)
        low = gs.Constant(f"{source.name}::low", np.array(-128 * step, np.float32))
        high = gs.Constant(f"{source.name}::high", np.array(127 * step, np.float32))
        graph.nodes.append(gs.Node("Clip", inputs=[source, low, high], outputs=[clipped]))
        fine = gs.Constant(f"{source.name}::fine_scale", np.array(step / 2 ** extra_bits, np.float32))
        wide_zero = gs.Constant(f"{source.name}::int16_zero", np.array(0, np.int16))
        q.inputs[0], q.inputs[1], q.inputs[2] = clipped, fine, wide_zero
        q.domain, q.outputs[0].dtype = MS_DOMAIN, np.int16
        for dq in dequantizers:
            dq.inputs[1], dq.inputs[2], dq.domain = fine, wide_zero, MS_DOMAIN
        changed += 1
    graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != MS_DOMAIN] + \
        [onnx.helper.make_opsetid(MS_DOMAIN, 1)]
    ir.toposort(graph)
    return ir.to_model(graph), changed


def main() -> None:
    import bench_cpu  # tools/
    import qdq_compiler
    from eval_fidelity import metrics
    from eval_weights import weights_only
    from qdq_compiler import ir
    from qdq_compiler.evaluate import embeddings, open_session
    from qdq_compiler.patterns.records import SITE_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="where minilm.onnx is (exported if missing)")
    parser.add_argument("--bits", default="9,10", help="activation bits to try besides 8, 9 to 15 (comma-separated)")
    parser.add_argument("--kinds", help="only these site kinds finer, e.g. softmax.output,v,ffn2.input")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation sentences (1 to 1000)")
    args = parser.parse_args()
    try:
        extra = [int(b) - 8 for b in args.bits.split(",") if b]
    except ValueError:
        parser.error(f"--bits {args.bits!r}: expected comma-separated integers")
    if not extra or any(e < 1 or e > 7 for e in extra):
        parser.error(f"--bits {args.bits}: each between 9 and 15")
    kinds = set(args.kinds.split(",")) if args.kinds else None
    if kinds is not None and kinds - set(SITE_NAMES):
        parser.error(f"--kinds {','.join(sorted(kinds - set(SITE_NAMES)))}: expected site kinds among "
                     f"{', '.join(SITE_NAMES)}")
    if not 1 <= args.eval <= 1000:
        parser.error(f"--eval {args.eval}: the shipped evaluation set has 1000 sentences")
    model, calibration, evaluation = bench_cpu.minilm_inputs(args.folder, args.eval)
    reference = embeddings(open_session(model), evaluation)
    calibrated = qdq_compiler.calibrate(qdq_compiler.insert(model), calibration, quiet=True).model
    rows = [("8 bits (the default compile, fake-quant)", calibrated)]
    for bits in extra:
        finer_model, changed = finer(calibrated, bits, kinds)
        rows.append((f"{8 + bits} bits at {changed} activation quantizers", finer_model))
    rows.append(("weights only (activations float)", weights_only(ir.from_model(calibrated))))
    print(f"{'activations':44} {'mean':>7} {'p1':>7} {'min':>7} {'R@10':>6}")
    for label, variant in rows:
        found = metrics(reference, embeddings(open_session(variant, optimize=False), evaluation))
        print(f"{label:44} {found['mean']:.5f} {found['p1']:.5f} {found['min']:.5f} {found['recall@10']:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
