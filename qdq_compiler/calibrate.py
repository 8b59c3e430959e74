"""`calibrate`: stream data through onnxruntime, histogram every activation a Q reads, write scales.

The model is run with every Q/DQ pair bypassed (calibration observes the float
network, as pytorch-quantization does with quantization disabled), the float
tensors the activation quantizers read are extra graph outputs, and each batch
is handed to that tensor's collector and dropped.
"""
from __future__ import annotations

import numbers
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from . import carried, ir, quant
from .calibration import HistogramCollector, Method, amaxes
from .config import choice, names
from .data import Dataset, InputSpec
from .errors import QdqcError, UsageError
from .graph import NARROW, final_readers, narrowing_clip


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation scales are computed; the defaults are the CLI's and the API's (smoothing aside,
    which is `SmoothConfig`). Percentile 99.999 with smoothing is the best recipe measured (README);
    pytorch-quantization's own default is percentile 99.99 without smoothing."""

    method: Method = Method.PERCENTILE
    percentile: float = 99.999
    batch_size: int = 16
    num_samples: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    trim_padding: bool = True
    shard: tuple[int, int] | None = None   # (index, count): exact merges across machines
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "method", choice(Method, self.method, "--method"))
        object.__setattr__(self, "providers", names(self.providers, "--providers"))
        if not self.providers:
            raise UsageError("--providers: name at least one onnxruntime execution provider")
        for option, value, kind in (("--percentile", self.percentile, numbers.Real),
                                    ("--batch-size", self.batch_size, numbers.Integral),
                                    ("--num-samples", self.num_samples, numbers.Integral)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise UsageError(f"{option}: expected {'an integer' if kind is numbers.Integral else 'a number'}, "
                                 f"got {value!r}")
        if not 0 < self.percentile <= 100:
            raise UsageError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_samples is not None and self.num_samples < 1:
            raise UsageError(f"--num-samples must be at least 1, got {self.num_samples}")
        if isinstance(self.shard, str):
            try:
                index, count = (int(part) for part in self.shard.split("/"))
            except ValueError:
                raise UsageError(f"--shard {self.shard!r}: expected K/N, e.g. 0/4") from None
            object.__setattr__(self, "shard", (index, count))
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise UsageError(f"--shard must be K/N with 0 <= K < N, got {self.shard[0]}/{self.shard[1]}")


@dataclass
class Quantizers:
    """The activation quantizers of a Q/DQ graph, grouped by the scale initializer they share."""

    tensors: list[str]                                      # float tensors read by activation Qs
    groups: dict[str, list[str]] = field(default_factory=dict)   # scale constant -> tensors


def activation_quantizers(graph: gs.Graph) -> Quantizers:
    found = Quantizers([])
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or ir.is_constant(node.inputs[0]):
            continue
        clip = narrowing_clip(node)   # a 7-bit operand's bound: the quantizer observes what it clips
        tensor = (clip.inputs[0] if clip is not None else node.inputs[0]).name
        if tensor not in found.tensors:
            found.tensors.append(tensor)
        members = found.groups.setdefault(node.inputs[1].name, [])
        if tensor not in members:
            members.append(tensor)
    return found


QDQ_MODEL = "the Q/DQ model from `qdqc insert`/`qdqc calibrate`"


def require_fake_quant(graph: gs.Graph, command: str, wanted: str = QDQ_MODEL) -> None:
    """Refuse a lowered graph: its float network cannot be recovered by bypassing Q/DQ pairs."""
    lowered = _lowered(graph)
    if lowered is not None:
        raise UsageError(f"the model is already lowered {lowered}: `{command}` needs {wanted}")


def _lowered(graph: gs.Graph) -> str | None:
    """What shows `graph` was lowered for a runtime: the target `lower` recorded, an integer kernel, an
    activation quantizer feeding something other than DequantizeLinear, or FP16 activation scales (the
    TensorRT lowering written before the record existed); None for a float or Q/DQ graph."""
    from .insert import LOWERED_OPS
    from .lower import LOWERED_KEY

    target = ir.metadata(graph).get(LOWERED_KEY)
    if target is not None:
        return f"for {target}"
    node = next((n for n in graph.nodes if n.op in LOWERED_OPS), None)
    activations = [n for n in graph.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])]
    node = node or next((q for q in activations if any(r.op != "DequantizeLinear" for r in q.outputs[0].outputs)),
                        None)
    if node is not None:
        return f"({ir.describe(node)})"
    half = next((q for q in activations if ir.constant(q.inputs[1]) is not None
                 and ir.constant(q.inputs[1]).dtype == np.float16), None)
    return None if half is None else "for tensorrt (its activation scales are FP16)"


