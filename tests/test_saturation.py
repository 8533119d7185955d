"""Clipped highlights: the data mask and every deconvolution that honours it.

A shaken night shot smears each light into a streak that the sensor clips;
those pixels recorded less light than fell on them, so no kernel explains
them. Treated as unknown data they stop the deconvolution from ringing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.catalog import REGISTRY
from models.deconv import unsaturated_mask
from models.l0_blind import L0Settings, final_deconvolution
from models.loading import load_model
from models.psf import psf_array
from models.synthetic_blur import (
    add_light_sources,
    blur_image,
    random_motion_kernel,
    sample_photographs,
)
from tests.image_helpers import psnr, to_numpy, to_tensor

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lit_coffee() -> np.ndarray:
    """A 192x192 colour crop of skimage's coffee with six over-bright lights (not clipped yet)."""
    base = sample_photographs()["coffee"][100:292, 200:392] / 255.0
    return add_light_sources(base, 6, np.random.default_rng(7))


@pytest.fixture(scope="module")
def shake() -> np.ndarray:
    return random_motion_kernel(15, np.random.default_rng(3))


@pytest.fixture(scope="module")
def night_shot(lit_coffee: np.ndarray, shake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sharp, blurred): the lit scene clipped to [0, 1], and shaken, noisy and clipped."""
    blurred = blur_image(lit_coffee, shake, noise_sigma=0.005, rng=np.random.default_rng(1))
    return np.clip(lit_coffee, 0.0, 1.0), blurred


def test_mask_drops_pixels_clipped_in_any_channel_and_their_neighbours() -> None:
    x = torch.full((2, 3, 9, 9), 0.5)
    x[0, 1, 4, 4] = 1.0  # green clipped in the middle of the first image
    x[1, :, 0, 8] = 0.99  # the second image's corner at 99 % in all channels
    mask = unsaturated_mask(x)
    assert mask.shape == (2, 1, 9, 9)
    assert float(mask[0, 0, 3:6, 3:6].sum()) == 0.0 and float(mask[0].sum()) == 81 - 9
    assert float(mask[1, 0, :2, 7:].sum()) == 0.0 and float(mask[1].sum()) == 81 - 4
    assert bool((unsaturated_mask(x, level=0.995)[1] == 1).all()), "0.99 is below a 0.995 level"
    assert bool((unsaturated_mask(torch.rand(1, 1, 8, 8) * 0.9) == 1).all())


def test_true_kernel_deconvolution_of_a_night_shot_needs_the_mask(
    night_shot: tuple[np.ndarray, np.ndarray], shake: np.ndarray
) -> None:
    sharp, blurred = night_shot
    x, kernel = to_tensor(blurred), torch.from_numpy(shake).float()
    known = unsaturated_mask(x)
    assert 0.005 < 1.0 - float(known.mean()) < 0.05, "the lights should clip a few per cent of the pixels"
    with torch.inference_mode():
        masked = final_deconvolution(x, kernel, L0Settings(), known).clamp(0, 1)
        plain = final_deconvolution(x, kernel, L0Settings()).clamp(0, 1)
    base = psnr(blurred, sharp)
    gain_masked, gain_plain = psnr(to_numpy(masked), sharp) - base, psnr(to_numpy(plain), sharp) - base
    assert gain_masked > 5.0, f"masked {gain_masked:+.2f} dB"
    assert gain_masked > gain_plain + 4.0, f"masked {gain_masked:+.2f} vs plain {gain_plain:+.2f} dB"


@pytest.mark.parametrize("name", ["wiener", "richardson-lucy"])
def test_non_blind_classics_leave_clipped_pixels_out(lit_coffee: np.ndarray, name: str) -> None:
    psf = "motion:length=13,angle=30"
    blurred = blur_image(lit_coffee, psf_array(psf), noise_sigma=0.005, rng=np.random.default_rng(9))
    sharp = np.clip(lit_coffee, 0.0, 1.0)
    gains = {}
    for extra in ("", ",saturation=0"):
        out = load_model(REGISTRY.parse(f"{name}:psf={psf}{extra}"), CPU)(to_tensor(blurred)).image
        gains[extra] = psnr(to_numpy(out), sharp) - psnr(blurred, sharp)
    assert gains[""] > gains[",saturation=0"] + 1.0, gains


@pytest.mark.slow
def test_blind_deblurring_of_a_night_shot(night_shot: tuple[np.ndarray, np.ndarray]) -> None:
    """l0-blind restores light streaks it used to give up on (or ring around)."""
    sharp, blurred = night_shot
    gains, outputs = {}, {}
    for spec in ("l0-blind", "l0-blind:saturation=0"):
        out = load_model(REGISTRY.parse(spec), CPU)(to_tensor(blurred))
        outputs[spec] = out
        gains[spec] = psnr(to_numpy(out.image), sharp) - psnr(blurred, sharp)
    assert gains["l0-blind"] > 1.0, gains
    assert gains["l0-blind"] > gains["l0-blind:saturation=0"] + 1.0, gains
    share = float(outputs["l0-blind"].metrics["saturated_share"][0])
    assert 0.005 < share < 0.05
    assert float(outputs["l0-blind:saturation=0"].metrics["saturated_share"][0]) == 0.0
