"""What an encoder-layer pattern returns: records holding the graph's nodes themselves, and the named
sites every family exposes (placement, the carried plan and the reports use the names)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

# Records hold the graph's nodes themselves: node names may be empty or repeated (legal ONNX), so
# nodes are compared by identity (eq=False) and named only in messages and reports (`ir.describe`).

@dataclass(frozen=True, eq=False)
class Linear:
    """A linear layer: MatMul(+Add bias) or Gemm, with a constant 2-D weight."""

    node: gs.Node
    op: str
    input: str                    # activation tensor read by the GEMM
    weight: str                   # the constant (float, or int8 under an existing DQ)
    weight_axis: int              # output-channel axis of that constant
    weight_user: tuple[gs.Node, int]  # (node, input index) that reads the constant
    gemm_output: str              # GEMM result before the bias
    bias_add: gs.Node | None
    output: str                   # after the bias
    weight_quantized: bool = False


@dataclass(frozen=True, eq=False)
class Attention:
    bmm1: gs.Node
    query: str        # BMM1 input A (Q)
    key: str          # BMM1 input B (K^T)
    scores: str       # BMM1 output, before scale and mask
    scale: tuple[gs.Node, ...]   # Mul/Div nodes applying 1/sqrt(d) ("folded" when empty)
    scale_position: str      # after_bmm | before_bmm | folded
    mask: gs.Node | None     # Add or Where node
    softmax: gs.Node
    probs: str        # BMM2 input A
    bmm2: gs.Node
    value: str        # BMM2 input B
    context: str      # BMM2 output


@dataclass(frozen=True, eq=False)
class Residual:
    add: gs.Node
    skip: str    # tensor from the layer input (the residual branch)
    local: str   # tensor from the GEMM branch
    output: str


@dataclass(frozen=True, eq=False)
class Norm:
    kind: str    # op | decomposed
    nodes: tuple[gs.Node, ...]
    input: str
    output: str


@dataclass(frozen=True, eq=False)
class Activation:
    kind: str    # gelu-op | gelu-erf | gelu-tanh | sigmoid | relu
    nodes: tuple[gs.Node, ...]
    input: str
    output: str


SITE_NAMES = ("qkv.input", "q", "k", "v", "softmax.output", "attention_output.input", "ffn1.input", "ffn2.input",
              "residual1", "residual2", "output")


@dataclass(frozen=True, eq=False)
class EncoderLayer:
    """One matched encoder layer, whatever its family: every site FasterTransformer quantizes."""

    index: int
    input: str
    projections: tuple[Linear, ...]   # (query, key, value) or (fused qkv,)
    attention: Attention
    attention_output: Linear
    attention_residual: Residual
    attention_norm: Norm
    ffn1: Linear
    activation: Activation
    ffn2: Linear
    ffn_residual: Residual
    ffn_norm: Norm
    family: str = "bert-post-ln"
    norm_position: str = "post"    # post: norms follow the residual Adds; pre: they lead each block
    qkv_input: str | None = None   # what the projections read, when it is not the layer input (pre-LN)
    float_gemms: tuple[tuple[gs.Node, str], ...] = ()   # GEMMs inside the layer its pattern keeps in float, why

    @property
    def fused_qkv(self) -> bool:
        return len(self.projections) == 1

    @property
    def output(self) -> str:
        return self.ffn_norm.output if self.norm_position == "post" else self.ffn_residual.output

    def sites(self) -> dict[str, str]:
        """The named sites every family exposes (SITE_NAMES) -> the float tensor at each."""
        attention = self.attention
        return {"qkv.input": self.qkv_input or self.input, "q": attention.query, "k": attention.key, "v": attention.value,
                "softmax.output": attention.probs, "attention_output.input": self.attention_output.input,
                "ffn1.input": self.ffn1.input, "ffn2.input": self.ffn2.input,
                "residual1": self.attention_residual.skip, "residual2": self.ffn_residual.skip,
                "output": self.output}

    def linears(self) -> dict[str, Linear]:
        names = ("qkv",) if self.fused_qkv else ("query", "key", "value")
        named = dict(zip(names, self.projections))
        named.update(attention_output=self.attention_output, ffn1=self.ffn1, ffn2=self.ffn2)
        return named


@dataclass(frozen=True, eq=False)
class Rejection:
    anchor: gs.Node
    reason: str
    gemms: tuple[gs.Node, ...]


@dataclass(frozen=True, eq=False)
class EncoderMatch:
    layers: tuple[EncoderLayer, ...]
    rejections: tuple[Rejection, ...]
    unmatched_gemms: tuple[tuple[gs.Node, str], ...] = ()  # (node, why)
    family: str = "none"   # the families of the matched layers, "+"-joined


class NoMatch(Exception):
    pass


