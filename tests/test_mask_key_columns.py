"""`mask-key-columns`: the padding mask as extra columns of the integer Q·K^T instead of a float Add.

A VNNI-form rewrite (255 × −128 column products saturate x86's int16 pair sums without VNNI): each
numeric check runs on the exact-kernel model of the graph (any host), and on this host's own kernels
where it has VNNI."""
import numpy as np
import onnx
import pytest
from onnx import helper

from qdq_compiler import ir
from qdq_compiler.cpu import host
from qdq_compiler.evaluate import exact_integer_kernels
from qdq_compiler.lower import LowerConfig, lower
from qdq_compiler.pipeline import PIPELINES, PassContext, run_pipeline
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, run_model


VNNI = LowerConfig("onnxruntime", isa="vnni")
KERNELS = ["exact"] + (["host"] if host().vnni else [])


def scores_of(graph, feeds, kernels):
    """Each layer's softmax input, read from the graph."""
    model = ir.to_model(graph)
    names = [n.inputs[0].name for n in graph.nodes if n.op == "Softmax"]
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return run_model(exact_integer_kernels(model) if kernels == "exact" else model, feeds)[1:]


def test_the_portable_lowering_keeps_the_mask_as_an_add(tmp_path):
    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=2))
    records = {r.name: dict(r.stats) for r in lower(graph, LowerConfig("onnxruntime"), verify=True)}
    assert records["mask-key-columns"] == {"masks_in_gemm": 0}
    assert records["clamp-attention-mask"]["softmax_inputs"] == 2


@pytest.mark.parametrize("kernels", KERNELS)
def test_padded_keys_drop_by_at_least_60_inside_the_gemm_and_nothing_else_moves(tmp_path, kernels):
    spec = BertSpec(layers=2)
    graph, _ = calibrated_bert(tmp_path, spec)
    clamped = graph.copy()
    records = {r.name: dict(r.stats) for r in lower(graph, VNNI, verify=True)}
    assert records["mask-key-columns"] == {"masks_in_gemm": spec.layers}
    assert records["clamp-attention-mask"]["softmax_inputs"] == 0 and records["floor-softmax-input"] == {
        "softmaxes_floored": 0}
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        gemm = ir.producer(softmax.inputs[0])           # the scores come straight from the integer GEMM
        assert gemm.op == "MatMulIntegerToFloat"
        assert all(ir.producer(t).op == "Concat" for t in gemm.inputs[:2])
    run_pipeline(clamped, tuple(p for p in PIPELINES["lower-onnxruntime"] if p != "mask-key-columns"),
                 PassContext(VNNI))
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][:, 9:] = 0
    feeds["attention_mask"][1, 5:] = 0
    padded = ~feeds["attention_mask"].astype(bool)[:, None, None, :]
    # the clamped graph's softmax input is scores + Max(mask, -60): attended keys carry the bare scores
    for new, old in zip(scores_of(graph, feeds, kernels), scores_of(clamped, feeds, kernels)):
        pad = np.broadcast_to(padded, new.shape)
        np.testing.assert_array_equal(new[~pad], old[~pad])    # the same int32 sums, the same scaling
        bare = old[pad] + 60.0
        assert np.all(new[pad] <= bare - 60.0 + 1e-3) and np.all(new[pad] >= bare - 120.0)
    run = (lambda g: run_model(exact_integer_kernels(ir.to_model(g)), feeds)) if kernels == "exact" else \
        (lambda g: run_model(g, feeds))
    np.testing.assert_array_equal(run(graph)[0], run(clamped)[0])


def test_it_needs_the_integer_gemms(tmp_path):
    import pytest

    from qdq_compiler.errors import PassError

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=1))   # Q/DQ, not lowered
    with pytest.raises(PassError, match="mask-key-columns needs integer GEMMs in the graph"):
        run_pipeline(graph, ("mask-key-columns",), PassContext(VNNI))


def test_a_mask_that_is_not_key_padding_keeps_its_add(tmp_path):
    spec = BertSpec(layers=1)
    graph, _ = calibrated_bert(tmp_path, spec)
    scale = next(n for n in graph.nodes if n.name.startswith("mask/Mul"))
    scale.inputs[0] = next(n for n in graph.nodes if n.name.startswith("mask/Cast")).outputs[0]   # -1e4 at attended keys
    records = {r.name: dict(r.stats) for r in lower(graph, VNNI, verify=True)}
    assert records["mask-key-columns"] == {"masks_in_gemm": 0}
    assert records["clamp-attention-mask"]["softmax_inputs"] == 1
