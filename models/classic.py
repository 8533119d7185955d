"""Non-blind classics: Wiener and Richardson-Lucy deconvolution with a given PSF.

Both work on any number of channels (each channel on its own), in float32 on
whatever device they are built for.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from jobs.errors import InvalidModelSpecError
from models.base import RestorationModel, Restored
from models.catalog import REGISTRY
from models.deconv import clipped_floor, richardson_lucy, unsaturated_mask, wiener
from models.psf import psf_kernel


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

    def known(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-channel mask of the values of ``x`` that are data: all but clipped highlights (``None``: all)."""
        if self.saturation <= 0:
            return None
        mask = unsaturated_mask(x, self.saturation, per_channel=True)
        return None if bool(mask.min() > 0) else mask


class WienerModel(_PSFModel):
    """Wiener deconvolution (gradient-weighted noise-to-signal ratio ``nsr``)."""

    def __init__(self, params: Mapping[str, object], device: torch.device) -> None:
        super().__init__("wiener", params, device)
        self.nsr = float(self.params["nsr"])  # type: ignore[arg-type]

    def restore_batch(self, x: torch.Tensor) -> Restored:
        known = self.known(x)
        floor = None if known is None else clipped_floor(x, self.saturation)
        return Restored(wiener(x, self.kernel, self.nsr, known=known, floor=floor))


class RichardsonLucyModel(_PSFModel):
    """Richardson-Lucy deconvolution with a fixed number of ``iterations``."""

    def __init__(self, params: Mapping[str, object], device: torch.device) -> None:
        super().__init__("richardson-lucy", params, device)
        self.iterations = int(self.params["iterations"])  # type: ignore[call-overload]

    def restore_batch(self, x: torch.Tensor) -> Restored:
        return Restored(richardson_lucy(x, self.kernel, self.iterations, known=self.known(x)))


def build_wiener(params: Mapping[str, object], device: torch.device) -> WienerModel:
    """Factory named in the catalog for ``wiener``."""
    return WienerModel(params, device)


def build_richardson_lucy(params: Mapping[str, object], device: torch.device) -> RichardsonLucyModel:
    """Factory named in the catalog for ``richardson-lucy``."""
    return RichardsonLucyModel(params, device)