def _activation_scales(graph: gs.Graph) -> tuple[list[str], list[str]]:
    """(tensors whose activation QuantizeLinear has a constant scale, those of them still at insert's
    placeholder)."""
    scales = [(q.inputs[0].name, ir.constant(q.inputs[1])) for q in graph.nodes
              if q.op == "QuantizeLinear" and not ir.is_constant(q.inputs[0]) and len(q.inputs) > 1]
    known = [(tensor, s) for tensor, s in scales if s is not None]
    return [tensor for tensor, _ in known], [tensor for tensor, s in known if quant.is_placeholder(s)]


def require_calibrated(graph: gs.Graph, command: str) -> None:
    """Refuse a graph whose activation scales are all still insert's placeholders (never calibrated)."""
    known, placeholders = _activation_scales(graph)
    if known and len(placeholders) == len(known):
        raise UsageError(f"the model is not calibrated: its {len(known)} activation quantizers still have insert's "
                         f"placeholder scale {quant.PLACEHOLDER_SCALE}; run `qdqc calibrate` before `{command}`")
    if placeholders:   # insert added quantizers to a calibrated (QAT) model: lowering them would use scale 1
        raise UsageError(f"{len(placeholders)} of {len(known)} activation quantizers (first: '{placeholders[0]}') "
                         f"still have insert's placeholder scale {quant.PLACEHOLDER_SCALE}; run `qdqc calibrate "
                         f"--keep-scales` (keeps the other scales) before `{command}`")


def float_network(graph: gs.Graph, outputs: list[str], keep=()) -> gs.Graph:
    """A copy of `graph` with every Q->DQ pair bypassed (but the QuantizeLinear nodes in `keep`, given
    as nodes of `graph`: names may be empty or repeated) and `outputs` exposed."""
    kept = {id(n) for n in keep}
    positions = [i for i, n in enumerate(graph.nodes) if id(n) in kept]
    network = graph.copy()   # copies the nodes in order: position i is the copy of graph.nodes[i]
    kept = {id(network.nodes[i]) for i in positions}
    tensors = network.tensors()
    for dq in [n for n in network.nodes if n.op == "DequantizeLinear"]:
        q = ir.producer(dq.inputs[0])
        if q is None or q.op != "QuantizeLinear" or id(q) in kept:
            continue
        source, target = q.inputs[0], dq.outputs[0]
        clip = narrowing_clip(q)
        if clip is not None:   # the float network: the 7-bit operand's Clip is part of its quantizer
            source = clip.inputs[0]
        for reader in list(target.outputs):
            for index, value in enumerate(reader.inputs):
                if value is target:
                    reader.inputs[index] = source
        if target in network.outputs:
            network.outputs = [source if t is target else t for t in network.outputs]
    for name in outputs:
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = np.float32
        if tensor not in network.outputs:
            network.outputs.append(tensor)
    network.cleanup(remove_unused_graph_inputs=False)
    ir.unique_node_names(network)   # onnxruntime refuses repeated node names
    return network


def session(graph: gs.Graph, providers: tuple[str, ...]):
    import onnxruntime as ort

    check_providers(providers)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures come back as one line from `run`
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # With dozens of intermediate tensors as outputs the extended fusions cannot apply and their
    # layout changes only add copies: basic optimization is faster here (measured on MiniLM).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    model = ir.to_model(graph)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QdqcError(f"onnxruntime cannot load the model: {ort_message(exc)}") from None


