"""Hypothesis-generated valid graphs through insert -> calibrate -> lower -> check.

Graphs of MatMul/Gemm (weights plain, transposed, transB, with and without bias), bias Adds, residual
Adds, pointwise activations and activation-by-activation MatMuls, with node names that are set, empty
or repeated (all legal ONNX). Whatever the graph: no exception, generic mode (and the fallback of the
BERT modes) puts a DequantizeLinear in front of every MatMul/Gemm input, calibration and lowering
succeed, the lint finds nothing, and the lowered model runs with finite outputs close to the float ones.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qdq_compiler import ir
from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
from qdq_compiler.check import check_graph
from qdq_compiler.config import InsertConfig
from qdq_compiler.data import Dataset
from qdq_compiler.insert import insert
from qdq_compiler.lower import LowerConfig, lower

from conftest import cosine, run_model

WIDTHS = st.sampled_from([4, 8, 12])
STEP = st.one_of(
    st.tuples(st.just("matmul"), WIDTHS),
    st.tuples(st.just("matmul_t"), WIDTHS),              # MatMul(x, Transpose(W))
    st.tuples(st.just("gemm"), WIDTHS, st.booleans(), st.booleans()),   # transB, bias
    st.tuples(st.just("bias")),
    st.tuples(st.just("act"), st.sampled_from(["Relu", "Sigmoid", "Tanh"])),
    st.tuples(st.just("residual")),
    st.tuples(st.just("bmm")),                           # x · x^T: an activation-by-activation MatMul
    # a QAT export's weight, Q/DQ already there, per output channel: [in, out] on axis 1 (given, or left to
    # ONNX's default) or [out, in] on axis 0 behind a Transpose; the DQ may have a scale initializer of its
    # own, as torch exports write it (onnxruntime's own fusion cannot run a per-input-channel weight)
    st.builds(lambda out, layout, own: ("qat", out, *layout, own), WIDTHS,
              st.sampled_from([(False, None), (False, 1), (True, 0)]), st.booleans()),
)
NAMING = st.sampled_from(["named", "empty", "repeated"])


@st.composite
def graphs(draw):
    """(model, its float twin, input width, seed): the twin has the same weights without the QAT Q/DQ."""
    first = draw(st.tuples(st.sampled_from(["matmul", "matmul_t"]), WIDTHS) | st.tuples(st.just("gemm"), WIDTHS,
                                                                                       st.booleans(), st.booleans()))
    steps = draw(st.permutations([first] + draw(st.lists(STEP, max_size=7))))
    naming, seed, width0 = draw(NAMING), draw(st.integers(0, 2**16)), draw(WIDTHS)
    model, twin = (_build(steps, naming, seed, width0, qat) for qat in (True, False))
    return model, twin, width0, seed


def _build(steps, naming: str, seed: int, width0: int, qat: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    current, width = "x", width0
    history = [(current, width)]
    counter = iter(range(10**6))

    def fresh(kind):
        return f"{kind}_{next(counter)}"

    def node(op, inputs, **attrs):
        out = fresh(op.lower())
        name = {"named": f"{op}_{len(nodes)}", "empty": "", "repeated": "same"}[naming]
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(shape):
        name = fresh("w")
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name))
        return name

    for step in steps:
        kind = step[0]
        if kind == "matmul":
            current, width = node("MatMul", [current, const((width, step[1]))]), step[1]
        elif kind == "matmul_t":
            weight = node("Transpose", [const((step[1], width))], perm=[1, 0])
            current, width = node("MatMul", [current, weight]), step[1]
        elif kind == "gemm":
            _, out, trans_b, bias = step
            inputs = [current, const((out, width) if trans_b else (width, out))] + ([const((out,))] if bias else [])
            current, width = node("Gemm", inputs, transB=int(trans_b)), out
        elif kind == "bias":
            current = node("Add", [current, const((width,))])
        elif kind == "act":
            current = node(step[1], [current])
        elif kind == "residual":
            same = [name for name, w in history[:-1] if w == width]
            if same:
                current = node("Add", [current, same[-1]])
        elif kind == "qat":
            _, out, transposed, axis, own_scale = step
            shape = (out, width) if transposed else (width, out)
            weight = const(shape)
            if qat:
                values = numpy_helper.to_array(inits[-1])
                channel = 1 if axis is None else axis
                scale = np.abs(values).max(axis=1 - channel) / 127 * 3   # stale on purpose: calibration redoes it
                attrs = {} if axis is None else {"axis": axis}
                scale_name, zero = fresh("s"), fresh("z")
                inits.append(numpy_helper.from_array(scale.astype(np.float32), scale_name))
                inits.append(numpy_helper.from_array(np.zeros(shape[channel], np.int8), zero))
                quantized = node("QuantizeLinear", [weight, scale_name, zero], **attrs)
                if own_scale:
                    inits.append(numpy_helper.from_array(scale.astype(np.float32), scale_name + "_dq"))
                weight = node("DequantizeLinear", [quantized, scale_name + "_dq" if own_scale else scale_name, zero],
                              **attrs)
            if transposed:
                weight = node("Transpose", [weight], perm=[1, 0])
            current, width = node("MatMul", [current, weight]), out
        elif kind == "bmm":   # a side branch ending in a graph output
            transposed = node("Transpose", [current], perm=[1, 0])
            outputs.append(node("MatMul", [current, transposed]))
        history.append((current, width))
    outputs.insert(0, current)
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width0])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "m"]) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _runnable(model) -> onnx.ModelProto:
    """A copy onnxruntime loads: it refuses repeated node names (legal ONNX), so every node is renamed."""
    model = ir.to_model(model) if isinstance(model, gs.Graph) else model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        node.name = f"n{index}"
    return copy


def _reads_dequantized(tensor: gs.Tensor) -> bool:
    """The tensor is a DequantizeLinear output, or only reshaped/transposed from one."""
    while True:
        producer = ir.producer(tensor)
        if producer is None:
            return False
        if producer.op == "DequantizeLinear":
            return True
        if producer.op not in ("Transpose", "Reshape"):
            return False
        tensor = producer.inputs[0]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=graphs(), mode=st.sampled_from(["generic", "ft1", "trt"]))
def test_random_graphs_insert_calibrate_lower_check(tmp_path, case, mode):
    model, twin, width, seed = case
    note(onnx.printer.to_text(model.graph))
    event(f"{sum(n.op_type in ('MatMul', 'Gemm') for n in model.graph.node)} MatMul/Gemm, names {model.graph.node[0].name!r}")
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((24, width)).astype(np.float32)}
    data = tmp_path / f"d{seed}.npz"
    np.savez(data, **feeds)
    reference = run_model(_runnable(twin), feeds)   # the float network, QAT weights unquantized

    graph = gs.import_onnx(model)
    result = insert(graph, InsertConfig(mode), verify=True)
    assert result.plan.fallback == (mode != "generic")
    gemms = [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]
    assert len(gemms) == sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)
    for gemm in gemms:   # every MatMul/Gemm input (the bias of a Gemm is not one) reads a DequantizeLinear
        assert all(_reads_dequantized(t) for t in gemm.inputs[:2]), ir.describe(gemm)

    calibrate(graph, Dataset(data, model_inputs(graph)), CalibrationConfig("max", progress=False))
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear" and ir.is_constant(n.inputs[0])):
        values, scale = ir.constant(q.inputs[0]), ir.constant(q.inputs[1])
        if scale.size > 1:   # per channel: one max|w|/127 per channel of ONNX's axis (default 1)
            channel = q.attrs.get("axis", 1)
            expected = np.array([np.abs(np.take(values, i, axis=channel)).max() for i in range(values.shape[channel])])
            np.testing.assert_allclose(scale, expected / 127, rtol=1e-6)
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear"):   # every DQ dequantizes with its Q's scale
        for dq in (n for n in q.outputs[0].outputs if n.op == "DequantizeLinear"):
            np.testing.assert_array_equal(ir.constant(dq.inputs[1]), ir.constant(q.inputs[1]))
    assert check_graph(graph) == []
    fake = run_model(_runnable(graph), feeds)
    lower(graph, LowerConfig("onnxruntime"), verify=True)
    lowered = run_model(graph, feeds)   # as written: lower leaves no repeated node name
    for ref, f, low in zip(reference, fake, lowered):
        assert low.shape == ref.shape and np.isfinite(low).all()
        assert cosine(low, f) > 0.99          # lowering reproduces the fake-quantized graph
        assert cosine(f, ref) > 0.9           # and INT8 stays close to float on these shallow graphs
