"""`insert`: the library entry point behind `qdqc insert`."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from . import ir
from .patterns.records import EncoderMatch
from .config import InsertConfig, SiteKind, site_kind
from .pipeline import PIPELINES, PassContext, PassRecord, run_pipeline
from .placement import QuantPlan, layer_site

# what `qdqc lower` (or onnxruntime's own quantizer) leaves: integer kernels instead of Q/DQ pairs
LOWERED_OPS = frozenset({"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearConv",
                         "ConvInteger", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class InsertResult:
    match: EncoderMatch
    plan: QuantPlan
    records: tuple[PassRecord, ...]
    created: dict[str, list[str]]
    input_qdq: dict[str, int]


def count_qdq(graph: gs.Graph) -> dict[str, int]:
    counts = Counter(n.op for n in graph.nodes if n.op in ir.QDQ_OPS)
    return {op: counts.get(op, 0) for op in sorted(ir.QDQ_OPS)}


def insert(graph: gs.Graph, config: InsertConfig, *, verify: bool = False) -> InsertResult:
    """Canonicalize, match, place and insert Q/DQ in `graph` (in place)."""
    before = count_qdq(graph)
    ctx = PassContext(config)
    records = run_pipeline(graph, PIPELINES["insert"], ctx, verify=verify)
    plan = ctx.analyses["plan"]
    if not plan.quantizers and not plan.existing:
        from .errors import QdqcError, UsageError

        if plan.disabled:   # there were sites: the rules turned every one off
            rules = list(dict.fromkeys(rule for _, rule in plan.disabled))
            raise UsageError(f"the recipe leaves no site to quantize: all {len(plan.disabled)} sites are turned off "
                             f"(by {', '.join(rules[:3])}{', ...' if len(rules) > 3 else ''})")

        lowered = [n.op for n in graph.nodes if n.op in LOWERED_OPS]
        raise QdqcError("nothing to quantize: " + (f"the model is already lowered ({lowered[0]})" if lowered else
                                                   "the model has no MatMul, Gemm or Conv"))
    return InsertResult(ctx.analyses["encoder"], ctx.analyses["plan"], tuple(records),
                        ctx.analyses.get("created", {}), before)


def report(result: InsertResult, config: InsertConfig) -> dict:
    """The JSON report: per layer, each site with its tensor and quantizer; every unmatched GEMM."""
    by_site = result.plan.by_site()
    quantizer_ids = {q.tensor: i for i, q in enumerate(result.plan.quantizers)}

    def site_entry(site: str) -> dict:
        q = by_site[site]
        return {"tensor": q.tensor, "kind": q.kind.value,
                "granularity": "per-channel" if q.axis is not None else "per-tensor", "axis": q.axis,
                "quantizer": f"{q.tensor}::q", "quantizer_id": quantizer_ids[q.tensor],
                "shared_with": [s for s in q.sites if s != site], "scale_group": q.scale_group}

    layers = []
    for layer in result.match.layers:
        prefix = layer_site(layer.index, "")
        sites = {site[len(prefix):]: site_entry(site) for site in by_site if site.startswith(prefix)}
        attn = layer.attention
        layers.append({
            "index": layer.index, "input": layer.input, "output": layer.output,
            "fused_qkv": layer.fused_qkv,
            "linears": {role: {"node": ir.label(lin.node), "op": lin.op, "weight": lin.weight,
                               "bias_add": lin.bias_add and ir.label(lin.bias_add)}
                        for role, lin in layer.linears().items()},
            "attention": {"bmm1": ir.label(attn.bmm1), "bmm2": ir.label(attn.bmm2), "softmax": ir.label(attn.softmax),
                          "scale": [ir.label(n) for n in attn.scale], "scale_position": attn.scale_position,
                          "mask": attn.mask and ir.label(attn.mask)},
            "layer_norm": [layer.attention_norm.kind, layer.ffn_norm.kind],
            "activation": layer.activation.kind,
            "sites": sites,
        })
    inside = tuple(layer_site(layer.index, "") for layer in result.match.layers)
    other = {site: site_entry(site) for site in by_site if not site.startswith(inside or ("\0",))}
    return {
        "mode": config.mode.value,
        "fallback_generic": result.plan.fallback,
        # every site quantized in the output: the ones insert placed and the ones the model already had
        "site_names": list(dict.fromkeys([*by_site, *(e.site for e in result.plan.existing)])),
        "layers": layers,
        "other_sites": other,
        "quantizers": [q.to_json() for q in result.plan.quantizers],
        "unmatched_gemms": [{"node": ir.label(n), "reason": why} for n, why in result.match.unmatched_gemms],
        "rejected_attention_blocks": [{"anchor": ir.label(r.anchor), "reason": r.reason,
                                       "gemms": [ir.label(g) for g in r.gemms]} for r in result.match.rejections],
        "input_quantization": {"qdq_nodes": result.input_qdq,
                               "sites_already_quantized": [vars(e) for e in result.plan.existing]},
        "skipped_sites": [{"site": s, "reason": why} for s, why in result.plan.skipped],
        "disabled_sites": [{"site": s, "by": rule} for s, rule in result.plan.disabled],
        "released_quantizers": [{"reader": use.label, "tensor": use.tensor} for use in result.plan.released],
        "calibration_rules_not_applied": [{"site": s, "by": rule, "why": KEPT_SCALE}
                                          for s, rule in result.plan.not_applied],
        "recipe": result.plan.recipe.to_json() if result.plan.recipe else None,
        "created_nodes": {node: {"pass": "insert-qdq", "sites": sites} for node, sites in result.created.items()},
        "passes": [r.to_json() for r in result.records],
    }


KEPT_SCALE = ("their scales are the model's own, kept as trained (calibrate --keep-scales, compile's default on "
              "such a model)")

_CATEGORIES = {SiteKind.GEMM_INPUT: "GEMM inputs", SiteKind.GEMM_WEIGHT: "weights", SiteKind.GEMM_OUTPUT: "GEMM outputs",
               SiteKind.BMM_INPUT: "BMM inputs", SiteKind.QK_OUTPUT: "QK^T outputs",
               SiteKind.RESIDUAL_SKIP: "residual skips", SiteKind.RESIDUAL_LOCAL: "residual locals",
               SiteKind.FINAL_OUTPUT: "final output"}


def site_category(site: str) -> str:
    """`layer.3.ffn2.input` -> "GEMM inputs", `layer.0.ffn1.weight` -> "weights", `<node>.input1` -> "GEMM inputs"."""
    parts = site.split(".")
    if len(parts) > 2 and parts[0] == "layer" and parts[1].isdigit():
        try:
            return _CATEGORIES[site_kind(".".join(parts[2:]))]
        except ValueError:
            return "other"
    return "GEMM inputs" if parts[-1] in ("input0", "input1") else "other"


def summary(result: InsertResult, config: InsertConfig) -> str:
    """A few human lines: layers matched, quantizers per kind, what was found or left out."""
    plan, match = result.plan, result.match
    lines = []
    if plan.fallback:
        lines.append(f"warning: no BERT encoder layer matched; mode '{config.mode.value}' fell back to 'generic'")
    elif match.layers:
        first = match.layers[0]
        lines.append(f"matched {len(match.layers)} encoder layers ({'fused' if first.fused_qkv else 'separate'} QKV, "
                     f"scale {first.attention.scale_position}, mask {'yes' if first.attention.mask else 'none'}, "
                     f"LayerNorm {first.attention_norm.kind}, {first.activation.kind})")
    kinds = Counter(site_category(site) for q in plan.quantizers for site in q.sites)
    weights = sum(q.kind.value == "weight" for q in plan.quantizers)
    if plan.quantizers:
        lines.append(f"mode {config.mode.value}: {len(plan.quantizers)} quantizers "
                     f"({weights} weights, {len(plan.quantizers) - weights} activations) over "
                     f"{sum(kinds.values())} sites: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    else:
        lines.append(f"mode {config.mode.value}: no quantizer added" +
                     (" (the model quantizes every site already)" if plan.existing else ""))
    if any(result.input_qdq.values()):
        lines.append(f"input already had {result.input_qdq['QuantizeLinear']} Q / "
                     f"{result.input_qdq['DequantizeLinear']} DQ nodes; {len(plan.existing)} sites kept as found")
    if plan.disabled:
        shown = ", ".join(site for site, _ in plan.disabled[:4]) + (", ..." if len(plan.disabled) > 4 else "")
        released = f" ({len(plan.released)} of the model's own quantizers taken out)" if plan.released else ""
        lines.append(f"{len(plan.disabled)} site(s) left in float by the recipe{released}: {shown}")
    if plan.not_applied:
        site, rule = plan.not_applied[0]
        lines.append(f"warning: {rule}: its method/percentile does not apply to {len(plan.not_applied)} site(s) the "
                     f"model already quantizes ({site}, ...): {KEPT_SCALE}")
    if match.unmatched_gemms:
        count = len(match.unmatched_gemms)
        lines.append(f"{count} GEMM{'s' if count > 1 else ''} outside matched layers (`qdqc insert --explain` "
                     "says why)")
    return "\n".join(lines)
