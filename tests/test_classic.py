"""Wiener and Richardson-Lucy on a real photograph blurred with a known PSF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.errors import InvalidModelSpecError
from models.catalog import REGISTRY
from models.deconv import centred_window, fft_size, grad, grad_adjoint, periodic_pad, psf2otf, wiener
from models.loading import load_model
from models.psf import psf_array, psf_kernel
from models.synthetic_blur import blur_image, sample_photographs
from tests.image_helpers import psnr, to_numpy, to_tensor

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 160x160 RGB crop of skimage's astronaut, float in [0, 1]."""
    return sample_photographs()["astronaut"][90:250, 150:310] / 255.0


def run(spec: str, img: np.ndarray) -> np.ndarray:
    model = load_model(REGISTRY.parse(spec), CPU)
    return to_numpy(model(to_tensor(img)).image)


@pytest.mark.parametrize(
    ("spec", "psf", "margin"),
    [
        ("wiener:psf=disk:radius=3,nsr=0.01", "disk:radius=3", 2.0),
        ("richardson-lucy:psf=disk:radius=3,iterations=30", "disk:radius=3", 1.5),
        ("wiener:psf=motion:length=13,angle=30,nsr=0.01", "motion:length=13,angle=30", 2.0),
    ],
)
def test_deconvolution_beats_blurred_input(photo: np.ndarray, spec: str, psf: str, margin: float) -> None:
    rng = np.random.default_rng(1)
    blurred = blur_image(photo, psf_array(psf), noise_sigma=0.005, rng=rng)
    restored = run(spec, blurred)
    assert restored.shape == photo.shape
    assert psnr(restored, photo) > psnr(blurred, photo) + margin


@pytest.mark.parametrize(
    ("spec", "psf"),
    [
        ("wiener:psf=motion:length=13,angle=30,nsr=0.01", "motion:length=13,angle=30"),
        ("richardson-lucy:psf=disk:radius=3,iterations=30", "disk:radius=3"),
    ],
)
def test_linear_light_matches_a_blur_of_light(photo: np.ndarray, spec: str, psf: str) -> None:
    """Blur made in linear light (real camera shake) is undone better with light=linear, and vice versa."""
    kernel = psf_array(psf)
    for made_in, better in (("linear", "linear"), ("encoded", "encoded")):
        blurred = blur_image(photo, kernel, noise_sigma=0.005, rng=np.random.default_rng(1), light=made_in)
        scores = {light: psnr(run(f"{spec},light={light}", blurred), photo) for light in ("encoded", "linear")}
        other = "encoded" if better == "linear" else "linear"
        assert scores[better] > scores[other] + 0.5, (made_in, scores)


@pytest.mark.parametrize("name", ["wiener", "richardson-lucy"])
def test_grey_and_rgb_shapes_are_kept(photo: np.ndarray, name: str) -> None:
    grey = photo.mean(axis=2)[:97, :131]
    assert run(f"{name}:psf=gaussian:sigma=1.5", grey).shape == grey.shape
    batch = torch.rand(2, 3, 45, 61)
    out = load_model(REGISTRY.parse(name), CPU)(batch).image
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize("name", ["wiener", "richardson-lucy"])
def test_sharp_input_with_tiny_psf_is_nearly_unchanged(photo: np.ndarray, name: str) -> None:
    restored = run(f"{name}:psf=gaussian:sigma=0.1", photo)
    assert psnr(restored, photo) > 40.0


def test_no_ringing_at_the_borders(photo: np.ndarray) -> None:
    """The 8-pixel border strip is restored about as well as the interior.

    A plain circular FFT Wiener filter on the same data fails this check, so it
    measures the border handling rather than the filter.
    """
    kernel = psf_array("motion:length=11,angle=60")
    blurred = blur_image(photo, kernel, noise_sigma=0.0)
    restored = to_numpy(wiener(to_tensor(blurred), torch.from_numpy(kernel).float(), nsr=0.01))

    def border_and_inner(img: np.ndarray) -> tuple[float, float]:
        err = (img - photo) ** 2
        mask = np.zeros(err.shape[:2], bool)
        mask[:8], mask[-8:], mask[:, :8], mask[:, -8:] = True, True, True, True
        return float(err[mask].mean()), float(err[~mask].mean())

    border, inner = border_and_inner(restored)
    blurred_border, _ = border_and_inner(blurred)
    assert border < blurred_border
    assert border < 3.0 * inner

    x = to_tensor(blurred)
    otf = psf2otf(torch.from_numpy(kernel).float()[None, None], x.shape[-2:])
    naive = torch.fft.irfft2(torch.fft.rfft2(x) * otf.conj() / (otf.abs() ** 2 + 1e-3), s=x.shape[-2:])
    naive_border, naive_inner = border_and_inner(to_numpy(naive.clamp(0, 1)))
    assert naive_border > 3.0 * naive_inner