def check_providers(providers: tuple[str, ...]) -> None:
    """Unknown or unavailable execution providers are refused (onnxruntime would fall back to the CPU,
    printing its own lines)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise UsageError(f"--providers {','.join(providers) or '(none)'}: onnxruntime here has {', '.join(available)}")


def model_inputs(graph: gs.Graph) -> list[InputSpec]:
    return [InputSpec.of(t) for t in graph.inputs]


def channel_ranges(graph: gs.Graph, dataset: Dataset, config: CalibrationConfig,
                   tensors: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Running min and max per channel (last axis) of `tensors` over the data (float network, every row
    the calibration histograms see), the same over the tokens the attention mask keeps, and the first
    batch's values of each, as [tokens, channels] rows."""
    runner = session(float_network(graph, tensors), config.providers)
    _, batches = model_batches(graph, dataset, config)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    attended: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first: dict[str, np.ndarray] = {}
    for index, feeds in enumerate(batches):
        mask = feeds.get("attention_mask")
        for name, values in zip(tensors, run(runner, tensors, feeds, f"calibration batch {index}")):
            rows = values.reshape(-1, values.shape[-1])
            first.setdefault(name, rows)
            low[name] = _running(np.minimum, low.get(name), rows.min(axis=0))
            high[name] = _running(np.maximum, high.get(name), rows.max(axis=0))
            if mask is not None and rows.shape[0] == mask.size:   # token rows: padding left out
                rows = rows[mask.reshape(-1).astype(bool)]
            if len(rows):
                found = attended.get(name, (None, None))
                attended[name] = (_running(np.minimum, found[0], rows.min(axis=0)),
                                  _running(np.maximum, found[1], rows.max(axis=0)))
    return low, high, attended, first


def _running(combine, so_far, found):
    return found if so_far is None else combine(so_far, found)


def collect(graph: gs.Graph, dataset: Dataset,
            config: CalibrationConfig) -> tuple[dict[str, HistogramCollector], int]:
    """One pass over the data: every activation quantizer's collector, and the samples this run kept."""
    quantizers = activation_quantizers(graph)
    if not quantizers.tensors:
        raise QdqcError("the model has no activation QuantizeLinear to calibrate (run `qdqc insert` first)")
    require_fake_quant(graph, "qdqc calibrate")
    runner = session(float_network(graph, quantizers.tensors), config.providers)
    collectors = {name: HistogramCollector() for name in quantizers.tensors}
    select = (lambda i: True) if config.shard is None else \
        (lambda i: i == 0 or i % config.shard[1] == config.shard[0])
    total, batches = model_batches(graph, dataset, config, select=select)
    bar = _progress(total, config.progress)

    def histogram(index: int, outputs: list[np.ndarray]) -> None:
        # Every shard histograms the first batch so all shards share its bin grid (exact merges);
        # only shard 0 keeps its counts.
        keep = config.shard is None or config.shard[0] == 0 or index > 0
        for name, values in zip(quantizers.tensors, outputs):
            if keep:
                collectors[name].collect(values, inplace=True)
            else:
                grid = HistogramCollector()
                grid.collect(values)
                collectors[name].width = grid.width
                collectors[name].counts = np.zeros_like(grid.counts)

    # Histogram batch k on a worker thread while onnxruntime runs batch k+1 (both release the GIL);
    # at most one batch of activations waits, so memory stays flat.
    kept = 0
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for index, feeds in enumerate(batches):
            outputs = run(runner, quantizers.tensors, feeds, f"calibration batch {index}")
            if pending is not None:
                pending.result()
            pending = worker.submit(histogram, index, outputs)
            del outputs
            count = len(next(iter(feeds.values())))
            kept += count if config.shard is None or config.shard[0] == 0 or index > 0 else 0
            bar.update(count)
        if pending is not None:
            pending.result()
    bar.close()
    if kept == 0:
        size = fixed_batch(graph) or config.batch_size
        raise QdqcError(f"--shard {config.shard[0]}/{config.shard[1]}: the data makes {-(-total // size)} batch(es) "
                        f"of {size} samples, none of them for this shard (use fewer shards or smaller batches)")
    return collectors, kept


