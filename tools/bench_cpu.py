"""CPU INT8 side by side: FP32, qdqc (`qdq_compiler.compile`: insert ft1 -> [smooth] -> calibrate -> lower),
onnxruntime's quantize_dynamic (per-channel) and quantize_static (QDQ, FasterTransformer placement:
MatMul inputs only, Percentile), and with OpenVINO installed: OpenVINO FP32 (f32 forced, and its
default, bf16 on a CPU with avx512_bf16/AMX), NNCF INT8 (with nncf installed) and qdqc
`--target openvino` — on the real all-MiniLM-L6-v2 (fidelity + latency) and a BERT-base-shaped
model (latency, onnxruntime only).

    python tools/bench_cpu.py [--rounds 15] [--eval 1000] [--models minilm,bert-base]
        [--batch 1,8] [--seq 128,384] [--no-openvino]

Latency: every batch x seq combination, intra-op threads 2 (OpenVINO: 2 inference threads, one
stream, latency hint), onnxruntime thread spinning off, all variants of a model interleaved round
by round in this one process; median and p90 ms, and each variant's speed-up over onnxruntime
FP32 (FP32 median / variant median). Fidelity: cosine of mean-pooled embeddings against FP32 on
real sentences not used for calibration, and recall@10 of the neighbours they retrieve.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from qdq_compiler.bench import interleaved, p90
from qdq_compiler.cpu import host

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SEQ = 128
NNCF_ROW = "NNCF INT8 (OpenVINO)"
OURS_OPENVINO = "qdqc --target openvino (OpenVINO)"


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


DYNAMIC_ROW = "ORT quantize_dynamic"
OURS = {"qdqc ft1 mse, lowered": {"smooth": "off", "method": "mse", "split": False},
        "qdqc defaults (smooth auto + shifts, p99.999, split, GPTQ)": {}}
if host().vnni:   # the VNNI-only kernel form, beside the portable default, where this CPU can run it
    OURS["qdqc defaults --isa vnni"] = {"isa": "vnni"}


def build_ours(model: Path, calibration: Path, folder: Path, options: dict) -> Path:
    import qdq_compiler

    lowered = folder / f"qdqc{'.'.join(f'{k}-{v}' for k, v in sorted(options.items()))}.int8.onnx"
    qdq_compiler.compile(model, calibration, quiet=True, **options).save(lowered, overwrite=True)
    return lowered


@contextlib.contextmanager
def without_root_warnings():
    """onnxruntime's quantizers log "Please consider to run pre-processing" on the root logger: advice
    for their users, noise in this table (the peers run as a user would run them, without it)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def build_dynamic(model: Path, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / "ort_dynamic.onnx"
    with without_root_warnings():
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
    with without_root_warnings():
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                        extra_options={"ActivationSymmetric": True, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                       "CalibPercentile": 99.999})
    return out


def latency(runners: dict, feeds_by_shape: dict[tuple[int, int], dict], rounds: int) -> dict:
    """{(batch, seq): {variant: [ms, ...]}}, the variants interleaved round by round. `runners` maps a
    variant to a session-like object with `run(None, feeds)` and `get_inputs()`."""
    timings = {}
    for shape, feeds in feeds_by_shape.items():
        calls = {}
        for name, runner in runners.items():
            known = {i.name for i in runner.get_inputs()}
            calls[name] = partial(runner.run, None, {k: v for k, v in feeds.items() if k in known})
        timings[shape] = interleaved(calls, rounds)
    return timings


def sessions(paths: dict[str, Path]) -> dict:
    """A runner per variant: onnxruntime for .onnx, OpenVINO for .xml and for (path, precision) pairs."""
    from qdq_compiler.evaluate import open_session
    from qdq_compiler.openvino_backend import OpenVinoRunner

    runners = {}
    for name, path in paths.items():
        if isinstance(path, tuple):
            runners[name] = OpenVinoRunner(path[0], threads=2, precision=path[1])
        elif path.suffix == ".xml":
            runners[name] = OpenVinoRunner(path, threads=2)
        else:
            runners[name] = open_session(path, threads=2)
    return runners


