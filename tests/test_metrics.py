"""Metrics against scikit-image, against an independent 3-D SSIM, and on edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import correlate
from skimage import data, transform
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jobs.errors import InputError
from models import metrics
from models.metrics import MetricInputError
from models.synthetic_blur import blur_image, disk_kernel

RNG = np.random.default_rng(1234)


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return float(structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=data_range, channel_axis=-1 if a.ndim == 3 else None,
    ))


def _noisy_pair(shape: tuple[int, ...], dtype: type, spread: int) -> tuple[np.ndarray, np.ndarray]:
    top = np.iinfo(dtype).max
    a = RNG.integers(0, top + 1, shape, dtype=np.int64)
    b = np.clip(a + RNG.integers(-spread, spread + 1, shape), 0, top)
    return a.astype(dtype), b.astype(dtype)


def _photo(size: int = 96) -> np.ndarray:
    """A real photograph as uint8 RGB, small enough for fast tests."""
    small = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return (small * 255).round().astype(np.uint8)


def _blurred(photo: np.ndarray, radius: float = 3.0) -> np.ndarray:
    return (blur_image(photo / 255.0, disk_kernel(radius)) * 255).round().astype(np.uint8)


def _matlab_ssim_3d(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Independent reference: MATLAB ``ssim`` on an array as a volume, written
    as a brute-force 3-D correlation of an edge-padded volume."""
    w = metrics.gaussian_window_1d()
    kernel = w[:, None, None] * w[None, :, None] * w[None, None, :]
    x = np.pad(a.astype(np.float64), 5, mode="edge")
    y = np.pad(b.astype(np.float64), 5, mode="edge")

    def local(v: np.ndarray) -> np.ndarray:
        return correlate(v, kernel, mode="constant")[5:-5, 5:-5, 5:-5]

    mx, my = local(x), local(y)
    vx, vy, cxy = local(x * x) - mx**2, local(y * y) - my**2, local(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


class TestPSNR:
    @pytest.mark.parametrize("shape", [(37, 41), (37, 41, 3)])
    def test_uint8_matches_skimage(self, shape: tuple[int, ...]) -> None:
        a, b = _noisy_pair(shape, np.uint8, 20)
        assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)

    def test_uint16_is_measured_at_its_own_range(self) -> None:
        a, b = _noisy_pair((32, 30, 3), np.uint16, 3000)
        expected = peak_signal_noise_ratio(a, b, data_range=65535)
        assert metrics.psnr(a, b) == pytest.approx(expected, abs=1e-9)
        mse = np.mean((a.astype(float) - b) ** 2)
        assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(65535**2 / mse), abs=1e-9)

    def test_same_picture_at_8_and_16_bits_scores_alike(self) -> None:
        photo = _photo(64)
        blurred = _blurred(photo)
        as16 = lambda im: im.astype(np.uint16) * 257  # noqa: E731 - exact 8->16 bit scaling
        assert metrics.psnr(as16(blurred), as16(photo)) == pytest.approx(metrics.psnr(blurred, photo), abs=1e-9)

    def test_float_needs_an_explicit_range(self) -> None:
        a = RNG.random((16, 16))
        with pytest.raises(MetricInputError, match="data_range"):
            metrics.psnr(a, a * 0.5)
        assert metrics.psnr(a, a * 0.5, data_range=1.0) == pytest.approx(
            peak_signal_noise_ratio(a, a * 0.5, data_range=1.0), abs=1e-9)

    def test_identical_is_infinite(self) -> None:
        photo = _photo(32)
        assert metrics.psnr(photo, photo.copy()) == math.inf

    def test_constant_images(self) -> None:
        a = np.full((20, 20, 3), 100, np.uint8)
        b = np.full((20, 20, 3), 110, np.uint8)
        assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=1e-12)

    def test_crop_border_ignores_the_edges(self) -> None:
        photo = _photo(40)
        damaged = photo.copy()
        damaged[:3] = 0
        assert metrics.psnr(damaged, photo) < 30
        assert metrics.psnr(damaged, photo, crop_border=3) == math.inf

    def test_mask_restricts_the_error(self) -> None:
        photo = _photo(40)
        damaged = photo.copy()
        damaged[:, :10] = 255 - damaged[:, :10]
        mask = np.ones(photo.shape[:2])
        mask[:, :10] = 0
        assert metrics.psnr(damaged, photo, mask=mask) == math.inf

    def test_mismatched_shapes_are_named(self) -> None:
        with pytest.raises(MetricInputError, match=r"\(10, 10, 3\) vs \(10, 12, 3\)"):
            metrics.psnr(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 12, 3), np.uint8))

    def test_mixed_bit_depths_are_refused(self) -> None:
        with pytest.raises(MetricInputError, match="uint8 vs uint16"):
            metrics.psnr(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint16))

    def test_errors_are_input_errors(self) -> None:
        assert issubclass(MetricInputError, InputError)


