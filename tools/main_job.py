"""The main job on the embedded default: the real all-MiniLM-L6-v2 through qdqc's Python API.

Exports the model with torch.onnx (TorchScript exporter, opset 17), tokenizes the real sentences
shipped with qdqc with the model's own tokenizer (`qdq_compiler.calibration_data`: 256 to
calibrate, 1000 others to evaluate), inserts Q/DQ at the FasterTransformer sites and lints the
result, calibrates (one pass, every method from the saved statistics, and SmoothQuant), compiles
with the defaults (text -> data -> `qdq_compiler.compile`), measures fidelity against FP32 on the
1000 evaluation sentences (cosine of mean-pooled embeddings), lowers for TensorRT (FP16 + INT8,
checked by TensorRT's parser) and, with OpenVINO installed, for OpenVINO (minilm.openvino.xml),
prints the table of fidelity and CPU latency at batch 1/8 x seq 128/384 for FP32, qdqc and
onnxruntime's own quantizers, and OpenVINO FP32 (f32 and its bf16 default), NNCF INT8 and qdqc's
OpenVINO target (tools/bench_cpu.py; the TensorRT graph's fidelity as onnxruntime runs it), and ends by building the FP32 and INT8 engines with TensorRT-RTX (no GPU needed). Artifacts
go to ./artifacts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import qdq_compiler
from qdq_compiler.cpu import host
from qdq_compiler.errors import QdqcError
from qdq_compiler.evaluate import cosines, embeddings, open_session
from qdq_compiler.hf_export import corpus, export, minilm_dir
from qdq_compiler.text import save_npz

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("max", {}), ("percentile", {"percentile": 99.99}), ("percentile", {"percentile": 99.999}),
           ("mse", {}), ("entropy", {})]


def lint(path: Path, parse: bool = False) -> None:
    """`qdqc check [--parse]`: TensorRT's explicit-quantization rules (and its ONNX parser); stops on a violation."""
    from qdq_compiler import ir
    from qdq_compiler.check import check_graph

    violations = check_graph(ir.load(path))
    for violation in violations:
        print(violation)
    print(f"check {path.name}: {len(violations)} violation(s)", flush=True)
    if parse:
        from qdq_compiler.trt_parse import parse as trt_parse

        result = trt_parse(path)
        for error in result.errors:
            print(f"parser: {error}")
        matmuls = {k.split(":")[1]: v for k, v in result.layers.items() if k.startswith("MATRIX_MULTIPLY:")}
        print(f"TensorRT parser: {'ok' if result.ok else 'FAILED'}; matrix multiplies by output type {matmuls}")
        violations = violations or not result.ok
    if violations:
        sys.exit(1)


