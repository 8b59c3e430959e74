"""CPU INT8 side by side: FP32, qdqc (`qdq_compiler.compile`: insert ft1 -> [smooth] -> calibrate -> lower),
onnxruntime's quantize_dynamic (per-channel) and quantize_static (QDQ, FasterTransformer placement:
MatMul inputs only, Percentile) — on the real all-MiniLM-L6-v2 (fidelity + latency) and a
BERT-base-shaped model (latency).

    python tools/bench_cpu.py [--rounds 15] [--eval 1000] [--models minilm,bert-base]

Latency: seq 128, batch 1 and 8, intra-op threads 2, thread spinning off, all variants of a
model interleaved round by round in this one process; median and p90 ms, and each variant's
speed-up over FP32 (FP32 median / variant median). Fidelity: cosine of mean-pooled embeddings
against FP32 on real sentences not used for calibration.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from qdq_compiler.bench import interleaved, p90

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SEQ = 128


def gemm_weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    consumers = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, index))
    total = 0
    for tensor in model.graph.initializer:
        uses = consumers.get(tensor.name, [])
        if len(tensor.dims) == 2 and min(tensor.dims) >= 64 and all(op != "Gather" for op, _ in uses):
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


OURS = {"qdqc ft1 mse, lowered": {"smooth": "off", "method": "mse"},
        "qdqc ft1 defaults (smooth auto p99.999)": {}}


def build_ours(model: Path, calibration: Path, folder: Path, options: dict) -> Path:
    import qdq_compiler

    lowered = folder / f"qdqc{len(options)}.int8.onnx"
    qdq_compiler.compile(model, calibration, quiet=True, **options).save(lowered, overwrite=True)
    return lowered


def build_dynamic(model: Path, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / "ort_dynamic.onnx"
    quantize_dynamic(str(model), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def build_static(model: Path, calibration: Path, folder: Path, samples: int, method: str = "Percentile") -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    data = {k: v[:samples] for k, v in np.load(calibration).items()}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + 16] for k, v in data.items()} for i in range(0, samples, 16)])

        def get_next(self):
            return next(self.batches, None)

    out = folder / "ort_static.onnx"
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": True, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                   "CalibPercentile": 99.999})
    return out


def latency(paths: dict[str, Path], feeds_by_batch: dict[int, dict], rounds: int) -> dict:
    from qdq_compiler.evaluate import open_session

    sessions = {name: open_session(path, threads=2) for name, path in paths.items()}
    return {batch: interleaved({name: partial(session.run, None, feeds) for name, session in sessions.items()},
                               rounds)
            for batch, feeds in feeds_by_batch.items()}


def report(title: str, paths: dict[str, Path], timings: dict, fidelity: dict | None,
           fidelity_only: dict[str, Path] | None = None) -> None:
    print(f"\n{title}")
    header = f"{'variant':40}"
    if fidelity:
        header += f" {'cos mean':>9} {'cos min':>8}"
    for batch in timings:
        header += f" {'b' + str(batch) + ' med ms':>11} {'p90':>7} {'vs FP32':>8}"
    header += f" {'GEMM weights MiB':>17}"
    print(header)
    for name, path in paths.items():
        line = f"{name:40}"
        if fidelity:
            mean, low = fidelity[name]
            line += f" {mean:9.4f} {low:8.4f}"
        for times in timings.values():
            median = statistics.median(times[name])
            line += f" {median:11.1f} {p90(times[name]):7.1f} {statistics.median(times['FP32']) / median:7.2f}x"
        line += f" {gemm_weight_bytes(path) / 2**20:17.1f}"
        print(line, flush=True)
    for name, path in (fidelity_only or {}).items():  # no CPU latency: its target is a GPU
        mean, low = fidelity[name]
        line = f"{name:28} {mean:9.4f} {low:8.4f}" + "".join(f" {'-':>11} {'-':>7} {'-':>8}" for _ in timings)
        print(line + f" {gemm_weight_bytes(path) / 2**20:17.1f}", flush=True)


def tensorrt_graph_session(path: Path):
    """onnxruntime running a `--target tensorrt` graph (FP16 + INT8 Q/DQ): the engine's numerics until a
    GPU runs the engine. Unoptimized when onnxruntime's fusions reject the FP16 graph."""
    from qdq_compiler.evaluate import open_session

    try:
        return open_session(path)
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph types for a fusion it cannot type
        return open_session(path, optimize=False)


