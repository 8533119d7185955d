"""The model registry's vocabulary, importable without torch.

A model is *declared* by a :class:`ModelInfo` (name, family, licence, weights,
size rules, parameters and the dotted path of the factory that builds it) and
*requested* by a :class:`ModelSpec` parsed from the command line form
``NAME[:PARAMS][:WEIGHT]``, e.g. ``wiener``, ``wiener:0.5``,
``wiener:psf=motion:length=15,angle=30``, ``l0-blind:kernel=31,lambda=4e-3:2``.

The producer validates specs against the registry before anything is enqueued;
only workers turn a spec into a torch module (:mod:`models.loading`).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from jobs.errors import InvalidModelSpecError, UnknownModelError

Family = Literal["classic", "learned-official", "learned-seed"]
FAMILIES: tuple[str, ...] = ("classic", "learned-official", "learned-seed")


@dataclass(frozen=True)
class Param:
    """One named parameter a model accepts in its spec.

    ``kind`` converts the text from the spec (``float``, ``int``, ``str`` or
    ``bool``); ``check`` may further validate or normalise the converted value
    and must raise ``ValueError`` with a readable message when it is wrong.
    """

    name: str
    kind: type
    default: object
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[object], object] | None = None
    # one of COMMON_PARAMS (possibly with a model's own default): applied by wrapping, not by the factory
    common: bool = False
    # the value itself holds comma-separated key=value parts (a PSF: motion:length=15,angle=30), so the spec
    # parser keeps an unknown key after a comma in this value instead of calling it a misspelt parameter
    compound: bool = False

    def convert(self, model: str, text: str) -> object:
        try:
            if self.kind is bool:
                lowered = text.strip().lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(f"expected a boolean, got {text!r}")
                value: object = lowered in {"1", "true", "yes", "on"}
            elif self.kind is int:
                value = _parse_number(int, "a whole number", text)
            elif self.kind is float:
                value = _parse_number(float, "a number", text)
                if not math.isfinite(value):
                    raise ValueError(f"expected a finite number, got {text!r}")
            else:
                value = text
            if self.minimum is not None and float(value) < self.minimum:  # type: ignore[arg-type]
                raise ValueError(f"must be >= {self.minimum}, got {text}")
            if self.maximum is not None and float(value) > self.maximum:  # type: ignore[arg-type]
                raise ValueError(f"must be <= {self.maximum}, got {text}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}; got {text!r}")
            if self.check is not None:
                value = self.check(value)
        except ValueError as exc:
            raise InvalidModelSpecError(
                f"model {model!r}: parameter {self.name!r}: {exc}"
            ) from None
        return value


def _parse_number(kind: Callable[[str], float], wanted: str, text: str) -> float:
    """``kind(text)``, with a ValueError naming what was expected instead of Python's own wording."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {wanted}, got {text!r}") from None