def print_sites(report_path: Path) -> None:
    report = json.loads(report_path.read_text())
    print(f"\nsites per layer (mode {report['mode']}):")
    print(f"{'layer':>5}  {'quantizers':>10}  {'sites':>5}  {'per-channel weights':>19}  one quantizer shared by")
    for layer in report["layers"]:
        sites = layer["sites"]
        distinct = {s["tensor"] for s in sites.values()}
        per_channel = sum(s["granularity"] == "per-channel" for s in sites.values())
        shared = sites.get("qkv.input", {}).get("shared_with", [])
        readers = ", ".join(["qkv.input"] + [s.split(".", 2)[2] for s in shared]) if shared else "-"
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
    print(f"CPU: {host().describe()}", flush=True)
    model = out / "minilm.onnx"
    if not model.exists():
        print(f"exporting all-MiniLM-L6-v2 (real weights) to {model}", flush=True)
        export("minilm", model, exporter="torchscript", opset=17)
    # text -> data, with the model's own tokenizer folder
    calibration = qdq_compiler.calibration_data(corpus("calibration"), minilm_dir())
    evaluation = qdq_compiler.calibration_data(corpus("evaluation"), minilm_dir())
    save_npz(out / "calib.npz", calibration)
    save_npz(out / "eval.npz", evaluation)

    qdq, report = out / "minilm.qdq.onnx", out / "minilm.sites.json"
    inserted = qdq_compiler.insert(model, mode=args.mode, verify=True)
    inserted.save(qdq)
    report.write_text(json.dumps(inserted.report["sites"], indent=1) + "\n")
    lint(qdq)
    print_sites(report)
    stats = out / "minilm.stats.npz"
    calibrated = qdq_compiler.calibrate(inserted, calibration, stats=stats, smooth="off", method="mse")
    calibrated.save(out / "minilm.calib.onnx")
    (out / "minilm.calib.json").write_text(json.dumps(calibrated.report["calibration"], indent=1) + "\n")
    lint(out / "minilm.calib.onnx")

    reference = embeddings(open_session(model), evaluation)

    def row(label: str, result) -> None:
        found = cosines(reference, embeddings(open_session(result.model), evaluation))
        print(f"{label:46} {found.mean():9.4f} {found.min():8.4f}", flush=True)

    print(f"\nfidelity vs FP32 on {len(reference)} real sentences not used for calibration "
          f"(256 calibration sentences, mode {args.mode}, onnxruntime):")
    print(f"{'calibration':46} {'cos mean':>9} {'cos min':>8}")
    for method, extra in METHODS:   # from the saved statistics: no new run, no smoothing
        result = qdq_compiler.calibrate(inserted, stats=stats, method=method, split=False, **extra)
        result.save(out / f"minilm.calib.{method}{extra.get('percentile', '')}.onnx")
        row(method + (f" {extra['percentile']}" if extra else ""), result)
    row("smooth 0.85 + percentile 99.999", qdq_compiler.calibrate(inserted, calibration, smooth=0.85, shift=False,
                                                                   weights="nearest", split=False))
    row("smooth auto + percentile 99.999", qdq_compiler.calibrate(inserted, calibration, shift=False,
                                                                   weights="nearest", split=False))
    row("smooth auto + percentile 99.999 + GPTQ", qdq_compiler.calibrate(inserted, calibration, shift=False,
                                                                          split=False))
    row("  + OS+ shifts", qdq_compiler.calibrate(inserted, calibration, split=False))
    smoothed = qdq_compiler.calibrate(inserted, calibration)   # the defaults: smooth auto + shifts, p99.999, split, GPTQ
    smoothed.save(out / "minilm.smooth.calib.onnx")
    row("default: + FFN2 channels split (fake-quant)", smoothed)
    compiled = qdq_compiler.compile(model, calibration)         # text -> data -> compile with the defaults
    compiled.save(out / "minilm.int8.onnx")
    row("default compile (portable, 7-bit weights)", compiled)
    print(compiled.report["check"]["line"])
    if host().vnni:   # the VNNI-only kernel form: the same function, on this CPU
        vnni = qdq_compiler.compile(model, calibration, isa="vnni")
        vnni.save(out / "minilm.int8.vnni.onnx")
        row("default compile --isa vnni (8-bit weights)", vnni)
        print(vnni.report["check"]["line"])
    print(f"compile: {compiled.report['smoothing']['sites_smoothed']} sites smoothed, timings "
          f"{compiled.report['timings']}\n", flush=True)

    qdq_compiler.lower(smoothed, target="tensorrt").save(out / "minilm.trt.onnx")
    lint(out / "minilm.trt.onnx", parse=True)
    import importlib.util

    openvino = importlib.util.find_spec("openvino") is not None
    if openvino:
        lowered = qdq_compiler.lower(smoothed, target="openvino", data=calibration)
        lowered.save(out / "minilm.openvino.xml")
        print(f"lower --target openvino: {lowered.report['check']['line']}")
    import bench_cpu  # tools/: FP32, qdqc, ORT dynamic and static, OpenVINO FP32 / NNCF / ours, side by side

    bench_cpu.run_minilm(out, argparse.Namespace(eval=1000, rounds=args.rounds, static_samples=128, batch=[1, 8],
                                                 seq=[128, 384], openvino=openvino),
                         tensorrt_graph=out / "minilm.trt.onnx")
    build_engines(out)


def build_engines(out: Path) -> None:
    """The last step: real engines, FP32 and INT8, built by TensorRT-RTX ahead of time (no GPU needed)."""
    print("\nengines (TensorRT-RTX builds ahead of time on this CPU; running them needs a GPU):", flush=True)
    from qdq_compiler.engine_build import EngineConfig, build_engine, summary_line

    fp32 = out / "minilm.fp32.plan"
    print(summary_line(build_engine(out / "minilm.onnx", fp32, EngineConfig())), flush=True)
    print(summary_line(build_engine(out / "minilm.trt.onnx", out / "minilm.int8.plan",
                                    EngineConfig(int8=True, baseline=fp32))), flush=True)


if __name__ == "__main__":
    try:
        main()
    except QdqcError as exc:   # a lowered model that diverges from its fake-quant model fails the job
        print(f"main job: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
