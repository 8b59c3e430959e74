"""Fidelity of a quantized encoder against FP32: cosine of mean-pooled embeddings."""
from __future__ import annotations

import numpy as np


def open_session(model, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def embeddings(session, feeds: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled (over attended tokens) first output for every sample."""
    from .data import trim

    names = {i.name for i in session.get_inputs()}
    count = len(feeds["attention_mask"])
    pooled = []
    for start in range(0, count, batch_size):
        batch = trim({k: v[start:start + batch_size] for k, v in feeds.items() if k in names})
        hidden = session.run(None, batch)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled.append((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))
    return np.concatenate(pooled)


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    dot = (reference * other).sum(axis=1)
    return dot / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
