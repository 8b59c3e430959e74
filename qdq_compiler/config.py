"""Frozen, validated settings and the FasterTransformer site/mode table."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .recipe import Recipe


def choice(kind: type[Enum], value, option: str):
    """`value` as a member of `kind`, or a UsageError naming the option and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(m.value for m in kind)}") from None


def names(value, option: str) -> tuple[str, ...]:
    """A comma-separated string or a sequence of strings as a tuple (CLI and API spell lists either way)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise UsageError(f"{option}: expected names, got {value!r}")
    return tuple(item.strip() for item in items if item.strip())


class Mode(str, Enum):
    FT1 = "ft1"
    FT2 = "ft2"
    FT3 = "ft3"
    TRT = "trt"
    GENERIC = "generic"


class SiteKind(str, Enum):
    """Where a quantizer sits, in FasterTransformer's terms (its BERT `quant_utils.py`)."""

    GEMM_INPUT = "gemm_input"          # LinearActivation._input_quantizer
    GEMM_WEIGHT = "gemm_weight"        # _weight_quantizer
    GEMM_OUTPUT = "gemm_output"        # _aftergemm_quantizer (before the bias)
    BMM_INPUT = "bmm_input"            # matmul_q/k/v/a_input_quantizer
    QK_OUTPUT = "qk_output"            # softmax_input_quantizer (QK^T before scale and mask)
    RESIDUAL_SKIP = "residual_skip"    # add_residual_input_quantizer
    RESIDUAL_LOCAL = "residual_local"  # add_local_input_quantizer
    FINAL_OUTPUT = "final_output"      # final_input_quantizer


_COMMON = frozenset({SiteKind.GEMM_INPUT, SiteKind.GEMM_WEIGHT, SiteKind.BMM_INPUT})
_FT2 = _COMMON | {SiteKind.GEMM_OUTPUT, SiteKind.RESIDUAL_SKIP}

MODE_SITES: dict[Mode, frozenset[SiteKind]] = {
    Mode.FT1: _COMMON,
    Mode.FT2: _FT2,
    Mode.FT3: _FT2 | {SiteKind.QK_OUTPUT},
    Mode.TRT: _COMMON | {SiteKind.RESIDUAL_SKIP, SiteKind.RESIDUAL_LOCAL, SiteKind.FINAL_OUTPUT},
    Mode.GENERIC: frozenset({SiteKind.GEMM_INPUT, SiteKind.GEMM_WEIGHT}),
}


# An encoder-layer site's name (after `layer.<i>.`, the same for every family) -> the kind of quantizer
# FasterTransformer puts there; a mode is a set of kinds, so the named sites it covers follow from the names.
NAMED_SITE_KINDS: dict[str, SiteKind] = {
    "qkv.input": SiteKind.GEMM_INPUT, "attention_output.input": SiteKind.GEMM_INPUT,
    "ffn1.input": SiteKind.GEMM_INPUT, "ffn2.input": SiteKind.GEMM_INPUT,
    "q": SiteKind.BMM_INPUT, "k": SiteKind.BMM_INPUT, "v": SiteKind.BMM_INPUT, "softmax.output": SiteKind.BMM_INPUT,
    "qk.output": SiteKind.QK_OUTPUT,
    "residual1": SiteKind.RESIDUAL_SKIP, "residual2": SiteKind.RESIDUAL_SKIP,
    "residual1.local": SiteKind.RESIDUAL_LOCAL, "residual2.local": SiteKind.RESIDUAL_LOCAL,
    "output": SiteKind.FINAL_OUTPUT,
}
# and per linear layer (query, key, value or qkv, attention_output, ffn1, ffn2): `<linear>.weight`, `<linear>.gemm_output`
LINEAR_SITE_KINDS: dict[str, SiteKind] = {"weight": SiteKind.GEMM_WEIGHT, "gemm_output": SiteKind.GEMM_OUTPUT}


def site_kind(name: str) -> SiteKind:
    """The quantizer kind of a layer site named `name` (`ffn2.input`, `q`, `ffn1.weight`, `residual1.local`)."""
    if name in NAMED_SITE_KINDS:
        return NAMED_SITE_KINDS[name]
    kind = LINEAR_SITE_KINDS.get(name.rsplit(".", 1)[-1])
    if kind is None:
        raise ValueError(f"'{name}' is not an encoder-layer site name")
    return kind


@dataclass(frozen=True)
class InsertConfig:
    mode: Mode = Mode.FT1
    recipe: Recipe | None = None   # per-site rules (--recipe, --include, --exclude; recipe.py): a Recipe, a dict or a path

    def __post_init__(self):
        from .recipe import parse_recipe

        object.__setattr__(self, "mode", choice(Mode, self.mode, "--mode"))
        object.__setattr__(self, "recipe", parse_recipe(self.recipe))

    @property
    def sites(self) -> frozenset[SiteKind]:
        return MODE_SITES[self.mode]

    def covers(self, name: str) -> bool:
        """Whether this mode quantizes the layer site `name` (`ffn2.input`, `residual1`, `query.gemm_output`)."""
        return site_kind(name) in self.sites

    @property
    def per_channel_weights(self) -> bool:
        """ft1 quantizes weights per output channel; ft2/ft3/trt per tensor."""
        return self.mode in (Mode.FT1, Mode.GENERIC)

    @property
    def fuse_qkv(self) -> bool:
        """FT's fuse_qkv: Q, K and V share one amax (one QKV GEMM in the kernels)."""
        return self.mode in (Mode.FT2, Mode.FT3, Mode.TRT)
