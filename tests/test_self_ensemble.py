"""Self-ensemble over flips and rotations: exact inverses, averaging, kernels, metrics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage import data

from jobs.errors import InvalidModelSpecError
from models.base import Restored, RestorationModel
from models.registry import ModelInfo
from models.self_ensemble import (
    TRANSFORMS_4,
    TRANSFORMS_8,
    SelfEnsembleModel,
    forward_transform,
    inverse_transform,
)

CPU = torch.device("cpu")
INFO = ModelInfo(name="probe", family="classic", license="Apache-2.0", summary="test", factory="tests:none")


class Identity(RestorationModel):
    def restore_batch(self, x: torch.Tensor) -> Restored:
        return Restored(x.clone())


class AddsAPattern(RestorationModel):
    """Adds a fixed, position-dependent pattern: not equivariant under any transform."""

    def restore_batch(self, x: torch.Tensor) -> Restored:
        h, w = x.shape[-2:]
        ys = torch.linspace(0, 0.2, h)[:, None]
        xs = torch.linspace(0, 0.1, w)[None, :] ** 2
        return Restored(x * 0.5 + ys + xs, metrics={"pattern": torch.full((x.shape[0],), float(h))})


class CentreKernel(RestorationModel):
    """Returns the normalised 3x3 centre of the image as its 'kernel' (equivariant on odd squares)."""

    def restore_batch(self, x: torch.Tensor) -> Restored:
        h, w = x.shape[-2:]
        centre = x[:, 0, h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2] + 1e-3
        return Restored(x.clone(), kernels=centre / centre.sum(dim=(-2, -1), keepdim=True))


def photo(h: int, w: int) -> torch.Tensor:
    image = np.asarray(data.coffee(), dtype=np.float32)[100 : 100 + h, 200 : 200 + w] / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


def test_every_transform_is_undone_exactly_on_non_square_images() -> None:
    x = photo(30, 47)
    outputs = []
    for t in TRANSFORMS_8:
        y = forward_transform(x, t)
        outputs.append(y)
        assert torch.equal(inverse_transform(y, t), x)
    distinct = {tuple(o.flatten()[:200].tolist()) for o in outputs}
    assert len(distinct) == 8


def test_an_identity_model_is_unchanged_by_the_ensemble() -> None:
    x = photo(33, 40)
    out = SelfEnsembleModel(Identity(INFO, {}, CPU))(x)
    assert (out.image - x).abs().max().item() < 1e-6


def test_the_ensemble_averages_out_what_depends_on_orientation() -> None:
    x = photo(48, 48)
    out = SelfEnsembleModel(AddsAPattern(INFO, {}, CPU))(x)
    residual = out.image - 0.5 * x
    # averaged over the whole group, the added pattern is symmetric under every transform
    for t in TRANSFORMS_8:
        assert torch.allclose(forward_transform(residual, t), residual, atol=1e-6)
    assert torch.equal(out.metrics["pattern"], torch.tensor([48.0]))


def test_four_flips_average_over_flips_only() -> None:
    x = photo(40, 40)
    out = SelfEnsembleModel(AddsAPattern(INFO, {}, CPU), transforms=4)(x)
    residual = out.image - 0.5 * x
    for t in TRANSFORMS_4:
        assert torch.allclose(forward_transform(residual, t), residual, atol=1e-6)
    transpose = (1, True)  # a quarter turn then a flip = transpose: not in the flip group
    assert not torch.allclose(forward_transform(residual, transpose), residual, atol=1e-4)


def test_kernels_are_turned_back_before_averaging() -> None:
    x = photo(31, 31)
    inner = CentreKernel(INFO, {}, CPU)
    out = SelfEnsembleModel(inner)(x)
    assert out.kernels is not None
    assert torch.allclose(out.kernels, inner(x).kernels, atol=1e-6)
    assert torch.allclose(out.kernels.sum(dim=(-2, -1)), torch.ones(1))


def test_only_four_or_eight_transforms_exist() -> None:
    with pytest.raises(InvalidModelSpecError, match="got 3"):
        SelfEnsembleModel(Identity(INFO, {}, CPU), transforms=3)


def test_the_wrapper_is_a_typed_model_that_names_the_option() -> None:
    model = SelfEnsembleModel(Identity(INFO, {"a": 1}, CPU))
    assert isinstance(model, RestorationModel)
    assert "self_ensemble=8" in model.version and "a=1" in model.version


def test_a_model_can_default_to_the_self_ensemble_and_the_spec_turns_it_off() -> None:
    from models.catalog import REGISTRY
    from models.loading import load_model
    from models.tiling import TiledModel

    def unwrap(model: RestorationModel) -> RestorationModel:
        return model.inner if isinstance(model, TiledModel) else model

    assert REGISTRY.get("seed002-unet").param("self_ensemble").default is True  # type: ignore[union-attr]
    assert isinstance(unwrap(load_model(REGISTRY.parse("seed002-unet"), CPU)), SelfEnsembleModel)
    assert not isinstance(unwrap(load_model(REGISTRY.parse("seed002-unet:self_ensemble=false"), CPU)),
                          SelfEnsembleModel)
    # every other model keeps the common default: off
    assert not isinstance(unwrap(load_model(REGISTRY.parse("wiener"), CPU)), SelfEnsembleModel)


def test_a_models_option_defaults_must_name_inherited_options_with_the_right_type() -> None:
    from models.registry import Registry, common_param_names

    registry = Registry([replace(INFO, name="fine", option_defaults=(("tile", 256),))])
    assert registry.get("fine").param("tile").default == 256  # type: ignore[union-attr]
    assert "tile" in common_param_names(registry.get("fine"))
    with pytest.raises(ValueError, match=r"\['strength'\] are not common options"):
        Registry([replace(INFO, option_defaults=(("strength", 1.0),))])
    with pytest.raises(ValueError, match="default of 'self_ensemble' must be a bool"):
        Registry([replace(INFO, option_defaults=(("self_ensemble", "yes"),))])


def test_metrics_that_name_a_choice_or_a_flag_are_not_averaged() -> None:
    """Averaged over the transforms, l0-blind's kernel_candidate came out 1.5 (no candidate), and its fallback and
    blur flags as fractions that the review rule then compared with 0.5."""
    import torch

    from models.base import Restored
    from models.self_ensemble import SelfEnsembleModel

    class Flags:
        """A stand-in inner model whose flags differ between transforms (the identity is the first call)."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
            first = self.calls == 0
            self.calls += 1
            one = torch.ones(x.shape[0])
            return Restored(image=x.clone(), metrics={
                "kernel_candidate": one * (2.0 if first else 1.0), "kernel_refit": one * (1.0 if first else 0.0),
                "kernel_fallback": one * (1.0 if first else 0.0), "blur_detected": one * (1.0 if first else 0.0),
                "kernel_size": one * (10.0 if first else 2.0)})

    inner = Flags()
    model = SelfEnsembleModel.__new__(SelfEnsembleModel)
    model.inner, model.transforms = inner, ((0, False), (1, False), (2, True), (3, True))
    metrics = model.restore_batch(torch.rand(1, 3, 8, 8)).metrics
    assert {name: float(value[0]) for name, value in metrics.items()} == {
        "kernel_candidate": 2.0, "kernel_refit": 1.0,  # the identity's
        "kernel_fallback": 0.0,  # not every copy fell back: the average is not the input
        "blur_detected": 1.0,  # one copy found blur
        "kernel_size": 4.0}  # a measure: averaged
