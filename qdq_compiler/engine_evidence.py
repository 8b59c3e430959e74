"""What a TensorRT (or TensorRT-RTX) build says about the engine it made, read from the builder itself.

The builder, at VERBOSE with `ProfilingVerbosity.DETAILED`, logs the total weights and activation
memory, the nodes it recognised as part of a self-attention pattern, and — TensorRT-RTX, which
builds ahead of time without a GPU — every engine layer with its input/output data types, tactic
and the ONNX nodes it covers (`Metadata: [ONNX Layer: ...]`). Where a GPU exists, the engine
inspector's JSON gives the same layer records. These pure functions turn either into one summary;
nothing here guesses from layer names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from . import graph as queries, ir

WEIGHTS = re.compile(r"Total Weights Memory:\s*(\d+)\s*bytes")
ACTIVATIONS = re.compile(r"Total Activation Memory:\s*(\d+)\s*bytes")
ATTENTION_NODE = re.compile(r"Found (.+) to be part of self-attention pattern")
ONNX_NODE = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
DATATYPE = re.compile(r"Datatype:\s*(\w+)")


@dataclass(frozen=True)
class EngineLayer:
    name: str
    kind: str
    inputs: tuple[str, ...]       # data types of the non-constant inputs (INT8, FP16, FP32, INT64, ...)
    outputs: tuple[str, ...]
    tactic: str
    onnx_nodes: tuple[str, ...]

    @property
    def int8(self) -> bool:
        return "INT8" in self.inputs

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.kind, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "tactic": self.tactic, "onnx_nodes": list(self.onnx_nodes)}


@dataclass(frozen=True)
class AttentionBlock:
    """One softmax-anchored attention in the ONNX graph: Q·K^T, softmax and ·V node names."""
    scores: str
    softmax: str
    context: str
    quantized: bool               # both batched matmuls read dequantized operands

    def nodes(self) -> frozenset[str]:
        return frozenset((self.scores, self.softmax, self.context))


def canonical_type(text: str) -> str:
    """'Int8', 'Half', 'Row major linear FP16 format', 'Float' ... -> INT8 / FP16 / FP32 / BF16 / ..."""
    lowered = text.lower()
    for token, name in (("int8", "INT8"), ("fp8", "FP8"), ("bf16", "BF16"), ("half", "FP16"), ("fp16", "FP16"),
                        ("int64", "INT64"), ("int32", "INT32"), ("bool", "BOOL"), ("float", "FP32"),
                        ("fp32", "FP32")):
        if token in lowered:
            return name
    return text


def _section(text: str, start: str, end: str) -> str:
    head = text.find(start)
    if head < 0:
        return ""
    tail = text.find(end, head + len(start))
    return text[head + len(start):tail if tail >= 0 else len(text)]


def layer_from_text(line: str) -> EngineLayer | None:
    """One line of the builder's 'Layers:' listing (the inspector's one-line format)."""
    if not line.startswith("Name: ") or ", LayerType: " not in line:
        return None
    name = line[len("Name: "):line.index(", LayerType: ")]
    kind = _section(line, ", LayerType: ", ",").strip()
    inputs = tuple(canonical_type(t) for t in DATATYPE.findall(_section(line, ", Inputs: [", "], Constants: [")))
    outputs = tuple(canonical_type(t) for t in DATATYPE.findall(_section(line, ", Outputs: [", "], TacticName: ")))
    tactic = _section(line, ", TacticName: ", ",").strip()
    nodes = tuple(ONNX_NODE.findall(line[line.find(", Metadata: "):] if ", Metadata: " in line else ""))
    return EngineLayer(name, kind, inputs, outputs, tactic, nodes)


def layer_from_inspector(record: dict | str) -> EngineLayer:
    """One layer of the engine inspector's JSON (`LayerInformationFormat.JSON`, DETAILED verbosity)."""
    if isinstance(record, str):  # LAYER_NAMES_ONLY engines list bare names
        return EngineLayer(record, "", (), (), "", ())

    def types(entries) -> tuple[str, ...]:
        found = []
        for entry in entries or []:
            value = next((v for k, v in entry.items() if "datatype" in k.lower()), None)
            if value is not None:
                found.append(canonical_type(str(value)))
        return tuple(found)

    metadata = str(record.get("Metadata", ""))
    return EngineLayer(str(record.get("Name", "")), str(record.get("LayerType", "")), types(record.get("Inputs")),
                       types(record.get("Outputs")), str(record.get("TacticName", "")),
                       tuple(ONNX_NODE.findall(metadata)))


def read_log(messages: list[str]) -> dict:
    """Weights/activation bytes, self-attention nodes and engine layers from the builder's log."""
    weights = activations = None
    attention_nodes: list[str] = []
    layers: list[EngineLayer] = []
    for message in messages:
        if (found := WEIGHTS.search(message)) is not None:
            weights = int(found.group(1))
        if (found := ACTIVATIONS.search(message)) is not None:
            activations = int(found.group(1))
        if (found := ATTENTION_NODE.search(message)) is not None:
            attention_nodes.append(found.group(1))
        if "Name: " in message and ", LayerType: " in message:
            layers += [layer for line in message.splitlines() if (layer := layer_from_text(line)) is not None]
    return {"weights_bytes": weights, "activation_bytes": activations,
            "attention_pattern_nodes": sorted(set(attention_nodes)), "layers": layers}


