"""Non-blind classics: Wiener and Richardson-Lucy deconvolution with a given PSF.

Both work on any number of channels (each channel on its own), in float32 on
whatever device they are built for, on the stored values or, with
``light=linear``, in linear light (real camera shake; see ``l0-blind``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from jobs.errors import InvalidModelSpecError
from models.base import RestorationModel, Restored
from models.catalog import REGISTRY
from models.deconv import clipped_floor, richardson_lucy, unsaturated_mask, wiener
from models.psf import psf_kernel
from models.tone import linear_to_srgb, srgb_to_linear


class _PSFModel(RestorationModel):
    """A model that deconvolves by a kernel given in its ``psf`` parameter."""

    channels = None

    def __init__(self, name: str, params: Mapping[str, object], device: torch.device) -> None:
        info = REGISTRY.get(name)
        resolved = {p.name: p.default for p in info.params}
        resolved.update(params)
        super().__init__(info, resolved, device)
        try:
            self.kernel = psf_kernel(str(self.params["psf"]), device)
        except ValueError as exc:
            raise InvalidModelSpecError(f"model {name!r}: parameter 'psf': {exc}") from None
        self.saturation = float(self.params["saturation"])  # type: ignore[arg-type]
        self.light = str(self.params["light"])

    def restore_batch(self, x: torch.Tensor) -> Restored:
        """Deconvolve ``x`` in the stored values, or in linear light with ``light=linear`` (real camera shake)."""
        if self.light == "linear":
            restored = self.deconvolve(srgb_to_linear(x), float(srgb_to_linear(self.saturation)))
            return Restored(linear_to_srgb(restored.clamp(0.0, 1.0)))
        return Restored(self.deconvolve(x, self.saturation))

    def deconvolve(self, x: torch.Tensor, saturation: float) -> torch.Tensor:
        """The deconvolution of ``x``, whose values at ``saturation`` or above are clipped."""
        raise NotImplementedError

    @staticmethod
    def known(x: torch.Tensor, saturation: float) -> torch.Tensor | None:
        """Per-channel mask of the values of ``x`` that are data: all but clipped highlights (``None``: all)."""
        if saturation <= 0:
            return None
        mask = unsaturated_mask(x, saturation, per_channel=True)
        return None if bool(mask.min() > 0) else mask


class WienerModel(_PSFModel):
    """Wiener deconvolution (gradient-weighted noise-to-signal ratio ``nsr``)."""

    def __init__(self, params: Mapping[str, object], device: torch.device) -> None:
        super().__init__("wiener", params, device)
        self.nsr = float(self.params["nsr"])  # type: ignore[arg-type]

    def deconvolve(self, x: torch.Tensor, saturation: float) -> torch.Tensor:
        known = self.known(x, saturation)
        floor = None if known is None else clipped_floor(x, saturation)
        return wiener(x, self.kernel, self.nsr, known=known, floor=floor)


class RichardsonLucyModel(_PSFModel):
    """Richardson-Lucy deconvolution with a fixed number of ``iterations``."""

    def __init__(self, params: Mapping[str, object], device: torch.device) -> None:
        super().__init__("richardson-lucy", params, device)
        self.iterations = int(self.params["iterations"])  # type: ignore[call-overload]

    def deconvolve(self, x: torch.Tensor, saturation: float) -> torch.Tensor:
        return richardson_lucy(x, self.kernel, self.iterations, known=self.known(x, saturation))


def build_wiener(params: Mapping[str, object], device: torch.device) -> WienerModel:
    """Factory named in the catalog for ``wiener``."""
    return WienerModel(params, device)


def build_richardson_lucy(params: Mapping[str, object], device: torch.device) -> RichardsonLucyModel:
    """Factory named in the catalog for ``richardson-lucy``."""
    return RichardsonLucyModel(params, device)
