"""The sRGB tone curve (models.tone) and blur synthesised in linear light."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.synthetic_blur import blur_image, linear_motion_kernel
from models.tone import linear_to_srgb, srgb_to_linear


def test_known_values_of_the_srgb_curve() -> None:
    # IEC 61966-2-1: mid-grey stored as 0.5 is 21.4 % of full light; the ends stay put
    assert srgb_to_linear(0.5) == pytest.approx(0.21404, abs=1e-5)
    assert linear_to_srgb(0.21404114) == pytest.approx(0.5, abs=1e-6)
    assert srgb_to_linear(0.0) == 0.0 and srgb_to_linear(1.0) == pytest.approx(1.0)
    # the linear segment near black
    assert srgb_to_linear(0.02) == pytest.approx(0.02 / 12.92)


def test_numpy_and_torch_agree_and_invert() -> None:
    values = np.linspace(0.0, 1.0, 1001)
    linear = srgb_to_linear(values)
    assert np.all(np.diff(linear) > 0)  # strictly increasing, no kink that reverses
    assert np.abs(linear_to_srgb(linear) - values).max() < 1e-12
    as_torch = srgb_to_linear(torch.from_numpy(values))
    assert isinstance(as_torch, torch.Tensor)
    assert np.abs(as_torch.numpy() - linear).max() < 1e-12
    assert float((linear_to_srgb(as_torch) - torch.from_numpy(values)).abs().max()) < 1e-12


def test_values_a_little_outside_the_range_stay_finite() -> None:
    # solvers overshoot slightly; the curve is continued rather than turned into NaN
    out = srgb_to_linear(torch.tensor([-0.05, 1.05]))
    back = linear_to_srgb(np.array([-0.01, 1.1]))
    assert torch.isfinite(out).all() and np.isfinite(back).all()
    assert float(out[0]) < 0 < 1 < float(out[1])


def test_blur_in_linear_light_is_brighter_at_a_dark_bright_edge() -> None:
    # a step from black to white: in linear light the white spreads further into the black
    edge = np.zeros((32, 32))
    edge[:, 16:] = 1.0
    kernel = linear_motion_kernel(9, 0.0)
    stored = blur_image(edge, kernel)
    linear = blur_image(edge, kernel, light="linear")
    assert linear.shape == stored.shape
    middle = slice(12, 20)
    assert (linear[:, middle] >= stored[:, middle] - 1e-12).all()
    assert float((linear[:, middle] - stored[:, middle]).max()) > 0.15
    # flat areas are unchanged by the choice
    assert np.allclose(linear[:, :8], stored[:, :8]) and np.allclose(linear[:, -8:], stored[:, -8:])
    with pytest.raises(ValueError, match="light"):
        blur_image(edge, kernel, light="gamma")