def _forward(tensor: gs.Tensor) -> list[gs.Node]:
    """Readers of `tensor`, looking through Cast, Q/DQ and a softmax NaN guard (SDPA exports)."""
    found = []
    for node in tensor.outputs:
        guard = node.op == "Where" and len(node.inputs) == 3 and node.inputs[2] is tensor and queries.is_nan_guard(node, 2)
        if node.op in ("Cast", "QuantizeLinear", "DequantizeLinear") or guard:
            found += _forward(node.outputs[0])
        else:
            found.append(node)
    return found


def attention_blocks(graph: gs.Graph) -> list[AttentionBlock]:
    """The graph's attentions: from the plan `qdqc insert` stored in the model (every family, DeBERTa's
    relative-position terms between Q·K^T and the softmax included), else every Softmax fed by a Q·K^T
    batched matmul (through scale and mask) and read by a ·V one (a float model, a foreign graph)."""
    from .carried import encoder_layers

    found = encoder_layers(graph)
    if found.source == "metadata":
        return [block for view in found.layers if (block := _planned_block(view)) is not None]
    return _walked_blocks(graph)


def _planned_block(view) -> AttentionBlock | None:
    probs = view.attention["probs"]
    context = next((n for n in probs.outputs if queries.is_bmm(n) and n.inputs[0] is probs), None)
    softmax = ir.producer(probs)
    while softmax is not None and softmax.op in ("Cast", "QuantizeLinear", "DequantizeLinear", "Where",
                                                 *queries.RESHAPE_OPS):
        softmax = ir.producer(softmax.inputs[0] if softmax.op != "Where" else softmax.inputs[2])
    if view.bmm1 is None or context is None or softmax is None or softmax.op != "Softmax":
        return None
    quantized = all(queries.is_dequantized(t) for t in view.attention.values())
    return AttentionBlock(view.bmm1.name, softmax.name, context.name, quantized)


def _walked_blocks(graph: gs.Graph) -> list[AttentionBlock]:
    blocks = []
    for softmax in graph.nodes:
        if softmax.op != "Softmax":
            continue
        node = queries.up(softmax.inputs[0])
        for _ in range(8):
            if node is None or queries.is_bmm(node):
                break
            data = [t for t in node.inputs if not ir.is_constant(t) and queries.reaches_bmm(t)] \
                if node.op in ("Mul", "Div", "Add", "Where", "Sub") else []
            node = queries.up(data[0]) if len(data) == 1 else None
        context = next((n for n in _forward(softmax.outputs[0]) if queries.is_bmm(n)), None)
        if node is None or not queries.is_bmm(node) or context is None:
            continue
        quantized = all(queries.is_dequantized(t) for t in (*node.inputs[:2], *context.inputs[:2]))
        blocks.append(AttentionBlock(node.name, softmax.name, context.name, quantized))
    return blocks


def quantized_gemms(graph: gs.Graph) -> set[str]:
    """MatMul/Gemm nodes whose first two inputs are both dequantized (INT8 GEMMs when TensorRT honours them)."""
    return {n.name for n in graph.nodes if n.op in ("MatMul", "Gemm") and len(n.inputs) >= 2
            and all(queries.is_dequantized(t) for t in n.inputs[:2])}


def summarize(graph: gs.Graph, log: dict, layers: list[EngineLayer],
              blocks: list[AttentionBlock] | None = None) -> dict:
    """The summary the build prints: memory, attention blocks fused, quantized GEMMs run in INT8.

    A block counts as fused when one engine layer covers its Q·K^T, softmax and ·V nodes; as INT8
    when that layer reads INT8. With no layer records (datacenter TensorRT without a GPU never gets
    here), the fused counts are None: unknown, not zero.
    """
    blocks = attention_blocks(graph) if blocks is None else blocks
    quantized = [b for b in blocks if b.quantized]
    covering = {b: next((layer for layer in layers if b.nodes() <= set(layer.onnx_nodes)), None) for b in blocks}
    gemms = quantized_gemms(graph)
    int8_nodes = {node for layer in layers if layer.int8 for node in layer.onnx_nodes}
    known = bool(layers)
    return {
        "weights_bytes": log.get("weights_bytes"),
        "activation_bytes": log.get("activation_bytes"),
        "attention_blocks": len(blocks),
        "attention_quantized": len(quantized),
        "attention_fused": sum(covering[b] is not None for b in blocks) if known else None,
        "attention_fused_int8": sum(covering[b] is not None and covering[b].int8 for b in quantized) if known else None,
        "attention_pattern_nodes": len(log.get("attention_pattern_nodes", [])),
        "quantized_gemms": len(gemms),
        "int8_gemms": len(gemms & int8_nodes) if known else None,
        "engine_layers": len(layers),
        "int8_layers": sum(layer.int8 for layer in layers),
    }
