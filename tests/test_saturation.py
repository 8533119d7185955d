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
from models.deconv import PartiallyKnown, clipped_floor, sparse_deconv, unsaturated_mask
from models.l0_blind import RGB_TO_YCC, L0Settings, final_deconvolution
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_per_channel_mask_keeps_the_channels_that_did_not_clip() -> None:
    x = torch.full((1, 3, 9, 9), 0.5)
    x[0, 0, 4, 4] = 1.0  # red clipped
    mask = unsaturated_mask(x, per_channel=True)
    assert mask.shape == (1, 3, 9, 9)
    assert float(mask[0, 0, 3:6, 3:6].sum()) == 0.0 and float(mask[0, 0].sum()) == 81 - 9
    assert bool((mask[0, 1:] == 1).all()), "green and blue are still data"


def test_floor_bounds_only_the_inside_of_wide_clipped_areas() -> None:
    x = torch.full((1, 1, 40, 40), 0.3)
    x[..., 2:5, 2:5] = 1.0  # a 3-px light: its truth may be a spike, no bound
    x[..., 15:35, 15:35] = 1.0  # a 20-px overexposed patch
    floor = clipped_floor(x, 0.985, depth=4)
    bounded = torch.isfinite(floor)[0, 0]
    assert not bool(bounded[:10, :10].any())
    assert bool(bounded[19:31, 19:31].all()) and int(bounded.sum()) == 12 * 12
    assert float(floor[0, 0, 25, 25]) == pytest.approx(0.985)
    assert bool(torch.isfinite(clipped_floor(x, 0.985, depth=0)).sum() == 9 + 400)


def test_partially_known_pixel_step_is_the_minimiser() -> None:
    """A pixel with a clipped red channel: the data step solves its small least-squares problem."""
    to_ycc = torch.tensor(RGB_TO_YCC, dtype=torch.float64)
    to_rgb = torch.linalg.inv(to_ycc)
    gen = torch.Generator().manual_seed(0)
    padded = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones_like(padded)
    mask[0, 0, 1, 2] = 0.0  # red unknown at one pixel
    rho = torch.tensor([0.5, 2.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    step = PartiallyKnown.build(padded, mask, to_rgb, rho)
    assert step.batch.numel() == 1
    target = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    v = step.data_step(padded.clone(), target)[0, :, 1, 2]
    # minimise 1/2 |T M (D v - x)|^2 + 1/2 sum rho_i (v_i - t_i)^2 as one stacked least-squares problem
    m = torch.diag(mask[0, :, 1, 2])
    recorded = to_rgb @ padded[0, :, 1, 2]
    weights = rho.view(3).sqrt()
    a = torch.cat([to_ycc @ m @ to_rgb, torch.diag(weights)])
    b = torch.cat([to_ycc @ m @ recorded, weights * target[0, :, 1, 2]])
    expected = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(v, expected, atol=1e-9)
    # with every channel known the step is the plain per-channel one
    full = PartiallyKnown.build(padded, torch.ones_like(padded), to_rgb, rho)
    assert full.batch.numel() == 0


def test_overexposed_photograph_keeps_its_unclipped_channels_and_stays_bright() -> None:
    """Blur over a scene 1.6x brighter than the sensor's white: large clipped areas, mostly one channel."""
    scene = sample_photographs()["coffee"][80:312, 180:412] / 255.0 * 1.6
    kernel = random_motion_kernel(17, np.random.default_rng(5))
    blurred = blur_image(scene, kernel, noise_sigma=0.01, rng=np.random.default_rng(2))
    sharp = np.clip(scene, 0.0, 1.0)
    x, k = to_tensor(blurred), torch.from_numpy(kernel).float()
    assert 0.1 < float((x >= 0.985).any(dim=1).float().mean()) < 0.6
    gains = {}
    with torch.inference_mode():
        for label, known in [("channel", unsaturated_mask(x, per_channel=True)), ("pixel", unsaturated_mask(x)),
                             ("none", None)]:
            out = final_deconvolution(x, k, L0Settings(), known).clamp(0, 1)
            gains[label] = psnr(to_numpy(out), sharp) - psnr(blurred, sharp)
    assert gains["channel"] > gains["pixel"] + 1.0, gains
    assert gains["channel"] > gains["none"] + 1.0, gains


def test_colour_deconvolution_with_all_channels_known_is_unchanged() -> None:
    """The per-channel path reduces to the plain YCbCr solve when nothing is clipped."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 24, 24, generator=gen) * 0.8
    kernel = torch.from_numpy(random_motion_kernel(7, np.random.default_rng(0))).float()
    to_ycc = torch.tensor(RGB_TO_YCC)
    ycc = torch.einsum("ij,njhw->nihw", to_ycc, x)
    lam = torch.tensor([2e-3, 5e-3, 5e-3]).view(1, 3, 1, 1)
    plain = sparse_deconv(ycc, kernel, lam)
    masked = sparse_deconv(ycc, kernel, lam, known=torch.ones_like(x), floor=torch.full_like(x, -torch.inf),
                           data_space=torch.linalg.inv(to_ycc))
    assert torch.allclose(plain, masked, atol=1e-5)


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
