"""The one graph representation: onnx-graphsurgeon, loaded and saved here only.

Everything that touches protobuf (loading, saving, shape inference, the checker)
lives in this module; passes see a `gs.Graph`.
"""
from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import ModelError, QdqcError, UsageError

MIN_OPSET = 13
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - (64 << 20)  # weights past this go to <model>.data
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


# ---------------------------------------------------------------- load / save

def load(path: str | os.PathLike) -> gs.Graph:
    """Load an ONNX model (external data included) as a graph, or say why not."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except DecodeError as exc:
        raise ModelError(f"{path}: not a readable ONNX model (truncated or corrupt protobuf: {exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot read ONNX model ({exc})") from None
    if not model.graph.node or model.ir_version == 0:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes or IR version)")
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise ModelError(f"{path}: opset {opset} is unsupported (need {MIN_OPSET}..{newest}; "
                         f"convert with onnx.version_converter.convert_version)")
    return gs.import_onnx(model)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    toposort(graph)
    return gs.export_onnx(graph, do_type_check=False)


def constant_bytes(graph: gs.Graph) -> int:
    total = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            total += int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    return total


def save(graph: gs.Graph, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
         overwrite: bool = False) -> Path:
    """Write atomically (temp file + rename); weights go to `<name>.data` past 2 GB."""
    path = Path(path)
    if source is not None and same_file(path, source) and not overwrite:
        raise UsageError(f"{path}: output would overwrite the input model (pass --overwrite to allow it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QdqcError(f"{path}: cannot write output (directory {parent} does not exist)")
    model = to_model(graph)
    external = constant_bytes(graph) > EXTERNAL_DATA_THRESHOLD
    try:
        staging = Path(tempfile.mkdtemp(prefix=".qdqc-", dir=parent))
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write output ({exc.strerror})") from None
    try:
        data_name = path.name + ".data"
        onnx.save_model(model, str(staging / path.name), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if external:
            os.replace(staging / data_name, parent / data_name)
        os.replace(staging / path.name, path)
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qdqc-", dir=path.parent if str(path.parent) else ".")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write ({exc.strerror or exc})") from None


# ---------------------------------------------------------------- whole-graph services

def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """onnx shape inference; returns a new graph carrying the inferred types."""
    model = to_model(graph)
    if model.ByteSize() > PROTOBUF_LIMIT:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
            onnx.save_model(model, src, save_as_external_data=True, location="in.data")
            onnx.shape_inference.infer_shapes_path(src, dst)
            model = onnx.load(dst)
    else:
        model = onnx.shape_inference.infer_shapes(model)
    return gs.import_onnx(model)


def check_model(graph: gs.Graph) -> None:
    """onnx.checker over the exported graph (through a file past the protobuf limit)."""
    model = to_model(graph)
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "m.onnx")
                onnx.save_model(model, src, save_as_external_data=True, location="m.data")
                onnx.checker.check_model(src)
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QdqcError(str(exc).strip().splitlines()[0]) from None


def toposort(graph: gs.Graph) -> None:
    """Order-preserving topological sort (Kahn's algorithm over original indices).

    Iterative, unlike graphsurgeon's recursive sort, which overflows the stack
    on graphs a few hundred nodes deep (BERT-base with Q/DQ).
    """
    nodes = list(graph.nodes)
    producer = {}
    for index, node in enumerate(nodes):
        for tensor in node.outputs:
            producer[tensor.name] = index
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        deps = {producer[name] for name in input_names(node) if name in producer} - {index}
        pending[index] = len(deps)
        for dep in deps:
            users[dep].append(index)
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(pending) if count)
        raise QdqcError(f"graph has a cycle through node '{stuck.name}'")
    graph.nodes = [nodes[i] for i in order]


def input_names(node: gs.Node) -> list[str]:
    """Names a node reads, including outer-scope names used by its subgraphs."""
    names = [t.name for t in node.inputs if t.name]
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for inner in value.nodes:
                names.extend(input_names(inner))
    return names


def cleanup(graph: gs.Graph) -> None:
    graph.cleanup(remove_unused_graph_inputs=False)
    toposort(graph)


class Names:
    """Unique, deterministic names: `base`, then `base_1`, `base_2`, ..."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self.taken:
            counter += 1
            name = f"{base}_{counter}"
        self.taken.add(name)
        return name


# ---------------------------------------------------------------- small graph queries

def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return value.values if isinstance(value, gs.Constant) else None
    return None


def is_constant(tensor: gs.Tensor) -> bool:
    return constant(tensor) is not None


def scalar(tensor: gs.Tensor) -> float | None:
    value = constant(tensor)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def annotate_shapes(graph: gs.Graph) -> int:
    """Run onnx shape inference and write the inferred types onto the graph's tensors.

    Large constants travel as typed graph inputs, so inference never copies the
    weights (BERT-large is 1.3 GB of them). Returns the number of tensors typed.
    """
    heavy = [t for t in graph.tensors().values()
             if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) > 256]
    saved = [(t, t._values) for t in heavy]
    for tensor in heavy:
        tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
        tensor.type = "tensor_type"  # what gs.Variable.__init__ would have set
    graph.inputs.extend(heavy)
    try:
        toposort(graph)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        del graph.inputs[len(graph.inputs) - len(heavy):]
        for tensor, values in saved:
            tensor.to_constant(values)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    tensors = graph.tensors()
    typed = 0
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        kind = info.type.tensor_type
        if not isinstance(tensor, gs.Variable) or not kind.elem_type:
            continue
        if tensor.dtype is None or tensor.shape is None:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
            if kind.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in kind.shape.dim]
            typed += 1
    return typed