def fixed_batch(graph: gs.Graph) -> int | None:
    """The batch size a model exported with a fixed batch dimension accepts, else None."""
    fixed = {t.shape[0] for t in graph.inputs if t.shape and isinstance(t.shape[0], int) and t.shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def model_batches(graph: gs.Graph, dataset: Dataset, config: CalibrationConfig, limit: int | None = None,
                  select=lambda index: True, option: str = "--num-samples"):
    """(samples used, batches) of the data as this model can take them: a model with a fixed batch
    dimension gets only batches of exactly that size. Says when fewer samples are used than asked."""
    wanted = config.num_samples if limit is None else limit
    size = fixed_batch(graph)
    if size is not None and size != config.batch_size:
        warnings.warn(f"the model's inputs have a fixed batch of {size}: running {size} samples at a time",
                      stacklevel=2)
    if wanted is not None and wanted > dataset.samples and option is not None:
        warnings.warn(f"{option} {wanted}: the data holds only {dataset.samples} samples; using all of them",
                      stacklevel=2)
    used = dataset.usable(size or config.batch_size, wanted, whole=size is not None)
    available = min(wanted or dataset.samples, dataset.samples)
    if used == 0:
        raise QdqcError(f"{dataset.path}: the model's inputs have a fixed batch of {size} but only {available} "
                        "samples are given")
    if used < available:
        warnings.warn(f"the model's inputs have a fixed batch of {size}: the last {available - used} of "
                      f"{available} samples do not fill one and are left out", stacklevel=2)
    return used, dataset.batches(size or config.batch_size, wanted, config.trim_padding, select, whole=size is not None)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def ort_message(exc: BaseException) -> str:
    """onnxruntime's message in one plain line: colour codes and its `[ONNXRuntimeError] : 2 : KIND :` prefix off."""
    text = _ANSI.sub("", str(exc)).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(exc).__name__)
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", line)


