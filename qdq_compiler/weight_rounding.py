"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1): each INT8 weight is rounded knowing the calibration
activations, and the rounding error of every input row is compensated on the rows not yet rounded.

For a GEMM y = x·W with W [K, N] and per-output-column scales s, nearest rounding minimizes
|W − Q(W)| element by element; GPTQ minimizes ||X·W − X·Q(W)||² over the calibration rows X,
whose Hessian is H = XᵀX. Rows are taken in decreasing diag(H) ("act order"), H is damped by 1 %
of its mean diagonal, and updates are applied in blocks of 128 rows (the paper's lazy batch).
X is the GEMM's input *as quantized* (the activation scales are known by then): the product the
integer GEMM computes is Q(x)·Q(W).

Measured on all-MiniLM-L6-v2 with smoothing (which moves activation outliers into weight rows and
so makes weight rounding matter as much as activation rounding): weight rounding alone cost as
much cosine as all 48 activation quantizers together; GPTQ halves the weight part.

Scales do not change, and every output column keeps an element at ±127, so recomputing weight
scales from the new weights (`refresh_weight_scales`) gives the same scales and the same integers.
Clipping (each column's scale searched below max|w|/127 for the smallest (w − q)ᵀH(w − q), before
GPTQ or scored by it) was measured on MiniLM and moved nothing once GPTQ rounds: README,
`tools/eval_weights.py`.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .graph import RESHAPE_OPS
from .patterns.blocks import linear_at
from .quant import QMAX, channel_axis, fake_quantize

DAMP, BLOCK = 0.01, 128
ROUNDINGS = ("gptq", "nearest")
DEFAULT_ROUNDING = "gptq"   # with calibration data; recomputing scales from saved statistics rounds to nearest


def parse_rounding(value, data_given: bool) -> str:
    """`--weights` as the CLI and the API spell it; None is the default (GPTQ when there is data)."""
    if value is None:
        return DEFAULT_ROUNDING if data_given else "nearest"
    if value not in ROUNDINGS:
        from .errors import UsageError

        raise UsageError(f"--weights {value!r}: expected gptq or nearest")
    if value == "gptq" and not data_given:
        from .errors import UsageError

        raise UsageError("--weights gptq needs --data (it measures each GEMM's input on the calibration data)")
    return value


def gptq(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, *, damp: float = DAMP,
         block: int = BLOCK, qmax: int = QMAX) -> np.ndarray:
    """Integer-valued weights [K, N] (as float, multiples of `scale`, within ±qmax) for `weight` [K, N]
    (input rows), `hessian` [K, K] = XᵀX and `scale` per output column [N] (or one scalar)."""
    w = np.array(weight, np.float64).T.copy()                    # [N, K]: the paper's layout
    h = np.array(hessian, np.float64).copy()
    rows = h.shape[0]
    dead = np.diag(h) == 0                                        # inputs never active: weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[order][:, order]
    h[np.diag_indices(rows)] += damp * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T                # H⁻¹ = UᵀU, factored in float64
    w, upper = w.astype(np.float32), upper.astype(np.float32)     # the row loop in float32, as the paper's code
    step = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (w.shape[0],))
    quantized = np.zeros_like(w)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        part, errors = w[:, start:stop].copy(), np.zeros((w.shape[0], stop - start), np.float32)
        for i in range(stop - start):
            column = part[:, i]
            rounded = np.clip(np.rint(column / step), -qmax, qmax) * step
            quantized[:, start + i] = rounded
            errors[:, i] = (column - rounded) / upper[start + i, start + i]
            part[:, i:] -= np.outer(errors[:, i], upper[start + i, start:stop][i:])
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    result = quantized[:, np.argsort(order)].T                    # back to [K, N], original row order
    nearest = np.clip(np.rint(np.asarray(weight, np.float32) / step), -qmax, qmax) * step
    # keep the scales a fixed point: a column that holds its scale's amax (±qmax when rounded to nearest)
    # and lost it keeps nearest rounding, so recomputing scales from these weights changes nothing
    full = (qmax - 0.5) * step
    shrunk = (np.abs(nearest).max(axis=0) >= full) & (np.abs(result).max(axis=0) < full)
    result[:, shrunk] = nearest[:, shrunk]
    return result.astype(np.float32)


def _activation_quantizer(tensor: gs.Tensor) -> gs.Node | None:
    """The activation QuantizeLinear behind a GEMM input (through the head-merging Reshape)."""
    node = ir.producer(tensor)
    while node is not None and node.op in RESHAPE_OPS:
        node = ir.producer(node.inputs[0])
    if node is None or node.op != "DequantizeLinear":
        return None
    q = ir.producer(node.inputs[0])
    return q if q is not None and q.op == "QuantizeLinear" and not ir.is_constant(q.inputs[0]) else None