def minilm_inputs(folder: Path, evaluation_samples: int) -> tuple[Path, Path, dict]:
    """The real MiniLM (exported once), its calibration npz (256 sentences) and the evaluation feeds."""
    from qdq_compiler.hf_export import corpus, encode, export

    model = folder / "minilm.onnx"
    if not model.exists():
        export("minilm", model, exporter="torchscript", opset=17)
    calibration = folder / "minilm.calib.npz"
    np.savez(calibration, **encode(corpus("calibration")))
    return model, calibration, encode(corpus("evaluation")[:evaluation_samples])


def run_minilm(folder: Path, args, tensorrt_graph: Path | None = None) -> None:
    """The table; `tensorrt_graph` adds a fidelity-only row for the TensorRT graph run by onnxruntime."""
    from qdq_compiler.evaluate import cosines, embeddings, open_session
    from qdq_compiler.hf_export import corpus, encode

    model, calibration, evaluation = minilm_inputs(folder, args.eval)
    paths = {"FP32": model, **{name: build_ours(model, calibration, folder, options) for name, options in OURS.items()},
             "ORT quantize_dynamic": build_dynamic(model, folder),
             f"ORT quantize_static ({args.static_samples} s.)": build_static(model, calibration, folder,
                                                                          args.static_samples)}
    reference = embeddings(open_session(model), evaluation)
    fidelity = {}
    for name, path in paths.items():
        found = cosines(reference, embeddings(open_session(path), evaluation))
        fidelity[name] = (float(found.mean()), float(found.min()))
    fidelity_only = {}
    if tensorrt_graph is not None:
        name = "qdqc TensorRT graph (ORT)"
        found = cosines(reference, embeddings(tensorrt_graph_session(tensorrt_graph), evaluation))
        fidelity[name], fidelity_only[name] = (float(found.mean()), float(found.min())), tensorrt_graph
    feeds = {b: {k: v[:b] for k, v in encode(corpus("evaluation")[:8]).items()} for b in (1, 8)}
    report(f"all-MiniLM-L6-v2 (real weights), fidelity on {args.eval} real sentences, latency at seq {SEQ}",
           paths, latency(paths, feeds, args.rounds), fidelity, fidelity_only)


def run_bert_base(folder: Path, args) -> None:
    import onnx

    from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

    spec = BertSpec(layers=12, hidden=768, heads=12, vocab=30522, max_positions=512, opset=17, seed=3)
    model = folder / "bert_base.onnx"
    onnx.save(build_bert(spec), model)
    calibration = folder / "bert_base.calib.npz"
    feeds = example_inputs(spec, batch=64, seq=SEQ, seed=5)
    feeds["attention_mask"][:] = 1
    np.savez(calibration, **feeds)
    paths = {"FP32": model, **{name: build_ours(model, calibration, folder, options) for name, options in OURS.items()},
             "ORT quantize_dynamic": build_dynamic(model, folder),
             # its Percentile calibrator fails on this model ("Too many bins for data range"): MinMax
             "ORT quantize_static MinMax": build_static(model, calibration, folder, 32, "MinMax")}
    batches = {b: {k: v[:b] for k, v in example_inputs(spec, batch=8, seq=SEQ, seed=6).items()} for b in (1, 8)}
    for batch in batches.values():
        batch["attention_mask"][:] = 1
    report(f"BERT-base shape (12 layers, hidden 768, random weights), latency at seq {SEQ}",
           paths, latency(paths, batches, max(5, args.rounds // 2)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--static-samples", type=int, default=128)
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"onnxruntime CPU, {os.cpu_count()} cores, intra-op threads 2, spinning off, "
              f"{args.rounds} interleaved rounds")
        if "minilm" in args.models:
            run_minilm(folder, args)
        if "bert-base" in args.models:
            run_bert_base(folder, args)


if __name__ == "__main__":
    main()