def report(title: str, paths: dict, timings: dict, fidelity: dict | None,
           fidelity_only: dict[str, Path] | None = None) -> None:
    print(f"\n{title}")
    width = max(40, *(len(name) for name in [*paths, *(fidelity_only or {})]))
    header = f"{'variant':{width}}"
    if fidelity:
        header += f" {'cos mean':>9} {'cos min':>8} {'R@10':>6}"
    for batch, seq in timings:
        header += f" {f'b{batch}s{seq} med ms':>14} {'p90':>7} {'vs FP32':>8}"
    header += f" {'GEMM weights MiB':>17}"
    print(header)
    for name, path in paths.items():
        line = f"{name:{width}}"
        if fidelity:
            line += " ".join(["", *(f"{v:{w}.{d}f}" for v, (w, d) in zip(fidelity[name], ((9, 5), (8, 5), (6, 3))))])
        for times in timings.values():
            median = statistics.median(times[name])
            line += f" {median:14.1f} {p90(times[name]):7.1f} {statistics.median(times['FP32']) / median:7.2f}x"
        print(line + f" {weight_mib(path):>17}", flush=True)
    for name, path in (fidelity_only or {}).items():  # no CPU latency: its target is a GPU
        line = f"{name:{width}}" + " ".join(["", *(f"{v:{w}.{d}f}" for v, (w, d) in zip(fidelity[name], ((9, 5), (8, 5),
                                                                                                      (6, 3))))])
        line += "".join(f" {'-':>14} {'-':>7} {'-':>8}" for _ in timings)
        print(line + f" {weight_mib(path):>17}", flush=True)
    if DYNAMIC_ROW in paths:
        for name in (n for n in OURS if n in paths):
            ratios = ", ".join(f"b{b}s{s} {statistics.median(t[DYNAMIC_ROW]) / statistics.median(t[name]):.2f}x"
                               for (b, s), t in timings.items())
            print(f"{name} vs {DYNAMIC_ROW} (its median / ours): {ratios}")
    if OURS_OPENVINO in paths and NNCF_ROW in paths:
        ratios = ", ".join(f"b{b}s{s} {statistics.median(t[NNCF_ROW]) / statistics.median(t[OURS_OPENVINO]):.3f}x"
                           for (b, s), t in timings.items())
        print(f"{OURS_OPENVINO} vs {NNCF_ROW} (NNCF median / ours): {ratios}")


def weight_mib(path) -> str:
    """GEMM weight MiB of an ONNX variant; '-' for OpenVINO IR (its .bin is not ONNX)."""
    path = path[0] if isinstance(path, tuple) else path
    return "-" if path.suffix == ".xml" else f"{gemm_weight_bytes(path) / 2**20:.1f}"


