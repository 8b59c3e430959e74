"""Bringing a QAT model: a QAT-style all-MiniLM-L6-v2 export through qdqc, compared with the QAT ONNX itself.

    python tools/eval_qat.py [--style torch|torch-ao|modelopt] [--folder DIR] [--samples 64] [--eval 500]

The real MiniLM is fake-quantized (qdq_compiler/qat_export.py: per-channel weights, per-tensor inputs of
every Linear and LayerNorm, max-calibrated on `--samples` calibration sentences; or ModelOpt's
INT8_DEFAULT_CFG) and exported with torch.onnx (TorchScript, opset 17). The reference is onnxruntime
running that QAT ONNX unoptimized; on the first `--eval` evaluation sentences (never calibrated on),
each row gives the cosine of mean-pooled embeddings to it (mean / min), to the FP32 MiniLM (mean / min)
and the weight GEMMs that run integer. The QAT ONNX's own optimized run is the yardstick of two
faithful runs: a fake-quantized network is discontinuous, so float reassociation alone moves it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def weight_gemms(graph) -> Counter:
    from qdq_compiler import ir
    from qdq_compiler.graph import weight_of

    counts = Counter()
    for node in graph.nodes:
        if node.op == "MatMulIntegerToFloat" and ir.is_constant(node.inputs[1]):
            counts["integer"] += 1
        elif node.op in ("MatMul", "Gemm") and weight_of(node, 1) is not None:
            counts["int8 Q/DQ" if weight_of(node, 1)[3] else "float"] += 1
    return counts


def main() -> None:
    import qdq_compiler
    from qdq_compiler.evaluate import cosines, embeddings, open_session
    from qdq_compiler.hf_export import corpus, encode, export
    from qdq_compiler.qat_export import export_modelopt, export_qat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=("torch", "torch-ao", "modelopt"), default="torch")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--samples", type=int, default=64, help="QAT calibration sentences")
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--norm-inputs", action="store_true", help="torch styles: quantize the LayerNorm inputs too")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_cpu  # tools/: the session that runs a TensorRT graph on onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        qat = folder / f"minilm.qat-{args.style}{'-norms' if args.norm_inputs else ''}.onnx"
        if not qat.exists():
            if args.style == "modelopt":
                export_modelopt("minilm", qat, seq=128, samples=args.samples)
            else:
                export_qat("minilm", qat, style=args.style, seq=128, samples=args.samples, norm_inputs=args.norm_inputs)
        calibration = folder / "minilm.calib.npz"
        np.savez(calibration, **encode(corpus("calibration")))
        evaluation = encode(corpus("evaluation")[:args.eval])
        reference = embeddings(open_session(qat, optimize=False), evaluation)
        fp32 = folder / "minilm.onnx"
        if not fp32.exists():
            export("minilm", fp32, exporter="torchscript", opset=17)
        original = embeddings(open_session(fp32), evaluation)

        def row(label, model, session=None):
            found = embeddings(session or open_session(getattr(model, "model", model)), evaluation)
            values, to_fp32 = cosines(reference, found), cosines(original, found)
            graph = getattr(model, "graph", None)
            gemms = dict(weight_gemms(graph)) if graph is not None else {}
            print(f"{label:52} {values.mean():.5f} {values.min():.5f}  {to_fp32.mean():.5f} {to_fp32.min():.5f}  "
                  f"{gemms}", flush=True)

        print(f"{'row':52} to the QAT ONNX (mean, min), to FP32 (mean, min), weight GEMMs")
        row("QAT ONNX, onnxruntime unoptimized (the reference)", qat, open_session(qat, optimize=False))
        row("QAT ONNX, onnxruntime optimized (yardstick)", qat)
        inserted = qdq_compiler.insert(qat)
        print(f"insert: {len(inserted.report['sites']['quantizers'])} quantizers added, "
              f"{len(inserted.report['sites']['input_quantization']['sites_already_quantized'])} sites already quantized")
        calibrated = qdq_compiler.calibrate(inserted, calibration, keep_scales=True, quiet=True)
        for label, model in (("lower (QAT scales only)", qat), ("insert + calibrate --keep-scales + lower", calibrated)):
            for target in ("onnxruntime", "tensorrt"):
                lowered = qdq_compiler.lower(model, target=target)
                session = None
                if target == "tensorrt":
                    path = lowered.save(folder / f"qat.{target}.onnx", overwrite=True)
                    session = bench_cpu.tensorrt_graph_session(path)
                row(f"{label} [{target}]", lowered, session)


if __name__ == "__main__":
    main()
