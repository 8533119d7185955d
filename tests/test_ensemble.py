"""Ensemble maths: weighted average, disagreement, strength, weight fitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from skimage import data, transform

from jobs.errors import InputError
from models import ensemble
from models.ensemble import EnsembleError
from models.synthetic_blur import blur_image, disk_kernel, gaussian_kernel

torch.set_num_threads(1)


def _photo_batch(size: int = 48) -> torch.Tensor:
    """Two real photographs as a (2, 3, size, size) float batch in [0, 1]."""
    images = [transform.resize(im, (size, size), anti_aliasing=True) for im in (data.astronaut(), data.coffee())]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def members() -> list[torch.Tensor]:
    base = _photo_batch()
    return [base, (base * 0.5).clamp(0, 1), (base + 0.2).clamp(0, 1)]


class TestWeights:
    def test_default_is_equal(self) -> None:
        assert ensemble.normalise_weights(None, 4) == [0.25] * 4

    def test_normalised_to_sum_one(self) -> None:
        assert ensemble.normalise_weights([2, 1, 1], 3) == pytest.approx([0.5, 0.25, 0.25])

    @pytest.mark.parametrize(("weights", "message"), [
        ([1, -1], r"-1\.0 of member 1"),
        ([1, math.nan], r"nan of member 1"),
        ([0, 0], r"all ensemble weights are zero \(\[0\.0, 0\.0\]\)"),
        ([1, 2, 3], r"3 weights .* for 2 member outputs"),
    ])
    def test_bad_weights_are_named(self, weights: list[float], message: str) -> None:
        with pytest.raises(EnsembleError, match=message):
            ensemble.normalise_weights(weights, 2)

    def test_errors_are_input_errors(self) -> None:
        assert issubclass(EnsembleError, InputError)


class TestAverage:
    def test_equal_weights_by_default(self, members: list[torch.Tensor]) -> None:
        expected = (members[0] + members[1] + members[2]) / 3
        torch.testing.assert_close(ensemble.average(members), expected)

    def test_weighted(self, members: list[torch.Tensor]) -> None:
        out = ensemble.average(members, [3, 1, 0])
        torch.testing.assert_close(out, 0.75 * members[0] + 0.25 * members[1])

    def test_zero_weight_drops_a_member(self, members: list[torch.Tensor]) -> None:
        poisoned = members[:2] + [torch.full_like(members[0], math.nan)]
        out = ensemble.average(poisoned, [1, 1, 0])
        torch.testing.assert_close(out, (members[0] + members[1]) / 2)

    def test_single_member_is_itself(self, members: list[torch.Tensor]) -> None:
        torch.testing.assert_close(ensemble.average(members[:1]), members[0])

    def test_result_is_float32_in_range(self, members: list[torch.Tensor]) -> None:
        out = ensemble.average([m.double() for m in members], [1, 2, 3])
        assert out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0

    def test_shape_mismatch_is_named(self, members: list[torch.Tensor]) -> None:
        with pytest.raises(EnsembleError, match=r"member 1 output has shape \(2, 3, 40, 48\)"):
            ensemble.average([members[0], members[1][..., :40, :]])

    def test_all_zero_weights_refused(self, members: list[torch.Tensor]) -> None:
        with pytest.raises(EnsembleError, match="all ensemble weights are zero"):
            ensemble.average(members, [0, 0, 0])


class TestDisagreement:
    def test_zero_for_identical_members(self, members: list[torch.Tensor]) -> None:
        same = [members[0].clone() for _ in range(3)]
        dis = ensemble.disagreement(same, ensemble.average(same))
        assert dis.shape == (2,)
        assert torch.all(dis == 0)

    def test_mean_absolute_deviation(self) -> None:
        a = torch.zeros(1, 1, 4, 4)
        b = torch.full((1, 1, 4, 4), 0.5)
        ens = ensemble.average([a, b])
        assert ensemble.disagreement([a, b], ens).item() == pytest.approx(0.25)

    def test_per_image(self, members: list[torch.Tensor]) -> None:
        mixed = [members[0], members[0].clone()]
        mixed[1][1] = 1.0 - mixed[1][1]  # members disagree only on the second image
        dis = ensemble.disagreement(mixed, ensemble.average(mixed))
        assert dis[0].item() == 0.0 and dis[1].item() > 0.05


class TestStrength:
    def test_endpoints_and_middle(self, members: list[torch.Tensor]) -> None:
        restored, original = members[0], members[1]
        assert torch.equal(ensemble.apply_strength(restored, original, 1.0), restored)
        assert torch.equal(ensemble.apply_strength(restored, original, 0.0), original)
        torch.testing.assert_close(ensemble.apply_strength(restored, original, 0.5), (restored + original) / 2)

    @pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "strong"])
    def test_out_of_range_refused(self, members: list[torch.Tensor], bad: object) -> None:
        with pytest.raises(EnsembleError, match="strength"):
            ensemble.apply_strength(members[0], members[1], bad)  # type: ignore[arg-type]


class TestFitWeights:
    @staticmethod
    def _members_and_targets(mix: list[float]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Three 'members' of real photos (a sharp one, a defocused one, a
        brightened Gaussian-blurred one) and targets that are a known mix."""
        outputs, targets = [], []
        for photo in (data.astronaut(), data.chelsea()):
            sharp = transform.resize(photo, (40, 40), anti_aliasing=True)
            stack = np.stack([
                sharp,
                blur_image(sharp, disk_kernel(2.0)),
                np.clip(blur_image(sharp, gaussian_kernel(1.5)) * 1.1, 0, 1),
            ])
            outputs.append(stack)
            targets.append(np.tensordot(np.array(mix), stack, axes=1))
        return outputs, targets

    def test_recovers_known_mixing_weights(self) -> None:
        outputs, targets = self._members_and_targets([0.6, 0.3, 0.1])
        weights, report = ensemble.fit_weights(outputs, targets)
        np.testing.assert_allclose(weights, [0.6, 0.3, 0.1], atol=1e-3)
        assert report.psnr_fitted > 60  # near-exact fit
        assert report.psnr_fitted > report.psnr_equal
        assert report.gain_db == pytest.approx(report.psnr_fitted - report.psnr_equal)
        assert report.images == 2 and report.to_dict()["weights"] == pytest.approx(list(weights))

    def test_useless_member_gets_zero_weight(self) -> None:
        outputs, targets = self._members_and_targets([0.8, 0.2, 0.0])
        rng = np.random.default_rng(0)
        noisy = [np.concatenate([o, rng.random((1,) + o.shape[1:])]) for o in outputs]
        weights, _ = ensemble.fit_weights(noisy, targets)
        assert weights.shape == (4,)
        assert weights[3] < 0.01 and abs(weights.sum() - 1) < 1e-12

    def test_subsampling_bounds_the_samples(self) -> None:
        outputs, targets = self._members_and_targets([0.5, 0.5, 0.0])
        weights, report = ensemble.fit_weights(outputs, targets, max_samples=2000, seed=3)
        assert report.samples <= 2000
        np.testing.assert_allclose(weights, [0.5, 0.5, 0.0], atol=1e-3)

    def test_uint8_inputs_are_scaled(self) -> None:
        outputs, targets = self._members_and_targets([0.6, 0.3, 0.1])
        to8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
        weights, _ = ensemble.fit_weights([to8(o) for o in outputs], [to8(t) for t in targets])
        np.testing.assert_allclose(weights, [0.6, 0.3, 0.1], atol=0.02)

    def test_an_image_its_mix_reproduces_exactly_counts_as_100_db(self) -> None:
        """A blank page restored exactly once made the mean PSNR infinite: the gain was saved and printed as -inf
        dB and written as JSON Infinity."""
        outputs, targets = self._members_and_targets([0.6, 0.3, 0.1])
        flat = np.full((40, 40, 3), 0.5)
        weights, report = ensemble.fit_weights([*outputs, np.stack([flat] * 3)], [*targets, flat])
        assert math.isfinite(report.psnr_equal) and math.isfinite(report.gain_db)
        assert report.psnr_equal <= ensemble.PSNR_CAP_DB

    def test_mismatched_inputs_are_named(self) -> None:
        outputs, targets = self._members_and_targets([1.0, 0.0, 0.0])
        with pytest.raises(EnsembleError, match="2 images but 1 targets"):
            ensemble.fit_weights(outputs, targets[:1])
        with pytest.raises(EnsembleError, match=r"image 1: member outputs have shape \(2, 40, 40, 3\)"):
            ensemble.fit_weights([outputs[0], outputs[1][:2]], targets)

    def test_biased_members_are_mixed_under_the_sum_to_one_constraint(self) -> None:
        # One member too bright, one too dark (and a little noisy): unconstrained
        # NNLS would scale the bright one down to fit exactly, and renormalising
        # that weight to 1 would leave a 20 % brightness error.
        sharp = transform.resize(data.coffee(), (40, 40), anti_aliasing=True)
        noise = np.random.default_rng(1).normal(0, 0.01, sharp.shape)
        stack = np.stack([sharp * 1.2, sharp * 0.8 + noise])
        plain, _ = nnls(stack.reshape(2, -1).T, sharp.reshape(-1))
        assert plain[1] < 0.05  # the pitfall is real for this data
        weights, report = ensemble.fit_weights([stack], [sharp])
        np.testing.assert_allclose(weights, [0.5, 0.5], atol=0.02)
        assert report.psnr_fitted > 35
