"""Integer GEMMs for onnxruntime on CPU: y = DQ(x_q)·DQ(W_q) + b becomes one
com.microsoft.MatMulIntegerToFloat over uint8 activations and int8 weights.

The activation's symmetric int8 grid is shifted to uint8 with zero point 128 (the
same values: q + 128), the form onnxruntime's x86 kernels are fast for (int8 activations run 4-11x
slower: `tools/bench_kernels.py --sections forms`); the weight stays int8 per channel; the int32
accumulator is scaled by s_x·s_w per output channel and the bias added inside the op. One uint8
QuantizeLinear serves all GEMMs that read the same tensor.

Exact on every CPU by default (`qdq_compiler.cpu`): `pair-weight-rows` then orders the weights'
rows so that their int8 pairs fit x86's int16 pair sums, and the attention batched matmuls, whose B
is a full-range int8 activation, take B as uint8 with zero point 128 (the U8U8 kernel, which widens
to int16 before multiplying) unless calibration put it on a 7-bit grid (`--weight-bits 7`, compile's
default for CPU targets: Kᵀ and V clipped to ±63 steps), where int8 is exact everywhere. With
`--isa vnni` B stays int8 (the faster U8S8 kernel, exact only where products are summed in int32).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq_compiler import ir, quant
from qdq_compiler.cpu import Isa, KernelSettings
from qdq_compiler.graph import LAYOUT_OPS, narrowing_clip
from qdq_compiler.pipeline import PassContext, PassResult, register

from .fold_weight_quantizers import quantized_weight

MS_DOMAIN = "com.microsoft"


class Operand:
    """A GEMM input that is DQ(Q(x)) (activation) or DQ(int8 constant)/DQ(Q(constant)) (weight)."""

    def __init__(self, dq: gs.Node):
        self.dq = dq
        source = ir.producer(dq.inputs[0])
        self.q = source if source is not None and source.op == "QuantizeLinear" else None
        self.scale = dq.inputs[1]
        self.axis = quant.channel_axis(dq.attrs, ir.constant(self.scale).size)
        stored = ir.constant(dq.inputs[0])
        if self.q is not None and ir.is_constant(self.q.inputs[0]):
            self.weight = quantized_weight(self.q)
        elif stored is not None:
            self.weight = stored
        else:
            self.weight = None
        self.float_input = self.q.inputs[0] if self.q is not None else None

    @classmethod
    def of(cls, tensor: gs.Tensor) -> "Operand | None":
        moves = []  # data-movement ops between the DQ and the GEMM: they run on the integers instead
        dq = ir.producer(tensor)
        while dq is not None and dq.op in LAYOUT_OPS and len(dq.outputs[0].outputs) == 1:
            moves.append(dq)
            dq = ir.producer(dq.inputs[0])
        if dq is None or dq.op != "DequantizeLinear":
            return None
        operand = cls(dq)
        operand.moves = moves[::-1]  # DQ -> moves -> GEMM: replayed on the integers
        zero = ir.constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            return None
        if operand.weight is None and (operand.q is None or operand.axis is not None):
            return None
        return operand


class Lowering:
    def __init__(self, graph: gs.Graph, isa: Isa = Isa.PORTABLE):
        self.graph, self.isa = graph, isa
        self.names = ir.Names(graph)
        self.quantized: dict[tuple[str, str, str], gs.Variable] = {}
        self.zero_of: dict[str, gs.Constant] = {}

    def requantize(self, operand: Operand, unsigned: bool) -> gs.Variable:
        """x as uint8 (zero point 128) or int8 (zero point 0) on the operand's scale, made once.

        Quantization commutes with Reshape/Transpose, so when x only exists to be quantized it
        is quantized before them and they move int8 instead of float (4x less memory traffic;
        onnxruntime's own QDQ propagation would otherwise add a Q/DQ pair per move)."""
        wanted = (operand.float_input.name, operand.scale.name, "u8" if unsigned else "s8")
        if wanted in self.quantized:
            return self.quantized[wanted]
        source, moves = operand.float_input, []
        clip = narrowing_clip(operand.q) if operand.q is not None else None
        if clip is not None:   # a 7-bit operand's Clip commutes with the moves too: it goes with the quantizer
            source = clip.inputs[0]
        while True:
            move = ir.producer(source)
            readers = [n for n in source.outputs if n.op != "QuantizeLinear" and n is not clip
                       and (not moves or n is not moves[-1])]
            if move is None or move.op not in LAYOUT_OPS or readers:
                break
            moves.append(move)
            source = move.inputs[0]
        key = (source.name, operand.scale.name, ("u8" if unsigned else "s8") + ("_narrow" if clip else ""))
        if key not in self.quantized:
            dtype = np.uint8 if unsigned else np.int8
            zero = gs.Constant(self.names.fresh(f"{source.name}::{key[2]}_zero_point"),
                               np.array(128 if unsigned else 0, dtype))
            out = gs.Variable(self.names.fresh(f"{source.name}::{key[2]}"), dtype=dtype, shape=source.shape)
            value = source
            if clip is not None:
                value = gs.Variable(self.names.fresh(f"{source.name}::narrowed"), dtype=source.dtype)
                self.graph.nodes.append(gs.Node("Clip", self.names.fresh(f"{source.name}::narrow"),
                                                inputs=[source, *clip.inputs[1:]], outputs=[value]))
            self.graph.nodes.append(gs.Node("QuantizeLinear", self.names.fresh(f"{source.name}::{key[2]}_q"),
                                            inputs=[value, operand.scale, zero], outputs=[out]))
            self.quantized[key] = out
            self.zero_of[out.name] = zero
        self.quantized[wanted] = self.replay(moves[::-1], self.quantized[key])
        return self.quantized[wanted]

    def lower(self, gemm: gs.Node) -> bool:
        if gemm.op == "Gemm" and (gemm.attrs.get("transA", 0) or gemm.attrs.get("alpha", 1.0) != 1.0
                                  or gemm.attrs.get("beta", 1.0) != 1.0):
            return False
        a, b = Operand.of(gemm.inputs[0]), Operand.of(gemm.inputs[1])
        if a is None or b is None or a.weight is not None or a.q is None:
            return False
        a_in = self.replay(a.moves, self.requantize(a, unsigned=True))
        a_zero = self.quantized_zero(a_in)
        if b.weight is not None:
            values, axis = b.weight, b.axis
            for move in b.moves:   # the weight's own Transpose (DQ -> Transpose -> GEMM) applies to its integers
                if move.op != "Transpose":
                    return False
                perm = list(move.attrs.get("perm", range(values.ndim)[::-1]))
                values, axis = values.transpose(perm), (None if axis is None else perm.index(axis % values.ndim))
            if gemm.op == "Gemm" and gemm.attrs.get("transB", 0):
                values, axis = values.T, (None if axis is None else 1 - axis)
            if values.ndim != 2 or (axis is not None and axis != 1):
                return False
            b_scale, b_zero = b.scale, None
            b_in = gs.Constant(self.names.fresh(f"{gemm.name}::weight_int8"), np.ascontiguousarray(values))
        else:   # an activation: int8 when on a 7-bit grid or for VNNI; full-range pairs go uint8 (U8U8, exact)
            wide = self.isa is Isa.PORTABLE and narrowing_clip(b.q) is None
            b_in = self.replay(b.moves, self.requantize(b, unsigned=wide))
            b_scale, b_zero = b.scale, (self.quantized_zero(b_in) if wide else None)
        inputs = [a_in, b_in, a.scale, b_scale, a_zero] + ([b_zero] if b_zero is not None else [])
        output = gemm.outputs[0]
        bias = self.bias_of(gemm, output)
        if bias is not None:
            add, constant = bias
            inputs += ([] if b_zero is not None else [gs.Variable.empty()]) + [constant]
            if add is not None:  # MatMul + Add(b): the Add's output is the result now
                output = add.outputs[0]
                add.outputs.clear()
        gemm.outputs.clear()
        self.graph.nodes.append(gs.Node("MatMulIntegerToFloat", self.names.fresh(f"{gemm.name}::integer"),
                                        inputs=inputs, outputs=[output], domain=MS_DOMAIN))
        return True

    def replay(self, moves: list[gs.Node], tensor: gs.Variable) -> gs.Variable:
        """Apply data-movement ops (a Reshape of the context, say) to the integers instead."""
        for move in moves:
            out = gs.Variable(self.names.fresh(f"{move.outputs[0].name}::{tensor.dtype.__name__}"), dtype=tensor.dtype)
            self.graph.nodes.append(gs.Node(move.op, self.names.fresh(f"{move.name}::integer"), dict(move.attrs),
                                            inputs=[tensor, *move.inputs[1:]], outputs=[out]))
            self.zero_of[out.name] = self.zero_of[tensor.name]
            tensor = out
        return tensor

    def quantized_zero(self, tensor: gs.Variable) -> gs.Constant:
        return self.zero_of[tensor.name]

    @staticmethod
    def bias_of(gemm: gs.Node, output: gs.Tensor):
        if gemm.op == "Gemm" and len(gemm.inputs) > 2 and gemm.inputs[2].name:
            return None if ir.constant(gemm.inputs[2]) is None else (None, gemm.inputs[2])
        readers = output.outputs
        if len(readers) != 1 or readers[0].op != "Add":
            return None
        add = readers[0]
        other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        value = ir.constant(other)
        if value is None or value.ndim != 1:
            return None
        return add, other


@register("lower-onnxruntime", requires=("qdq",), provides=("integer-gemms",), settings=KernelSettings)
def lower_onnxruntime(graph: gs.Graph, ctx: PassContext) -> PassResult:
    lowering = Lowering(graph, ctx.settings(KernelSettings).isa)
    lowered = weights = batched = 0
    for node in list(graph.nodes):
        if node.op in ("MatMul", "Gemm") and lowering.lower(node):
            lowered += 1
    for node in graph.nodes:
        if node.op == "MatMulIntegerToFloat":
            if isinstance(node.inputs[1], gs.Constant):
                weights += 1
            else:
                batched += 1
    if lowered:
        domains = [d for d in (graph.import_domains or []) if d.domain != MS_DOMAIN]
        if not any(d.domain in ("", "ai.onnx") for d in domains):
            domains.append(onnx.helper.make_opsetid("", graph.opset))
        graph.import_domains = domains + [onnx.helper.make_opsetid(MS_DOMAIN, 1)]
        ir.cleanup(graph)
    return PassResult(lowered > 0, {"gemms_lowered": lowered, "weight_gemms": weights, "batched_matmuls": batched,
                                    "uint8_quantizers": sum(n.op == "QuantizeLinear" and n.outputs[0].dtype == np.uint8
                                                            for n in graph.nodes),
                                    "int8_quantizers": sum(n.op == "QuantizeLinear" and n.outputs[0].dtype == np.int8
                                                           for n in graph.nodes)})
