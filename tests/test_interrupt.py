"""SIGINT / SIGTERM while an output is being written: nothing at the output path, no temp files, input intact.

The command runs in a subprocess whose `os.replace` (the rename that publishes every output) first says
WRITING and sleeps, so the signal lands inside the write phase every time, temp file on disk.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest

from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import ROOT

HARNESS = """
import os, signal, sys, time
# a shell starting a background job (CI) makes it ignore SIGINT, and Python keeps that: restore the
# interactive default, where Ctrl-C raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
real = os.replace
def slow_replace(src, dst):
    print("WRITING", flush=True)
    time.sleep(60)
    real(src, dst)
os.replace = slow_replace
from qdq_compiler.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    spec = BertSpec(layers=1)
    model = root / "bert.onnx"
    onnx.save(build_bert(spec), model)
    data = root / "d.npz"
    np.savez(data, **example_inputs(spec, batch=4, seq=16))
    assert subprocess.run([sys.executable, "-m", "qdq_compiler.cli", "insert", model, "-o", root / "q.onnx"],
                          capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, "-m", "qdq_compiler.cli", "calibrate", root / "q.onnx", "--data", data,
                           "-o", root / "c.onnx", "--stats", root / "s.npz"], capture_output=True).returncode == 0
    return root


COMMANDS = [("insert", "{root}/bert.onnx", "-o", "{out}/m.onnx"),
            ("calibrate", "{root}/q.onnx", "--data", "{root}/d.npz", "-o", "{out}/m.onnx"),
            ("lower", "{root}/c.onnx", "-o", "{out}/m.onnx"),
            ("calibrate", "merge", "{root}/s.npz", "{root}/s.npz", "-o", "{out}/m.npz")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", COMMANDS[:3] + [COMMANDS[3][:3] + ("{root}/s2.npz",) + COMMANDS[3][4:]],
                         ids=["insert", "calibrate", "lower", "merge"])
def test_interrupted_write_leaves_nothing(inputs, tmp_path, signum, command):
    (inputs / "s2.npz").write_bytes((inputs / "s.npz").read_bytes())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()}
    argv = [part.format(root=inputs, out=tmp_path) for part in command]
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert any(p.name.startswith(".qdqc-") for p in tmp_path.iterdir())   # the write is under way
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []          # no output, no temp file or folder
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()} == before
