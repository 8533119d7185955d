"""Ensemble maths: weighted averaging of member outputs, member disagreement,
the user's restoration strength, and fitting member weights from data.

All tensors are (N, C, H, W) float in [0, 1] (the :class:`models.base.Restored`
convention); weight fitting works on NumPy arrays so it can run on outputs read
back from storage by an evaluation job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import nnls

from jobs.errors import InputError


class EnsembleError(InputError, ValueError):
    """Bad ensemble input: weights, member outputs or strength. The message
    names the bad value."""


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Member weights scaled to sum to 1; ``None`` means equal weights.

    Weights must be finite and non-negative, one per member, not all zero.
    A zero weight keeps its member out of the average.
    """
    if count < 1:
        raise EnsembleError("an ensemble needs at least one member output")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise EnsembleError(f"got {len(values)} weights {values} for {count} member outputs; give one weight per member")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise EnsembleError(f"weight {w!r} of member {i} is invalid; weights must be finite and >= 0")
    total = math.fsum(values)
    if total <= 0:
        raise EnsembleError(f"all ensemble weights are zero ({values}); give at least one member a positive weight")
    return [w / total for w in values]


def _check_outputs(outputs: Sequence[torch.Tensor]) -> None:
    if len(outputs) == 0:
        raise EnsembleError("an ensemble needs at least one member output")
    shape = tuple(outputs[0].shape)
    if len(shape) != 4:
        raise EnsembleError(f"member outputs must be (N, C, H, W) batches, got shape {shape}")
    for i, out in enumerate(outputs[1:], start=1):
        if tuple(out.shape) != shape:
            raise EnsembleError(f"member {i} output has shape {tuple(out.shape)} but member 0 has {shape}")


