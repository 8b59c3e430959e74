"""Fidelity of a quantized encoder against FP32: cosine of mean-pooled embeddings."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir


def open_session(model, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        from .calibrate import ort_message
        from .errors import QdqcError

        raise QdqcError(f"onnxruntime cannot load {'the model' if hasattr(model, 'SerializeToString') else model}: "
                        f"{ort_message(exc)}") from None


def embeddings(session, feeds: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled (over attended tokens) first output for every sample."""
    from .calibrate import run
    from .data import trim

    names = {i.name for i in session.get_inputs()}
    count = len(feeds["attention_mask"])
    pooled = []
    for start in range(0, count, batch_size):
        batch = trim({k: v[start:start + batch_size] for k, v in feeds.items() if k in names})
        hidden = run(session, None, batch, f"evaluation samples {start}..{start + len(batch['attention_mask']) - 1}")[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled.append((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))
    return np.concatenate(pooled)


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    dot = (reference * other).sum(axis=1)
    return dot / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))


def exact_accumulation(graph):
    """A copy of a fake-quant graph whose quantized GEMMs (both operands dequantized) multiply
    and accumulate in float64 and round once to float32.

    That is what an integer GEMM computes from the same operands: its int32 sum is exact, while
    float32 accumulation rounds every partial sum, and a re-quantizer downstream can then land
    on the neighbouring level. It is the reference against which a lowered model's agreement
    with its fake-quant model is measured (tools/agreement.py)."""
    import onnx
    import onnx_graphsurgeon as gs

    from . import ir
    from .graph import is_dequantized

    graph = graph.copy()
    names = ir.Names(graph)
    for node in list(graph.nodes):
        if node.op not in ("MatMul", "Gemm") or not all(is_dequantized(t) for t in node.inputs[:2]):
            continue
        for index, tensor in enumerate(node.inputs):
            wide = gs.Variable(names.fresh(f"{tensor.name}::f64"), dtype=np.float64)
            graph.nodes.append(gs.Node("Cast", names.fresh(f"{tensor.name}::to_f64"), {"to": onnx.TensorProto.DOUBLE},
                                       inputs=[tensor], outputs=[wide]))
            node.inputs[index] = wide
        result = node.outputs[0]
        wide = gs.Variable(names.fresh(f"{result.name}::f64"), dtype=np.float64)
        node.outputs[0] = wide
        graph.nodes.append(gs.Node("Cast", names.fresh(f"{result.name}::to_f32"), {"to": onnx.TensorProto.FLOAT},
                                   inputs=[wide], outputs=[result]))
    ir.toposort(graph)
    return graph


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def recall_at_k(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Each sample queries all the others by cosine similarity: the mean share of the reference's k
    nearest neighbours that `other`'s k nearest neighbours keep (1 = the same neighbours)."""
    count = len(reference)
    if count <= k:
        raise ValueError(f"recall@{k} needs more than {k} samples, got {count}")

    def neighbours(rows):
        similarity = _unit(rows) @ _unit(rows).T
        np.fill_diagonal(similarity, -np.inf)
        return np.argpartition(-similarity, k, axis=1)[:, :k]

    found, expected = neighbours(other), neighbours(reference)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, expected)]))


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values), np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def similarity_spearman(reference: np.ndarray, other: np.ndarray) -> float:
    """Spearman rank correlation of all pairwise cosine similarities (upper triangle)."""
    upper = np.triu_indices(len(reference), 1)
    a = _ranks((_unit(reference) @ _unit(reference).T)[upper])
    b = _ranks((_unit(other) @ _unit(other).T)[upper])
    return float(np.corrcoef(a, b)[0, 1])


def exact_integer_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lowered onnxruntime model whose MatMulIntegerToFloat nodes are exact float64 arithmetic:
    (A − a_zero)·(B − b_zero)·a_scale·b_scale + bias, the int32 sum VNNI, AMX and ARM kernels compute.
    Runs a VNNI-form model as a VNNI CPU would, on any CPU (products up to 2^53 are exact in float64)."""
    graph = ir.from_model(model)
    names = ir.Names(graph)

    def node(op, inputs, label, dtype=np.float64, **attrs):
        out = gs.Variable(names.fresh(label), dtype=dtype)
        graph.nodes.append(gs.Node(op, names.fresh(f"{label}_{op}"), attrs, inputs=inputs, outputs=[out]))
        return out

    def wide(tensor, zero):
        value = node("Cast", [tensor], f"{tensor.name}::f64", to=onnx.TensorProto.DOUBLE)
        if zero is None or not zero.name:
            return value
        return node("Sub", [value, node("Cast", [zero], f"{zero.name}::f64", to=onnx.TensorProto.DOUBLE)],
                    f"{tensor.name}::centred")

    for gemm in [n for n in graph.nodes if n.op == "MatMulIntegerToFloat"]:
        inputs = list(gemm.inputs) + [None] * (7 - len(gemm.inputs))
        a, b, a_scale, b_scale, a_zero, b_zero, bias = inputs
        product = node("MatMul", [wide(a, a_zero), wide(b, b_zero)], f"{gemm.name}::exact")
        scale = node("Mul", [node("Cast", [a_scale], f"{a_scale.name}::f64", to=onnx.TensorProto.DOUBLE),
                             node("Cast", [b_scale], f"{b_scale.name}::f64", to=onnx.TensorProto.DOUBLE)],
                     f"{gemm.name}::scale")
        result = node("Mul", [product, scale], f"{gemm.name}::scaled")
        if bias is not None and bias.name:
            result = node("Add", [result, node("Cast", [bias], f"{bias.name}::f64", to=onnx.TensorProto.DOUBLE)],
                          f"{gemm.name}::biased")
        output = gemm.outputs[0]
        gemm.outputs.clear()
        graph.nodes.append(gs.Node("Cast", names.fresh(f"{gemm.name}::to_f32"), {"to": onnx.TensorProto.FLOAT},
                                   inputs=[result], outputs=[output]))
    ir.cleanup(graph)
    return ir.to_model(graph)
