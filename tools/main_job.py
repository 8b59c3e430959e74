"""The main job on the embedded default: the real all-MiniLM-L6-v2 through qdqc.

Exports the model with torch.onnx (TorchScript exporter, opset 17), inserts Q/DQ at
the FasterTransformer sites (`qdqc insert`), lints the result (`qdqc check`),
calibrates on 256 real sentences shipped with qdqc (`qdqc calibrate`, one pass, all
methods from the saved statistics, and SmoothQuant), measures fidelity against FP32 on
1000 other real sentences (cosine of mean-pooled embeddings), lowers for onnxruntime
(integer GEMMs) and TensorRT (FP16 + INT8, checked by TensorRT's parser), prints the table of
fidelity and CPU latency for FP32, qdqc and onnxruntime's own quantizers (tools/bench_cpu.py; the
TensorRT graph's fidelity as onnxruntime runs it), and ends by building the FP32 and INT8 engines
with TensorRT-RTX (no GPU needed). Artifacts go to ./artifacts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qdq_compiler.cli import main as qdqc
from qdq_compiler.evaluate import cosines, embeddings, open_session
from qdq_compiler.hf_export import corpus, encode, export

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("max", []), ("percentile", ["--percentile", "99.99"]), ("percentile", ["--percentile", "99.999"]),
           ("mse", []), ("entropy", [])]


def run(*args: str) -> None:
    print("$ qdqc " + " ".join(args), flush=True)
    code = qdqc(list(args))
    if code:
        sys.exit(code)


def print_sites(report_path: Path) -> None:
    report = json.loads(report_path.read_text())
    print(f"\nsites per layer (mode {report['mode']}):")
    print(f"{'layer':>5}  {'quantizers':>10}  {'sites':>5}  {'per-channel weights':>19}  one quantizer shared by")
    for layer in report["layers"]:
        sites = layer["sites"]
        distinct = {s["tensor"] for s in sites.values()}
        per_channel = sum(s["granularity"] == "per-channel" for s in sites.values())
        shared = sites.get("query.input", {}).get("shared_with", [])
        readers = ", ".join(["query.input"] + [s.split(".", 1)[1] for s in shared]) if shared else "-"
        print(f"{layer['index']:>5}  {len(distinct):>10}  {len(sites):>5}  {per_channel:>19}  {readers}")
    print(f"unmatched GEMMs: {len(report['unmatched_gemms'])}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--mode", default="ft1")
    parser.add_argument("--rounds", type=int, default=15, help="latency rounds in the final table")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / "minilm.onnx"
    if not model.exists():
        print(f"exporting all-MiniLM-L6-v2 (real weights) to {model}", flush=True)
        export("minilm", model, exporter="torchscript", opset=17)
    calibration, evaluation = out / "calib.npz", out / "eval.npz"
    np.savez(calibration, **encode(corpus("calibration")))
    np.savez(evaluation, **encode(corpus("evaluation")))

    qdq, report = out / "minilm.qdq.onnx", out / "minilm.sites.json"
    run("insert", str(model), "-o", str(qdq), "--mode", args.mode, "--report", str(report), "--verify")
    run("check", str(qdq))
    print_sites(report)
    stats = out / "minilm.stats.npz"
    run("calibrate", str(qdq), "--data", str(calibration), "--stats", str(stats), "--method", "mse",
        "--report", str(out / "minilm.calib.json"), "-o", str(out / "minilm.calib.onnx"))
    run("check", str(out / "minilm.calib.onnx"))

    feeds = {k: v for k, v in np.load(evaluation).items()}
    reference = embeddings(open_session(model), feeds)
    print(f"\nfidelity vs FP32 on {len(reference)} real sentences not used for calibration "
          f"(256 calibration sentences, mode {args.mode}, onnxruntime fake-quant):")
    print(f"{'calibration':22} {'cos mean':>9} {'cos min':>8}")
    for method, extra in METHODS:
        target = out / f"minilm.calib.{method}{''.join(extra[1:])}.onnx"
        code = qdqc(["calibrate", str(qdq), "--stats", str(stats), "--method", method, *extra, "-o", str(target),
                     "--quiet"])
        if code:
            sys.exit(code)
        found = cosines(reference, embeddings(open_session(target), feeds))
        label = method + (f" {extra[1]}" if extra else "")
        print(f"{label:22} {found.mean():9.4f} {found.min():8.4f}", flush=True)
    smoothed = out / "minilm.smooth.calib.onnx"
    code = qdqc(["calibrate", str(qdq), "--data", str(calibration), "--smooth", "auto", "--method", "percentile",
                 "--percentile", "99.999", "-o", str(smoothed), "--quiet"])
    if code:
        sys.exit(code)
    found = cosines(reference, embeddings(open_session(smoothed), feeds))
    print(f"{'smooth auto + p99.999':22} {found.mean():9.4f} {found.min():8.4f}\n", flush=True)

    run("lower", str(smoothed), "--target", "onnxruntime", "-o", str(out / "minilm.int8.onnx"))
    run("lower", str(smoothed), "--target", "tensorrt", "-o", str(out / "minilm.trt.onnx"))
    run("check", str(out / "minilm.trt.onnx"), "--parse")
    import bench_cpu  # tools/: FP32, qdqc (insert -> mse -> lower), ORT dynamic and static, side by side

    bench_cpu.run_minilm(out, argparse.Namespace(eval=1000, rounds=args.rounds, static_samples=128),
                         tensorrt_graph=out / "minilm.trt.onnx")
    build_engines(out)


def build_engines(out: Path) -> None:
    """The last step: real engines, FP32 and INT8, built by TensorRT-RTX ahead of time (no GPU needed)."""
    print("\nengines (TensorRT-RTX builds ahead of time on this CPU; running them needs a GPU):", flush=True)
    fp32 = out / "minilm.fp32.plan"
    run("build-engine", str(out / "minilm.onnx"), "-o", str(fp32))
    run("build-engine", str(out / "minilm.trt.onnx"), "-o", str(out / "minilm.int8.plan"), "--int8",
        "--baseline", str(fp32))


if __name__ == "__main__":
    main()
