"""Calibration cost on the real all-MiniLM-L6-v2: qdqc vs plain inference vs onnxruntime's calibrators.

    python tools/bench_calibrate.py [--rounds 3] [--samples 256] [--batch-size 16]

1. Time, rounds interleaved in one process: plain FP32 onnxruntime inference over the
   calibration data (padded to 128 as stored, and with trailing padding trimmed as qdqc
   does), and `qdqc calibrate`'s full pass (session, collection, all four methods' amax).
2. Peak RSS of `qdqc calibrate` on 256 and 1024 samples, each in a fresh process.
3. onnxruntime.quantization's MinMax / Entropy / Percentile calibrators on the same model and
   data (MatMul tensors, the FasterTransformer placement), each in a fresh process: time, RSS.
Needs the `dev` extra (torch, transformers) to export the model and tokenize the sentences.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qdq_compiler.bench import p90

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def peak_rss_mib() -> float:
    """VmHWM: this process's own peak (ru_maxrss survives exec and would report the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(folder: Path, samples: int) -> tuple[Path, Path, Path]:
    from qdq_compiler import ir
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.hf_export import encode, export
    from importlib.resources import files

    model, qdq = folder / "minilm.onnx", folder / "minilm.qdq.onnx"
    if not model.exists():
        export("minilm", model, exporter="torchscript", opset=17)
    graph = ir.load(model)
    from qdq_compiler.insert import insert

    insert(graph, InsertConfig("ft1"))
    ir.save(graph, qdq)
    lines = files("qdq_compiler").joinpath("data/sentences.txt").read_text().splitlines()
    for count in {samples, 1024}:
        np.savez(folder / f"data{count}.npz", **encode(lines[:count]))
    return model, qdq, folder / f"data{samples}.npz"


def child(args) -> None:
    """One measured run in a fresh process: prints JSON with seconds and peak RSS."""
    start = time.perf_counter()
    if args.child == "qdqc":
        from qdq_compiler import ir
        from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
        from qdq_compiler.data import Dataset

        graph = ir.load(args.model)
        calibrate(graph, Dataset(args.data, model_inputs(graph)),
                  CalibrationConfig(batch_size=args.batch_size, progress=False))
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

        data = dict(np.load(args.data))

        class Reader(CalibrationDataReader):
            def __init__(self):
                count = len(data["input_ids"])
                self.batches = iter([{k: v[i:i + args.batch_size] for k, v in data.items()}
                                     for i in range(0, count, args.batch_size)])

            def get_next(self):
                return next(self.batches, None)

        method = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
                  "ort-percentile": CalibrationMethod.Percentile}[args.child]
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(args.model, ["MatMul"], augmented_model_path=f"{tmp}/aug.onnx",
                                           calibrate_method=method, extra_options={"symmetric": True})
            calibrator.collect_data(Reader())
            calibrator.compute_data()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}))


def spawn(kind: str, model: Path, data: Path, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--model", str(model), "--data", str(data),
                          "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(model: Path, qdq: Path, data: Path, rounds: int, batch_size: int) -> dict[str, list[float]]:
    from qdq_compiler import ir
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.data import Dataset
    from qdq_compiler.evaluate import open_session

    def plain(trim: bool) -> float:
        start = time.perf_counter()
        session = open_session(model)
        for feeds in Dataset(data, model_inputs(ir.load(model))).batches(batch_size, trim_padding=trim):
            session.run(None, feeds)
        return time.perf_counter() - start

    def ours() -> float:
        start = time.perf_counter()
        graph = ir.load(qdq)
        calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(batch_size=batch_size, progress=False))
        return time.perf_counter() - start

    results = {"fp32 inference, padded to 128": [], "fp32 inference, padding trimmed": [], "qdqc calibrate": []}
    for _ in range(rounds):
        results["fp32 inference, padded to 128"].append(plain(False))
        results["fp32 inference, padding trimmed"].append(plain(True))
        results["qdqc calibrate"].append(ours())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--folder", type=Path, default=Path("artifacts/bench_calibrate"))
    parser.add_argument("--child")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.folder.mkdir(parents=True, exist_ok=True)
    model, qdq, data = prepare(args.folder, args.samples)
    print(f"all-MiniLM-L6-v2, {args.samples} real sentences at seq 128, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, {args.rounds} interleaved rounds")
    results = timing(model, qdq, data, args.rounds, args.batch_size)
    base = statistics.median(results["fp32 inference, padded to 128"])
    trimmed = statistics.median(results["fp32 inference, padding trimmed"])
    print(f"\n{'run':34} {'median s':>9} {'p90 s':>7} {'/ padded':>9} {'/ trimmed':>10}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:34} {median:9.2f} {p90(values):7.2f} {median / base:9.2f} {median / trimmed:10.2f}")
    print(f"\n{'fresh process':34} {'seconds':>9} {'peak RSS MiB':>13}")
    for kind, source in (("qdqc", data), ("qdqc", args.folder / "data1024.npz")):
        run = spawn(kind, qdq, source, args.batch_size)
        label = f"qdqc calibrate, {'1024' if '1024' in source.name else args.samples} samples"
        print(f"{label:34} {run['seconds']:9.2f} {run['peak_rss_mib']:13.0f}")
    for kind in ("ort-minmax", "ort-entropy", "ort-percentile"):
        run = spawn(kind, model, data, args.batch_size)
        print(f"{kind + ', ' + str(args.samples) + ' samples':34} {run['seconds']:9.2f} {run['peak_rss_mib']:13.0f}")


if __name__ == "__main__":
    main()
