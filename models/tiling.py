"""Overlapping tiles with smooth blending, so any model restores any image size.

A 24-megapixel scan does not fit through a transformer on most GPUs (nor in a
CPU worker's memory budget). :class:`TiledModel` cuts the image into tiles of
a fixed side that overlap by ``overlap`` pixels, sends one tile (for the whole
batch) at a time through the wrapped model, and blends the results on the CPU
with raised-cosine ramps across each overlap, so there are no visible seams.
Only one tile is ever on the model's device; the full-size accumulators live
on the CPU.

:func:`apply_inference_options` turns the common model parameters
(:data:`models.registry.COMMON_PARAMS`: ``tile``, ``tile_overlap``,
``self_ensemble``) into the corresponding wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from jobs.errors import InvalidModelSpecError
from models.base import Restored, RestorationModel, keep_grey
from models.self_ensemble import SelfEnsembleModel

DEFAULT_OVERLAP = 32


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` pixels.

    Consecutive tiles overlap by at least ``overlap`` pixels; the last tile is
    aligned with the end, so every tile has the same side (``min(tile,
    length)``) and no tile needs padding beyond the model's own size rules.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(size: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blending weights of a tile: raised-cosine ramps on the overlapping sides.

    ``rise``/``fall`` say whether a neighbouring tile overlaps the start/end.
    Weights are strictly positive (the ramp is sampled at pixel centres), so
    dividing by their sum over all tiles is always defined; sides on the image
    border keep full weight.
    """
    weights = torch.ones(size, dtype=torch.float32)
    n = min(overlap, size)
    if n == 0:
        return weights
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ramp = (0.5 - 0.5 * torch.cos(math.pi * centres)).float()
    if rise:
        weights[:n] = torch.minimum(weights[:n], ramp)
    if fall:
        weights[size - n :] = torch.minimum(weights[size - n :], ramp.flip(0))
    return weights


class TiledModel(RestorationModel):
    """Wraps a model so that images larger than one tile are restored tile by tile.

    ``tile`` is rounded down to a multiple of the model's ``size_multiple`` (and
    up to its ``min_size``). An image that fits in one tile goes straight to the
    inner model. Estimated kernels are not returned for a tiled image (each
    tile has its own); per-image metrics are averaged over the tiles. The output
    is on the input's device.

    A grey RGB input comes back grey (:func:`models.base.keep_grey`), decided
    on the whole image: the tiles are restored without that step, as a tile
    that looks grey may belong to a colour image, whose neutral parts keep the
    colour the model gives them, tiled or not.
    """

    channels = None

    def __init__(self, inner: RestorationModel, tile: int, overlap: int = DEFAULT_OVERLAP) -> None:
        name = inner.info.name
        if tile <= 0:
            raise InvalidModelSpecError(f"model {name!r}: tile must be > 0 pixels, got {tile}")
        if overlap < 0 or 2 * overlap >= tile:
            raise InvalidModelSpecError(
                f"model {name!r}: tile_overlap={overlap} must be >= 0 and less than half of "
                f"tile={tile}; lower tile_overlap or raise tile"
            )
        multiple = max(1, inner.info.size_multiple)
        side = max(multiple, tile // multiple * multiple, inner.info.min_size)
        super().__init__(
            inner.info, {**inner.params, "tile": side, "tile_overlap": overlap}, inner.device
        )
        self.inner = inner
        self.weights_sha256 = inner.weights_sha256
        self.tile = side
        self.overlap = min(overlap, (side - 1) // 2)

    def autocast_dtype(self) -> torch.dtype | None:
        # The inner model picks its own precision for each tile.
        return None

    def __call__(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[-2] <= self.tile and x.shape[-1] <= self.tile:
            return self.inner(x, keep_grey_inputs=keep_grey_inputs)
        out = self.restore_batch(x)
        if keep_grey_inputs and x.shape[1] == 3 and out.image.shape[1] == 3:
            out.image = keep_grey(x.to(out.image.device, torch.float32), out.image)
        return out

    def restore_batch(self, x: torch.Tensor) -> Restored:
        """The blended tiles, each restored by the inner model without its grey step (see the class)."""
        n, _, h, w = x.shape
        tile_h, tile_w = min(self.tile, h), min(self.tile, w)
        cpu = torch.device("cpu")
        out: torch.Tensor | None = None  # shaped by the first tile's output (a refiner returns fewer channels)
        weight = torch.zeros((h, w), dtype=torch.float32, device=cpu)
        metric_sums: dict[str, torch.Tensor] = {}
        tiles = 0
        for y0 in tile_starts(h, tile_h, self.overlap):
            wy = blend_ramp(tile_h, self.overlap, rise=y0 > 0, fall=y0 + tile_h < h)
            for x0 in tile_starts(w, tile_w, self.overlap):
                wx = blend_ramp(tile_w, self.overlap, rise=x0 > 0, fall=x0 + tile_w < w)
                mask = wy[:, None] * wx[None, :]
                result = self.inner(x[..., y0 : y0 + tile_h, x0 : x0 + tile_w], keep_grey_inputs=False)
                if out is None:
                    out = torch.zeros((n, result.image.shape[1], h, w), dtype=torch.float32, device=cpu)
                out[..., y0 : y0 + tile_h, x0 : x0 + tile_w].addcmul_(
                    result.image.to(cpu, torch.float32), mask
                )
                weight[y0 : y0 + tile_h, x0 : x0 + tile_w].add_(mask)
                for name, value in result.metrics.items():
                    value = value.to(cpu, torch.float32)
                    metric_sums[name] = value if name not in metric_sums else metric_sums[name] + value
                tiles += 1
        assert out is not None  # at least one tile
        out.div_(weight).clamp_(0.0, 1.0)
        return Restored(
            image=out.to(x.device),
            kernels=None,
            metrics={name: (value / tiles).to(x.device) for name, value in metric_sums.items()},
        )


def apply_inference_options(model: RestorationModel, options: Mapping[str, object]) -> RestorationModel:
    """Wrap ``model`` according to the common parameters in ``options``.

    ``self_ensemble`` (bool) averages over the 8 flips/rotations; ``tile`` > 0
    tiles with that side, 0 uses the model's default ``tile_size`` (none: no
    tiling), -1 never tiles; ``tile_overlap`` is the blending overlap. The
    ensemble is applied inside the tiling, so memory stays bounded by one tile.
    """
    tile = int(options.get("tile", 0))  # type: ignore[call-overload]
    overlap = int(options.get("tile_overlap", DEFAULT_OVERLAP))  # type: ignore[call-overload]
    if bool(options.get("self_ensemble", False)):
        model = SelfEnsembleModel(model)
    side = model.info.tile_size if tile == 0 else (None if tile < 0 else tile)
    if side:
        overlap = min(overlap, (side - 1) // 2) if tile == 0 else overlap
        model = TiledModel(model, side, overlap)
    return model
