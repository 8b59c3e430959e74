"""The main job on the embedded default: the real all-MiniLM-L6-v2 through qdqc.

Exports the model with torch.onnx (TorchScript exporter, opset 17), inserts
Q/DQ at the FasterTransformer sites (`qdqc insert`), lints the result
(`qdqc check`) and prints the site summary. Artifacts go to ./artifacts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdq_compiler.cli import main as qdqc
from qdq_compiler.hf_export import export

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    print("$ qdqc " + " ".join(args), flush=True)
    code = qdqc(list(args))
    if code:
        sys.exit(code)


def print_sites(report_path: Path) -> None:
    report = json.loads(report_path.read_text())
    print(f"\nsites per layer (mode {report['mode']}):")
    print(f"{'layer':>5}  {'quantizers':>10}  {'sites':>5}  {'per-channel weights':>19}  shared LN-output quantizer")
    for layer in report["layers"]:
        sites = layer["sites"]
        distinct = {s["tensor"] for s in sites.values()}
        per_channel = sum(s["granularity"] == "per-channel" for s in sites.values())
        readers = ["query.input"] + [s.split(".", 1)[1] for s in sites.get("query.input", {}).get("shared_with", [])]
        shared = ", ".join(readers) if "query.input" in sites else "-"
        print(f"{layer['index']:>5}  {len(distinct):>10}  {len(sites):>5}  {per_channel:>19}  {shared}")
    print(f"unmatched GEMMs: {len(report['unmatched_gemms'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--mode", default="ft1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "minilm.onnx"
    if not model.exists():
        print(f"exporting all-MiniLM-L6-v2 (real weights) to {model}", flush=True)
        export("minilm", model, exporter="torchscript", opset=17)
    qdq, report = args.out / "minilm.qdq.onnx", args.out / "minilm.sites.json"
    run("insert", str(model), "-o", str(qdq), "--mode", args.mode, "--report", str(report), "--verify")
    run("check", str(qdq))
    print_sites(report)


if __name__ == "__main__":
    main()