def run(runner, outputs: list[str] | None, feeds: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    """One onnxruntime run; a failure names `where` (the batch), its samples' shapes and onnxruntime's line."""
    try:
        return runner.run(outputs, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items())
        raise QdqcError(f"onnxruntime failed on {where} ({shapes}): {ort_message(exc)}") from None


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="calibrating", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


@dataclass(frozen=True)
class TensorReport:
    tensor: str
    elements: int
    nonfinite: int
    max: float
    amax: dict[str, float]
    chosen: float
    scale: float
    kept: bool = False   # the scale is the model's own (--keep-scales): chosen/scale are what it holds


def apply_scales(graph: gs.Graph, collectors: dict[str, HistogramCollector], config: CalibrationConfig,
                 auto_choice: dict[str, tuple[str, float]] | None = None) -> list[TensorReport]:
    """Write amax/127 into every activation Q and DQ (shared scale groups take their max) and
    recompute the weight scales from the initializers."""
    require_fake_quant(graph, "qdqc calibrate")
    _scales_as_initializers(graph)
    quantizers = activation_quantizers(graph)
    missing = [t for t in quantizers.tensors if t not in collectors]
    if missing:
        raise QdqcError(f"calibration statistics have no entry for {len(missing)} quantized tensors "
                        f"(first: '{missing[0]}'); were they collected on another model? (statistics of a "
                        "smoothed run describe the smoothed model: recompute from that run's output)")
    found = {t: amaxes(collectors[t], percentile=config.percentile) for t in quantizers.tensors}
    if config.method is Method.AUTO:
        if auto_choice is None:
            raise QdqcError("--method auto needs the calibration data (it measures each layer's error)")
        chosen = {t: auto_choice[t][1] for t in quantizers.tensors}
        for t in quantizers.tensors:
            found[t]["auto"] = f"{auto_choice[t][0]} -> {auto_choice[t][1]:.6g}"
    else:
        chosen = {t: found[t][config.method.value] for t in quantizers.tensors}
    for t, settings in carried.recipe_settings(graph).items():   # the recipe's per-site method/percentile
        if t not in found or (settings.method is None and settings.percentile is None):
            continue
        method = settings.method or (config.method if config.method is not Method.AUTO else Method.PERCENTILE)
        if settings.percentile is not None and method is not Method.PERCENTILE:
            where = ", ".join(carried.quantizer_sites(graph).get(t, ())) or f"'{t}'"
            raise UsageError(f"the recipe sets percentile {settings.percentile:g} for {where}, whose method is "
                             f"{method.value} (--method {config.method.value}): a percentile applies only to method "
                             "percentile; give the entry method = \"percentile\" or pass --method percentile")
        percentile = settings.percentile if settings.percentile is not None else config.percentile
        chosen[t] = amaxes(collectors[t], percentile=percentile)[method.value]
        label = f"percentile {percentile:g}" if method is Method.PERCENTILE else method.value
        found[t]["recipe"] = f"{label} -> {chosen[t]:.6g}"
    tensors = graph.tensors()
    reports = []
    narrow = narrow_operands(graph) if weight_bits(graph) == 7 else []
    narrow_scales = {q.inputs[1].name for q in narrow}
    for scale_name, members in quantizers.groups.items():
        amax = max(chosen[t] for t in members)
        if amax <= quant.MIN_AMAX:
            warnings.warn(f"'{members[0]}' was always zero in calibration: it gets a tiny positive scale",
                          stacklevel=2)
        qmax = quant.weight_qmax(7) if scale_name in narrow_scales else quant.QMAX
        scale = quant.scale_from_amax(np.float32(amax), qmax)
        tensors[scale_name].values = np.asarray(scale, np.float32)
        reports += [TensorReport(t, collectors[t].elements, collectors[t].nonfinite, collectors[t].amax, found[t],
                                 amax, float(scale)) for t in members]
    if [clip_to_grid(graph, q, quant.weight_qmax(7)) for q in narrow].count(True):
        ir.toposort(graph)   # the new Clips were appended
    refresh_weight_scales(graph)   # and every DequantizeLinear takes its QuantizeLinear's new scale
    return reports


def narrow_operands(graph: gs.Graph) -> list[gs.Node]:
    """The activation quantizers read only as the second operand of an activation x activation MatMul
    (attention's Kᵀ and V), through Reshape/Transpose. With 7-bit weights (`--weight-bits 7`) they take a
    7-bit grid too: x86's uint8 x int8 kernels without VNNI, and OpenVINO's int8 x int8 attention, are
    exact only when the second operand's pairs fit int16 (qdq_compiler.cpu)."""
    found = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or ir.constant(q.inputs[1]) is None \
                or ir.constant(q.inputs[1]).size != 1:
            continue
        readers = [dq for dq in q.outputs[0].outputs]
        if readers and all(dq.op == "DequantizeLinear" and _second_operand_only(dq.outputs[0]) for dq in readers):
            found.append(q)
    return found


def _second_operand_only(tensor: gs.Tensor) -> bool:
    readers = final_readers(tensor)
    return bool(readers) and all(r.op == "MatMul" and r.inputs[1] is source and not ir.is_constant(r.inputs[0])
                                 for source, r in readers)


def clip_to_grid(graph: gs.Graph, q: gs.Node, qmax: int) -> bool:
    """Clip(x, ±qmax·s) before `q` (QuantizeLinear saturates at ±127, a narrower grid needs its own bound),
    or its bounds updated; whether a Clip was appended (the caller sorts the graph once)."""
    bound = np.float32(qmax) * np.asarray(ir.constant(q.inputs[1]), np.float32).reshape(())
    low, high = np.array(-bound, np.float32), np.array(bound, np.float32)
    clip = narrowing_clip(q)
    if clip is not None:
        clip.inputs[1].values, clip.inputs[2].values = low, high
        return False
    names, source = ir.Names(graph), q.inputs[0]
    out = gs.Variable(names.fresh(f"{source.name}{NARROW}ed"), dtype=source.dtype, shape=source.shape)
    graph.nodes.append(gs.Node("Clip", names.fresh(f"{source.name}{NARROW}"),
                               inputs=[source, gs.Constant(names.fresh(f"{source.name}::narrow_min"), low),
                                       gs.Constant(names.fresh(f"{source.name}::narrow_max"), high)], outputs=[out]))
    q.inputs[0] = out
    return True


def _sync_dequantize_scales(graph: gs.Graph) -> None:
    """A DQ with its own scale initializer (QAT exports: Q and DQ each get a copy) takes its Q's scale."""
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear"):
        for dq in q.outputs[0].outputs:
            if dq.op == "DequantizeLinear" and dq.inputs[1] is not q.inputs[1]:
                dq.inputs[1].values = q.inputs[1].values.copy()


def _scales_as_initializers(graph: gs.Graph) -> None:
    """Q/DQ scales and zero points made by Constant nodes (raw torch exports) become initializers, so
    calibration can write them."""
    for node in graph.nodes:
        if node.op not in ir.QDQ_OPS:
            continue
        for index in (1, 2):
            if index < len(node.inputs) and not isinstance(node.inputs[index], gs.Constant):
                value = ir.constant(node.inputs[index])
                if value is not None:
                    ir.inline_constant(graph, node.inputs[index], value)


def weight_bits(graph: gs.Graph) -> int:
    """The weights' grid the model records (`calibrate --weight-bits`), 8 when it records none."""
    return int(ir.metadata(graph).get(quant.WEIGHT_BITS_KEY, 8))


def set_weight_bits(graph: gs.Graph, bits: int) -> None:
    ir.metadata(graph)[quant.WEIGHT_BITS_KEY] = str(bits)


def refresh_weight_scales(graph: gs.Graph) -> None:
    """Weight scales from the initializers (per channel, or the max over a shared per-tensor group);
    every DequantizeLinear with a scale of its own then takes its QuantizeLinear's."""
    _scales_as_initializers(graph)
    qmax = quant.weight_qmax(weight_bits(graph))
    groups: dict[str, list[gs.Node]] = {}
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear" and ir.is_constant(n.inputs[0])):
        groups.setdefault(q.inputs[1].name, []).append(q)
    for nodes in groups.values():
        axis = quant.channel_axis(nodes[0].attrs, nodes[0].inputs[1].values.size)
        amax = np.max([quant.amax(ir.constant(q.inputs[0]), axis) for q in nodes], axis=0)
        nodes[0].inputs[1].values = quant.scale_from_amax(amax, qmax)
    _sync_dequantize_scales(graph)


def report_json(reports: list[TensorReport], config: CalibrationConfig, samples: int | None, seconds: float) -> dict:
    return {"method": config.method.value, "percentile": config.percentile, "samples": samples,
            "seconds": round(seconds, 3),
            "tensors": [{"tensor": r.tensor, "samples": samples, "elements": r.elements,
                         "nonfinite": r.nonfinite, "max": r.max, "amax": r.amax, "chosen_amax": r.chosen,
                         "scale": r.scale, **({"kept": True} if r.kept else {})} for r in reports]}


def calibrate(graph: gs.Graph, dataset: Dataset, config: CalibrationConfig):
    """Collect and apply in one go; returns (collectors, reports, samples, seconds)."""
    start = time.perf_counter()
    collectors, samples = collect(graph, dataset, config)
    auto_choice = None
    if config.method is Method.AUTO:
        from .auto_method import choose, needed_tensors

        tensors = needed_tensors(graph, list(collectors))
        runner = session(float_network(graph, tensors), config.providers)
        first = next(iter(model_batches(graph, dataset, config)[1]))
        auto_choice = choose(graph, collectors, dict(zip(tensors, run(runner, tensors, first, "calibration batch 0"))))
    reports = apply_scales(graph, collectors, config, auto_choice)
    return collectors, reports, samples, time.perf_counter() - start



def mixes_placeholder_and_calibrated_scales(graph: gs.Graph) -> bool:
    """Some activation quantizers still hold insert's placeholder and others a real scale: insert added
    quantizers to a calibrated (QAT) model, whose own scales are to be kept."""
    known, placeholders = _activation_scales(graph)
    return 0 < len(placeholders) < len(known)


def existing_scales(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Every Q/DQ scale the model already has (a QAT export's), by tensor name: all but insert's
    placeholders, so `calibrate --keep-scales` can calibrate only what insert added."""
    _scales_as_initializers(graph)
    kept = {}
    for node in graph.nodes:
        if node.op not in ir.QDQ_OPS or len(node.inputs) < 2:
            continue
        value = ir.constant(node.inputs[1])
        placeholder = value is not None and quant.is_placeholder(value) \
            and not ir.is_constant(node.inputs[0])
        if value is not None and not placeholder:
            kept[node.inputs[1].name] = value.copy()
    return kept


def restore_scales(graph: gs.Graph, kept: dict[str, np.ndarray], reports: list[TensorReport] = ()) -> list[TensorReport]:
    """Put the kept scales back; returns `reports` with each kept tensor's entry giving the scale the
    model holds (amax = scale * 127), marked kept, instead of the one calibration computed."""
    tensors = graph.tensors()
    for name, value in kept.items():
        tensors[name].values = value
    scale_of = {n.inputs[0].name: n.inputs[1].name for n in graph.nodes
                if n.op == "QuantizeLinear" and len(n.inputs) > 1}
    restored = []
    for report in reports:
        value = kept.get(scale_of.get(report.tensor, ""))
        if value is not None and value.size == 1:
            scale = float(value.reshape(()))
            report = replace(report, chosen=scale * quant.QMAX, scale=scale, kept=True)
        restored.append(report)
    return restored
