"""The seeds' learned models as :class:`RestorationModel` descriptors, with safe weight loading.

Factories (``build_seed001``, ``build_seed002``, ``build_seed003``) are named by
the registry entries in :mod:`models.catalog`. Weights are ``.safetensors``
files only (no pickle): the shipped ones in ``models/weights/``, or a file
given with the ``weights=PATH`` parameter, or ``DEBLUR_WEIGHTS_DIR/<file>``.
The file's metadata records the architecture and its options, so a file
trained with other widths loads into the right network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jobs.errors import WeightsError
from models.base import RestorationModel, Restored
from models.registry import SHIPPED_WEIGHTS_DIR, ModelInfo, ModelSpec, WeightsFile, weights_dir
from models.weights_store import check_readable, sha256_of

SHIPPED_DIR = SHIPPED_WEIGHTS_DIR


@dataclass(frozen=True)
class SeedModel:
    """How a registered learned seed model maps to an architecture and its options."""

    arch: str
    arch_kwargs: Mapping[str, object]
    prior: str = ""  # a refiner's blind model: its weights must record the same prior


# Architecture options of the registered models (the shipped weights were trained with these).
SEED_MODELS: dict[str, SeedModel] = {
    "seed001-gan": SeedModel("seed001", {"width": 32, "scale": 2, "reduce_activation": True}),
    "seed002-unet": SeedModel("seed002", {"width": 16}),
    "seed001-refine": SeedModel(
        "seed001", {"width": 32, "scale": 2, "reduce_activation": True, "reduce_slope": 0.1, "in_channels": 6},
        prior="l0-blind",
    ),
    "seed002-refine": SeedModel("seed002", {"width": 16, "in_channels": 6}, prior="l0-blind"),
    "seed003-vit": SeedModel("seed003", {}),
}


# Refiners fine-tuned on synthetic blur made in linear light, their prior l0-blind:light=linear: what
# ``seed001-refine:light=linear`` and ``seed002-refine:light=linear`` load (models/weights/MODEL_CARD.md).
LINEAR_LIGHT_WEIGHTS: dict[str, WeightsFile] = {
    "seed001-refine": WeightsFile(
        "seed001-refine-linear.safetensors",
        "01763797e61adf10881259a88067a0cdd3d5621e1b41c77914ccb00c5aeb7fc7",
        shipped=True,
    ),
    "seed002-refine": WeightsFile(
        "seed002-refine-linear.safetensors",
        "9506ae1026ca193f8f5cacd390c8f312368ed6730de5c75d1b6673b8bacaf78b",
        shipped=True,
    ),
}


def default_prior(name: str) -> str:
    """The blind model a registered refiner is trained on ("" for other names)."""
    model = SEED_MODELS.get(name)
    return model.prior if model is not None else ""


def resolve_arch(name: str) -> tuple[str, dict[str, object]]:
    """(architecture, options) for an architecture name or a registered learned seed model name."""
    from models.archs import ARCHITECTURES

    if name in ARCHITECTURES:
        return name, {}
    if name in SEED_MODELS:
        model = SEED_MODELS[name]
        return model.arch, dict(model.arch_kwargs)
    known = ", ".join([*ARCHITECTURES, *SEED_MODELS])
    raise WeightsError(f"unknown architecture or learned model {name!r}; known: {known}")


def weights_path(info: ModelInfo, explicit: str = "") -> Path:
    """Where the weights of ``info`` are: ``explicit`` if given, else the shipped or weights-dir file."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"model {info.name!r}: weights file {explicit!r} does not exist")
        return path
    if info.weights is None:
        raise WeightsError(
            f"model {info.name!r} has no registered weights; train some with "
            f"'deblur train {info.name} -o RUN_DIR' and pass weights=RUN_DIR/best.safetensors"
        )
    if info.weights.shipped:
        path = SHIPPED_DIR / info.weights.filename
    else:
        path = weights_dir() / info.weights.filename
    if not path.is_file():
        raise WeightsError(
            f"model {info.name!r}: weights file {str(path)!r} is missing; reinstall the package or "
            f"train them with 'deblur train {info.name} -o RUN_DIR' and pass weights=RUN_DIR/best.safetensors"
        )
    return path