@dataclass(frozen=True)
class WeightsFile:
    """Where a model's weights come from and how to check them.

    ``shipped`` weights live in this repository (``models/weights/``); others
    are looked up in ``DEBLUR_WEIGHTS_DIR`` and fetched by ``deblur models pull``.
    """

    filename: str
    sha256: str | None = None
    url: str | None = None
    shipped: bool = False
    size_bytes: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Everything known about a model without loading it."""

    name: str
    family: Family
    license: str
    summary: str
    factory: str  # "package.module:function", called as factory(params, device)
    params: tuple[Param, ...] = ()
    weights: WeightsFile | None = None
    noncommercial: bool = False
    size_multiple: int = 1
    min_size: int = 1
    tile_size: int | None = None
    dtypes: tuple[str, ...] = ("float32",)
    produces_kernel: bool = False
    version: str = "1"
    # defaults of COMMON_PARAMS that differ for this model, e.g. (("self_ensemble", True),)
    option_defaults: tuple[tuple[str, object], ...] = ()
    # keep the latest result so an ensemble member and a refiner's prior compute it once
    shared_results: bool = False
    # the network its weights file must hold (spandrel's architecture id), checked by 'deblur models pull'
    architecture: str | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def size_rules(self) -> str:
        rules = []
        if self.size_multiple > 1:
            rules.append(f"padded to a multiple of {self.size_multiple}")
        if self.min_size > 1:
            rules.append(f"min side {self.min_size}")
        if self.tile_size:
            rules.append(f"tiles of {self.tile_size}")
        return ", ".join(rules) or "any size"


@dataclass(frozen=True)
class ModelSpec:
    """A requested model: its name, explicit parameters and ensemble weight."""

    name: str
    params: tuple[tuple[str, object], ...] = ()
    weight: float = 1.0

    @property
    def param_dict(self) -> dict[str, object]:
        return dict(self.params)

    def key(self) -> str:
        """Canonical text naming the model and its parameters (not its weight).

        Used as the model cache key in workers and as the model name under
        which metrics are stored, so two specs that mean the same model share it.
        """
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params)

    def to_text(self) -> str:
        """The spec in the command-line form, weight included when not 1."""
        text = self.key()
        if self.weight != 1.0:
            text += f":{_fmt(self.weight)}"
        return text


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _check_weight(model: str, weight: float) -> None:
    """Refuse an ensemble weight that is infinite, NaN or negative: the average of the members has no meaning
    then, and workers would fail on every image."""
    if not math.isfinite(weight) or weight < 0:
        raise InvalidModelSpecError(f"model {model!r}: ensemble weight must be a finite number >= 0, got {weight}")


def _unknown_parameter(info: ModelInfo, key: str) -> InvalidModelSpecError:
    """The error for a parameter ``info`` does not take, listing the ones it does and the closest of them."""
    names = [p.name for p in info.params]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return InvalidModelSpecError(
        f"unknown parameter {key!r} for {info.name}; its parameters are: {', '.join(names) or 'none'}{hint}"
    )


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "=" not in text


# Inference options every model accepts. ``Registry.register`` appends them to
# each entry that does not declare a parameter of the same name itself, and
# ``models.loading`` strips them before calling the factory and applies them by
# wrapping the built model (tiling, self-ensemble).
COMMON_PARAMS: tuple[Param, ...] = (
    Param(
        "tile",
        int,
        0,
        "tile side in pixels for large images (0: the model's default tile size, "
        "if any; -1: never tile)",
        minimum=-1,
        common=True,
    ),
    Param(
        "tile_overlap",
        int,
        32,
        "overlap between neighbouring tiles in pixels, blended with a raised-cosine ramp",
        minimum=0,
        maximum=4096,
        common=True,
    ),
    Param(
        "self_ensemble",
        bool,
        False,
        "average the outputs over the 8 flips and 90-degree rotations (8x slower)",
        common=True,
    ),
)


_COMMON_OVERLAP_DEFAULT = next(p.default for p in COMMON_PARAMS if p.name == "tile_overlap")


def common_param_names(info: ModelInfo) -> tuple[str, ...]:
    """Names of the :data:`COMMON_PARAMS` the registry added to ``info``.

    A parameter the entry declares itself under the same name is not counted:
    its factory handles it.
    """
    return tuple(p.name for p in info.params if p.common)


def _check_tiling(info: ModelInfo, given: Mapping[str, object]) -> None:
    """Reject an explicit tile that its overlap would not fit, before anything is enqueued."""
    if not {"tile", "tile_overlap"} <= set(common_param_names(info)):
        return
    tile = given.get("tile")
    overlap = given.get("tile_overlap", _COMMON_OVERLAP_DEFAULT)
    if isinstance(tile, int) and isinstance(overlap, int) and 0 < tile <= 2 * overlap:
        raise InvalidModelSpecError(
            f"model {info.name!r}: tile_overlap={overlap} must be less than half of tile={tile}; "
            "lower tile_overlap or raise tile"
        )


class Registry:
    """An explicit, duplicate-checked table of :class:`ModelInfo` by name."""

    def __init__(self, entries: Iterable[ModelInfo] = ()) -> None:
        self._entries: dict[str, ModelInfo] = {}
        for entry in entries:
            self.register(entry)

    def register(self, info: ModelInfo) -> None:
        if info.name in self._entries:
            raise ValueError(f"model {info.name!r} is registered twice")
        if info.family not in FAMILIES:
            raise ValueError(f"model {info.name!r}: unknown family {info.family!r}")
        if ":" not in info.factory:
            raise ValueError(f"model {info.name!r}: factory must be 'module:function'")
        names = [p.name for p in info.params]
        if len(names) != len(set(names)):
            raise ValueError(f"model {info.name!r}: duplicate parameter names {names}")
        missing = tuple(p for p in COMMON_PARAMS if p.name not in names)
        overrides = dict(info.option_defaults)
        unknown = sorted(set(overrides) - {p.name for p in missing})
        if unknown:
            raise ValueError(f"model {info.name!r}: option_defaults {unknown} are not common options it inherits")
        for p in missing:
            if p.name in overrides and not isinstance(overrides[p.name], p.kind):
                raise ValueError(f"model {info.name!r}: default of {p.name!r} must be a {p.kind.__name__}")
        missing = tuple(replace(p, default=overrides[p.name]) if p.name in overrides else p for p in missing)
        if missing:
            info = replace(info, params=info.params + missing)
        self._entries[info.name] = info

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._entries[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> ModelInfo:
        try:
            return self._entries[name]
        except KeyError:
            close = [n for n in self.names() if n.split("-")[0] in name or name in n]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {name!r}; known: {', '.join(self.names())}.{hint} "
                "Run 'deblur models list' to see them all."
            ) from None

    def parse(self, text: str) -> ModelSpec:
        """Parse ``NAME[:PARAMS][:WEIGHT]`` and validate it against the registry.

        Parameters are ``key=value`` pairs separated by commas. A value may
        itself contain ``:`` and ``,``: a piece without ``=`` continues the
        previous value, and so does a ``key=value`` piece whose key is not a
        parameter of the model when the previous parameter is
        :attr:`Param.compound` (``psf=motion:length=15,angle=30``); anywhere
        else such a piece is a misspelt parameter and is reported as one, not
        as a bad value of its neighbour. A trailing ``:NUMBER`` is the
        ensemble weight.
        """
        text = text.strip()
        if not text:
            raise InvalidModelSpecError("empty model spec; expected NAME[:PARAMS][:WEIGHT]")
        name, _, rest = text.partition(":")
        info = self.get(name.strip())
        weight = 1.0
        if rest:
            head, sep, tail = rest.rpartition(":")
            if _looks_like_number(rest):
                weight, rest = float(rest), ""
            elif sep and _looks_like_number(tail):
                weight, rest = float(tail), head
        _check_weight(info.name, weight)
        raw: dict[str, str] = {}
        last: Param | None = None
        for piece in rest.split(",") if rest else []:
            key, eq, value = piece.partition("=")
            key = key.strip()
            param = info.param(key) if eq else None
            if param is not None:
                if key in raw:
                    raise InvalidModelSpecError(f"model {info.name!r}: parameter {key!r} given twice")
                raw[key] = value.strip()
                last = param
            elif last is not None and (last.compound or not eq):
                # a PSF's own 'angle=30', or a comma inside a value (a path): the previous value goes on
                raw[last.name] += "," + piece
            else:
                raise _unknown_parameter(info, key if eq else piece.strip())
        params = tuple(
            (p.name, p.convert(info.name, raw[p.name])) for p in info.params if p.name in raw
        )
        _check_tiling(info, dict(params))
        return ModelSpec(info.name, params, weight)

    def resolved_params(self, spec: ModelSpec) -> dict[str, object]:
        """The spec's parameters with every default filled in."""
        info = self.get(spec.name)
        values = {p.name: p.default for p in info.params}
        values.update(spec.param_dict)
        return values


