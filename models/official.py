"""Official pretrained networks (NAFNet, Restormer, MPRNet, FFTformer, Uformer) via spandrel.

The checkpoint is read by :mod:`models.checkpoints` (safetensors or
``torch.load(weights_only=True)``, never spandrel's own file loader), its
official layout is normalised, and the resulting state dict is handed to
spandrel, which detects the architecture from the tensor names and shapes
and builds the exact published network. The network is then wrapped in an
:class:`OfficialModel`, the typed descriptor workers see.

The architectures of ``spandrel_extra_arches`` (MPRNet, Restormer and others)
come with restrictive, mostly non-commercial licences: the named entries say
so in the registry (``noncommercial=True``), and the generic ``spandrel``
entry refuses any checkpoint detected as one of them unless
``DEBLUR_ALLOW_NONCOMMERCIAL=1``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from spandrel import ArchRegistry, ImageModelDescriptor, ModelLoader, UnsupportedModelError
from spandrel import MAIN_REGISTRY as SPANDREL_REGISTRY

from jobs.errors import InvalidModelSpecError, LicenseError, WeightsError
from models.base import Restored, RestorationModel
from models.catalog import REGISTRY
from models.checkpoints import StateDict, load_state_dict
from models.registry import ModelInfo, find_weights, noncommercial_allowed, weights_dir
from models.weights_store import normalise_sha256, sha256_of

with warnings.catch_warnings():
    # one of its architectures (CodeFormer) applies torch.jit.script as it is imported, which newer torch
    # deprecates with a FutureWarning every user saw on 'deblur restore --model spandrel:...'; nothing of
    # ours or theirs calls it afterwards
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from spandrel_extra_arches import EXTRA_REGISTRY


class OfficialModel(RestorationModel):
    """A spandrel ``ImageModelDescriptor`` behind the project's model interface.

    ``info.size_multiple`` and ``min_size`` are raised to what the loaded
    network requires (spandrel's ``size_requirements``), so the base class
    reflect-pads exactly as far as needed; spandrel's own call then only adds
    the padding to a square for the architectures that need one (Uformer).
    """

    def __init__(
        self,
        info: ModelInfo,
        params: Mapping[str, object],
        device: torch.device,
        descriptor: ImageModelDescriptor,
    ) -> None:
        required = descriptor.size_requirements
        multiple = math.lcm(max(1, info.size_multiple), max(1, required.multiple_of))
        info = replace(
            info,
            size_multiple=multiple,
            min_size=max(info.min_size, required.minimum),
            dtypes=_dtypes(descriptor),
        )
        super().__init__(info, params, device)
        self.descriptor = descriptor.to(device).eval()
        self.channels = descriptor.input_channels
        self.architecture: str = str(descriptor.architecture.id)

    def restore_batch(self, x: torch.Tensor) -> Restored:
        return Restored(image=self.descriptor(x))


def build_nafnet(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """NAFNet (Chen et al., ECCV 2022), GoPro width-64 checkpoint."""
    return build_named("nafnet-gopro", "NAFNet", params, device)


def build_restormer(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Restormer (Zamir et al., CVPR 2022), motion-deblurring checkpoint."""
    return build_named("restormer-gopro", "Restormer", params, device)


def build_mprnet(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """MPRNet (Zamir et al., CVPR 2021), deblurring checkpoint."""
    return build_named("mprnet-gopro", "MPRNet", params, device)


def build_fftformer(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """FFTformer (Kong et al., CVPR 2023), GoPro checkpoint."""
    return build_named("fftformer-gopro", "FFTformer", params, device)


def build_uformer(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Uformer-B (Wang et al., CVPR 2022), GoPro checkpoint."""
    return build_named("uformer-gopro", "Uformer", params, device)


def build_any(params: Mapping[str, object], device: torch.device) -> RestorationModel:
    """Whatever same-size restoration network spandrel detects in ``path=``."""
    info = REGISTRY.get("spandrel")
    text = str(params.get("path") or "").strip()
    if not text:
        raise InvalidModelSpecError(
            "model 'spandrel' needs the checkpoint to load: spandrel:path=/path/to/model.pth"
        )
    path = Path(text).expanduser()
    descriptor = describe_checkpoint(load_state_dict(path), path)
    if is_noncommercial_architecture(str(descriptor.architecture.id)) and not noncommercial_allowed():
        raise LicenseError(
            f"{path} is a {descriptor.architecture.id} checkpoint; that architecture's licence "
            "forbids commercial use. Set DEBLUR_ALLOW_NONCOMMERCIAL=1 to confirm your use is "
            "non-commercial"
        )
    model = OfficialModel(info, params, device, descriptor)
    model.weights_sha256 = sha256_of(path)
    return model


def build_named(
    name: str, architecture: str, params: Mapping[str, object], device: torch.device
) -> RestorationModel:
    """Load the checkpoint of registry entry ``name`` and check it is ``architecture``."""
    info = REGISTRY.get(name)
    path, digest = resolve_weights(info, str(params.get("path") or ""))
    descriptor = describe_checkpoint(load_state_dict(path), path)
    found = str(descriptor.architecture.id)
    if found != architecture:
        raise WeightsError(
            f"model {name!r} expects a {architecture} checkpoint, but {path} holds a {found} "
            f"network; use spandrel:path={path} to run it as it is"
        )
    model = OfficialModel(info, params, device, descriptor)
    model.weights_sha256 = digest or sha256_of(path)  # an explicit file: hashed once it loaded
    return model


def resolve_weights(info: ModelInfo, explicit: str) -> tuple[Path, str | None]:
    """The checkpoint file to load, ``explicit`` if given, else the registered file, and the registered file's
    SHA-256 (None for an explicit file).

    The registered file is looked up in ``DEBLUR_WEIGHTS_DIR`` (then the shipped
    weights) and checked against the registry's sha256 when one is recorded; the
    file is read once for both.
    """
    if explicit.strip():
        return Path(explicit.strip()).expanduser(), None
    if info.weights is None:
        raise InvalidModelSpecError(f"model {info.name!r} needs path=FILE (no registered weights)")
    found = find_weights(info)
    if found is None:
        raise WeightsError(
            f"model {info.name!r}: weights file {info.weights.filename!r} not found in "
            f"{weights_dir()} (DEBLUR_WEIGHTS_DIR); run 'deblur models pull {info.name}' or "
            f"pass {info.name}:path=/path/to/checkpoint"
        )
    expected = normalise_sha256(info.weights.sha256)
    actual = sha256_of(found)
    if expected is not None and actual != expected:
        raise WeightsError(
            f"{found} has sha256 {actual}, but model {info.name!r} expects {expected}; "
            f"run 'deblur models pull {info.name} --force' to replace it"
        )
    return found, actual


def describe_checkpoint(state_dict: StateDict, source: Path | str) -> ImageModelDescriptor:
    """Let spandrel detect the architecture of ``state_dict`` and build the network.

    Only same-size, image-to-image restoration networks are accepted; the
    result is a spandrel ``ImageModelDescriptor`` in eval mode on the CPU.
    """
    try:
        descriptor = ModelLoader(registry=_registry()).load_from_state_dict(state_dict)
    except UnsupportedModelError:
        raise WeightsError(
            f"{source}: spandrel does not recognise this network (none of its "
            f"{len(_registry())} architectures matches the tensor names)"
        ) from None
    except (KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{source}: spandrel could not build the network: {exc}") from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise WeightsError(
            f"{source} holds a {descriptor.architecture.id} {descriptor.purpose} model, which "
            "needs more than an image as input; deblur only runs image-to-image networks"
        )
    if descriptor.scale != 1 or descriptor.input_channels != descriptor.output_channels:
        raise WeightsError(
            f"{source} holds a {descriptor.architecture.id} network with scale "
            f"{descriptor.scale} and {descriptor.input_channels}->{descriptor.output_channels} "
            "channels; deblur needs outputs the same size and channel count as the input"
        )
    return descriptor.eval()


def is_noncommercial_architecture(architecture_id: str) -> bool:
    """Whether spandrel ships ``architecture_id`` in ``spandrel_extra_arches``.

    That package holds the architectures with restrictive licences (MPRNet,
    Restormer, CodeFormer, ...), mostly academic/non-commercial.
    """
    return architecture_id in EXTRA_REGISTRY


@lru_cache(maxsize=1)
def _registry() -> ArchRegistry:
    """spandrel's architectures plus the extra ones, without touching spandrel's global registry."""
    registry = ArchRegistry()
    registry.add(*SPANDREL_REGISTRY, *EXTRA_REGISTRY, ignore_duplicates=True)
    return registry


def _dtypes(descriptor: ImageModelDescriptor) -> tuple[str, ...]:
    dtypes = ["float32"]
    if descriptor.supports_bfloat16:
        dtypes.append("bfloat16")
    if descriptor.supports_half:
        dtypes.append("float16")
    return tuple(dtypes)
