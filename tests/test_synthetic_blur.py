"""Synthetic camera shake: the trajectory behind the kernels, and a camera that also turns."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from models.synthetic_blur import (
    _rasterise,
    blur_image,
    local_shake_kernel,
    random_motion_kernel,
    roll_angles,
    rotating_shake_blur,
    sample_photographs,
    shake_path,
)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 200x200 colour crop of astronaut in [0, 1]."""
    return sample_photographs()["astronaut"][100:300, 100:300] / 255.0


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([fftconvolve(image[..., c], kernel, mode="same") for c in range(image.shape[2])], axis=2)


def test_the_kernel_is_its_trajectory_rasterised_with_the_same_draws() -> None:
    kernel = random_motion_kernel(21, np.random.default_rng(5))
    path = shake_path(21, np.random.default_rng(5))
    assert np.array_equal(kernel, _rasterise(path.real, path.imag, 21))
    assert kernel.sum() == pytest.approx(1.0)
    assert np.ptp(path.real) <= 19 and np.ptp(path.imag) <= 19  # fits the window with a pixel to spare


def test_roll_angles_have_zero_mean_and_the_spread_asked_for() -> None:
    angles = roll_angles(200, np.random.default_rng(1), 1.5)
    assert abs(angles.mean()) < 1e-12
    assert np.rad2deg(np.ptp(angles)) == pytest.approx(1.5)
    assert np.all(roll_angles(50, np.random.default_rng(1), 0.0) == 0)


def test_a_camera_that_does_not_turn_convolves_with_its_path(scene: np.ndarray) -> None:
    path = shake_path(15, np.random.default_rng(0))[::10]
    blurred = rotating_shake_blur(scene, path, np.zeros(len(path)))
    expected = convolve(scene, _rasterise(path.real, path.imag, 15))
    inner = (slice(20, -20), slice(20, -20))  # away from the reflected borders
    assert np.abs(blurred - expected)[inner].max() < 1e-4


def test_a_turning_camera_blurs_each_point_by_its_own_kernel(scene: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    path = shake_path(15, rng)[::10]
    angles = roll_angles(len(path), rng, 2.0)
    blurred = rotating_shake_blur(scene, path, angles)
    middle = (scene.shape[0] - 1) / 2

    def error_near(offset: tuple[int, int], kernel: np.ndarray) -> float:
        row, column = round(middle + offset[0]), round(middle + offset[1])
        region = (slice(row - 10, row + 10), slice(column - 10, column + 10))
        return float(np.abs(blurred - convolve(scene, kernel))[region].mean())

    centre_kernel = local_shake_kernel(path, angles, (0.0, 0.0), 31)
    assert np.array_equal(centre_kernel, _rasterise(path.real, path.imag, 31))  # no drift in the middle
    assert error_near((0, 0), centre_kernel) < 1e-3
    for offset in ((-70, -70), (60, -70), (70, 65)):
        local = local_shake_kernel(path, angles, (float(offset[0]), float(offset[1])), 31)
        assert error_near(offset, local) < 0.3 * error_near(offset, centre_kernel)


def test_kernels_without_a_centre_or_larger_than_a_valid_image_are_refused() -> None:
    """scipy swaps the arguments of a 'valid' convolution with a kernel larger than the image (a 1x9 image came
    back 9x1), and an even kernel shifts the result by half a pixel (16x16 became 17x17)."""
    with pytest.raises(ValueError, match="odd sides"):
        blur_image(np.zeros((16, 16)), np.ones((4, 4)) / 16)
    with pytest.raises(ValueError, match="does not fit"):
        blur_image(np.zeros((1, 9)), np.ones((9, 9)) / 81, mode="valid")
