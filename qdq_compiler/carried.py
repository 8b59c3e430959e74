"""The plan travels with the model: what `insert` decided, stored in model-level metadata_props.

After insert, the family, the mode, the site -> quantizer map and, per matched layer, the tensors
later stages look at (what the attention's batched matmuls read, where the FFN activation starts and
ends) are written under `qdqc.plan` as JSON. Model-level metadata_props survive save and load
(`ir.metadata`); node-level ones do not. Calibration, lowering, `check` and the reports read this
record instead of matching the encoder again, so the matcher never has to understand a later rewrite
(SmoothQuant's Muls, FP16 casts, integer kernels). A model inserted by an older qdqc, or a QAT export,
has no record: `encoder_layers` falls back to matching.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Mapping

import onnx_graphsurgeon as gs

from . import ir
from .graph import LAYOUT_OPS, narrowing_clip
from .patterns import match_encoder
from .patterns.blocks import match_activation
from .patterns.records import Activation, EncoderMatch
from .errors import ModelError
from .calibration import Method
from .recipe import SiteSettings

PLAN_KEY = "qdqc.plan"
FORMAT = 1
ATTENTION_ROLES = ("query", "key", "probs", "value")


@dataclass(frozen=True)
class CarriedLayer:
    index: int
    attention: Mapping[str, str]     # role (ATTENTION_ROLES) -> the tensor the batched matmul reads
    activation: tuple[str, str]      # (FFN1 output, FFN2 input): the float region between them
    output: str
    named_sites: Mapping[str, str] = field(default_factory=dict)   # the family's named sites -> float tensors

    def to_json(self) -> dict:
        return {"index": self.index, "attention": dict(self.attention), "activation": list(self.activation),
                "output": self.output, "named_sites": dict(self.named_sites)}


@dataclass(frozen=True)
class CarriedPlan:
    family: str | None               # None: no layer matched (generic placement)
    mode: str
    layers: tuple[CarriedLayer, ...]
    sites: Mapping[str, str] = field(default_factory=dict)   # site -> the float tensor its quantizer reads
    recipe: Mapping | None = None    # the recipe in force at insert (its file form), None: none given
    settings: Mapping[str, Mapping] = field(default_factory=dict)   # quantized tensor -> what the recipe set
    float_sites: Mapping[str, str] = field(default_factory=dict)   # site the recipe left in float -> its tensor

    def to_json(self) -> dict:
        found = {"format": FORMAT, "family": self.family, "mode": self.mode,
                 "layers": [layer.to_json() for layer in self.layers], "sites": dict(self.sites)}
        if self.recipe is not None:
            found.update(recipe=dict(self.recipe), settings={k: dict(v) for k, v in sorted(self.settings.items())})
        if self.float_sites:
            found["float_sites"] = dict(self.float_sites)
        return found

    def deliberate_float(self) -> dict[str, str]:
        """Tensor -> the site the recipe left in float there (lowering notes these GEMMs, never warns)."""
        return {tensor: site for site, tensor in self.float_sites.items()}

    def tensor_settings(self) -> dict[str, SiteSettings]:
        """Quantized tensor -> the per-site calibration/smoothing settings the recipe gave it."""
        return {tensor: SiteSettings.from_json(values) for tensor, values in self.settings.items()}

    @classmethod
    def from_json(cls, text: str) -> "CarriedPlan":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this qdqc reads {FORMAT}")
            layers = tuple(CarriedLayer(int(e["index"]), {r: str(e["attention"][r]) for r in ATTENTION_ROLES},
                                        (str(e["activation"][0]), str(e["activation"][1])), str(e["output"]),
                                        {str(k): str(v) for k, v in e.get("named_sites", {}).items()})
                           for e in data["layers"])
            settings = {str(k): dict(v) for k, v in data.get("settings", {}).items()}
            for values in settings.values():
                SiteSettings.from_json(values)   # an unknown method or granularity is unreadable here
            return cls(data["family"], str(data["mode"]), layers, {str(k): str(v) for k, v in data["sites"].items()},
                       data.get("recipe"), settings,
                       {str(k): str(v) for k, v in data.get("float_sites", {}).items()})
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ModelError(f"metadata '{PLAN_KEY}' is unreadable ({type(exc).__name__}: {exc}); "
                             f"remove it to fall back to matching") from None


def record(match: EncoderMatch, plan, family: str | None) -> CarriedPlan:
    """The record of an insertion, read off the graph right after insert-qdq (the tensors the batched
    matmuls read are the dequantized ones by then)."""
    layers = []
    for layer in match.layers:
        attention = layer.attention
        reads = {"query": attention.bmm1.inputs[0].name, "key": attention.bmm1.inputs[1].name,
                 "probs": attention.bmm2.inputs[0].name, "value": attention.bmm2.inputs[1].name}
        layers.append(CarriedLayer(layer.index, reads, (layer.activation.input, layer.activation.output), layer.output,
                                   layer.sites()))
    sites = {e.site: e.tensor for e in plan.existing}   # quantized in the input model already
    sites.update({site: q.tensor for q in plan.quantizers for site in q.sites})
    recipe = plan.recipe.to_json() if plan.recipe else None
    settings = {q.tensor: q.settings.to_json() for q in plan.quantizers if q.settings.to_json()}
    return CarriedPlan(family if match.layers else None, plan.mode.value, tuple(layers), sites, recipe, settings,
                       dict(plan.disabled_tensors))


def _planned(tensor: gs.Tensor) -> str:
    """The tensor insert planned a quantizer on (a smoothed site's Q reads the `::smooth` Mul's output, or
    the `::shift` Sub's after it)."""
    source = ir.producer(tensor)
    while source is not None and ("::smooth" in source.name or "::shift" in source.name):
        tensor = source.inputs[0]
        source = ir.producer(tensor)
    return tensor.name


# the layer sites every mode has (FasterTransformer's GEMM and batched-matmul inputs): what a model
# without a plan can be named by, whatever mode inserted it
_EVERY_MODE_SITES = ("qkv.input", "q", "k", "v", "softmax.output", "attention_output.input", "ffn1.input", "ffn2.input")


def _matched_sites(graph: gs.Graph) -> dict[str, list[str]]:
    """Tensor -> site names, matched (a model without a plan: an older qdqc's output, a QAT export); a
    quantized site's tensor is the one its DequantizeLinear hands the GEMM."""
    from .placement import layer_site

    by_tensor: dict[str, list[str]] = {}
    for layer in match_encoder(graph).layers:
        for name, tensor in layer.sites().items():
            if name in _EVERY_MODE_SITES:
                by_tensor.setdefault(tensor, []).append(layer_site(layer.index, name))
    return by_tensor


def quantizer_sites(graph: gs.Graph) -> dict[str, tuple[str, ...]]:
    """Activation tensor read by a QuantizeLinear now -> the site names insert gave it (without a plan:
    the names every mode has, found by matching the encoder)."""
    plan = read(graph)
    if plan is None:
        by_tensor = _matched_sites(graph)
        found = {}
        for q in graph.nodes:
            if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]):
                continue
            source = _quantized(q)
            names = list(by_tensor.get(source.name, ()))
            reached = [dq.outputs[0] for dq in q.outputs[0].outputs if dq.op == "DequantizeLinear"]
            while reached:   # what the DequantizeLinear hands on, through the reshapes that only flatten it
                tensor = reached.pop()
                names += [n for n in by_tensor.get(tensor.name, ()) if n not in names]
                reached += [n.outputs[0] for n in tensor.outputs if n.op in LAYOUT_OPS]
            found[q.inputs[0].name] = found[source.name] = tuple(names)
        return found
    by_tensor: dict[str, list[str]] = {}
    for site, tensor in plan.sites.items():
        by_tensor.setdefault(tensor, []).append(site)
    found = {}
    for q in graph.nodes:
        if q.op == "QuantizeLinear" and not ir.is_constant(q.inputs[0]):
            source = _quantized(q)
            found[q.inputs[0].name] = found[source.name] = tuple(by_tensor.get(_planned(source), ()))
    return found