def gptq_targets(graph: gs.Graph) -> list[tuple[gs.Node, list[gs.Node]]]:
    """(weight QuantizeLinear, the activation QuantizeLinears of the GEMMs it feeds) for every constant 2-D
    weight quantized on both sides, once per weight: a weight shared by several layers (ALBERT) is one
    target whose GEMMs read several activations."""
    found: dict[int, tuple[gs.Node, list[gs.Node]]] = {}
    for node in graph.nodes:
        linear = linear_at(node) if node.op in ("MatMul", "Gemm") else None
        if linear is None:
            continue
        dq = ir.producer(node.inputs[1])
        q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
        if q is None or q.op != "QuantizeLinear" or not isinstance(q.inputs[0], gs.Constant):
            continue
        activation = _activation_quantizer(node.inputs[0])
        if activation is not None and len(q.inputs[0].outputs) == 1 and q.inputs[0].values.ndim == 2:
            _, readers = found.setdefault(id(q), (q, []))
            if all(a is not activation for a in readers):
                readers.append(activation)
    return list(found.values())


def _oriented(weight_q: gs.Node) -> tuple[np.ndarray, bool]:
    """The weight as [K inputs, N outputs], and whether it is stored transposed ([N, K], Gemm transB=1)."""
    axis = channel_axis(weight_q.attrs, weight_q.inputs[1].values.size)
    transposed = axis is not None and axis % 2 == 0
    values = weight_q.inputs[0].values
    return (values.T if transposed else values), transposed


def input_hessians(graph: gs.Graph, dataset, config,
                   targets: list[tuple[gs.Node, list[gs.Node]]]) -> dict[str, np.ndarray]:
    """XᵀX of each activation quantizer's output as its GEMMs see it (quantized at its scale, one row per
    token, as wide as their weights' inputs), over the calibration tokens the attention mask keeps."""
    from .calibrate import float_network, model_batches, run, session

    width = {a.inputs[0].name: _oriented(q)[0].shape[0] for q, readers in targets for a in readers}
    amax = {a.inputs[0].name: float(np.max(a.inputs[1].values)) * QMAX for _, readers in targets for a in readers}
    tensors = sorted(width)
    runner = session(float_network(graph, tensors), config.providers)
    _, batches = model_batches(graph, dataset, config)
    hessians: dict[str, np.ndarray] = {}
    for index, feeds in enumerate(batches):
        mask = feeds.get("attention_mask")
        for name, values in zip(tensors, run(runner, tensors, feeds, f"calibration batch {index}")):
            if values.size % width[name]:
                continue   # not token rows of the GEMM's width: left out, the weight keeps nearest rounding
            rows = values.reshape(-1, width[name])  # [B, S, heads, d] before the head merge: the same tokens
            if mask is not None and rows.shape[0] == mask.size:
                rows = rows[mask.reshape(-1).astype(bool)]
            rows = fake_quantize(rows, amax[name])
            hessians[name] = hessians.get(name, 0.0) + (rows.T @ rows).astype(np.float64)  # per batch in float32
    return hessians


def round_weights(graph: gs.Graph, hessians: dict[str, np.ndarray],
                  targets: list[tuple[gs.Node, list[gs.Node]]], qmax: int = QMAX) -> tuple[int, int]:
    """Replace each target weight by its GPTQ-rounded values (on the INT8 grid of its scale); returns
    (rounded, left with nearest rounding). Weights whose GEMMs read the same activations (Q, K and V)
    share its Hessian and are rounded in one pass; a weight shared by several layers takes the sum of
    its layers' Hessians."""
    groups: dict[tuple[str, ...], list[tuple[gs.Constant, bool, np.ndarray]]] = {}
    skipped = 0
    for weight_q, readers in targets:
        weight, transposed = _oriented(weight_q)
        names = tuple(sorted({a.inputs[0].name for a in readers}))
        if any(hessians.get(name) is None or hessians[name].shape[0] != weight.shape[0] for name in names):
            skipped += 1
            continue
        columns = np.broadcast_to(np.asarray(weight_q.inputs[1].values, np.float32).reshape(-1), (weight.shape[1],))
        groups.setdefault(names, []).append((weight_q.inputs[0], transposed, columns))
    for names, members in groups.items():
        weights = [(c.values.T if t else c.values) for c, t, _ in members]
        hessian = sum(hessians[name] for name in names)
        result = gptq(np.concatenate(weights, axis=1), hessian, np.concatenate([s for _, _, s in members]),
                      qmax=qmax)
        start = 0
        for (constant, transposed, _), weight in zip(members, weights):
            part = result[:, start:start + weight.shape[1]]
            start += weight.shape[1]
            constant.values = (part.T if transposed else part).astype(constant.values.dtype)
    return sum(len(members) for members in groups.values()), skipped


def apply_gptq(graph: gs.Graph, dataset, config, *, verify: bool = False):
    """Measure the GEMM input Hessians on the calibration data, then round (pass `round-weights-gptq`).
    Runs after calibration: the Hessians are of the activations as quantized."""
    from .pipeline import PassContext, run_pipeline

    ctx = PassContext(config)
    targets = gptq_targets(graph)
    ctx.analyses["hessians"] = input_hessians(graph, dataset, config, targets)
    return run_pipeline(graph, ("round-weights-gptq",), ctx, verify=verify)
