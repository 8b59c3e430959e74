"""Graph queries every pattern and pass shares: one place for walking through Q/DQ pairs and data
movement, for the dequantized source of a tensor and for replacing every use of a tensor."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from . import ir

MOVE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity",
                      "Dropout", "QuantizeLinear", "DequantizeLinear", "Split", "Slice", "Gather"})
POINTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Gelu", "Relu",
                           "Sqrt", "Cast", "QuantizeLinear", "DequantizeLinear", "FastGelu", "BiasGelu"})
GEMM_OPS = frozenset({"MatMul", "Gemm"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# only rearrange elements: they commute with per-tensor quantization
LAYOUT_OPS = RESHAPE_OPS | {"Transpose"}
NARROW = "::narrow"   # names the Clip that keeps a 7-bit operand on its grid (calibrate.clip_to_grid)


def final_readers(tensor: gs.Tensor) -> list[tuple[gs.Tensor, gs.Node]]:
    """(the tensor it reads, the node) for each reader of `tensor`, past single-reader Reshape/Transpose."""
    found = []
    for reader in tensor.outputs:
        source = tensor
        while reader.op in LAYOUT_OPS and len(reader.outputs[0].outputs) == 1:
            source, reader = reader.outputs[0], reader.outputs[0].outputs[0]
        found.append((source, reader))
    return found


def narrowing_clip(q: gs.Node) -> gs.Node | None:
    """The Clip a QuantizeLinear reads when its operand is on a 7-bit grid, else None."""
    clip = ir.producer(q.inputs[0])
    return clip if clip is not None and clip.op == "Clip" and clip.name.endswith(NARROW) else None




def float_source(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor behind any chain of Q->DQ pairs."""
    while True:
        dq = ir.producer(tensor)
        if dq is None or dq.op != "DequantizeLinear":
            return tensor
        q = ir.producer(dq.inputs[0])
        if q is None or q.op != "QuantizeLinear":
            return tensor
        tensor = q.inputs[0]


def origin(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor behind Q/DQ pairs, reshapes (Gemm exports flatten tokens around each GEMM) and
    per-channel constant Muls and Subs (SmoothQuant's 1/s and OS+'s shift on a GEMM branch)."""
    while True:
        tensor = float_source(tensor)
        node = ir.producer(tensor)
        if node is not None and is_channel_scale(node, 0):
            tensor = node.inputs[0]
        elif node is not None and node.op in RESHAPE_OPS:
            tensor = node.inputs[0]
        else:
            return tensor


def is_channel_scale(node: gs.Node, index: int) -> bool:
    """Mul(x, constant vector) or Sub(x, constant vector) read at x: SmoothQuant's per-channel 1/s and
    Outlier Suppression+'s per-channel shift on a GEMM branch."""
    return node.op in ("Mul", "Sub") and index == 0 and len(node.inputs) == 2 and ir.is_constant(node.inputs[1]) \
        and ir.constant(node.inputs[1]).ndim == 1


def uses(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """(node, input index) reading `tensor`, looking through Q->DQ pairs."""
    found = []
    for node in tensor.outputs:
        if node.op == "QuantizeLinear" and node.inputs[0] is tensor:
            for dq in node.outputs[0].outputs:
                if dq.op == "DequantizeLinear":
                    found.extend(uses(dq.outputs[0]))
            continue
        for index, value in enumerate(node.inputs):
            if value is tensor:
                found.append((node, index))
    return found


def up(tensor: gs.Tensor) -> gs.Node | None:
    """The producer of `tensor`, skipping Q/DQ and Cast."""
    tensor = float_source(tensor)
    node = ir.producer(tensor)
    while node is not None and node.op in ("Cast", "QuantizeLinear", "DequantizeLinear"):
        node = ir.producer(node.inputs[0])
    return node


# what may sit between a GEMM and its constant weight: QAT exports write weight -> Q -> DQ -> Transpose
# (torch's F.linear reads W^T), with Identity, Cast or a shape-keeping Reshape on the way
WEIGHT_PATH_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "QuantizeLinear", "DequantizeLinear"})