def _quantized(q: gs.Node) -> gs.Tensor:
    """The float tensor a quantizer quantizes: its input, or before a 7-bit operand's Clip."""
    clip = narrowing_clip(q)
    return clip.inputs[0] if clip is not None else q.inputs[0]


def record_decision(graph: gs.Graph, recipe: dict, methods: dict[str, str]) -> None:
    """`compile`'s decision becomes the recipe in force in the model: `recipe` (its file form) and, per
    quantized tensor, the methods `--method auto` chose at `methods` (site -> "mse", "percentile 99.9"), as
    the same recipe replayed would record them."""
    plan = read(graph)
    if plan is None:
        return
    settings = {tensor: SiteSettings.from_json(values) for tensor, values in plan.settings.items()}
    for site, label in methods.items():
        tensor = plan.sites.get(site, site)
        method, _, percentile = label.partition(" ")
        found = settings.get(tensor, SiteSettings())
        settings[tensor] = replace(found, method=Method(method),
                                   percentile=float(percentile) if percentile else found.percentile)
    store(graph, replace(plan, recipe=recipe, settings={t: s.to_json() for t, s in settings.items() if s.to_json()}))


def recipe_settings(graph: gs.Graph) -> dict[str, SiteSettings]:
    """What the recipe in force set per activation quantizer, keyed by the tensor each QuantizeLinear reads
    now (a smoothed site's quantizer reads the `::smooth` Mul's output, not the tensor insert planned)."""
    plan = read(graph)
    if plan is None or not plan.settings:
        return {}
    by_tensor = plan.tensor_settings()
    found = {}
    for q in (n for n in graph.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])):
        tensor = q.inputs[0]
        planned = _planned(tensor)
        if planned in by_tensor:
            found[tensor.name] = by_tensor[planned]
    return found