def load_network(path: Path, expected_arch: str | None = None, check_sha256: str | None = None) -> tuple[nn.Module, dict[str, str]]:
    """Build the network recorded in a ``.safetensors`` file's metadata and load its tensors.

    Returns the network (CPU, eval mode) and the file's metadata. Raises
    :class:`WeightsError` on a file this user may not read, a checksum
    mismatch, a file that is not safetensors, missing metadata, another
    architecture or mismatched tensors.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from models.archs import build_network

    check_readable(path)
    if check_sha256 is not None:
        actual = sha256_of(path)
        if actual != check_sha256.lower():
            raise WeightsError(
                f"weights file {str(path)!r} has sha256 {actual}, expected {check_sha256}; "
                "it is corrupt or not the registered file"
            )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {str(path)!r} as safetensors: {exc}") from None
    arch = meta.get("arch")
    if not arch:
        raise WeightsError(f"{str(path)!r} has no 'arch' metadata; was it written by 'deblur train'?")
    if expected_arch is not None and arch != expected_arch:
        raise WeightsError(f"{str(path)!r} holds a {arch!r} network, not {expected_arch!r}")
    kwargs = json.loads(meta.get("arch_kwargs", "{}"))
    net = build_network(arch, **kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{str(path)!r} does not match the {arch!r} network {kwargs}: {exc}") from None
    return net.eval(), meta


class LearnedSeedModel(RestorationModel):
    """A trained seed network behind the :class:`RestorationModel` interface.

    The base class pads inputs to ``info.size_multiple`` (reflect), handles
    grey inputs, ``inference_mode`` and clamping; this class maps [0, 1] to the
    network's own value range and back.
    """

    channels = 3

    def __init__(self, info: ModelInfo, params: Mapping[str, object], device: torch.device, net: nn.Module) -> None:
        super().__init__(info, params, device)
        self.net = net.to(device).eval()

    def restore_batch(self, x: torch.Tensor) -> Restored:
        from models.archs import run_network

        return Restored(image=run_network(self.net, x))


class JointNetwork(LearnedSeedModel):
    """A refiner's network on its joint input ``[image, prior result]`` (6 channels in, 3 out).

    The base class pads, picks the precision and clamps; this is what tiling
    and self-ensemble wrap for a refiner, so the prior runs once on the whole
    image while the network may go tile by tile.
    """

    channels = None


class RefinerModel(RestorationModel):
    """A seed network conditioned on a blind model's result (``prior`` in the weights' metadata).

    The prior (e.g. ``l0-blind``) runs on the whole image first; the network
    (:class:`JointNetwork`, tiled and self-ensembled when asked) then sees
    ``[image, prior result]`` and returns a corrected image. The prior's
    kernel and metrics are passed through, so the worker stores them as this
    model's artefacts too. When the same prior is also an ensemble member it
    is computed once (:mod:`models.shared_results`). A grey photograph stored
    as RGB comes back grey, as from any model (:func:`models.base.keep_grey`):
    the network sees 6 channels, so the base class cannot tell on its own.
    """

    channels = None

    def __init__(
        self, info: ModelInfo, params: Mapping[str, object], device: torch.device,
        network: RestorationModel, prior: RestorationModel,
    ) -> None:
        super().__init__(info, params, device)
        self.network = network
        self.prior = prior

    @property
    def version(self) -> str:
        return f"{super().version}<{self.prior.version}>"

    def apply_inference_options(self, options: Mapping[str, object]) -> RestorationModel:
        """Tile / self-ensemble the network only (the prior needs the whole image); returns ``self``."""
        from models.tiling import apply_inference_options

        self.network = apply_inference_options(self.network, options)
        self.params.update({k: v for k, v in self.network.params.items() if k in options})
        return self

    def restore_batch(self, x: torch.Tensor) -> Restored:
        return self(x)

    def __call__(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
        from models.base import _adapt_channels, _restore_channels, keep_grey

        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        c = x.shape[1]
        x = x.to(self.device, torch.float32)
        prior = self.prior(x, keep_grey_inputs=keep_grey_inputs)
        joint = torch.cat([_adapt_channels(x, 3), _adapt_channels(prior.image.to(x.device), 3)], dim=1)
        image = self.network(joint).image.to(x.device)
        if c != 3:
            image = _restore_channels(image, c)
        elif keep_grey_inputs:
            image = keep_grey(x, image)  # the channels' mean of values in [0, 1]: no clamping needed
        return Restored(image=image, kernels=prior.kernels, metrics=dict(prior.metrics))


def prior_spec(prior_text: str, light: str) -> ModelSpec:
    """The spec of a refiner's prior (from its weights' metadata), undoing the blur in ``light``.

    "encoded" leaves the spec as recorded, so an ensemble's plain ``l0-blind``
    member and the refiners' prior are the same model and run once
    (:mod:`models.shared_results`); "linear" adds ``light=linear``, which
    the prior must accept.
    """
    from models.catalog import REGISTRY, in_light

    spec = REGISTRY.parse(prior_text)
    if light != "encoded" and REGISTRY.get(spec.name).param("light") is None:
        raise WeightsError(f"the refiner's prior {spec.name!r} has no 'light' parameter; use light=encoded")
    return in_light(spec, light)


def _build(name: str, params: Mapping[str, object], device: torch.device) -> RestorationModel:
    from models.catalog import REGISTRY

    info = REGISTRY.get(name)
    explicit = str(params.get("weights") or "")
    light = str(params.get("light") or "encoded")
    linear = LINEAR_LIGHT_WEIGHTS.get(name) if light == "linear" and not explicit else None
    if linear is not None:  # a refiner fine-tuned on blur made in linear light, with its prior there
        path, expected_sha = SHIPPED_DIR / linear.filename, linear.sha256
        if not path.is_file():
            raise WeightsError(f"model {name!r}: weights file {str(path)!r} for light=linear is missing; "
                               "reinstall the package")
    else:
        path = weights_path(info, explicit)
        expected_sha = None if explicit or info.weights is None else info.weights.sha256
    net, meta = load_network(path, SEED_MODELS[name].arch, expected_sha)
    multiple = int(getattr(net, "size_multiple", 1))
    if info.size_multiple % multiple:
        raise WeightsError(
            f"{str(path)!r} needs sides that are multiples of {multiple}, but {name!r} pads to {info.size_multiple}"
        )
    prior_text = meta.get("prior", "")
    wanted = SEED_MODELS[name].prior
    if wanted and not prior_text:
        raise WeightsError(
            f"{str(path)!r} is not a refiner (no 'prior' in its metadata), but {name!r} refines {wanted}; "
            f"train one with 'deblur train {name} -o RUN_DIR'"
        )
    if prior_text and wanted:  # (a file with a prior given to a plain architecture loads as a refiner of it)
        from models.catalog import REGISTRY

        recorded = REGISTRY.parse(prior_text).name
        if recorded != REGISTRY.parse(wanted).name:
            plain = next(n for n, m in SEED_MODELS.items() if m.arch == SEED_MODELS[name].arch and not m.prior)
            raise WeightsError(f"{str(path)!r} refines {recorded}, but {name!r} refines {wanted}: its network learned "
                               f"to correct another model's results; restore it as a refiner of {recorded} with "
                               f"'-m {plain}:weights={path}', or train one for {name!r} with 'deblur train {name} "
                               "-o RUN_DIR' (no --prior)")
    model: RestorationModel
    if prior_text:
        from models.loading import load_model

        prior = load_model(prior_spec(prior_text, light), device)
        model = RefinerModel(info, params, device, JointNetwork(info, params, device, net), prior)
    else:
        model = LearnedSeedModel(info, params, device, net)
    model.weights_sha256 = (expected_sha or sha256_of(path)).lower()  # an expected digest was checked on loading
    return model


def build_seed001(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Factory for ``seed001-gan`` (registry entry in :mod:`models.catalog`)."""
    return _build("seed001-gan", params, device)


def build_seed002(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Factory for ``seed002-unet``."""
    return _build("seed002-unet", params, device)


def build_seed001_refine(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Factory for ``seed001-refine`` (seed 001's generator refining l0-blind's result)."""
    return _build("seed001-refine", params, device)


def build_seed002_refine(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Factory for ``seed002-refine`` (seed 002's U-Net refining l0-blind's result)."""
    return _build("seed002-refine", params, device)


def build_seed003(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Factory for ``seed003-vit`` (needs ``weights=PATH``: no weights ship for it)."""
    return _build("seed003-vit", params, device)
