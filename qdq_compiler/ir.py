"""The one graph representation: onnx-graphsurgeon, loaded and saved here only.

Everything that touches protobuf (loading, saving, shape inference, the checker)
lives in this module; passes see a `gs.Graph`.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import tempfile
import weakref
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
# graphsurgeon logs a multi-line warning on every export of a graph whose nodes share a name; repeated
# and empty node names are legal ONNX and qdqc keys nodes by identity, so only its errors are shown
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
GENERATED_MARK = "::"   # every node and tensor name qdqc makes is `{what it attaches to}::{role}`


# ---------------------------------------------------------------- model metadata

# graphsurgeon keeps no model-level metadata_props (import drops them, export writes none): qdqc carries
# them beside each graph, keyed by the graph's identity, read on import and written on export here
_METADATA: dict[int, dict[str, str]] = {}


def metadata(graph: gs.Graph) -> dict[str, str]:
    """The model-level metadata_props of `graph` (a mutable dict; what passes store there is saved)."""
    key = id(graph)
    if key not in _METADATA:
        _METADATA[key] = {}
        weakref.finalize(graph, _METADATA.pop, key, None)
    return _METADATA[key]


def import_model(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    metadata(graph).update({entry.key: entry.value for entry in model.metadata_props})
    return graph


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    del model.metadata_props[:]
    for key, value in sorted(metadata(graph).items()):
        model.metadata_props.add(key=key, value=value)
    return model


# ---------------------------------------------------------------- load / save

def check_input(path: str | os.PathLike, what: str = "an .onnx file") -> Path:
    """An input file that exists and is not a folder, or a one-line UsageError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected {what}")
    return path


def load(path: str | os.PathLike) -> gs.Graph:
    """Load an ONNX model (external data included) as a graph, or say why not."""
    model = read_model(path)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(Path(path).parent))
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: cannot read its external data ({str(exc).strip().splitlines()[0]})") from None
    return import_model(model)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model's protobuf without its external data, checked: a readable graph, a supported opset,
    external-data files inside the model's folder. What `load` and the benchmark runner rely on."""
    path = check_input(path)
    if path.suffix.lower() in (".xml", ".bin"):
        raise ModelError(f"{path}: OpenVINO IR is an output of qdqc, not an input: give the ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelError(f"{path}: not a readable ONNX model (truncated or corrupt protobuf: {exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot read ONNX model ({str(exc).strip().splitlines()[0]})") from None
    check_readable(model, str(path))
    _check_external_locations(model, path)
    return model


def from_model(model: onnx.ModelProto, where: str = "model") -> gs.Graph:
    """A graph from an in-memory model, with `load`'s checks (`where` names it in errors)."""
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"{where}: expected an onnx.ModelProto, got {type(model).__name__}")
    check_readable(model, where)
    copied = onnx.ModelProto()
    copied.CopyFrom(model)   # graphsurgeon keeps references into the proto (Constant tensors): never the user's
    return import_model(copied)


def check_readable(model: onnx.ModelProto, where: str) -> None:
    """A graph with nodes and an opset qdqc supports, or a one-line ModelError naming `where`."""
    if not model.graph.node or model.ir_version == 0:
        raise ModelError(f"{where}: not an ONNX model (no graph nodes or IR version)")
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise ModelError(f"{where}: opset {opset} is unsupported (need {MIN_OPSET}..{newest}; "
                         f"convert with onnx.version_converter.convert_version)")


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data file must lie inside the model's folder (no `../../etc/passwd`, no absolute path)."""
    folder = path.parent.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents:
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data at {location!r}, outside the model's "
                             "folder: refused")
        if not target.is_file():
            raise ModelError(f"{path}: tensor '{tensor.name}': external data file {location!r} is missing")


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors of a graph and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_tensors(sub)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    toposort(graph)
    return export_model(graph)


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
    external = constant_bytes(graph) > EXTERNAL_DATA_THRESHOLD
    try:
        staging = Path(tempfile.mkdtemp(prefix=".qdqc-", dir=parent))
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write output ({exc.strerror})") from None
    try:
        data_name = path.name + ".data"
        write_model(graph, staging / path.name, data_name if external else None)
        if external:
            os.replace(staging / data_name, parent / data_name)
        os.replace(staging / path.name, path)
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _heavy_constants(graph: gs.Graph, min_elements: int = 256) -> list[gs.Constant]:
    return [t for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) > min_elements]


