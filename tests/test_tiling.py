"""Tiles with raised-cosine blending: coverage, size rules, equality, bounded tile size."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from jobs.errors import InvalidModelSpecError
from models.base import Restored, RestorationModel
from models.catalog import REGISTRY
from models.loading import load_model
from models.registry import ModelInfo
from models.self_ensemble import SelfEnsembleModel
from models.tiling import TiledModel, apply_inference_options, blend_ramp, tile_starts

CPU = torch.device("cpu")


def info(size_multiple: int = 1, tile_size: int | None = None) -> ModelInfo:
    return ModelInfo(
        name="probe",
        family="classic",
        license="Apache-2.0",
        summary="test model",
        factory="tests:none",
        size_multiple=size_multiple,
        tile_size=tile_size,
    )


class PointwiseModel(RestorationModel):
    """Per-pixel colour curve: its tiled output must equal the whole-image output."""

    def restore_batch(self, x: torch.Tensor) -> Restored:
        mixed = 0.8 * x + 0.2 * x.mean(dim=1, keepdim=True)
        return Restored(mixed.clamp(0, 1) ** 0.8, metrics={"mean": x.mean(dim=(1, 2, 3))})


class BlurModel(RestorationModel):
    """A 3x3 box filter with zero padding: wrong within one pixel of every tile edge."""

    def __init__(self, inf: ModelInfo) -> None:
        super().__init__(inf, {}, CPU)
        self.seen: list[tuple[int, ...]] = []

    def restore_batch(self, x: torch.Tensor) -> Restored:
        self.seen.append(tuple(x.shape))
        weight = torch.full((x.shape[1], 1, 3, 3), 1 / 9)
        return Restored(F.conv2d(x, weight, padding=1, groups=x.shape[1]))


class TintModel(RestorationModel):
    """Adds a little red everywhere, as a network trained on colour may on neutral parts: pointwise, so tiling
    changes nothing."""

    def restore_batch(self, x: torch.Tensor) -> Restored:
        tinted = x.clone()
        tinted[:, 0] += 0.02
        return Restored(tinted)


def photo(h: int, w: int) -> torch.Tensor:
    image = np.asarray(data.astronaut(), dtype=np.float32)[:h, :w] / 255.0
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


def test_tile_starts_cover_the_image_with_the_overlap_and_end_aligned() -> None:
    for length, tile, overlap in [(300, 64, 16), (64, 64, 8), (65, 64, 8), (1000, 512, 32), (40, 64, 8)]:
        starts = tile_starts(length, tile, overlap)
        side = min(tile, length)
        assert starts[0] == 0 and starts[-1] + side == length
        assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + side] = True
        assert covered.all()


def test_blend_ramps_are_positive_smooth_and_full_on_the_border() -> None:
    ramp = blend_ramp(64, 16, rise=True, fall=True)
    assert (ramp > 0).all() and ramp.max() == 1.0
    assert torch.allclose(ramp, ramp.flip(0))
    assert (ramp[1:16] > ramp[:15]).all()  # rises monotonically across the overlap
    border = blend_ramp(64, 16, rise=False, fall=True)
    assert border[:48].eq(1).all()
    # two facing ramps sum to one across the overlap (raised-cosine partition of unity)
    assert torch.allclose(ramp[:16] + ramp[-16:], torch.ones(16))


def test_tiled_equals_whole_image_for_a_pointwise_model() -> None:
    inner = PointwiseModel(info(), {}, CPU)
    x = photo(200, 300)
    tiled = TiledModel(inner, tile=64, overlap=16)(x)
    whole = inner(x)
    assert (tiled.image - whole.image).abs().max().item() < 1e-6
    assert tiled.kernels is None
    assert torch.allclose(tiled.metrics["mean"], whole.metrics["mean"], atol=0.05)


def test_an_image_that_fits_in_one_tile_is_not_tiled() -> None:
    inner = BlurModel(info())
    x = photo(64, 60)
    out = TiledModel(inner, tile=64, overlap=16)(x)
    assert torch.equal(out.image, inner(x).image)
    assert inner.seen == [(1, 3, 64, 60), (1, 3, 64, 60)]


def test_tile_edges_are_blended_away_for_a_local_model() -> None:
    inner = BlurModel(info())
    x = photo(160, 224)
    whole = inner(x).image
    tiled = TiledModel(inner, tile=64, overlap=16)(x).image
    diff = (tiled - whole).abs()
    # zero-padded tile edges are wrong by up to ~1/3 of the signal, but they sit
    # where the raised-cosine weight is ~0, so the blend is off by far less
    assert diff.max().item() < 5e-3
    # away from the image border every pixel is interior to some tile's full-weight zone
    interior = diff[..., 1:-1, 1:-1]
    assert interior.mean().item() < 1e-4


def test_the_model_only_ever_sees_tiles_that_respect_its_size_rules() -> None:
    inner = BlurModel(info(size_multiple=16))
    x = photo(50, 300)
    TiledModel(inner, tile=70, overlap=8)(x)  # rounded down to 64
    assert inner.seen
    for shape in inner.seen:
        assert shape[-1] <= 64 and shape[-2] <= 64
        assert shape[-1] % 16 == 0 and shape[-2] % 16 == 0


def test_tiled_output_is_accumulated_on_the_cpu_and_shaped_like_the_input() -> None:
    inner = PointwiseModel(info(), {}, CPU)
    x = photo(130, 250).repeat(2, 1, 1, 1)
    out = TiledModel(inner, tile=64, overlap=8)(x)
    assert out.image.shape == x.shape and out.image.device.type == "cpu"
    assert out.metrics["mean"].shape == (2,)


def test_overlap_too_large_for_the_tile_is_refused_with_both_values() -> None:
    with pytest.raises(InvalidModelSpecError, match="tile_overlap=40.*tile=64"):
        TiledModel(PointwiseModel(info(), {}, CPU), tile=64, overlap=40)


def test_inference_options_wrap_as_requested() -> None:
    plain = PointwiseModel(info(tile_size=None), {}, CPU)
    assert apply_inference_options(plain, {"tile": 0, "tile_overlap": 32, "self_ensemble": False}) is plain
    with_default = PointwiseModel(info(tile_size=256), {}, CPU)
    tiled = apply_inference_options(with_default, {"tile": 0, "tile_overlap": 32, "self_ensemble": False})
    assert isinstance(tiled, TiledModel) and tiled.tile == 256
    assert apply_inference_options(with_default, {"tile": -1}) is with_default
    both = apply_inference_options(plain, {"tile": 128, "tile_overlap": 16, "self_ensemble": True})
    assert isinstance(both, TiledModel) and isinstance(both.inner, SelfEnsembleModel)
    assert isinstance(both, RestorationModel)


def test_every_registered_model_accepts_the_common_options() -> None:
    for entry in REGISTRY:
        names = {p.name for p in entry.params}
        assert {"tile", "tile_overlap", "self_ensemble"} <= names, entry.name


def test_load_model_strips_the_common_options_before_the_factory() -> None:
    model = load_model(REGISTRY.parse("wiener:tile=64,tile_overlap=8"), CPU)
    assert isinstance(model, TiledModel) and model.tile == 64
    assert "tile" in model.version
    x = photo(100, 150)
    assert model(x).image.shape == x.shape


def test_an_impossible_tile_overlap_is_refused_when_the_spec_is_parsed() -> None:
    with pytest.raises(InvalidModelSpecError, match="tile_overlap=32 must be less than half of tile=48"):
        REGISTRY.parse("wiener:tile=48")
    with pytest.raises(InvalidModelSpecError, match="tile_overlap=40"):
        REGISTRY.parse("wiener:tile_overlap=40,tile=64")
    assert REGISTRY.parse("wiener:tile=48,tile_overlap=8").param_dict["tile"] == 48
    assert REGISTRY.parse("wiener:tile_overlap=300").param_dict["tile_overlap"] == 300  # default tile: clamped


@pytest.mark.parametrize("self_ensemble", [False, True])
def test_an_image_grey_but_for_one_region_is_restored_alike_tiled_or_not(self_ensemble: bool) -> None:
    """Whether an image is grey is decided on the whole image: a tile that happens to be neutral keeps the model's
    colour (it used to be made grey, so the output depended on the tile grid); a grey image still comes back
    grey."""
    torch.manual_seed(3)
    x = 0.85 * torch.rand(1, 1, 64, 128).expand(1, 3, -1, -1).clone()  # nothing clamped
    x[:, 0, :, 96:] += 0.1  # colour only in the right quarter
    inner: RestorationModel = TintModel(info(), {}, CPU)
    if self_ensemble:
        inner = SelfEnsembleModel(inner, transforms=4)
    whole = inner(x).image
    tiled = TiledModel(inner, tile=32, overlap=4)(x).image
    assert (tiled - whole).abs().max().item() < 1e-5
    assert (tiled[0, 0, :, :64] - tiled[0, 1, :, :64]).mean().item() == pytest.approx(0.02, abs=1e-5)
    grey = x[:, 1:2].expand(1, 3, -1, -1)
    out = TiledModel(inner, tile=32, overlap=4)(grey).image
    assert (out.amax(dim=1) - out.amin(dim=1)).max().item() == 0.0
    assert (out - inner(grey).image).abs().max().item() < 1e-5


class _FakeCuda:
    """Two GPUs for :meth:`RestorationModel.autocast_dtype`: 0 emulates bfloat16 (pre-Ampere), 1 has it natively;
    the current device is 1."""

    def __init__(self) -> None:
        self.current = 1
        self.calls: list[tuple[int, bool]] = []

    def device(self, device: torch.device):  # type: ignore[no-untyped-def]
        fake = self

        class _Select:
            def __enter__(self) -> None:
                self.previous, fake.current = fake.current, device.index if device.index is not None else fake.current

            def __exit__(self, *exc: object) -> None:
                fake.current = self.previous

        return _Select()

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.calls.append((self.current, including_emulation))
        return self.current == 1 or including_emulation


def test_bfloat16_only_where_the_models_own_gpu_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's check counts emulated bfloat16 (slower than float32 on pre-Ampere GPUs) and looks at the current
    device, not the model's."""
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake.is_bf16_supported)
    both = replace(info(), dtypes=("float32", "bfloat16", "float16"))
    assert PointwiseModel(both, {}, torch.device("cuda:0")).autocast_dtype() == torch.float16
    assert PointwiseModel(both, {}, torch.device("cuda:1")).autocast_dtype() == torch.bfloat16
    assert fake.calls == [(0, False), (1, False)] and fake.current == 1
    only_bf16 = replace(info(), dtypes=("float32", "bfloat16"))
    assert PointwiseModel(only_bf16, {}, torch.device("cuda:0")).autocast_dtype() is None
    assert PointwiseModel(both, {}, CPU).autocast_dtype() is None