def build_nncf(model: Path, calibration: Path, folder: Path) -> Path:
    """NNCF post-training INT8 as a CPU user runs it: the TRANSFORMER model type (SmoothQuant, alpha
    0.95), the MIXED preset, 256 calibration samples one at a time."""
    import nncf
    import openvino as ov

    data = dict(np.load(calibration))
    converted = ov.convert_model(str(model))
    names = [port.get_any_name() for port in converted.inputs]
    items = [{name: data[name][i:i + 1] for name in names} for i in range(len(data[names[0]]))]
    quantized = nncf.quantize(converted, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              preset=nncf.QuantizationPreset.MIXED, subset_size=min(256, len(items)))
    out = folder / "nncf.int8.xml"
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def openvino_variants(model: Path, calibration: Path, folder: Path) -> dict:
    """The OpenVINO rows: FP32 forced f32 and at OpenVINO's default precision, NNCF INT8 (if nncf is
    installed), qdqc --target openvino."""
    import importlib.util

    import qdq_compiler

    ours = folder / "qdqc.openvino.xml"
    qdq_compiler.compile(model, calibration, target="openvino", quiet=True).save(ours, overwrite=True)
    default = "bf16" if host().features["bf16"] else "f32"   # OpenVINO's own choice on this CPU
    variants = {"OpenVINO FP32 (f32)": (model, "f32"), f"OpenVINO FP32 default ({default})": (model, "default")}
    if importlib.util.find_spec("nncf") is not None:
        variants[NNCF_ROW] = build_nncf(model, calibration, folder)
    else:
        print("nncf is not installed (pip install 'qdqc[bench]'): no NNCF row")
    variants[OURS_OPENVINO] = ours
    if host().vnni:
        vnni = folder / "qdqc.openvino.vnni.xml"
        qdq_compiler.compile(model, calibration, target="openvino", isa="vnni", quiet=True).save(vnni, overwrite=True)
        variants[f"{OURS_OPENVINO} --isa vnni"] = vnni
    return variants


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
    from qdq_compiler.evaluate import cosines, embeddings, recall_at_k
    from qdq_compiler.hf_export import corpus, encode

    model, calibration, evaluation = minilm_inputs(folder, args.eval)
    paths = {"FP32": model, **{name: build_ours(model, calibration, folder, options) for name, options in OURS.items()},
             DYNAMIC_ROW: build_dynamic(model, folder),
             f"ORT quantize_static ({args.static_samples} s.)": build_static(model, calibration, folder,
                                                                          args.static_samples)}
    if args.openvino:
        paths.update(openvino_variants(model, calibration, folder))
    runners = sessions(paths)
    reference = embeddings(runners["FP32"], evaluation)
    fidelity = {}
    for name, runner in runners.items():
        found = embeddings(runner, evaluation)
        fidelity[name] = (float(cosines(reference, found).mean()), float(cosines(reference, found).min()),
                          recall_at_k(reference, found))
    fidelity_only = {}
    if tensorrt_graph is not None:
        name = "qdqc TensorRT graph (ORT)"
        found = embeddings(tensorrt_graph_session(tensorrt_graph), evaluation)
        fidelity[name] = (float(cosines(reference, found).mean()), float(cosines(reference, found).min()),
                          recall_at_k(reference, found))
        fidelity_only[name] = tensorrt_graph
    feeds = {(b, s): {k: v[:b] for k, v in encode(corpus("evaluation")[:max(args.batch)], seq=s).items()}
             for s in args.seq for b in args.batch}
    report(f"all-MiniLM-L6-v2 (real weights), fidelity on {args.eval} real sentences, latency on real sentences "
           f"padded to seq {','.join(map(str, args.seq))}", paths, latency(runners, feeds, args.rounds), fidelity,
           fidelity_only)


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
             DYNAMIC_ROW: build_dynamic(model, folder),
             # its Percentile calibrator fails on this model ("Too many bins for data range"): MinMax
             "ORT quantize_static MinMax": build_static(model, calibration, folder, 32, "MinMax")}
    batches = {(b, SEQ): {k: v[:b] for k, v in example_inputs(spec, batch=8, seq=SEQ, seed=6).items()}
               for b in (1, 8)}
    for batch in batches.values():
        batch["attention_mask"][:] = 1
    report(f"BERT-base shape (12 layers, hidden 768, random weights), latency at seq {SEQ}",
           paths, latency(sessions(paths), batches, max(5, args.rounds // 2)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--static-samples", type=int, default=128)
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    parser.add_argument("--seq", default=str(SEQ), help="sequence lengths (comma-separated), e.g. 128,384")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="leave out the OpenVINO rows (default: with them when openvino is installed)")
    args = parser.parse_args()
    try:
        args.batch, args.seq = [int(v) for v in args.batch.split(",")], [int(v) for v in args.seq.split(",")]
    except ValueError:
        parser.error("--batch and --seq take comma-separated integers")
    if min(args.batch + args.seq) < 1 or max(args.seq) > 512:
        parser.error("--batch must be at least 1 and --seq within 1..512")
    import importlib.util

    args.openvino = args.openvino and importlib.util.find_spec("openvino") is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"CPU: {host().describe()}")
        print(f"onnxruntime CPU, {os.cpu_count()} cores, intra-op threads 2, spinning off"
              + ("; OpenVINO 2 threads, 1 stream" if args.openvino else "") + f"; {args.rounds} interleaved rounds")
        if "minilm" in args.models:
            run_minilm(folder, args)
        if "bert-base" in args.models:
            run_bert_base(folder, args)


if __name__ == "__main__":
    main()