class TestSSIMChannelMean:
    @pytest.mark.parametrize(
        ("shape", "dtype", "spread"),
        [((48, 53, 3), np.uint8, 40), ((48, 53), np.uint8, 40), ((33, 35, 3), np.uint16, 9000)],
    )
    def test_equals_skimage_on_random_images(self, shape: tuple[int, ...], dtype: type, spread: int) -> None:
        a, b = _noisy_pair(shape, dtype, spread)
        top = float(np.iinfo(dtype).max)
        ours = metrics.ssim(a, b, variant=metrics.SSIM_CHANNEL_MEAN)
        assert abs(ours - _skimage_ssim(a, b, top)) < 1e-6
        assert ours < 0.99  # the pair really differs

    def test_equals_skimage_on_a_blurred_photograph(self) -> None:
        photo = _photo(80)
        blurred = _blurred(photo)
        ours = metrics.ssim(blurred, photo, variant=metrics.SSIM_CHANNEL_MEAN)
        assert abs(ours - _skimage_ssim(blurred, photo, 255.0)) < 1e-6

    def test_float_images_with_range(self) -> None:
        a = RNG.random((30, 30, 3))
        b = np.clip(a + RNG.normal(0, 0.1, a.shape), 0, 1)
        assert abs(metrics.ssim(a, b, data_range=1.0) - _skimage_ssim(a, b, 1.0)) < 1e-6


class TestSSIM3D:
    def test_equals_matlab_volume_ssim(self) -> None:
        a, b = _noisy_pair((26, 23, 3), np.uint8, 50)
        ours = metrics.ssim(a, b, variant=metrics.SSIM_3D)
        assert abs(ours - _matlab_ssim_3d(a, b, 255.0)) < 1e-10

    def test_sixteen_bit(self) -> None:
        a, b = _noisy_pair((22, 25, 3), np.uint16, 12000)
        assert abs(metrics.ssim(a, b, variant="3d") - _matlab_ssim_3d(a, b, 65535.0)) < 1e-10

    def test_grey_is_matlab_2d_ssim_with_replicate_padding(self) -> None:
        a, b = _noisy_pair((24, 27), np.uint8, 50)
        # A grey image is a volume of depth 1: edge padding along depth changes nothing.
        expected = _matlab_ssim_3d(a[..., None], b[..., None], 255.0)
        assert abs(metrics.ssim(a, b, variant="3d") - expected) < 1e-10

    def test_differs_from_the_channel_mean(self) -> None:
        photo = _photo(64)
        blurred = _blurred(photo)
        volume = metrics.ssim(blurred, photo, variant="3d")
        per_channel = metrics.ssim(blurred, photo, variant="channel-mean")
        assert 0 < per_channel < 1 and 0 < volume < 1
        assert abs(volume - per_channel) > 1e-4

    def test_insensitive_to_rgb_versus_bgr(self) -> None:
        photo = _photo(48)
        blurred = _blurred(photo)
        assert metrics.ssim(blurred, photo, variant="3d") == pytest.approx(
            metrics.ssim(blurred[..., ::-1], photo[..., ::-1], variant="3d"), abs=1e-12)


class TestSSIMEdgeCases:
    @pytest.mark.parametrize("variant", metrics.SSIM_VARIANTS)
    def test_identical_is_one(self, variant: str) -> None:
        photo = _photo(40)
        assert metrics.ssim(photo, photo.copy(), variant=variant) == pytest.approx(1.0, abs=1e-12)

    @pytest.mark.parametrize("variant", metrics.SSIM_VARIANTS)
    def test_constant_images(self, variant: str) -> None:
        a = np.full((20, 20, 3), 100, np.uint8)
        b = np.full((20, 20, 3), 110, np.uint8)
        assert metrics.ssim(a, a.copy(), variant=variant) == pytest.approx(1.0, abs=1e-12)
        c1 = (0.01 * 255) ** 2
        luminance_term = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
        assert metrics.ssim(a, b, variant=variant) == pytest.approx(luminance_term, abs=1e-9)

    @pytest.mark.parametrize("variant", metrics.SSIM_VARIANTS)
    def test_smaller_than_the_window_is_refused(self, variant: str) -> None:
        tiny = np.zeros((10, 30, 3), np.uint8)
        with pytest.raises(MetricInputError, match=r"10x30 pixels.*11x11"):
            metrics.ssim(tiny, tiny, variant=variant)

    def test_crop_border_counts_towards_the_minimum(self) -> None:
        img = np.zeros((20, 20), np.uint8)
        with pytest.raises(MetricInputError, match="crop_border=5"):
            metrics.ssim(img, img, crop_border=5)

    def test_unknown_variant_lists_the_known_ones(self) -> None:
        img = np.zeros((20, 20), np.uint8)
        with pytest.raises(MetricInputError, match=r"'matlab'.*channel-mean, 3d"):
            metrics.ssim(img, img, variant="matlab")


