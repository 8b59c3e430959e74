"""`fuse-attention` (--attention fused): one MultiHeadAttention per layer on the quantized Q, K, V."""
import numpy as np
import onnx
import pytest
from onnx import helper

from qdq_compiler import ir
from qdq_compiler.lower import LowerConfig, lower
from qdq_compiler.synthetic import BertSpec, example_inputs

from conftest import calibrated_bert, cosine, run_model


def with_outputs(graph, names):
    model = ir.to_model(graph)
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def attention(q, k, v, bias, heads, scale):
    """float64 multi-head attention over B×S×hidden inputs: the independent restatement of the kernel."""
    b, s, h = q.shape
    split = [x.astype(np.float64).reshape(b, -1, heads, h // heads).transpose(0, 2, 1, 3) for x in (q, k, v)]
    scores = scale * split[0] @ split[1].transpose(0, 1, 3, 2) + bias.astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split[2]).transpose(0, 2, 1, 3).reshape(b, s, h)


@pytest.mark.parametrize("spec", [BertSpec(layers=2), BertSpec(layers=2, linear="gemm", fused_qkv=True),
                                  BertSpec(layers=2, scale="after_div")], ids=["matmul", "fused_qkv", "div"])
def test_each_layer_becomes_one_kernel_on_the_quantized_q_k_v(tmp_path, spec):
    graph, _ = calibrated_bert(tmp_path, spec)
    fake = ir.to_model(graph)
    records = {r.name: r for r in lower(graph, LowerConfig("onnxruntime", attention="fused"), verify=True)}
    assert records["fuse-attention"].stats == {"fused": spec.layers, "layers": spec.layers}
    ops = [n.op for n in graph.nodes]
    assert ops.count("MultiHeadAttention") == spec.layers and "Softmax" not in ops and "MatMul" not in ops
    assert ops.count("MatMulIntegerToFloat") == (4 if spec.fused_qkv else 6) * spec.layers   # weight GEMMs only
    assert ops.count("Expand") == 1                                     # one attention bias for all layers
    kernels = [n for n in graph.nodes if n.op == "MultiHeadAttention"]
    for kernel in kernels:
        assert kernel.attrs["num_heads"] == spec.heads
        assert kernel.attrs["scale"] == pytest.approx((spec.hidden // spec.heads) ** -0.5, rel=1e-6)
        for tensor in kernel.inputs[:3]:   # Q, K, V: fake-quantized per tensor on the int8 grid
            dq = ir.producer(tensor)
            assert dq.op == "DequantizeLinear" and ir.producer(dq.inputs[0]).op == "QuantizeLinear"
            assert ir.constant(dq.inputs[1]).size == 1
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][:, 9:] = 0                          # padded keys
    kernel = kernels[0]
    names = [t.name for t in (*kernel.inputs[:3], kernel.inputs[5], kernel.outputs[0])]
    q, k, v, bias, out = run_model(with_outputs(graph, names), feeds)[1:]
    assert bias.shape == (4, 1, 16, 16) and bias.min() == -60.0   # the mask, clamped, over the full S×S
    expected = attention(q, k, v, bias, spec.heads, kernel.attrs["scale"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # the probabilities are no longer re-quantized: close to the fake-quant model, not its exact function
    assert cosine(run_model(graph, feeds)[0], run_model(fake, feeds)[0]) > 0.999


def test_a_where_mask_leaves_the_attention_integer_and_says_why(tmp_path):
    spec = BertSpec(layers=1, mask="where")
    graph, _ = calibrated_bert(tmp_path, spec)
    records = {r.name: r for r in lower(graph, LowerConfig("onnxruntime", attention="fused"), verify=True)}
    assert records["fuse-attention"].stats == {"fused": 0, "layers": 1}
    assert "no additive mask" in records["fuse-attention"].diagnostics[0].message
    assert [n.op for n in graph.nodes].count("MatMulIntegerToFloat") == 8   # the integer form


def test_the_default_keeps_integer_attention(tmp_path):
    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    records = {r.name: r for r in lower(graph, LowerConfig("onnxruntime"))}
    assert not records["fuse-attention"].modified
    assert "MultiHeadAttention" not in [n.op for n in graph.nodes]


def test_cli_option_and_its_errors(tmp_path):
    from conftest import qdqc

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    calibrated = tmp_path / "bert.calib.onnx"
    ir.save(graph, calibrated)
    out = tmp_path / "fused.onnx"
    proc = qdqc("lower", calibrated, "--attention", "fused", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "fuse-attention: fused 1" in proc.stdout
    assert [n.op_type for n in onnx.load(out).graph.node].count("MultiHeadAttention") == 1
    proc = qdqc("lower", calibrated, "--target", "tensorrt", "--attention", "fused", "-o", tmp_path / "t.onnx")
    assert proc.returncode == 2 and "--attention fused is for --target onnxruntime" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "t.onnx").exists()
