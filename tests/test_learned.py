"""The learned seed models behind the RestorationModel interface, and their shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.errors import WeightsError
from models import base
from models.archs import build_network
from models.catalog import LEARNED_SEED, REGISTRY
from models.learned import SHIPPED_DIR, load_network
from models.loading import load_model
from models.synthetic_blur import (
    blur_image,
    disk_kernel,
    random_motion_kernel,
    sample_photographs,
)
from models.training.loop import export_weights
from models.weights_store import sha256_of

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _tiny_weights(tmp_path: Path, arch: str, kwargs: dict[str, object]) -> Path:
    torch.manual_seed(0)
    net = build_network(arch, **kwargs)
    path = tmp_path / f"{arch}.safetensors"
    export_weights(net, path, arch, kwargs, {"step": 0})
    return path


@pytest.mark.parametrize(
    ("name", "arch", "kwargs"),
    [
        ("seed001-gan", "seed001", {"width": 8, "scale": 2}),
        ("seed002-unet", "seed002", {"width": 4}),
        ("seed003-vit", "seed003", {"hidden_dim": 32, "layers": 1, "heads": 1}),
    ],
)
def test_any_size_and_grey_inputs_through_the_wrapper(tmp_path: Path, name: str, arch: str, kwargs: dict[str, object]) -> None:
    path = _tiny_weights(tmp_path, arch, kwargs)
    model = load_model(REGISTRY.parse(f"{name}:weights={path}"), CPU)
    for shape in [(1, 3, 37, 53), (2, 1, 20, 17)]:
        out = model(torch.rand(*shape))
        assert out.image.shape == shape
        assert 0 <= float(out.image.min()) and float(out.image.max()) <= 1
        assert out.kernels is None


def _grey_and_tinted(sharp: np.ndarray, radius: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A defocused grey crop stored as RGB (1, 3, H, W), and a copy with one pixel two 8-bit levels off neutral:
    a colour image."""
    grey = torch.from_numpy(blur_image(sharp, disk_kernel(radius), noise_sigma=0.005,
                                       rng=np.random.default_rng(seed))).float().expand(1, 3, -1, -1).clone()
    tinted = grey.clone()
    tinted[0, 0, 5, 5] += 2 / 255 if float(tinted[0, 0, 5, 5]) < 0.9 else -2 / 255
    return grey, tinted


def spread(image: torch.Tensor) -> float:
    """The largest difference between an image's channels at any pixel (0: grey)."""
    return float((image.amax(dim=1) - image.amin(dim=1)).max())


