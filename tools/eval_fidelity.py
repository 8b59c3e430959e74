"""Task-level fidelity of every recipe against FP32, on the real all-MiniLM-L6-v2 and the shipped sentences.

    python tools/eval_fidelity.py [--folder artifacts] [--eval 1000] [--recipe R.toml ...] [--only default]
                                  [--rows no-shift,value-fold,ft2,...] [--targets onnxruntime]

For each qdqc recipe (compiled on the 256 calibration sentences) the model is lowered for onnxruntime
(integer GEMMs) and for TensorRT (FP16 + INT8 Q/DQ, run by onnxruntime on CPU: the engine's numerics
until a GPU runs it); onnxruntime's own quantize_dynamic and quantize_static are rows too. On the 1000
evaluation sentences (never calibrated on) each model's mean-pooled embeddings are compared with
FP32's: cosine (mean / 1st percentile / min), and the retrieval the embeddings serve — each sentence
queries the other 999 by cosine similarity: recall@10 of FP32's 10 nearest neighbours, and the
Spearman correlation of all pairwise similarities.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from qdq_compiler.smooth import SmoothConfig  # noqa: E402

# label -> compile options; every GEMM and both attention batched matmuls INT8 (no fallback) in each
RECIPES = {
    "qdqc default (smooth auto + OS+ shifts, p99.999, split, GPTQ)": {},
    "qdqc smooth auto, p99.999, nearest": {"weights": "nearest", "split": False},
    "qdqc mse, no smoothing, GPTQ": {"smooth": "off", "method": "mse", "split": False},
    "pytorch-quantization defaults": {"smooth": "off", "method": "percentile", "percentile": 99.99,
                                      "weights": "nearest", "split": False},
}
# rows measured for the last gap to FP32 (README, "Task-level fidelity"), on demand: --rows NAME,...
EXTRA = {
    "no-shift": ("qdqc default without OS+ shifts (--no-shift)", {"shift": False}),
    "no-split": ("qdqc default without outlier channel splitting (--no-split)", {"split": False}),
    "value-fold": ("qdqc default + smoothing through V", {"smooth": SmoothConfig(None, through_value=True)}),
    "smooth-mse": ("qdqc smooth auto, mse, GPTQ", {"method": "mse"}),
    "batch-1": ("qdqc default, statistics without padding (batch 1)", {"batch_size": 1}),
    **{mode: (f"qdqc default recipe, insert --mode {mode}", {"mode": mode}) for mode in ("ft2", "ft3", "trt")},
}


def metrics(reference: np.ndarray, found: np.ndarray) -> dict:
    from qdq_compiler.evaluate import cosines, recall_at_k, similarity_spearman

    values = cosines(reference, found)
    return {"mean": float(values.mean()), "p1": float(np.percentile(values, 1)), "min": float(values.min()),
            "recall@10": recall_at_k(reference, found, 10), "spearman": similarity_spearman(reference, found)}


def main() -> None:
    import qdq_compiler
    from qdq_compiler.evaluate import embeddings, open_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where minilm.onnx is (exported if missing) and models go")
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--recipe", type=Path, action="append", default=[],
                        help="also a row per recipe file: the default options with that recipe (`compile --recipe`)")
    parser.add_argument("--only", choices=["all", "default"], default="all",
                        help="default: only the default row (and the --recipe rows), no baselines")
    parser.add_argument("--rows", default="", help=f"also these rows, comma-separated: {', '.join(EXTRA)}")
    parser.add_argument("--targets", default="onnxruntime,tensorrt")
    args = parser.parse_args()
    unknown = [name for name in args.rows.split(",") if name and name not in EXTRA]
    if unknown:
        parser.error(f"--rows: unknown row {unknown[0]!r} (known: {', '.join(EXTRA)})")
    recipes = dict(RECIPES) if args.only == "all" else {k: v for k, v in RECIPES.items() if not v}
    recipes.update(EXTRA[name] for name in args.rows.split(",") if name)
    recipes.update({f"qdqc default + recipe {path.name}": {"recipe": path} for path in args.recipe})
    import bench_cpu  # tools/: onnxruntime's own quantizers, built the same way as in the latency table

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model, calibration, evaluation = bench_cpu.minilm_inputs(folder, args.eval)
        reference = embeddings(open_session(model), evaluation)
        rows = []
        for label, options in recipes.items():
            started = time.perf_counter()
            inserted = qdq_compiler.insert(model, recipe=options.get("recipe"), mode=options.get("mode"))
            calibrated = qdq_compiler.calibrate(inserted, calibration, quiet=True,
                                                **{k: v for k, v in options.items() if k not in ("mode", "recipe")})
            seconds = time.perf_counter() - started
            for target in args.targets.split(","):
                lowered = qdq_compiler.lower(calibrated, target=target)
                session = bench_cpu.tensorrt_graph_session(lowered.model) if target == "tensorrt" \
                    else open_session(lowered.model)
                rows.append((f"{label} [{target}]", metrics(reference, embeddings(session, evaluation)), seconds))
                print_row(*rows[-1])
        if args.only == "default":
            return
        for label, path in (("ORT quantize_dynamic (per-channel)", bench_cpu.build_dynamic(model, folder)),
                            ("ORT quantize_static (FT placement, p99.999)",
                             bench_cpu.build_static(model, calibration, folder, 128))):
            rows.append((label, metrics(reference, embeddings(open_session(path), evaluation)), None))
            print_row(*rows[-1])


def print_row(label: str, found: dict, seconds: float | None) -> None:
    timing = f"{seconds:6.1f}" if seconds is not None else f"{'-':>6}"
    print(f"{label:58} {found['mean']:.5f} {found['p1']:.5f} {found['min']:.5f} {found['recall@10']:.4f} "
          f"{found['spearman']:.5f} {timing}", flush=True)


if __name__ == "__main__":
    print(f"{'recipe [target]':58} {'mean':>7} {'p1':>7} {'min':>7} {'R@10':>6} {'rho':>7} {'cal s':>6}")
    main()
