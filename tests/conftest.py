import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from qdq_compiler import ir
from qdq_compiler.synthetic import BertSpec, build_bert

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_model(model, feeds):
    if isinstance(model, gs.Graph):
        model = ir.to_model(model)
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def graph_of(spec: BertSpec = BertSpec()) -> gs.Graph:
    return gs.import_onnx(build_bert(spec))


def calibrated_bert(tmp_path, spec: BertSpec = BertSpec(), mode: str = "ft1", *, batch: int = 16,
                    seed: int = 4) -> tuple[gs.Graph, Path]:
    """A synthetic BERT with Q/DQ inserted and max-calibrated, and its calibration npz."""
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.insert import insert
    from qdq_compiler.synthetic import example_inputs

    data = tmp_path / "calib.npz"
    np.savez(data, **example_inputs(spec, batch=batch, seq=16, seed=seed))
    graph = graph_of(spec)
    insert(graph, InsertConfig(mode))
    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("max", progress=False))
    return graph, data


def qdqc(*args, cwd=None):
    """Run the CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "qdq_compiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture
def bert_file(tmp_path):
    path = tmp_path / "bert.onnx"
    onnx.save(build_bert(BertSpec()), path)
    return path
