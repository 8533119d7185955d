"""Self-ensemble: run a model on flipped and rotated copies of the input and average.

Each copy is transformed back before averaging, so the result is the mean of
the model's answers over the dihedral group of the square (8 transforms: 4
rotations by 90 degrees, each with and without a horizontal flip) or over the
4 flips only. A network that is not exactly equivariant makes slightly
different errors on each copy, and averaging them typically gains a few
tenths of a dB (the "x8" trick of the EDSR/NAFNet papers) at 8x (or 4x) the
cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jobs.errors import InvalidModelSpecError
from models.base import Restored, RestorationModel

# (quarter turns counter-clockwise, then a horizontal flip?)
Transform = tuple[int, bool]

TRANSFORMS_8: tuple[Transform, ...] = tuple((k, flip) for flip in (False, True) for k in range(4))
# identity, left-right flip, up-down flip (= half turn + left-right flip), both flips (= half turn)
TRANSFORMS_4: tuple[Transform, ...] = ((0, False), (0, True), (2, True), (2, False))


def forward_transform(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """Apply ``t`` to the last two (spatial) dimensions of ``x``."""
    quarter_turns, flip = t
    y = torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns % 4 else x
    return y.flip(-1) if flip else y


def inverse_transform(y: torch.Tensor, t: Transform) -> torch.Tensor:
    """Undo :func:`forward_transform` on the last two dimensions of ``y``."""
    quarter_turns, flip = t
    if flip:
        y = y.flip(-1)
    return torch.rot90(y, -quarter_turns, dims=(-2, -1)) if quarter_turns % 4 else y


class SelfEnsembleModel(RestorationModel):
    """Wraps a model so that each call averages it over flips and rotations.

    The wrapper keeps the inner model's ``info`` (its size rules still describe
    what the network needs: the inner model pads each transformed copy
    itself). The output is on the input's device. Estimated kernels are
    transformed back and averaged when every copy produced one of the same
    shape; per-image metrics are averaged over the copies.
    """

    channels = None

    def __init__(self, inner: RestorationModel, transforms: int = 8) -> None:
        if transforms not in (4, 8):
            raise InvalidModelSpecError(
                f"model {inner.info.name!r}: self-ensemble takes 4 (flips) or 8 (flips and "
                f"rotations) transforms, got {transforms}"
            )
        super().__init__(inner.info, {**inner.params, "self_ensemble": transforms}, inner.device)
        self.inner = inner
        self.weights_sha256 = inner.weights_sha256
        self.transforms = TRANSFORMS_8 if transforms == 8 else TRANSFORMS_4

    def autocast_dtype(self) -> torch.dtype | None:
        # The inner model picks its own precision for each call.
        return None

    def __call__(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        return self.restore_batch(x, keep_grey_inputs=keep_grey_inputs)

    def restore_batch(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
        """The average over the transforms; ``keep_grey_inputs`` is passed to the inner model's call (a flip or
        rotation keeps a grey image grey, so each copy's grey step is the whole image's)."""
        total: torch.Tensor | None = None  # shaped by the first output (a refiner returns fewer channels)
        kernels: list[torch.Tensor] = []
        metric_sums: dict[str, torch.Tensor] = {}
        combined: dict[str, torch.Tensor] = {}  # metrics that name a choice or a flag: not averaged
        for t in self.transforms:
            out = self.inner(forward_transform(x, t), keep_grey_inputs=keep_grey_inputs)
            image = inverse_transform(out.image, t).to(x.device, torch.float32)
            total = image.clone() if total is None else total.add_(image)
            if out.kernels is not None:
                kernels.append(inverse_transform(out.kernels, t).to(x.device, torch.float32))
            for name, value in out.metrics.items():
                value = value.to(x.device, torch.float32)
                if name in _COMBINED:
                    combined[name] = value if name not in combined else _COMBINED[name](combined[name], value)
                    continue
                metric_sums[name] = value if name not in metric_sums else metric_sums[name] + value
        count = len(self.transforms)
        kernel: torch.Tensor | None = None
        if len(kernels) == count and len({k.shape for k in kernels}) == 1:
            kernel = torch.stack(kernels).mean(dim=0)
        elif kernels:
            kernel = kernels[0]  # identity transform: shapes differ, so no average is defined
        return Restored(
            image=total.div_(count).clamp_(0.0, 1.0),  # type: ignore[union-attr]
            kernels=kernel,
            metrics={**{name: value / count for name, value in metric_sums.items()}, **combined},
        )


_COMBINED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # the average is the input only if every copy fell back, and blur was found if any copy found it (so
    # jobs.review flags an image exactly when the averaged result is the input as it came)
    "kernel_fallback": torch.minimum,
    "blur_detected": torch.maximum,
    # which candidate won, whether the kernel was refitted: the identity transform's (the first), as a number that
    # names one (an average of 1 and 2 names none)
    "kernel_candidate": lambda first, _later: first,
    "kernel_refit": lambda first, _later: first,
}
"""How the transforms' values of the metrics that are choices or flags are combined (the others are averaged)."""
