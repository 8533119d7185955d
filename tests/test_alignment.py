"""RealBlur-style alignment: a sharp photograph moved by a few pixels is
recovered by intensity matching + ECC homography, and metrics on the valid
mask see the restoration, not the misregistration."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data, transform

from models import alignment, metrics
from models.alignment import AlignmentError, AlignOptions

SIZE = 128
# A few pixels of shift, a little rotation and a touch of perspective.
TRUE_WARP = np.array([[1.0, 0.012, 2.6], [-0.01, 1.0, -1.8], [1e-5, -5e-6, 1.0]])


def _photo() -> np.ndarray:
    """Astronaut, float RGB in [0, 1], SIZE x SIZE."""
    return transform.resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True)


def _moved(image: np.ndarray, warp: np.ndarray = TRUE_WARP) -> np.ndarray:
    """``image`` resampled so that moved(warp @ p) = image(p)."""
    out = cv2.warpPerspective(image.astype(np.float32), warp, (image.shape[1], image.shape[0]),
                              flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return np.clip(out.astype(np.float64), 0.0, 1.0)


def test_alignment_recovers_much_higher_psnr() -> None:
    sharp = _photo()
    restored = _moved(sharp)
    sharp8 = (sharp * 255).round().astype(np.uint8)
    plain = metrics.full_reference_metrics(restored, sharp8)
    aligned = metrics.full_reference_metrics(restored, sharp8, align=True)
    refit = metrics.full_reference_metrics(restored, sharp8, align=AlignOptions(refit=True))
    assert plain["psnr"] < 15
    assert aligned["psnr"] > plain["psnr"] + 10  # published protocol: ~12 -> ~25 dB
    assert refit["psnr"] > 35  # only resampling and 8-bit rounding remain
    assert aligned["ssim"] > 0.97 > 0.5 > plain["ssim"]
    assert aligned["alignment_converged"] == 1.0
    assert 0.85 < aligned["alignment_valid_fraction"] < 1.0


def test_homography_maps_reference_to_restored_coordinates() -> None:
    sharp = _photo()
    result = alignment.align_to_reference(_moved(sharp), sharp)
    assert result.converged
    assert result.correlation > 0.99
    found = result.homography / result.homography[2, 2]
    np.testing.assert_allclose(found[:2, 2], TRUE_WARP[:2, 2], atol=0.1)
    np.testing.assert_allclose(found[:2, :2], TRUE_WARP[:2, :2], atol=2e-3)


def test_mask_marks_pixels_from_outside_the_restored_image() -> None:
    sharp = _photo()
    result = alignment.align_to_reference(_moved(sharp), sharp)
    assert result.mask.shape == sharp.shape
    assert set(np.unique(result.mask)) <= {0.0, 1.0}
    # Reference pixel p comes from restored pixel TRUE_WARP @ p, ~2.6 px to the
    # right and ~1.8 px up: the last columns and first rows have no source.
    assert result.mask[:, -1].sum() == 0
    assert result.mask[0].sum() == 0
    assert result.mask[20:-20, 20:-20].min() == 1.0
    assert np.all(result.image[result.mask == 0] == 0)
    assert np.all(result.reference[result.mask == 0] == 0)


def test_intensity_matching_scale_and_affine() -> None:
    sharp = _photo()
    darker = sharp * 0.8
    matched, scale, offset = alignment.match_intensity(darker, sharp, "scale")
    assert scale == pytest.approx(1.25, rel=1e-9) and offset == 0.0
    np.testing.assert_allclose(matched, sharp, atol=1e-12)
    shifted = sharp * 0.7 + 0.1
    matched, scale, offset = alignment.match_intensity(shifted, sharp, "affine")
    assert scale == pytest.approx(1 / 0.7, rel=1e-9)
    assert offset == pytest.approx(-0.1 / 0.7, rel=1e-9)
    np.testing.assert_allclose(matched, sharp, atol=1e-12)


def test_refit_removes_the_published_protocols_brightness_bias() -> None:
    sharp = _photo()
    restored = _moved(sharp)
    published = alignment.align_to_reference(restored, sharp)
    # Fitting the scale before alignment darkens this well-exposed restoration.
    assert published.scale < 0.97
    refit = alignment.align_to_reference(restored, sharp, AlignOptions(refit=True))
    assert refit.scale == pytest.approx(1.0, abs=0.01)
    measure = lambda a: metrics.psnr(a.image, a.reference, 1.0, mask=a.mask)  # noqa: E731
    assert measure(refit) > measure(published) + 5


@pytest.mark.parametrize("intensity", alignment.INTENSITY_MODES)
def test_exposure_difference_is_corrected_before_measuring(intensity: str) -> None:
    sharp = _photo()
    restored = np.clip(_moved(sharp) * 0.8 + 0.05, 0, 1)
    sharp8 = (sharp * 255).round().astype(np.uint8)
    plain = metrics.full_reference_metrics(restored, sharp8)
    aligned = metrics.full_reference_metrics(restored, sharp8, align=AlignOptions(intensity, refit=True))
    assert aligned["psnr"] > plain["psnr"] + 15


def test_grey_images_align() -> None:
    sharp = _photo()[..., 1]
    result = alignment.align_to_reference(_moved(sharp), sharp)
    assert result.converged and result.image.shape == sharp.shape
    assert metrics.psnr(result.image, result.reference, 1.0, mask=result.mask) > 22


def test_flat_image_falls_back_to_identity() -> None:
    flat = np.full((40, 40, 3), 0.5)
    result = alignment.align_to_reference(flat, flat)
    assert not result.converged
    np.testing.assert_array_equal(result.homography, np.eye(3))
    assert result.mask.min() == 1.0


@pytest.mark.parametrize("size", [16, 32, 64])
def test_a_pair_already_in_register_is_left_there(size: int) -> None:
    """ECC iterates even from a perfect fit and drifted away from it: a small crop compared with itself once
    scored 15 dB at 16 px and 26 dB at 32 px, reported as converged."""
    crop = _photo()[40:40 + size, 40:40 + size]
    result = alignment.align_to_reference(crop, crop)
    np.testing.assert_array_equal(result.homography, np.eye(3))
    assert result.converged  # in register: the identity is the fit
    assert metrics.psnr(result.image, result.reference, 1.0, mask=result.mask) > 100  # float32 resampling only


def test_bad_inputs_are_named() -> None:
    with pytest.raises(AlignmentError, match=r"\(20, 20, 3\).*\(20, 21, 3\)"):
        alignment.align_to_reference(np.zeros((20, 20, 3)), np.zeros((20, 21, 3)))
    with pytest.raises(AlignmentError, match="'median'"):
        alignment.match_intensity(np.zeros(4), np.zeros(4), "median")
    with pytest.raises(AlignmentError, match="'median'"):
        AlignOptions(intensity="median")
    with pytest.raises(AlignmentError, match="got 4"):
        AlignOptions(gauss_filter_size=4)


def test_masked_metrics_match_realblurs_evaluation_formulas() -> None:
    """RealBlur computes PSNR as sum of squared errors over sum(mask) and SSIM
    as skimage's full Gaussian SSIM map times the mask, cropped by the window
    radius, averaged per channel over the mask."""
    from skimage.metrics import structural_similarity

    sharp = _photo()
    result = alignment.align_to_reference(_moved(sharp), sharp)
    image, ref, mask = result.image, result.reference, result.mask

    expected_psnr = 10 * np.log10(1.0 / (np.sum((ref - image) ** 2) / np.sum(mask)))
    assert metrics.psnr(image, ref, 1.0, mask=mask) == pytest.approx(expected_psnr, abs=1e-9)

    _, smap = structural_similarity(ref, image, channel_axis=-1, gaussian_weights=True,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    pad = 5
    cropped, cropped_mask = (smap * mask)[pad:-pad, pad:-pad], mask[pad:-pad, pad:-pad]
    expected_ssim = np.mean(cropped.sum(axis=(0, 1)) / cropped_mask.sum(axis=(0, 1)))
    ours = metrics.ssim(image, ref, 1.0, variant=metrics.SSIM_CHANNEL_MEAN, mask=mask)
    assert abs(ours - expected_ssim) < 1e-6
    assert ours < 0.999  # a real (imperfect) alignment, not a trivial pair