def test_a_grey_photograph_stored_as_rgb_comes_back_grey(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped network, trained mostly on colour, tints a grey input; the wrapper must not let that colour a
    black-and-white scan."""
    model = load_model(REGISTRY.parse("seed002-unet:self_ensemble=false"), CPU)
    grey, tinted = _grey_and_tinted(sample_photographs()["camera"][100:196, 200:296] / 255.0, 2.0, seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(base, "keep_grey", lambda x, image: image)
        raw = model(grey).image  # what the network alone makes of it
    assert spread(raw) > 0.01
    out = model(grey).image
    assert spread(out) == 0.0
    # the channels' mean (the network's raw channels were clamped one by one, the mean after: tiny differences)
    assert float((out[:, 0] - raw.mean(dim=1)).abs().mean()) < 1e-4
    assert spread(model(tinted).image) > 0.01  # left as the network made it
    both = model(torch.cat([grey, tinted])).image  # in one batch, only the grey one is made grey
    assert spread(both[:1]) == 0.0 and spread(both[1:]) > 0.01


@pytest.mark.parametrize("name", ["seed001-refine", "seed002-refine"])
def test_a_refiner_returns_a_grey_photograph_stored_as_rgb_grey(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A refiner's network sees 6 channels ([image, prior result]), so the base class's grey step never ran on
    it: up to 15 levels of 255 of colour on a black-and-white scan, also in the default ensemble."""
    model = load_model(REGISTRY.parse(f"{name}:self_ensemble=false"), CPU)
    grey, tinted = _grey_and_tinted(sample_photographs()["camera"][200:264, 200:264] / 255.0, 1.5, seed=2)
    with monkeypatch.context() as patch:
        patch.setattr(base, "keep_grey", lambda x, image: image)
        raw = model(grey).image  # what the refiner alone makes of it
    assert spread(raw) > 0.01
    out = model(grey).image
    assert out.shape == grey.shape and spread(out) == 0.0
    assert float((out[:, 0] - raw.mean(dim=1)).abs().max()) < 1e-6  # the channels' mean, nothing else changed
    both = model(torch.cat([grey, tinted])).image  # only the grey one is made grey
    assert spread(both[:1]) == 0.0 and spread(both[1:]) > 0.01
    single = model(grey[:, :1]).image  # a one-channel photograph stays one channel
    assert single.shape == (1, 1, 64, 64)


def test_weights_errors_name_the_problem(tmp_path: Path) -> None:
    path = _tiny_weights(tmp_path, "seed002", {"width": 4})
    with pytest.raises(WeightsError, match="holds a 'seed002' network, not 'seed001'"):
        load_model(REGISTRY.parse(f"seed001-gan:weights={path}"), CPU)
    with pytest.raises(WeightsError, match="expected 0000"):
        load_network(path, "seed002", check_sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(REGISTRY.parse(f"seed002-unet:weights={tmp_path / 'nope.safetensors'}"), CPU)
    pickle = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(WeightsError, match="cannot read"):
        load_network(pickle)
    with pytest.raises(WeightsError, match="deblur train seed003-vit"):
        load_model(REGISTRY.parse("seed003-vit"), CPU)


SHIPPED = [info for info in LEARNED_SEED if info.weights is not None and info.weights.shipped]


@pytest.mark.parametrize("info", SHIPPED, ids=[i.name for i in SHIPPED])
def test_shipped_weights_are_present_small_and_registered(info) -> None:  # type: ignore[no-untyped-def]
    path = SHIPPED_DIR / info.weights.filename
    assert path.is_file(), f"{info.name}: shipped weights {path.name} missing"
    assert path.stat().st_size < 10 * 1024 * 1024
    assert info.weights.sha256 == sha256_of(path)
    assert info.family == "learned-seed" and info.license == "Apache-2.0"
    # the version recorded with every image names the weights, wrapped (tiled, self-ensembled) or not
    for options in ("", ":tile=-1,self_ensemble=true"):
        version = load_model(REGISTRY.parse(info.name + options), torch.device("cpu")).version
        assert version.split("<")[0].endswith("#" + info.weights.sha256[:12])


def _held_out_blurs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Motion and defocus blur of crops of the held-out validation photographs (chelsea, coffee)."""
    photos = sample_photographs()
    rng = np.random.default_rng(7)
    cases = []
    for name, (y, x) in (("chelsea", (60, 120)), ("coffee", (100, 200))):
        sharp = photos[name][y : y + 128, x : x + 128].astype(np.float64) / 255
        for kernel in (random_motion_kernel(13, rng), disk_kernel(3.0)):
            cases.append((blur_image(sharp, kernel, noise_sigma=0.005, rng=rng), sharp))
    return cases


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("info", SHIPPED, ids=[i.name for i in SHIPPED])
def test_shipped_weights_improve_blurred_held_out_photos(info) -> None:  # type: ignore[no-untyped-def]
    model = load_model(REGISTRY.parse(info.name), CPU)
    gains = []
    for blurred, sharp in _held_out_blurs():
        x = torch.from_numpy(blurred).permute(2, 0, 1)[None].float()
        out = model(x).image[0].permute(1, 2, 0).double().numpy()
        gains.append(_psnr(out, sharp) - _psnr(blurred, sharp))
    assert np.mean(gains) > 0.5, gains


def test_a_named_refiner_loads_only_weights_that_refine_its_model(tmp_path: Path) -> None:
    """seed002-refine given a file re-saved with another prior ran that prior: the network corrects one model's
    results, and only that model's. (A plain architecture given a file with a prior still loads as a refiner of
    it, by design.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from jobs.errors import WeightsError

    shipped = Path(__file__).resolve().parents[1] / "models" / "weights" / "seed002-refine.safetensors"
    with safe_open(str(shipped), framework="pt") as fh:
        meta = dict(fh.metadata())
    other = tmp_path / "wiener-refiner.safetensors"
    save_file(load_file(str(shipped)), str(other), metadata={**meta, "prior": "wiener:psf=gaussian:sigma=3"})
    with pytest.raises(WeightsError, match="refines wiener, but 'seed002-refine' refines l0-blind"):
        load_model(REGISTRY.parse(f"seed002-refine:weights={other}"), CPU)


def test_a_faint_tone_of_a_16_bit_scan_is_colour_while_8_bit_rounding_is_grey() -> None:
    """A 16-bit scan whose red and blue differ from green by 120 of 65,535 levels was taken for grey (within one
    8-bit level) and flattened; a grey JPEG's YCbCr rounding (one 8-bit level) and a 12-bit image's (one 12-bit
    level) still count as grey."""
    rng = np.random.default_rng(3)
    green = torch.from_numpy(rng.integers(2000, 60000, (1, 1, 16, 16))).float()
    toned = torch.cat([green + 120, green, green - 120], dim=1) / 65535.0
    exact = green.expand(1, 3, 16, 16) / 65535.0
    levels = torch.from_numpy(rng.integers(1, 254, (1, 1, 16, 16))).float()
    rounded = torch.cat([levels + 1, levels, levels], dim=1) / 255.0
    fine = torch.cat([green + 16, green, green], dim=1) / 65535.0  # a 12-bit level of rounding: still grey
    assert base.grey_images(torch.cat([toned, exact, rounded, fine])).tolist() == [False, True, True, True]