def test_psf2otf_is_centred() -> None:
    """Filtering with a delta kernel, even a big one, returns the image exactly."""
    delta = torch.zeros(9, 9)
    delta[4, 4] = 1.0
    x = torch.rand(1, 1, 20, 24)
    y = torch.fft.irfft2(torch.fft.rfft2(x) * psf2otf(delta, (20, 24)), s=(20, 24))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 1, 20, 24), (3, 17, 33), (2, 2)])
def test_differences_are_the_rolled_ones_bit_for_bit(shape: tuple[int, ...]) -> None:
    """grad and grad_adjoint (written on slices for speed) equal the plain rolled forms exactly, and are adjoint."""
    u, v = torch.randn(shape), torch.randn(shape)
    gx, gy = grad(u)
    assert torch.equal(gx, torch.roll(u, -1, dims=-1) - u)
    assert torch.equal(gy, torch.roll(u, -1, dims=-2) - u)
    rolled = torch.roll(gx, 1, dims=-1) - gx + torch.roll(gy, 1, dims=-2) - gy
    assert torch.equal(grad_adjoint(gx, gy), rolled)
    vx, vy = grad(v)
    inner = float((gx.double() * vx).sum() + (gy.double() * vy).sum())
    torch.testing.assert_close(inner, float((u.double() * grad_adjoint(vx, vy)).sum()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", [1, 3, 8, 9])
def test_psf2otf_places_the_kernel_as_rolling_would_and_centred_window_reads_it_back(side: int) -> None:
    kernel = torch.rand(2, side, side)
    padded = torch.zeros(2, 20, 24)
    padded[:, :side, :side] = kernel
    rolled = torch.roll(padded, shifts=(-(side // 2), -(side // 2)), dims=(-2, -1))
    assert torch.equal(psf2otf(kernel, (20, 24)), torch.fft.rfft2(rolled))
    assert torch.equal(centred_window(rolled, side), kernel)


def test_periodic_pad_keeps_the_image_and_wraps_smoothly(photo: np.ndarray) -> None:
    x = to_tensor(photo)
    padded = periodic_pad(x, 20, (fft_size(200), fft_size(203)))
    assert padded.shape[-2:] == (200, 216)
    torch.testing.assert_close(padded[..., 20:180, 20:180], x)
    # the jump across the wrap-around is no larger than ordinary neighbour differences
    wrap_jump = (padded[..., 0, :] - padded[..., -1, :]).abs().max()
    assert wrap_jump < 0.05


def test_bad_psf_is_named() -> None:
    with pytest.raises(InvalidModelSpecError, match="radius"):
        REGISTRY.parse("wiener:psf=disk:radius=-1")
    with pytest.raises(ValueError, match="sigma"):
        psf_kernel("gaussian:size=3")


def test_a_parameter_that_is_not_a_number_says_what_was_expected() -> None:
    with pytest.raises(InvalidModelSpecError, match=r"'kernel': expected a whole number, got '2\.5'"):
        REGISTRY.parse("l0-blind:kernel=2.5")
    with pytest.raises(InvalidModelSpecError, match=r"'nsr': expected a number, got 'x'"):
        REGISTRY.parse("wiener:nsr=x")
    with pytest.raises(InvalidModelSpecError, match=r"'nsr': expected a finite number, got 'nan'"):
        REGISTRY.parse("wiener:nsr=nan")
    assert dict(REGISTRY.parse("l0-blind:kernel=31").params)["kernel"] == 31


def test_fft_sizes_have_small_prime_factors_and_odd_ones_no_factor_two() -> None:
    assert [fft_size(n) for n in (1, 7, 97, 1025)] == [1, 8, 100, 1080]
    # odd sizes (no Nyquist bin, for sub-pixel shifts) use 3, 5 and 7
    assert [fft_size(n, odd=True) for n in (1, 2, 11, 1056)] == [1, 3, 15, 1125]


@pytest.mark.parametrize("spec, message", [
    ("l0-blind:kernel=1", "a side of at least 3 pixels"),
    ("l0-blind:kernel=2", "a side of at least 3 pixels"),
    ("wiener:psf=motion:length=5,length=7", "length is given twice"),
])
def test_parameters_that_would_mislead_are_refused(spec: str, message: str) -> None:
    from models.catalog import REGISTRY

    with pytest.raises(Exception, match=message):
        REGISTRY.parse(spec)


def test_l0_blind_wiener_final_step_weighs_each_image_by_its_own_noise() -> None:
    """final=wiener took the batch's mean noise for every image: a clean photograph batched with a noisy one came
    out up to 0.09 different from the same photograph restored alone."""
    import numpy as np
    import torch

    from models.deconv import wiener

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 1, 32, 32))).float()
    kernel = torch.full((2, 5, 5), 1 / 25)
    per_image = torch.tensor([1e-3, 1e-1]).view(2, 1, 1, 1)
    both = wiener(x, kernel, nsr=per_image)
    alone = wiener(x[:1], kernel[:1], nsr=1e-3)
    assert float((both[:1] - alone).abs().max()) < 1e-5