class TestFullReference:
    def test_gopro_protocol_on_uint8_rgb(self) -> None:
        photo = _photo(64)
        blurred = _blurred(photo)
        result = metrics.full_reference_metrics(blurred, photo)
        assert set(result) == {"psnr", "ssim", "ssim_3d", "ssim_channel_mean"}
        assert result["ssim"] == result["ssim_3d"]
        assert result["psnr"] == pytest.approx(peak_signal_noise_ratio(photo, blurred, data_range=255), abs=1e-9)
        assert abs(result["ssim_channel_mean"] - _skimage_ssim(blurred, photo, 255.0)) < 1e-6
        chosen = metrics.full_reference_metrics(blurred, photo, ssim_variant="channel-mean")
        assert chosen["ssim"] == chosen["ssim_channel_mean"]

    def test_float_restoration_is_quantised_like_a_saved_png(self) -> None:
        photo = _photo(48)
        restored = _blurred(photo) / 255.0 + 0.4 / 255.0  # rounds back to the uint8 image
        as_float = metrics.full_reference_metrics(restored, photo)
        as_uint8 = metrics.full_reference_metrics(_blurred(photo), photo)
        assert as_float == as_uint8

    def test_alpha_is_ignored(self) -> None:
        photo = _photo(40)
        blurred = _blurred(photo)
        alpha = np.full(photo.shape[:2] + (1,), 255, np.uint8)
        other_alpha = np.zeros_like(alpha)
        with_alpha = metrics.full_reference_metrics(
            np.concatenate([blurred, other_alpha], axis=2), np.concatenate([photo, alpha], axis=2))
        assert with_alpha == metrics.full_reference_metrics(blurred, photo)

    def test_sixteen_bit_grey(self) -> None:
        photo = (_photo(40)[..., 1].astype(np.uint16) * 257)
        noisy = np.clip(photo + RNG.normal(0, 500, photo.shape), 0, 65535).astype(np.uint16)
        result = metrics.full_reference_metrics(noisy, photo)
        assert result["psnr"] == pytest.approx(peak_signal_noise_ratio(photo, noisy, data_range=65535), abs=1e-9)
        assert abs(result["ssim_channel_mean"] - _skimage_ssim(noisy, photo, 65535.0)) < 1e-6

    def test_shape_mismatch_names_both_shapes(self) -> None:
        with pytest.raises(MetricInputError, match=r"\(30, 30\).*\(30, 30, 3\)"):
            metrics.full_reference_metrics(np.zeros((30, 30), np.uint8), np.zeros((30, 30, 3), np.uint8))


class TestNoReference:
    def test_blur_lowers_sharpness_and_raises_blur_effect(self) -> None:
        photo = _photo(96)
        sharp = metrics.no_reference_metrics(photo)
        blurry = metrics.no_reference_metrics(_blurred(photo, 4.0))
        assert set(sharp) == {"laplacian_variance", "blur_effect"}
        assert blurry["laplacian_variance"] < 0.5 * sharp["laplacian_variance"]
        assert blurry["blur_effect"] > sharp["blur_effect"]
        assert 0 <= sharp["blur_effect"] <= 1

    def test_eight_and_sixteen_bit_versions_compare(self) -> None:
        photo = _photo(64)
        eight = metrics.no_reference_metrics(photo)
        sixteen = metrics.no_reference_metrics(photo.astype(np.uint16) * 257)
        as_float = metrics.no_reference_metrics(photo / 255.0)
        for name in eight:
            assert sixteen[name] == pytest.approx(eight[name], rel=1e-9)
            assert as_float[name] == pytest.approx(eight[name], rel=1e-9)

    def test_grey_and_bgr(self) -> None:
        photo = _photo(48)
        grey = metrics.luminance(photo)
        assert metrics.luminance(photo[..., ::-1], channel_order="BGR") == pytest.approx(grey)
        assert metrics.no_reference_metrics(grey)["laplacian_variance"] == pytest.approx(
            metrics.no_reference_metrics(photo)["laplacian_variance"])

    def test_flat_image_has_no_sharpness(self) -> None:
        flat = np.full((32, 32, 3), 77, np.uint8)
        assert metrics.no_reference_metrics(flat)["laplacian_variance"] == 0.0

    def test_too_small_is_refused_not_nan(self) -> None:
        with pytest.raises(MetricInputError, match=r"3x3 pixels .* at least 4x4"):
            metrics.no_reference_metrics(np.zeros((3, 3), np.uint8))
        values = metrics.no_reference_metrics(RNG.random((4, 4, 3)))
        assert all(math.isfinite(v) for v in values.values())


def test_a_restoration_in_another_integer_type_than_the_reference_is_refused() -> None:
    """A uint8 restoration measured against a float reference once gave -44.8 dB without a word."""
    sharp = data.camera()[:64, :64] / 255.0
    with pytest.raises(MetricInputError, match="restored image is uint8 but the sharp image is float64"):
        metrics.full_reference_metrics((sharp * 255).astype(np.uint8), sharp)
    assert metrics.full_reference_metrics(sharp.astype(np.float32), sharp)["psnr"] > 100  # float: measured
