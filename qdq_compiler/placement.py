"""Decide which tensors get quantized, for whom, and which share a scale.

Placement is pure: it reads the graph and the matched layers and returns a
`QuantPlan`; `passes/insert_qdq.py` applies it. One tensor read by several
quantized consumers gets one quantizer (one scale) whatever the number of sites.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from enum import Enum

import onnx_graphsurgeon as gs

from . import ir
from .graph import RESHAPE_OPS, weight_of
from .patterns.records import EncoderLayer, EncoderMatch
from .config import InsertConfig, Mode
from .errors import UsageError
from .recipe import Granularity, Recipe, SiteSettings, combine

GRAPH_OUTPUT = "<graph output>"   # how a report names the graph-output use


class TensorKind(str, Enum):
    ACTIVATION = "activation"
    WEIGHT = "weight"


@dataclass(frozen=True, eq=False)
class Use:
    """A reader of a tensor: the node itself (None for a graph output), never its name, which may be
    empty or shared with other nodes (legal ONNX)."""

    node: gs.Node | None   # None: the graph output
    tensor: str            # the tensor this use reads now (resolved to input indices at insertion)

    def __eq__(self, other) -> bool:
        return isinstance(other, Use) and self.node is other.node and self.tensor == other.tensor

    def __hash__(self) -> int:
        return hash((id(self.node), self.tensor))

    @property
    def label(self) -> str:
        return GRAPH_OUTPUT if self.node is None else ir.label(self.node)


@dataclass(frozen=True)
class Quantizer:
    tensor: str
    kind: TensorKind
    axis: int | None              # per-channel axis; None = per-tensor
    uses: tuple[Use, ...]
    sites: tuple[str, ...]
    scale_group: str | None = None  # quantizers that must end with one common scale
    settings: SiteSettings = SiteSettings()   # what the recipe decided for it (calibration, smoothing)

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "kind": self.kind.value,
                "granularity": "per-channel" if self.axis is not None else "per-tensor",
                "axis": self.axis, "sites": list(self.sites), "scale_group": self.scale_group,
                "consumers": [u.label for u in self.uses], "recipe": self.settings.to_json()}


@dataclass(frozen=True)
class ExistingQuantizer:
    site: str
    tensor: str
    note: str


@dataclass(frozen=True)
class QuantPlan:
    mode: Mode
    quantizers: tuple[Quantizer, ...]
    existing: tuple[ExistingQuantizer, ...]
    skipped: tuple[tuple[str, str], ...]   # (site, reason)
    fallback: bool                         # no layer matched: generic placement used
    disabled: tuple[tuple[str, str], ...] = ()   # (site, the rule that turned it off)
    recipe: Recipe = Recipe()
    disabled_tensors: tuple[tuple[str, str], ...] = ()   # (site, the tensor it would have quantized)
    released: tuple[Use, ...] = ()   # the model's own quantizers the recipe turned off: taken out at insertion
    not_applied: tuple[tuple[str, str], ...] = ()   # (site, rule) calibration settings on a scale the model keeps

    def by_site(self) -> dict[str, Quantizer]:
        return {site: q for q in self.quantizers for site in q.sites}


@dataclass(frozen=True)
class _Request:
    site: str
    tensor: str
    use: Use | None      # None: every reader of the tensor (resolved from the graph in _merge)
    kind: TensorKind
    axis: int | None = None
    group: str | None = None
    node: gs.Node | None = None          # the GEMM, batched matmul or Add the site belongs to (recipe rules)
    channel_axis: int | None = None      # a weight's output-channel axis (a rule may ask for per-channel)

    def names(self) -> tuple[str, ...]:
        """What a recipe glob may name this site by: the site, its node's name and op type (the tensor it
        quantizes only by its exact name: `Recipe.settings`)."""
        node = self.node
        return (self.site, node.name if node is not None else "", node.op if node is not None else "")


def layer_site(index: int, site: str) -> str:
    """The stable name of a site of encoder layer `index`: `layer.3.ffn2.input`, `layer.0.q`, ..."""
    return f"layer.{index}.{site}"


# the GEMM-input site of each linear layer, in FasterTransformer's terms (records.SITE_NAMES)
GEMM_INPUT_SITES = {"query": "qkv.input", "key": "qkv.input", "value": "qkv.input", "qkv": "qkv.input",
                    "attention_output": "attention_output.input", "ffn1": "ffn1.input", "ffn2": "ffn2.input"}


def plan_quantizers(graph: gs.Graph, match: EncoderMatch, config: InsertConfig) -> QuantPlan:
    fallback = not match.layers and config.mode is not Mode.GENERIC
    requests: list[_Request] = []
    skipped: list[tuple[str, str]] = []
    if config.mode is Mode.GENERIC or fallback:
        requests = _generic_requests(graph, config)
    else:
        tensors = graph.tensors()
        for layer in match.layers:
            _layer_requests(layer, config, tensors, requests, skipped)
        _final_requests(graph, match.layers[-1], config, requests, skipped)
    everything = requests
    requests, settings, disabled, off = _apply_recipe(config.recipe, requests, config.mode)
    off_sites = {site for site, _ in disabled}
    plan = _merge(graph, requests, settings, skipped, config, fallback, disabled)
    released = tuple(r.use for r in off if r.use is not None and r.use.node is not None
                     and _already_quantized(graph.tensors(), r) is not None)
    tensors = graph.tensors()
    disabled_tensors = tuple(dict.fromkeys((r.site, _float_source(tensors, r.tensor)) for r in everything
                                           if r.site in off_sites))
    return replace(plan, disabled_tensors=disabled_tensors, released=released)


def _float_source(tensors: dict[str, gs.Tensor], name: str) -> str:
    """The float tensor a site reads once its quantizer is gone: behind the model's own Q -> DQ pair (what
    release-quantizers rewires the reader to), else the tensor itself."""
    dq = ir.producer(tensors[name])
    q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    return q.inputs[0].name if q is not None and q.op == "QuantizeLinear" else name


def _already_quantized(tensors: dict[str, gs.Tensor], request: _Request) -> str | None:
    """Why the input model already quantizes this site (a QAT export's quantizer), else None."""
    source = ir.producer(tensors[request.tensor])
    if source is not None and source.op == "DequantizeLinear":
        return "already dequantized in the input model"
    reader = request.use.node if request.use is not None else None
    if reader is not None and request.tensor not in {t.name for t in reader.inputs}:
        return f"{ir.describe(reader)} already reads it through a DequantizeLinear"
    return None


def _apply_recipe(recipe: Recipe, requests: list[_Request], mode: Mode):
    """The requests the recipe keeps (weights at the granularity it asks), each one's settings, and
    the sites it turned off (and their requests); a rule that names nothing, or sets what none of its
    sites has, is an error."""
    kept, settings, disabled, off, used = [], [], [], [], set()
    kinds: dict[int, set[TensorKind]] = {}   # rule index -> the kinds of site it matched
    for request in requests:
        found = recipe.settings(request.names(), request.tensor)
        used.update(found.rules)
        for index in found.rules:
            kinds.setdefault(index, set()).add(request.kind)
        if not found.enabled:
            rule = next(recipe.rules[i] for i in reversed(found.rules) if recipe.rules[i].enabled is False)
            disabled.append((request.site, rule.label))
            off.append(request)
            continue
        if request.kind is TensorKind.WEIGHT and found.weights is not None:
            per_channel = found.weights is Granularity.PER_CHANNEL
            request = replace(request, axis=request.channel_axis if per_channel else None)
        kept.append(request)
        settings.append(found)
    if recipe.rules:
        recipe.check_used(used, (name for r in requests for name in (*r.names(), r.tensor) if name),
                          (r.site for r in requests), mode)
        _check_applicable(recipe, kinds)
        _check_scale_groups(recipe, kept, mode)
    unique = list(OrderedDict.fromkeys(disabled))
    return kept, settings, tuple(unique), off


def _check_applicable(recipe: Recipe, kinds: dict[int, set[TensorKind]]) -> None:
    """`weights` sets a weight's granularity, `method`/`percentile`/`smooth` an activation's calibration:
    a rule whose sites have none of the kind its setting is for would do nothing."""
    for index, matched in kinds.items():
        rule = recipe.rules[index]
        if rule.weights is not None and TensorKind.WEIGHT not in matched:
            raise UsageError(f"{rule.label}: 'weights' sets a weight's granularity, and this entry names only "
                             "activation sites")
        for key in ("method", "percentile", "smooth"):
            if getattr(rule, key) is not None and TensorKind.ACTIVATION not in matched:
                raise UsageError(f"{rule.label}: '{key}' applies to activation sites, and this entry names only "
                                 "weights (weights are scaled by their own max)")


def _check_scale_groups(recipe: Recipe, kept: list[_Request], mode: Mode) -> None:
    """Weights that share one scale (ft2/ft3/trt: Q, K and V) change granularity together or not at all:
    one per-channel member would split the scale the fused QKV GEMM needs."""
    groups: dict[str, list[_Request]] = {}
    for request in kept:
        if request.kind is TensorKind.WEIGHT and request.group:
            groups.setdefault(request.group, []).append(request)
    for group, members in groups.items():
        if len({m.axis for m in members}) > 1:
            rule = next(recipe.rules[i] for m in members for i in reversed(recipe.settings(m.names(), m.tensor).rules)
                        if recipe.rules[i].weights is not None)
            raise UsageError(f"{rule.label}: weights {rule.weights.value} would split the one scale that "
                             f"{', '.join(m.site for m in members)} share in mode {mode.value}; name all of them "
                             f"(e.g. 'layer.*.[qkv]*.weight') or none")


def gemm_input_site(tensors: dict[str, gs.Tensor], node: gs.Node, tensor: str) -> Use:
    """Where a GEMM input is quantized: before the reshapes that only flatten it for this GEMM,
    so Q, K and V Gemms behind their own Reshapes still share the one LayerNorm-output quantizer."""
    use = Use(node, tensor)
    while True:
        reshape = ir.producer(tensors[use.tensor])
        if reshape is None or reshape.op not in RESHAPE_OPS or len(reshape.outputs[0].outputs) != 1:
            return use
        use = Use(reshape, reshape.inputs[0].name)


def _layer_requests(layer: EncoderLayer, config: InsertConfig, tensors: dict[str, gs.Tensor],
                    out: list[_Request], skipped: list[tuple[str, str]]) -> None:
    """The sites of one layer that the mode covers (`config.covers`, by site name), each with its readers."""
    candidates: list[tuple[str, _Request | str]] = []   # (site within the layer, request or why it cannot be)
    shared = layer_site(layer.index, "qkv") if config.fuse_qkv else None   # FT's fuse_qkv: one amax for Q, K, V
    qkv_roles = {"query", "key", "value"}
    for role, linear in layer.linears().items():
        group = shared if role in qkv_roles else None
        use = gemm_input_site(tensors, linear.node, linear.input)
        candidates.append((GEMM_INPUT_SITES[role], _Request("", use.tensor, use, TensorKind.ACTIVATION,
                                                            node=linear.node)))
        axis = linear.weight_axis if config.per_channel_weights else None
        candidates.append((f"{role}.weight", _Request("", linear.weight, Use(linear.weight_user[0], linear.weight),
                                                      TensorKind.WEIGHT, axis, group and group + ".weight",
                                                      linear.node, linear.weight_axis)))
        if linear.bias_add is None:
            candidates.append((f"{role}.gemm_output",
                               f"{ir.describe(linear.node)} has no separate bias Add to quantize before"))
        else:
            candidates.append((f"{role}.gemm_output",
                               _Request("", linear.gemm_output, Use(linear.bias_add, linear.gemm_output),
                                        TensorKind.ACTIVATION, group=group and group + ".gemm_output",
                                        node=linear.node)))
    attn = layer.attention
    bmm_group = shared and shared + ".bmm_input"
    for name, tensor, node, group in (("q", attn.query, attn.bmm1, bmm_group), ("k", attn.key, attn.bmm1, bmm_group),
                                      ("softmax.output", attn.probs, attn.bmm2, None),
                                      ("v", attn.value, attn.bmm2, bmm_group)):
        candidates.append((name, _Request("", tensor, Use(node, tensor), TensorKind.ACTIVATION, group=group, node=node)))
    # QK^T's readers are resolved from the graph in _merge (scale Mul, mask Add or Softmax)
    candidates.append(("qk.output", _Request("", attn.scores, None, TensorKind.ACTIVATION, node=attn.bmm1)))
    for name, residual in (("residual1", layer.attention_residual), ("residual2", layer.ffn_residual)):
        candidates.append((name, _Request("", residual.skip, Use(residual.add, residual.skip), TensorKind.ACTIVATION,
                                          node=residual.add)))
        candidates.append((f"{name}.local", _Request("", residual.local, Use(residual.add, residual.local),
                                                     TensorKind.ACTIVATION, node=residual.add)))
    for name, found in candidates:
        if not config.covers(name):
            continue
        site = layer_site(layer.index, name)
        if isinstance(found, str):
            skipped.append((site, found))
        else:
            out.append(replace(found, site=site))


def _final_requests(graph: gs.Graph, last: EncoderLayer, config: InsertConfig, out: list[_Request],
                    skipped: list[tuple[str, str]]) -> None:
    """The encoder's output (FasterTransformer's final_input quantizer), for whatever reads it next. A
    pre-LN encoder ends in a final LayerNorm: its output is the encoder's, and a quantizer before it
    would only feed a LayerNorm, which runs in float anyway."""
    if not config.covers("output"):
        return
    site, output = layer_site(last.index, "output"), last.output
    if last.norm_position == "pre":
        readers = graph.tensors()[output].outputs
        if len(readers) != 1 or readers[0].op != "LayerNormalization":
            skipped.append((site, "pre-LN: no single final LayerNormalization reads the last layer's output"))
            return
        output = readers[0].outputs[0].name
    out.append(_Request(site, output, None, TensorKind.ACTIVATION))
    if any(t.name == output for t in graph.outputs):
        out.append(_Request(site, output, Use(None, output), TensorKind.ACTIVATION))


def _generic_requests(graph: gs.Graph, config: InsertConfig) -> list[_Request]:
    """Every MatMul/Gemm/Conv input: activations per tensor, constant weights per channel."""
    requests = []
    names = Counter(n.name for n in graph.nodes)
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv"):
            continue
        # a site is named after its node, or after the node's output when the name is empty or shared
        owner = node.name if node.name and names[node.name] == 1 else node.outputs[0].name
        for index, tensor in enumerate(node.inputs[:2]):
            site = f"{owner}.input{index}"
            found = weight_of(node, index) if index == 1 and node.op != "Conv" else None
            if found is not None:
                const, transposed, user, _ = found
                channel = _generic_axis(node, transposed)
                axis = channel if config.per_channel_weights else None
                requests.append(_Request(site, const.name, Use(user[0], const.name), TensorKind.WEIGHT, axis,
                                         node=node, channel_axis=channel))
            elif ir.is_constant(tensor):
                channel = 0 if node.op == "Conv" else None
                axis = channel if config.per_channel_weights else None
                requests.append(_Request(site, tensor.name, Use(node, tensor.name), TensorKind.WEIGHT, axis,
                                         node=node, channel_axis=channel))
            else:
                requests.append(_Request(site, tensor.name, Use(node, tensor.name), TensorKind.ACTIVATION,
                                         node=node))
    return requests


def _generic_axis(node: gs.Node, transposed: bool) -> int:
    axis = (0 if node.attrs.get("transB", 0) else 1) if node.op == "Gemm" else 1
    return 1 - axis if transposed else axis


def _merge(graph: gs.Graph, requests: list[_Request], settings: list[SiteSettings],
           skipped: list[tuple[str, str]], config: InsertConfig, fallback: bool,
           disabled: tuple[tuple[str, str], ...]) -> QuantPlan:
    tensors = graph.tensors()
    merged: OrderedDict[str, dict] = OrderedDict()
    existing: list[ExistingQuantizer] = []
    not_applied: list[tuple[str, str]] = []
    for request, found in zip(requests, settings):
        tensor = tensors[request.tensor]
        why = _already_quantized(tensors, request)
        if why is not None:
            # named by the float tensor its QuantizeLinear reads, as the sites insert quantizes are
            existing.append(ExistingQuantizer(request.site, _float_source(tensors, request.tensor), why))
            rule = _calibration_rule(config.recipe, found)
            if rule is not None and request.kind is TensorKind.ACTIVATION:
                not_applied.append((request.site, rule))
            continue
        entry = merged.setdefault(request.tensor, {"kind": request.kind, "axis": request.axis, "uses": [],
                                                   "sites": [], "group": request.group, "rules": []})
        if entry["axis"] != request.axis or entry["kind"] != request.kind:
            skipped.append((request.site, f"'{request.tensor}' is already quantized with another granularity"))
            continue
        uses = ([Use(n, request.tensor) for n in tensor.outputs if n.op != "Shape"]
                if request.use is None else [request.use])
        for use in uses:
            if use not in entry["uses"]:
                entry["uses"].append(use)
        if request.site not in entry["sites"]:
            entry["sites"].append(request.site)
        entry["group"] = entry["group"] or request.group
        entry["rules"].append(found.rules)
    recipe = config.recipe
    quantizers = tuple(Quantizer(name, e["kind"], e["axis"], tuple(e["uses"]), tuple(e["sites"]), e["group"],
                                 combine(recipe, e["rules"]))
                       for name, e in merged.items())
    return QuantPlan(config.mode, quantizers, tuple(existing), tuple(skipped), fallback, disabled, recipe,
                     not_applied=tuple(not_applied))


def _calibration_rule(recipe: Recipe, found: SiteSettings) -> str | None:
    """The last rule that sets a calibration method or percentile for a site, as its label."""
    return next((recipe.rules[i].label for i in reversed(found.rules)
                 if recipe.rules[i].method is not None or recipe.rules[i].percentile is not None), None)
