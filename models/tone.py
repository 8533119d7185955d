"""The sRGB tone curve, both ways, for NumPy arrays and torch tensors alike.

A camera's sensor integrates light while it shakes, so camera shake blurs
*linear* light; the photograph then stores the values through a tone curve
(sRGB's, about a 1/2.2 power). Blur in the stored values is what most
synthetic benchmarks make, and a deblurring model must undo the blur in the
domain where it happened: on real camera shake the stored values are not a
convolution of the scene, and restoring them as one costs several dB
(bench/RESULTS.md). These functions take values in [0, 1] (a little outside
is tolerated: the curve is continued, never NaN) and need no torch.
It also holds Rec. 601's luminance weights, which every part of the project
that reduces a colour photograph to its brightness uses.
"""

from __future__ import annotations

from typing import TypeVar

Values = TypeVar("Values")  # a NumPy array, a torch tensor or a float

# Rec. 601 luminance of RGB: the weights of R, G and B (they sum to 1)
REC601_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

# Where a model undoes the blur ("light"): the choices every model, command and benchmark accepts.
LIGHT_CHOICES: tuple[str, ...] = ("encoded", "linear")
# the command-line help of --light, for every command that takes it
LIGHT_HELP = (
    "Where the models that deconvolve by a kernel (l0-blind, the refiners' l0-blind, wiener, richardson-lucy) "
    "undo the blur: 'linear' for photographs of real camera shake (a camera blurs light before its tone curve "
    "is applied; 1.7-2.7 dB better there on the benchmarks), 'encoded' (default) for blur made in the stored "
    "values, as synthetic benchmarks make it. Learned networks on their own are unaffected."
)

# IEC 61966-2-1: the linear segment near black and the power law above it
_ENCODED_KNEE = 0.04045
_LINEAR_KNEE = 0.0031308
_SLOPE = 12.92
_OFFSET = 0.055
_POWER = 2.4


def srgb_to_linear(encoded: Values) -> Values:
    """Linear light from sRGB-encoded values (0.5 stored is 0.214 of full light)."""
    power = ((abs(encoded) + _OFFSET) / (1.0 + _OFFSET)) ** _POWER  # type: ignore[operator]
    return (encoded <= _ENCODED_KNEE) * (encoded / _SLOPE) + (encoded > _ENCODED_KNEE) * power  # type: ignore[operator]


def linear_to_srgb(linear: Values) -> Values:
    """sRGB-encoded values from linear light; the inverse of :func:`srgb_to_linear`."""
    power = (1.0 + _OFFSET) * abs(linear) ** (1.0 / _POWER) - _OFFSET  # type: ignore[operator]
    return (linear <= _LINEAR_KNEE) * (linear * _SLOPE) + (linear > _LINEAR_KNEE) * power  # type: ignore[operator]
