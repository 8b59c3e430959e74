"""A lowered model against its fake-quant model on CPUs this machine does not have, emulated by qemu-user.

    python tools/check_isa.py FAKE_QUANT.onnx LOWERED.onnx [LOWERED2.onnx ...] --data eval.npz [--samples 16]

Each lowered model runs under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI: onnxruntime's
VPMADDUBSW kernels), `.arm64/run` with QEMU_CPU=max (ARM64 with dot products) and cortex-a72 (without),
and natively; the fake-quant model runs natively with onnxruntime's graph optimizations off (its Q/DQ as
float arithmetic). Prints the per-sample cosine (mean / min over attended tokens) of each against it.
Emulation is slow (about a minute per model and CPU for 16 MiniLM sentences); it is exact. A model
that passes on the Cortex-A72 row may still wrap on another input there (a (−128)·(−128) pair): qdqc
refuses `--isa vnni` models on ARM64 without dot products whatever this tool shows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qdq_compiler.cpu import host
from qdq_compiler.evaluate import open_session

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "isa_scripts" / "run_model.py"


def cpus() -> dict[str, tuple[list[str], dict]]:
    found = {f"native ({host().describe()})": ([sys.executable], {})}
    if shutil.which("qemu-x86_64"):
        found["x86-64 Haswell: AVX2, no VNNI (qemu)"] = (["qemu-x86_64", "-cpu", "Haswell", sys.executable], {})
    if (ROOT / ".arm64" / "run").exists():
        for cpu, label in (("max", "ARM64 with dot products (qemu max)"), ("cortex-a72", "ARM64 Cortex-A72, no dot products (qemu)")):
            found[label] = ([str(ROOT / ".arm64" / "run")], {"QEMU_CPU": cpu})
    return found


def cosine_rows(reference: np.ndarray, found: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows = []
    for i in range(len(mask)):
        a, b = reference[i][mask[i].astype(bool)].ravel(), found[i][mask[i].astype(bool)].ravel()
        rows.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fake_quant", type=Path)
    parser.add_argument("lowered", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True, help="npz of model inputs (samples on axis 0)")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    feeds = {k: v[:args.samples] for k, v in np.load(args.data).items()}
    session = open_session(args.fake_quant, optimize=False)
    reference = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        for model in args.lowered:
            for label, (command, env) in cpus().items():
                out = Path(tmp) / "out.npz"
                done = subprocess.run([*command, str(RUNNER), str(model), str(Path(tmp) / "feeds.npz"), str(out)],
                                      capture_output=True, text=True, env={**os.environ, **env})
                if done.returncode:
                    print(f"{model.name:32} {label:46} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                rows = cosine_rows(reference, np.load(out)["output"], feeds["attention_mask"])
                print(f"{model.name:32} {label:46} cosine vs fake-quant: mean {rows.mean():.6f} min {rows.min():.6f}",
                      flush=True)


if __name__ == "__main__":
    main()