def store(graph: gs.Graph, carried: CarriedPlan) -> None:
    ir.metadata(graph)[PLAN_KEY] = json.dumps(carried.to_json(), separators=(",", ":"))


def read(graph: gs.Graph) -> CarriedPlan | None:
    """The plan `insert` stored in the model, or None when it has none."""
    text = ir.metadata(graph).get(PLAN_KEY)
    return None if text is None else CarriedPlan.from_json(text)


# ---------------------------------------------------------------- what later stages see

@dataclass(frozen=True, eq=False)
class LayerView:
    """One encoder layer as later stages need it, from the carried plan or from matching."""

    index: int
    attention: Mapping[str, gs.Tensor]   # role -> the tensor the batched matmul reads
    bmm1: gs.Node | None
    activation: Activation | None


@dataclass(frozen=True, eq=False)
class EncoderLayers:
    layers: tuple[LayerView, ...]
    source: str            # "metadata" | "matched"
    note: str = ""         # why the metadata was not used, when it was present


def encoder_layers(graph: gs.Graph) -> EncoderLayers:
    """The encoder layers: read from the carried plan when the model has one whose tensors all still
    exist, else matched (models from older qdqc versions, QAT exports, hand-edited graphs)."""
    carried = read(graph)
    note = ""
    if carried is not None:
        tensors = graph.tensors()
        names = {name for layer in carried.layers for name in (*layer.attention.values(), *layer.activation)}
        missing = sorted(name for name in names if name not in tensors)
        if not missing:
            return EncoderLayers(tuple(_view(layer, tensors) for layer in carried.layers), "metadata")
        note = f"{len(missing)} tensors of the carried plan are gone (e.g. '{missing[0]}'): matched instead"
    views = []
    for layer in match_encoder(graph).layers:
        tensors = graph.tensors()
        attention = layer.attention
        reads = {"query": tensors[attention.query], "key": tensors[attention.key],
                 "probs": tensors[attention.probs], "value": tensors[attention.value]}
        views.append(LayerView(layer.index, reads, attention.bmm1, layer.activation))
    return EncoderLayers(tuple(views), "matched", note)


def _view(layer: CarriedLayer, tensors: dict[str, gs.Tensor]) -> LayerView:
    reads = {role: tensors[name] for role, name in layer.attention.items()}
    bmm1 = next((n for n in reads["query"].outputs if n.op == "MatMul" and n.inputs[0] is reads["query"]), None)
    start, end = (tensors[name] for name in layer.activation)
    return LayerView(layer.index, reads, bmm1, match_activation(start, end))
