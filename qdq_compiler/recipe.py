"""Per-site control: which quantization sites are on, and how each one is quantized.

A recipe is an ordered list of rules. A rule names sites by a glob (fnmatch, case-sensitive) over
site names (`layer.3.ffn2.input`, `layer.*.softmax.output`; generic sites `<node>.input0`), the names
of the nodes the sites belong to (the GEMM, batched MatMul or Add reading the quantized tensor, never
its producer) and their op types, or by the exact name of the tensor a site quantizes (not a glob:
exported tensor names carry their producer's path, so a node-path glob would reach the next layer's
inputs), and sets some of:
`enabled`, `method` and `percentile` (activations), `weights` (per-channel | per-tensor), `smooth`
(off | an alpha). Later rules override earlier ones. `--include`/`--exclude` are rules too: the
include rules before the file's, the exclude rules after them. The same idea as pytorch-quantization's per-module `QuantDescriptor` and
`disable_quant()`, or onnxruntime's `nodes_to_exclude`, keyed by names that survive re-export.

    {"mode": "ft1",
     "sites": [{"match": "layer.*.ffn2.input", "enabled": false},
               {"match": "layer.*.softmax.output", "method": "mse"},
               {"match": "layer.0.*.weight", "weights": "per-tensor"}]}

Placement resolves the rules once; what they decided per quantized tensor travels with the model
(carried.py) so calibration and smoothing read it instead of matching names again.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import numbers
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Iterable

from .calibration import Method
from .config import Mode, choice
from .errors import UsageError

FORMAT = 1


class Granularity(str, Enum):
    PER_CHANNEL = "per-channel"
    PER_TENSOR = "per-tensor"


_RULE_KEYS = ("match", "enabled", "method", "percentile", "weights", "smooth", "bits")
_TOP_KEYS = ("format", "mode", "bits", "sites")


def _bits(value, where: str) -> None:
    if isinstance(value, bool) or value != 8:
        raise UsageError(f"{where}: bits {value!r}: qdqc quantizes to 8 bits only (INT8 Q/DQ); "
                         "other widths are not supported")


@dataclass(frozen=True)
class SiteRule:
    """One recipe entry: a glob and the settings it gives the sites it matches (None: unchanged)."""

    match: str
    enabled: bool | None = None
    method: Method | None = None
    percentile: float | None = None
    weights: Granularity | None = None
    smooth: float | str | None = None     # "off" or an alpha in [0, 1]
    origin: str = field(default="", compare=False)   # "recipe.toml sites[2]" / "--exclude", for messages

    def __post_init__(self):
        where = self.origin or "recipe rule"
        if not isinstance(self.match, str) or not self.match.strip():
            raise UsageError(f"{where}: 'match' must be a non-empty glob, got {self.match!r}")
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise UsageError(f"{where}: enabled {self.enabled!r}: expected true or false")
        if self.method is not None:
            # validated like --method, but `auto` measures the whole model at once: not per site
            method = choice(Method, self.method, f"{where}: method")
            if method is Method.AUTO:
                raise UsageError(f"{where}: method 'auto' is whole-model (--method auto), not per site; "
                                 f"name max, percentile, mse or entropy")
            object.__setattr__(self, "method", method)
        if self.percentile is not None:
            from .calibrate import CalibrationConfig

            try:
                CalibrationConfig(percentile=self.percentile)   # the --percentile checks
            except UsageError as exc:
                raise UsageError(f"{where}: {str(exc).removeprefix('--')}") from None
        if self.percentile is not None and self.method not in (None, Method.PERCENTILE):
            raise UsageError(f"{where}: percentile {self.percentile:g} with method {self.method.value}: a percentile "
                             "applies only to method percentile")
        if self.weights is not None:
            object.__setattr__(self, "weights", choice(Granularity, self.weights, f"{where}: weights"))
        if self.smooth is not None:
            from .smooth import SmoothConfig

            if self.smooth is True or self.smooth == "auto":
                raise UsageError(f"{where}: smooth {self.smooth!r}: per site, name an alpha in [0, 1] or off "
                                 "(--smooth auto searches every site)")
            try:
                parsed = SmoothConfig.parse(self.smooth)   # the --smooth checks
            except UsageError as exc:
                raise UsageError(f"{where}: {str(exc).removeprefix('--')}") from None
            object.__setattr__(self, "smooth", "off" if parsed is None else parsed.alpha)

    @property
    def label(self) -> str:
        """How messages name the rule: `--exclude 'layer.*.ffn2.input'`, `r.toml sites[2] ('layer.0.*')`."""
        if self.origin.startswith("--"):
            return f"{self.origin} {self.match!r}"
        return f"{self.origin or 'recipe rule'} ({self.match!r})"

    def matches(self, names: Iterable[str], tensor: str = "") -> bool:
        """A glob over the site's `names` (site name, reading node's name, its op type); the quantized
        tensor only by its exact name, since a tensor is named after its producer, not its reader."""
        return self.match == tensor or any(fnmatch.fnmatchcase(name, self.match) for name in names if name)

    def to_json(self) -> dict:
        found = {"match": self.match}
        for key in _RULE_KEYS[1:-1]:
            value = getattr(self, key)
            if value is not None:
                found[key] = value.value if isinstance(value, Enum) else value
        return found


@dataclass(frozen=True)
class SiteSettings:
    """What the rules decided for one site or quantized tensor (None: the command's own option)."""

    enabled: bool = True
    method: Method | None = None
    percentile: float | None = None
    weights: Granularity | None = None
    smooth: float | str | None = None
    rules: tuple[int, ...] = ()    # the indices of the rules that matched, in order

    def to_json(self) -> dict:
        found = {}
        for key in ("method", "percentile", "weights", "smooth"):
            value = getattr(self, key)
            if value is not None:
                found[key] = value.value if isinstance(value, Enum) else value
        return found

    @classmethod
    def from_json(cls, data: dict) -> "SiteSettings":
        return cls(True, data.get("method") and Method(data["method"]), data.get("percentile"),
                   data.get("weights") and Granularity(data["weights"]), data.get("smooth"))


@dataclass(frozen=True)
class Recipe:
    rules: tuple[SiteRule, ...] = ()
    mode: Mode | None = None      # None: the command's --mode
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if self.mode is not None:
            object.__setattr__(self, "mode", choice(Mode, self.mode, f"{self.source or 'recipe'}: mode"))

    def __bool__(self) -> bool:
        return bool(self.rules) or self.mode is not None

    # ------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, data, source: str = "recipe") -> "Recipe":
        """A recipe from its JSON/TOML form (the API takes the same dict); every error is one line naming
        `source` and the entry."""
        if isinstance(data, Recipe):
            return data
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a table/object with 'sites' (and optionally 'mode'), "
                             f"got {type(data).__name__}")
        unknown = [key for key in data if key not in _TOP_KEYS]
        if unknown:
            raise UsageError(f"{source}: unknown key {unknown[0]!r} (a recipe has {', '.join(_TOP_KEYS)})")
        if data.get("format", FORMAT) != FORMAT:
            raise UsageError(f"{source}: format {data['format']!r}, this qdqc reads format {FORMAT}")
        if "bits" in data:
            _bits(data["bits"], source)
        entries = data.get("sites", [])
        if not isinstance(entries, list):
            raise UsageError(f"{source}: 'sites' must be a list of entries, got {type(entries).__name__}")
        rules = []
        for index, entry in enumerate(entries):
            where = f"{source} sites[{index}]"
            if not isinstance(entry, dict):
                raise UsageError(f"{where}: expected a table/object, got {entry!r}")
            unknown = [key for key in entry if key not in _RULE_KEYS]
            if unknown:
                close = difflib.get_close_matches(unknown[0], _RULE_KEYS, 1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UsageError(f"{where}: unknown key {unknown[0]!r} ({hint}an entry has {', '.join(_RULE_KEYS)})")
            if "match" not in entry:
                raise UsageError(f"{where}: no 'match' (the glob naming the sites)")
            if "bits" in entry:
                _bits(entry["bits"], where)
            if "percentile" in entry and (isinstance(entry["percentile"], bool)
                                          or not isinstance(entry["percentile"], numbers.Real)):
                raise UsageError(f"{where}: percentile {entry['percentile']!r}: expected a number")
            rules.append(SiteRule(**{k: v for k, v in entry.items() if k != "bits"}, origin=where))
        try:
            return cls(tuple(rules), data.get("mode"), source)
        except UsageError as exc:
            raise UsageError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe file: `.toml` (tomllib) or `.json`."""
        path = Path(path)
        check_suffix(path, "--recipe")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--recipe {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--recipe {path}: cannot read it ({exc})") from None
        if path.suffix.lower() == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"{path}: not valid TOML ({exc})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                    from None
        return cls.from_dict(data, str(path))

    def with_filters(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> "Recipe":
        """`--include` keeps only the sites it names (everything else off), before the recipe's own rules
        (so it never turns back on a site the recipe leaves in float); `--exclude` turns sites off, after them."""
        include, exclude = list(include or ()), list(exclude or ())
        rules = []
        if include:
            rules.append(SiteRule("*", enabled=False, origin="--include (what it does not name)"))
            rules += [SiteRule(p, enabled=True, origin="--include") for p in include]
        rules += list(self.rules)
        rules += [SiteRule(p, enabled=False, origin="--exclude") for p in exclude]
        return replace(self, rules=tuple(rules))

    # ------------------------------------------------------------ resolving

    def settings(self, names: Iterable[str], tensor: str = "") -> SiteSettings:
        """The settings of a site known by `names` (its site name, reader's name and op type) and `tensor`."""
        names = tuple(names)
        found = SiteSettings()
        for index, rule in enumerate(self.rules):
            if rule.matches(names, tensor):
                found = fold(found, rule, index)
        return found

    def check_used(self, matched: set[int], candidates: Iterable[str], sites: Iterable[str] = (),
                   mode: Mode | None = None) -> None:
        """A rule that matched no site is a mistake (a typo, another mode's site): one line with the
        closest names, the modes that have such a site, or what the names here look like."""
        sites = list(dict.fromkeys(sites))
        for index, rule in enumerate(self.rules):
            if index in matched or rule.match == "*":
                continue
            known = sorted(set(candidates))
            close = difflib.get_close_matches(rule.match, known, 5, 0.5)
            elsewhere = _other_modes(rule.match, sites, mode) if mode is not None else ""
            if elsewhere:
                hint = f"; {elsewhere}"
            elif close:
                hint = f"; closest: {', '.join(close)}"
            else:
                ops = sorted({name for name in known if name in _SITE_OPS})
                hint = (f"; site names here look like {', '.join(sites[:3])}" if sites else "") + \
                        (f"; op types: {', '.join(ops)}" if ops else "")
            raise UsageError(f"{rule.label}: matches no quantization site, node name or op type{hint}")

    def to_json(self) -> dict:
        found: dict = {"format": FORMAT}
        if self.mode is not None:
            found["mode"] = self.mode.value
        found["sites"] = [rule.to_json() for rule in self.rules]
        return found


_SITE_OPS = ("MatMul", "Gemm", "Conv", "Add")


def _other_modes(pattern: str, sites: list[str], mode: Mode) -> str:
    """Which modes have the layer sites `pattern` names, when `mode` has none of them ('' if none do)."""
    from .config import LINEAR_SITE_KINDS, MODE_SITES, NAMED_SITE_KINDS, site_kind

    layers = sorted({site.split(".")[1] for site in sites if site.startswith("layer.")} or {"0"})
    roles = ("query", "key", "value", "qkv", "attention_output", "ffn1", "ffn2")
    names = list(NAMED_SITE_KINDS) + [f"{role}.{kind}" for role in roles for kind in LINEAR_SITE_KINDS]
    wanted = [name for name in names if any(fnmatch.fnmatchcase(f"layer.{i}.{name}", pattern) for i in layers)]
    if not wanted:
        return ""
    modes = [m.value for m in Mode if m is not mode and any(site_kind(n) in MODE_SITES[m] for n in wanted)]
    return (f"mode {mode.value} has no {wanted[0]} site" + (f" (modes {', '.join(modes)} have)" if modes else "")
            if modes else "")


def fold(settings: SiteSettings, rule: SiteRule, index: int) -> SiteSettings:
    """`settings` with `rule`'s values on top (later rules win)."""
    changes = {key: getattr(rule, key) for key in ("enabled", "method", "percentile", "weights", "smooth")
               if getattr(rule, key) is not None}
    return replace(settings, **changes, rules=settings.rules + (index,))


def combine(recipe: Recipe, rule_sets: Iterable[tuple[int, ...]]) -> SiteSettings:
    """One quantized tensor read at several sites: the rules of all of them, in recipe order."""
    found = SiteSettings()
    for index in sorted({i for rules in rule_sets for i in rules}):
        found = fold(found, recipe.rules[index], index)
    return found


def parse_recipe(recipe) -> Recipe:
    """The API's `recipe=`: a path, a dict (the file's form) or a Recipe."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe, "recipe")
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe)
    raise UsageError(f"recipe: expected a path, a dict or a Recipe, got {type(recipe).__name__}")


SUFFIXES = (".json", ".toml")


def check_suffix(path: str | Path, option: str) -> Path:
    """A recipe file is `.json` or `.toml` (its suffix says which), never guessed from another suffix."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{option} {path}: a recipe file ends in .json or .toml, not "
                         f"{path.suffix or 'no suffix'!r}")
    return path


def write(recipe: dict, path: str | Path) -> Path:
    """Write a recipe (its JSON/TOML dict) atomically: `.toml` or `.json` by suffix."""
    from . import ir

    path = check_suffix(path, "--emit-recipe")
    ir.write_text_atomic(path, to_toml(recipe) if path.suffix.lower() == ".toml" else json.dumps(recipe, indent=1) + "\n")
    return path


def to_toml(recipe: dict) -> str:
    """The recipe's TOML spelling (flat values only: strings, numbers, booleans)."""
    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [f"{k} = {value(v)}" for k, v in recipe.items() if k != "sites" and v is not None]
    for entry in recipe.get("sites", []):
        lines += ["", "[[sites]]"] + [f"{k} = {value(v)}" for k, v in entry.items() if v is not None]
    return "\n".join(lines) + "\n"


def decision(base: Recipe, mode: str | None, float_sites: Iterable[str] = (),
             methods: dict[str, str] | None = None) -> dict:
    """A decision written as a recipe (its file form), to review, edit and replay: the rules in force,
    then one rule per site left in float, then one per site whose calibration method was chosen
    (`--method auto`'s labels: "max", "mse", "entropy", "percentile 99.99"). `mode` None (a model
    without qdqc's plan): no mode, the replaying command's --mode decides."""
    rules = [rule.to_json() for rule in base.rules]
    rules += [{"match": site, "enabled": False} for site in float_sites]
    for site, label in (methods or {}).items():
        method, _, percentile = label.partition(" ")
        rules.append({"match": site, "method": method, **({"percentile": float(percentile)} if percentile else {})})
    return {"format": FORMAT, **({"mode": mode} if mode is not None else {}), "sites": rules}