def weights_dir() -> Path:
    """The operator's weights folder (``DEBLUR_WEIGHTS_DIR``)."""
    configured = os.environ.get("DEBLUR_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "deblur" / "weights"


SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def find_weights(info: ModelInfo) -> Path | None:
    """The weights file for ``info`` if present: operator folder first, then shipped."""
    if info.weights is None:
        return None
    for folder in (weights_dir(), SHIPPED_WEIGHTS_DIR):
        candidate = folder / info.weights.filename
        if candidate.is_file():
            return candidate
    return None


def weights_present(info: ModelInfo) -> bool:
    return info.weights is None or find_weights(info) is not None


def noncommercial_allowed() -> bool:
    """Whether the operator opted into models under non-commercial licences (``DEBLUR_ALLOW_NONCOMMERCIAL``)."""
    return os.environ.get("DEBLUR_ALLOW_NONCOMMERCIAL", "").strip().lower() in {"1", "true", "yes", "on"}


def needs_worker_setup(info: ModelInfo) -> bool:
    """Whether a worker may be unable to run ``info`` for want of its operator's setting up: weights that do not
    ship with the code (``deblur models pull``), or a non-commercial licence (``DEBLUR_ALLOW_NONCOMMERCIAL``)."""
    return info.noncommercial or (info.weights is not None and not info.weights.shipped)


LICENCE_REASON = "licensed"  # how unavailable_reason's licence refusal starts (a model's own file cannot mend it)


def unavailable_reason(info: ModelInfo) -> str | None:
    """Why this installation cannot run ``info`` (None: it can): its licence is not opted into, or its weights
    are not in the weights folder."""
    if info.noncommercial and not noncommercial_allowed():
        return (f"{LICENCE_REASON} {info.license!r}, which forbids commercial use, and DEBLUR_ALLOW_NONCOMMERCIAL "
                "is not set there")
    if not weights_present(info):
        return (f"no weights ({info.weights.filename if info.weights else '?'}) in its DEBLUR_WEIGHTS_DIR: run "
                f"'deblur models pull {info.name}' there")
    return None


def describe(info: ModelInfo) -> Mapping[str, object]:
    """A JSON-ready description, as printed by ``deblur models list --format json``."""
    return {
        "name": info.name,
        "family": info.family,
        "license": info.license,
        "noncommercial": info.noncommercial,
        "weights_present": weights_present(info),
        "weights_file": info.weights.filename if info.weights else None,
        "summary": info.summary,
        "size_rules": info.size_rules(),
        "size_multiple": info.size_multiple,
        "tile_size": info.tile_size,
        "dtypes": list(info.dtypes),
        "produces_kernel": info.produces_kernel,
        "params": [
            {"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help}
            for p in info.params
        ],
    }


@dataclass(frozen=True)
class EnsembleSpec:
    """Members of an ensemble with their weights, plus the restoration strength."""

    members: tuple[ModelSpec, ...]
    strength: float = 1.0
    extras: dict[str, object] = field(default_factory=dict, compare=False)

    def normalised_weights(self) -> list[float]:
        """Each member's share of the average, checked the way workers will compute it.

        Workers sum the weights with :func:`math.fsum`, which raises on an infinite sum, so weights that are
        each finite but overflow together (two of 1e308) are refused here, before anything is enqueued,
        rather than failing every image.
        """
        for member in self.members:
            _check_weight(member.name, member.weight)
        try:
            total = math.fsum(m.weight for m in self.members)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            weights = ", ".join(_fmt(m.weight) for m in self.members)
            raise InvalidModelSpecError(
                f"ensemble weights {weights} add up to more than the largest number there is; only their ratios "
                "count, so use smaller ones (e.g. 1 and 2)"
            )
        if total <= 0:
            raise InvalidModelSpecError("ensemble weights sum to zero; give at least one weight > 0")
        return [m.weight / total for m in self.members]