def weight_of(node: gs.Node, index: int):
    """(constant, transposed, user, already quantized) for a 2-D GEMM weight input, else None.

    `user` reads the constant where a new quantizer would go: the GEMM itself when the weight is
    already behind a DequantizeLinear (so placement sees it quantized), else the first op on the path."""
    tensor, user = node.inputs[index], (node, index)
    quantized = transposed = False
    reshapes: list[tuple[list[int], bool]] = []   # (target shape, transposed at that point)
    for _ in range(8):
        if ir.is_constant(tensor):
            break
        source = ir.producer(tensor)
        if source is None or source.op not in WEIGHT_PATH_OPS:
            return None
        if source.op == "Transpose":
            if list(source.attrs.get("perm", [1, 0])) != [1, 0]:
                return None
            transposed = not transposed
        elif source.op == "Reshape":
            target = ir.constant(source.inputs[1])
            if target is None or target.size != 2:
                return None
            reshapes.append(([int(d) for d in target], transposed))
        elif source.op == "DequantizeLinear":
            quantized = True
        elif source.op == "QuantizeLinear" and not quantized:
            return None   # a Q that no DQ follows is not a fake-quantized weight
        if not quantized:
            user = (source, 0)
        tensor = source.inputs[0]
    value = ir.constant(tensor)
    if value is None or value.ndim != 2:
        return None
    # a Reshape on the path may only restate the shape it already has (else the output axis moves)
    # (transposes between the constant and a Reshape: all of them, less those between it and the GEMM)
    if any(target != list(value.shape[::-1] if transposed != flipped else value.shape) for target, flipped in reshapes):
        return None
    return tensor, transposed, user, quantized


def sole_reader(constant: gs.Constant, node: gs.Node) -> bool:
    """Whether `node` is the one node reading `constant` (through its Q/DQ): a weight shared by several
    layers (ALBERT shares every layer's) cannot be rescaled or widened for one of them."""
    readers, frontier = [], [constant]
    while frontier:
        for reader in frontier.pop().outputs:
            if reader.op in ("QuantizeLinear", "DequantizeLinear"):
                frontier.extend(reader.outputs)
            else:
                readers.append(reader)
    return len(readers) == 1 and readers[0] is node


def is_dequantized(tensor: gs.Tensor) -> bool:
    """Produced by a DequantizeLinear, possibly reshaped, transposed or cast on the way (data movement
    commutes with quantization; TensorRT moves Q/DQ across it)."""
    node = ir.producer(tensor)
    while node is not None and node.op in LAYOUT_OPS | {"Cast", "Identity"}:
        node = ir.producer(node.inputs[0])
    return node is not None and node.op == "DequantizeLinear"


def is_nan_guard(node: gs.Node, index: int) -> bool:
    """Where(IsNaN(x), 0, x): torch's SDPA export guards the softmax output this way."""
    if node.op != "Where" or index != 2:
        return False
    test = ir.producer(node.inputs[0])
    return test is not None and test.op == "IsNaN" and ir.is_constant(node.inputs[1])


def is_bmm(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and not any(ir.is_constant(t) for t in node.inputs)


def reaches_bmm(tensor: gs.Tensor, depth: int = 6) -> bool:
    node = up(tensor)
    if node is None or depth == 0:
        return False
    if is_bmm(node):
        return True
    if node.op in ("Mul", "Div", "Add", "Where", "Sub"):
        return any(reaches_bmm(t, depth - 1) for t in node.inputs if not ir.is_constant(t))
    return False


def dequantized_source(tensor: gs.Tensor) -> gs.Tensor | None:
    """The output of the DequantizeLinear of a Q->DQ pair that already reads `tensor`, if any."""
    for q in tensor.outputs:
        if q.op == "QuantizeLinear" and q.inputs[0] is tensor:
            for dq in q.outputs[0].outputs:
                if dq.op == "DequantizeLinear":
                    return dq.outputs[0]
    return None


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Every node input reading `old` reads `new` instead (graph outputs untouched); returns the count."""
    replaced = 0
    for reader in list(old.outputs):
        for index, value in enumerate(reader.inputs):
            if value is old:
                reader.inputs[index] = new
                replaced += 1
    return replaced
