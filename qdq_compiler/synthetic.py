"""A synthetic BERT builder (pure onnx) that can emit each exporter's style.

The fast fixture for tests and benchmarks: any depth, width and head count, and
the variations real exports show: linear layers as MatMul+Add,
Gemm (transB 0 or 1) or MatMul behind a Transpose of the weight; LayerNorm as one
op or decomposed; GELU as an op, the Erf pattern or the tanh approximation; the
1/sqrt(d) scale after or before Q·K^T or folded into Q; the mask as Add or Where;
separate or fused QKV; with or without token_type_ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LINEAR_STYLES = ("matmul", "gemm", "gemm_transb", "matmul_transposed")
NORM_STYLES = ("op", "decomposed")
GELU_STYLES = ("op", "erf", "tanh")
SCALE_STYLES = ("after_mul", "after_div", "before_q", "split", "folded")
MASK_STYLES = ("add", "where")


@dataclass(frozen=True)
class BertSpec:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    intermediate: int | None = None
    vocab: int = 128
    max_positions: int = 128
    opset: int = 17
    linear: str = "matmul"
    norm: str = "op"
    gelu: str = "erf"
    scale: str = "after_mul"
    mask: str = "add"
    fused_qkv: bool = False
    token_types: bool = True
    seed: int = 0

    def __post_init__(self):
        for value, allowed, name in ((self.linear, LINEAR_STYLES, "linear"), (self.norm, NORM_STYLES, "norm"),
                                     (self.gelu, GELU_STYLES, "gelu"), (self.scale, SCALE_STYLES, "scale"),
                                     (self.mask, MASK_STYLES, "mask")):
            if value not in allowed:
                raise ValueError(f"BertSpec.{name}={value!r}: expected one of {allowed}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.norm == "op" and self.opset < 17:
            raise ValueError("LayerNormalization needs opset 17")
        if self.gelu == "op" and self.opset < 20:
            raise ValueError("Gelu needs opset 20")

    @property
    def ffn(self) -> int:
        return self.intermediate or 4 * self.hidden


class _Builder:
    def __init__(self, spec: BertSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        base = self.name(base or op_type)
        outs = [f"{base}_out{i}" if outputs > 1 else f"{base}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, **attrs))
        return outs if outputs > 1 else outs[0]

    def weight(self, rows: int, cols: int) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, base: str) -> str:
        """y = x @ w + b for a [K, N] weight, written in the spec's exporter style."""
        style = self.spec.linear
        if style == "matmul":
            y = self.op("MatMul", [x, self.const(f"{base}.weight", w)], f"{base}/MatMul")
            return self.op("Add", [y, self.const(f"{base}.bias", b)], f"{base}/Add")
        if style == "matmul_transposed":
            wt = self.op("Transpose", [self.const(f"{base}.weight", w.T.copy())], f"{base}/Transpose", perm=[1, 0])
            y = self.op("MatMul", [x, wt], f"{base}/MatMul")
            return self.op("Add", [y, self.const(f"{base}.bias", b)], f"{base}/Add")
        # Gemm is 2-D: flatten tokens, multiply, restore [batch, seq, N]
        flat = self.op("Reshape", [x, self.const("shape", np.array([-1, w.shape[0]], np.int64))], f"{base}/Flatten")
        stored, trans = (w.T.copy(), 1) if style == "gemm_transb" else (w, 0)
        y = self.op("Gemm", [flat, self.const(f"{base}.weight", stored), self.const(f"{base}.bias", b)],
                    f"{base}/Gemm", transB=trans)
        lead = self.op("Slice", [self.op("Shape", [x]), self.const("s", np.array([0], np.int64)),
                                 self.const("e", np.array([2], np.int64))])
        shape = self.op("Concat", [lead, self.const("n", np.array([w.shape[1]], np.int64))], axis=0)
        return self.op("Reshape", [y, shape], f"{base}/Unflatten")

    def layer_norm(self, x: str, base: str) -> str:
        h = self.spec.hidden
        gamma = (1 + 0.1 * self.rng.standard_normal(h)).astype(np.float32)
        beta = (0.05 * self.rng.standard_normal(h)).astype(np.float32)
        if self.spec.norm == "op":
            return self.op("LayerNormalization", [x, self.const(f"{base}.weight", gamma),
                                                  self.const(f"{base}.bias", beta)], base, axis=-1, epsilon=1e-12)
        mean = self.op("ReduceMean", [x], f"{base}/ReduceMean", axes=[-1]) if self.spec.opset < 18 else \
            self.op("ReduceMean", [x, self.const("axes", np.array([-1], np.int64))], f"{base}/ReduceMean")
        centered = self.op("Sub", [x, mean], f"{base}/Sub")
        square = self.op("Pow", [centered, self.const("two", np.float32(2))], f"{base}/Pow")
        var = self.op("ReduceMean", [square], f"{base}/ReduceMean_1", axes=[-1]) if self.spec.opset < 18 else \
            self.op("ReduceMean", [square, self.const("axes", np.array([-1], np.int64))], f"{base}/ReduceMean_1")
        std = self.op("Sqrt", [self.op("Add", [var, self.const("eps", np.float32(1e-12))], f"{base}/Add")])
        normed = self.op("Div", [centered, std], f"{base}/Div")
        scaled = self.op("Mul", [normed, self.const(f"{base}.weight", gamma)], f"{base}/Mul")
        return self.op("Add", [scaled, self.const(f"{base}.bias", beta)], f"{base}/Add_1")

    def gelu(self, x: str, base: str) -> str:
        style = self.spec.gelu
        if style == "op":
            return self.op("Gelu", [x], base)
        if style == "erf":
            e = self.op("Erf", [self.op("Div", [x, self.const("sqrt2", np.float32(np.sqrt(2)))], f"{base}/Div")])
            half = self.op("Mul", [x, self.op("Add", [e, self.const("one", np.float32(1))], f"{base}/Add")],
                           f"{base}/Mul")
            return self.op("Mul", [half, self.const("half", np.float32(0.5))], f"{base}/Mul_1")
        cube = self.op("Pow", [x, self.const("three", np.float32(3))], f"{base}/Pow")
        inner = self.op("Add", [x, self.op("Mul", [cube, self.const("c", np.float32(0.044715))])])
        t = self.op("Tanh", [self.op("Mul", [inner, self.const("k", np.float32(np.sqrt(2 / np.pi)))])])
        plus = self.op("Add", [t, self.const("one", np.float32(1))])
        return self.op("Mul", [self.op("Mul", [x, self.const("half", np.float32(0.5))]), plus], f"{base}/Mul")

    def heads_split(self, x: str, transpose_k: bool = False) -> str:
        s = self.spec
        shaped = self.op("Reshape", [x, self.const("heads", np.array([0, 0, s.heads, s.hidden // s.heads], np.int64))])
        return self.op("Transpose", [shaped], perm=[0, 2, 3, 1] if transpose_k else [0, 2, 1, 3])

    def attention(self, x: str, mask: str, base: str) -> str:
        s = self.spec
        h, d = s.hidden, s.hidden // s.heads
        ws = [self.weight(h, h) for _ in range(3)]
        bs = [(0.02 * self.rng.standard_normal(h)).astype(np.float32) for _ in range(3)]
        if s.scale == "folded":
            ws[0], bs[0] = (ws[0] / np.sqrt(d)).astype(np.float32), (bs[0] / np.sqrt(d)).astype(np.float32)
        if s.fused_qkv:
            qkv = self.linear(x, np.concatenate(ws, 1), np.concatenate(bs), f"{base}/qkv")
            q, k, v = self.op("Split", [qkv, self.const("split", np.array([h, h, h], np.int64))], outputs=3, axis=-1)
        else:
            q, k, v = (self.linear(x, w, b, f"{base}/{n}") for w, b, n in zip(ws, bs, ("query", "key", "value")))
        q, k, v = self.heads_split(q), self.heads_split(k, transpose_k=True), self.heads_split(v)
        if s.scale == "before_q":
            q = self.op("Mul", [q, self.const("inv_sqrt_d", np.float32(1 / np.sqrt(d)))], f"{base}/ScaleQ")
        if s.scale == "split":  # torch's SDPA export: both Q and K^T times d^-1/4
            q = self.op("Mul", [q, self.const("root", np.float32(d ** -0.25))], f"{base}/ScaleQ")
            k = self.op("Mul", [k, self.const("root", np.float32(d ** -0.25))], f"{base}/ScaleK")
        scores = self.op("MatMul", [q, k], f"{base}/QK")
        if s.scale == "after_mul":
            scores = self.op("Mul", [scores, self.const("inv_sqrt_d", np.float32(1 / np.sqrt(d)))], f"{base}/Scale")
        elif s.scale == "after_div":
            scores = self.op("Div", [scores, self.const("sqrt_d", np.float32(np.sqrt(d)))], f"{base}/Scale")
        if s.mask == "add":
            scores = self.op("Add", [scores, mask], f"{base}/Mask")
        else:
            scores = self.op("Where", [mask, self.const("fill", np.float32(-3.4e38)), scores], f"{base}/Mask")
        probs = self.op("Softmax", [scores], f"{base}/Softmax", axis=-1)
        context = self.op("MatMul", [probs, v], f"{base}/AV")
        merged = self.op("Reshape", [self.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                     self.const("merge", np.array([0, 0, h], np.int64))])
        out = self.linear(merged, self.weight(h, h), np.zeros(h, np.float32), f"{base}/output")
        return self.layer_norm(self.op("Add", [out, x], f"{base}/Residual"), f"{base}/LayerNorm")

    def ffn(self, x: str, base: str) -> str:
        s = self.spec
        inner = self.linear(x, self.weight(s.hidden, s.ffn), np.zeros(s.ffn, np.float32), f"{base}/intermediate")
        act = self.gelu(inner, f"{base}/gelu")
        out = self.linear(act, self.weight(s.ffn, s.hidden), np.zeros(s.hidden, np.float32), f"{base}/output")
        return self.layer_norm(self.op("Add", [out, x], f"{base}/Residual"), f"{base}/LayerNorm")

    def mask(self, attention_mask: str) -> str:
        expanded = self.op("Unsqueeze", [attention_mask, self.const("axes", np.array([1, 2], np.int64))])
        if self.spec.mask == "where":
            return self.op("Equal", [expanded, self.const("zero", np.int64(0))], "mask/Equal")
        as_float = self.op("Cast", [expanded], "mask/Cast", to=TensorProto.FLOAT)
        inverted = self.op("Sub", [self.const("one", np.float32(1)), as_float], "mask/Sub")
        return self.op("Mul", [inverted, self.const("neg", np.float32(-10000.0))], "mask/Mul")

    def build(self) -> onnx.ModelProto:
        s = self.spec
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if s.token_types else [])
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names]
        word = self.const("embeddings.word", (self.rng.standard_normal((s.vocab, s.hidden)) * 0.5).astype(np.float32))
        pos = self.const("embeddings.position",
                         (self.rng.standard_normal((s.max_positions, s.hidden)) * 0.1).astype(np.float32))
        x = self.op("Gather", [word, "input_ids"], "embeddings/word")
        seq = self.op("Gather", [self.op("Shape", ["input_ids"]), self.const("one_idx", np.int64(1))])
        positions = self.op("Range", [self.const("zero", np.int64(0)), seq, self.const("step", np.int64(1))])
        x = self.op("Add", [x, self.op("Gather", [pos, positions], "embeddings/position")])
        if s.token_types:
            types = self.const("embeddings.token_type", (self.rng.standard_normal((2, s.hidden)) * 0.1).astype(np.float32))
            x = self.op("Add", [x, self.op("Gather", [types, "token_type_ids"], "embeddings/token_type")])
        x = self.layer_norm(x, "embeddings/LayerNorm")
        mask = self.mask("attention_mask")
        for i in range(s.layers):
            x = self.ffn(self.attention(x, mask, f"layer.{i}/attention"), f"layer.{i}/ffn")
        out = self.op("Identity", [x], "last_hidden_state")
        self.nodes[-1].output[0] = "last_hidden_state"
        outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                 ["batch", "sequence", s.hidden])]
        del out
        graph = helper.make_graph(self.nodes, "synthetic_bert", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", s.opset)],
                                  producer_name="qdqc.synthetic")
        model.ir_version = min(model.ir_version, 10)
        return model


def build_bert(spec: BertSpec = BertSpec()) -> onnx.ModelProto:
    """A random-weight BERT encoder in the exporter style `spec` describes."""
    return _Builder(spec).build()


def example_inputs(spec: BertSpec, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, spec.vocab, (batch, seq), dtype=np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)}
    feeds["attention_mask"][0, seq // 2:] = 0
    if spec.token_types:
        feeds["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feeds