class _ConstantsAsInputs:
    """Temporarily turn large constants into typed graph inputs, so an export carries no weights."""

    def __init__(self, graph: gs.Graph, heavy: list[gs.Constant]):
        self.graph, self.heavy = graph, heavy

    def __enter__(self):
        self.saved = [(t, t._values) for t in self.heavy]
        for tensor in self.heavy:
            tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
            tensor.type = "tensor_type"  # what gs.Variable.__init__ would have set
        self.graph.inputs.extend(self.heavy)
        return self

    def __exit__(self, *exc):
        del self.graph.inputs[len(self.graph.inputs) - len(self.heavy):]
        for tensor, values in self.saved:
            tensor.to_constant(values)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)  # wire type 2: length-delimited


_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def write_model(graph: gs.Graph, path: Path, data_name: str | None = None) -> None:
    """Serialize without copying the weights through protobuf (8 s for BERT-large's 1.3 GB).

    The graph skeleton is serialized normally; each large weight follows it as
    another `graph { initializer { ... raw_data } }` record, which protobuf
    parsers merge into the one graph (repeated fields append). With `data_name`
    the raw bytes go to that file next to the model instead (external data).
    """
    heavy = _heavy_constants(graph)
    names = {t.name for t in heavy}
    toposort(graph)
    with _ConstantsAsInputs(graph, heavy):
        model = export_model(graph)
    kept = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    data = open(path.parent / data_name, "wb") if data_name else None
    try:
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString())
            for tensor in heavy:
                values = np.ascontiguousarray(tensor.values)
                if values.dtype.byteorder == ">":
                    values = values.astype(values.dtype.newbyteorder("<"))
                proto = onnx.TensorProto(name=tensor.name, dims=values.shape,
                                         data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
                raw = memoryview(values).cast("B")
                if data is not None:
                    offset = data.tell()
                    data.write(raw)
                    proto.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                        proto.external_data.add(key=key, value=value)
                    body, tail = proto.SerializeToString(), b""
                else:
                    head = proto.SerializeToString()
                    body, tail = head + _field(_RAW_DATA_FIELD, raw.nbytes), raw
                tensor_length = len(body) + len(tail)
                record = _field(_INITIALIZER_FIELD, tensor_length)
                handle.write(_field(_GRAPH_FIELD, len(record) + tensor_length) + record + body)
                if tail:
                    handle.write(tail)
    finally:
        if data is not None:
            data.close()


def check_output(path: str | os.PathLike, *, inputs=(), overwrite: bool | None = None, others=()) -> Path:
    """Refuse, before any work, an output that cannot be written or would replace an input.

    `inputs` are the files the command reads: replacing one is refused, unless `overwrite` is True
    (None: the command has no --overwrite for this output); `others` are its other outputs."""
    path = Path(path)
    for source in inputs:
        if source is not None and same_file(path, source):
            if overwrite:
                break
            raise UsageError(f"{path}: output would overwrite the input {source}"
                             + (" (pass --overwrite to allow it)" if overwrite is not None else ""))
    for other in others:
        if other is not None and same_file(path, other):
            raise UsageError(f"{path}: is also the command's output {other}")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an output file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QdqcError(f"{path}: cannot write output (directory {parent} does not exist)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QdqcError(f"{path}: cannot write output (directory {parent} is not writable)")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise QdqcError(f"{path}: cannot write output (permission denied)")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write through a temp file in the same folder and rename: the path holds the old file or the whole
    new one, never part of it; the temp file is removed whatever stops the write (Ctrl-C, SIGTERM)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qdqc-", dir=path.parent if str(path.parent) else ".")
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report or engine is an ordinary file
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise QdqcError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


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
    return import_model(model)


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


def unique_node_names(graph: gs.Graph) -> int:
    """Give every repeat of a node name a fresh one (`name::1`, ...); returns how many were renamed.

    Repeated names are legal ONNX but onnxruntime refuses to load such a model, so what qdqc hands to
    a runtime (the calibration network, a lowered model) gets them; the first holder and unnamed nodes
    keep their names."""
    names = Names(graph)
    seen: set[str] = set()
    renamed = 0
    for node in graph.nodes:
        if node.name and node.name in seen:
            node.name = names.fresh(f"{node.name}{GENERATED_MARK}1")
            renamed += 1
        seen.add(node.name)
    return renamed


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

def describe(node: gs.Node) -> str:
    """How a message names a node: `Op 'name'`, or by its first output when it has no name.

    Only for people: empty and repeated node names are legal ONNX, so code keys nodes by
    identity, never by this text."""
    if node.name:
        return f"{node.op} '{node.name}'"
    output = node.outputs[0].name if node.outputs else "nothing"
    return f"unnamed {node.op} (output '{output}')"


def label(node: gs.Node) -> str:
    """A report's name for a node: its name, or `<op producing 'output'>` when it has none."""
    return node.name or describe(node)


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


def inline_constant(graph: gs.Graph, tensor: gs.Variable, value: np.ndarray) -> gs.Constant:
    """Replace a Constant node's output by an initializer of the same name and value, in every reader."""
    initializer = gs.Constant(tensor.name, np.array(value))
    for reader in list(tensor.outputs):
        for index, current in enumerate(reader.inputs):
            if current is tensor:
                reader.inputs[index] = initializer
    producer(tensor).outputs.clear()
    tensor.name = ""   # the initializer holds the name now; the orphaned Constant node goes at cleanup
    graph.nodes = [n for n in graph.nodes if n.outputs]
    return initializer


def own_constant(node: gs.Node, constant: gs.Constant) -> gs.Constant:
    """`constant` as `node` alone reads it: a copy in its place when other nodes read it too (exporters
    deduplicate equal constants: a random-weight model's zero biases and LayerNorm betas are one tensor),
    so a value folded into it changes this node only."""
    if len(constant.outputs) == 1:
        return constant
    own = gs.Constant(f"{constant.name}::{node.name}", constant.values.copy())
    node.inputs[node.inputs.index(constant)] = own
    return own


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
    with _ConstantsAsInputs(graph, _heavy_constants(graph)):
        toposort(graph)
        model = gs.export_onnx(graph, do_type_check=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    tensors = graph.tensors()
    typed = 0
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        kind = info.type.tensor_type
        if not isinstance(tensor, gs.Variable) or not kind.elem_type:
            continue
        known = kind.HasField("shape") and any(d.HasField("dim_value") for d in kind.shape.dim)
        vague = tensor.shape is None or not any(isinstance(d, int) for d in tensor.shape)
        if tensor.dtype is None or (vague and known):
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
            if kind.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in kind.shape.dim]
            typed += 1
    return typed


def upgrade_opset(graph: gs.Graph, version: int) -> gs.Graph:
    """The graph at a newer default-domain opset, by onnx.version_converter (weights never copied)."""
    from onnx import version_converter

    heavy = _heavy_constants(graph)
    originals = {t.name: t for t in heavy}
    with _ConstantsAsInputs(graph, heavy):
        toposort(graph)
        model = gs.export_onnx(graph, do_type_check=False)
    try:
        converted = version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises several exception types
        raise QdqcError(f"cannot convert the model to opset {version}: {str(exc).splitlines()[0]}") from None
    upgraded = gs.import_onnx(converted)
    for node in upgraded.nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor.name in originals:
                node.inputs[index] = originals[tensor.name]
    upgraded.inputs = [t for t in upgraded.inputs if t.name not in originals]
    names = Names(upgraded)
    for node in upgraded.nodes:
        if not node.name:  # the converter adds unnamed nodes (Constant axes for ReduceMean-18)
            node.name = names.fresh(f"{node.outputs[0].name}::{node.op}")
    return upgraded


def replace_contents(graph: gs.Graph, source: gs.Graph) -> None:
    """Make `graph` hold `source`'s nodes and interface (passes mutate the graph they are given)."""
    graph.nodes, graph.inputs, graph.outputs = source.nodes, source.inputs, source.outputs
    graph.opset, graph.import_domains = source.opset, source.import_domains