def average(outputs: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of member outputs, each (N, C, H, W) float in [0, 1].

    ``weights`` are normalised to sum 1 (default: equal). Computed in float32
    on the first output's device; zero-weight members are not read at all.
    """
    _check_outputs(outputs)
    norm = normalise_weights(weights, len(outputs))
    device = outputs[0].device
    used = [(w, out.to(device=device, dtype=torch.float32)) for w, out in zip(norm, outputs, strict=True) if w > 0]
    # ref + sum w_i (x_i - ref) equals sum w_i x_i since the weights sum to 1,
    # and is exactly ref when all members agree (no 1/3 + 1/3 + 1/3 rounding).
    ref = used[0][1]
    total = ref.clone()
    for w, out in used[1:]:
        total.add_(out - ref, alpha=w)
    return total


def disagreement(outputs: Sequence[torch.Tensor], ensemble: torch.Tensor) -> torch.Tensor:
    """Per-image confidence metric: mean absolute deviation of the members from
    the ensemble, averaged over members, channels and pixels.

    ``outputs``: member outputs (N, C, H, W) in [0, 1]; ``ensemble``: their
    average, same shape. Returns shape (N,), in [0, 1]; 0 when all members agree.
    """
    _check_outputs(outputs)
    if tuple(ensemble.shape) != tuple(outputs[0].shape):
        raise EnsembleError(f"ensemble shape {tuple(ensemble.shape)} differs from member shape {tuple(outputs[0].shape)}")
    ens = ensemble.to(torch.float32)
    dev = torch.zeros(ens.shape[0], dtype=torch.float32, device=ens.device)
    for out in outputs:
        dev += (out.to(device=ens.device, dtype=torch.float32) - ens).abs().mean(dim=(1, 2, 3))
    return dev / len(outputs)


def check_strength(strength: float) -> float:
    """Validate a restoration strength: a number in [0, 1]."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise EnsembleError(f"strength {strength!r} is not a number; use a value between 0 and 1") from None
    if not (0.0 <= value <= 1.0):
        raise EnsembleError(f"strength {strength!r} is outside [0, 1]; 0 keeps the input, 1 the full restoration")
    return value


def apply_strength(restored: torch.Tensor, original: torch.Tensor, strength: float) -> torch.Tensor:
    """Blend the restoration with its input (seed 000's user-controlled
    restoration): ``original + strength * (restored - original)``.

    Both (N, C, H, W) float in [0, 1] of one shape. ``strength`` 1 returns the
    restoration exactly, 0 the input exactly.
    """
    value = check_strength(strength)
    if restored.shape != original.shape:
        raise EnsembleError(f"restored shape {tuple(restored.shape)} differs from input shape {tuple(original.shape)}")
    start = original.to(device=restored.device, dtype=torch.float32)
    return torch.lerp(start, restored.to(torch.float32), value)


@dataclass(frozen=True)
class FitReport:
    """What :func:`fit_weights` found, in figures a report can show.

    PSNRs are means over images (dB, data range 1, as the paper tables).
    """

    weights: list[float]
    psnr_fitted: float
    psnr_equal: float
    gain_db: float
    images: int
    samples: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _unit_float(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype.kind == "u":
        return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    raise EnsembleError(f"images of dtype {arr.dtype} are not supported; use unsigned integers or float in [0, 1]")


PSNR_CAP_DB = 100.0
"""A mix equal to its sharp image (a blank page, a saturated frame) counts as this, not as an infinite PSNR that
would make the mean, and the fitted gain, infinite (saved, printed as -inf dB and written as JSON Infinity)."""


def _mean_psnr(members: Sequence[np.ndarray], targets: Sequence[np.ndarray], weights: np.ndarray) -> float:
    """Mean over images of the PSNR (range 1, at most :data:`PSNR_CAP_DB`) of the weighted mix; images are
    converted one at a time so memory stays at one image's worth."""
    values = []
    for stack, target in zip(members, targets, strict=True):
        mix = np.tensordot(weights, _unit_float(stack), axes=1)
        mse = float(np.mean((mix - _unit_float(target)) ** 2))
        values.append(PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else -10.0 * math.log10(mse))
    return float(np.mean(values))


def fit_weights(
    member_outputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    max_samples: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, FitReport]:
    """Fit non-negative ensemble weights that minimise the squared error to the
    sharp images (and so maximise pooled PSNR), with the weights summing to 1.

    ``member_outputs[i]``: the M members' restorations of image ``i`` stacked
    as (M, *shape); ``targets[i]``: its sharp image, ``shape`` (HW or HWC).
    Unsigned-integer arrays are scaled by their range, floats taken as [0, 1].
    Pixels are pooled over all images and subsampled (at most ``max_samples``,
    spread over images in proportion to their size, reproducible by ``seed``)
    to bound memory; arrays are converted to float only where sampled, and
    one image at a time for the report. Solved by ``scipy.optimize.nnls``
    with one heavily weighted extra row enforcing ``sum(w) = 1``: the
    ensemble normalises its weights, so the fit respects that instead of
    renormalising an unconstrained fit (which is not the best normalised mix
    when members are biased in brightness).

    Returns the weights (M,) and a :class:`FitReport` comparing mean PSNR with
    fitted and equal weights on the full images.
    """
    if len(member_outputs) == 0:
        raise EnsembleError("no images to fit ensemble weights on")
    if len(member_outputs) != len(targets):
        raise EnsembleError(f"got member outputs for {len(member_outputs)} images but {len(targets)} targets")
    if max_samples < 1:
        raise EnsembleError(f"max_samples must be positive, got {max_samples}")
    count = np.shape(member_outputs[0])[0]
    for i, (stack, target) in enumerate(zip(member_outputs, targets, strict=True)):
        if np.shape(stack)[1:] != np.shape(target) or np.shape(stack)[0] != count:
            raise EnsembleError(
                f"image {i}: member outputs have shape {np.shape(stack)}, expected ({count}, *{np.shape(target)}) "
                "to match the target and the other images"
            )
    sizes = np.array([np.size(t) for t in targets], dtype=np.float64)
    quota = np.maximum(1, np.floor(max_samples * sizes / sizes.sum())).astype(int)
    rng = np.random.default_rng(seed)
    rows, values = [], []
    for stack, target, q in zip(member_outputs, targets, quota, strict=True):
        # Sample before converting: only the chosen pixels become float64.
        idx = rng.choice(np.size(target), size=min(q, np.size(target)), replace=False)
        rows.append(_unit_float(np.reshape(stack, (count, -1))[:, idx]).T)
        values.append(_unit_float(np.reshape(target, -1)[idx]))
    a = np.concatenate(rows)
    b = np.concatenate(values)
    penalty = 10.0 * math.sqrt(len(b))
    a = np.vstack([a, np.full((1, count), penalty)])
    b = np.append(b, penalty)
    raw, _ = nnls(a, b)
    weights = raw / raw.sum()  # the constraint row keeps the sum near 1, never 0
    fitted = _mean_psnr(member_outputs, targets, weights)
    equal = _mean_psnr(member_outputs, targets, np.full(count, 1.0 / count))
    report = FitReport(
        weights=[float(w) for w in weights],
        psnr_fitted=fitted,
        psnr_equal=equal,
        gain_db=fitted - equal,
        images=len(targets),
        samples=len(b) - 1,
    )
    return weights, report
