"""Refiners: seed networks conditioned on a blind method's result, their cached training data and loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from jobs.errors import InputError
from models import shared_results
from models.archs.seed001 import Seed001Generator
from models.archs.seed002 import Seed002UNet
from models.catalog import REGISTRY
from models.learned import RefinerModel
from models.loading import load_model
from models.synthetic_blur import blur_image, random_motion_kernel, sample_photographs
from models.training.data import BlurSynthesizer, to_float_rgb
from models.training.prior import PriorPairs, build_cache, claim, load_cache, validation_triplets

torch.set_num_threads(1)

CHEAP_PRIOR = "wiener:psf=gaussian:sigma=1.0,nsr=0.02"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return to_float_rgb(sample_photographs()["astronaut"])[20:180, 150:310]


@pytest.mark.parametrize("net", [Seed001Generator(width=8, in_channels=6), Seed002UNet(width=4, in_channels=6)])
def test_refiner_networks_return_three_channels_and_the_prior_when_the_residual_is_zero(net: torch.nn.Module) -> None:
    out_conv = net.final_conv if isinstance(net, Seed001Generator) else net.out
    torch.nn.init.zeros_(out_conv.weight)
    torch.nn.init.zeros_(out_conv.bias)
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, 32, 32)
    assert torch.equal(y, x[:, 3:])  # the residual refines the prior, not the blurred image


def test_refiner_networks_refuse_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        Seed001Generator(in_channels=4)
    with pytest.raises(ValueError, match="in_channels"):
        Seed002UNet(in_channels=1)


def test_cache_builds_in_chunks_resumes_and_refuses_another_prior(tmp_path: Path, photo: np.ndarray) -> None:
    synth_photos = {"a": photo}
    count = build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=5, size=48, chunk_size=2, progress=False)
    assert count == 6  # three whole chunks
    assert sorted(p.name for p in tmp_path.glob("chunk-*.npz")) == [f"chunk-0000{i}.npz" for i in range(3)]
    first = load_cache(tmp_path)
    assert len(first) == 6 and all(t[0].shape == t[1].shape == t[2].shape == (48, 48, 3) for t in first)
    # the stored prior is the model's result on the stored blurred patch
    model = load_model(REGISTRY.parse(CHEAP_PRIOR), torch.device("cpu"))
    again = model(torch.from_numpy(first[0][0]).permute(2, 0, 1)[None]).image[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(first[0][1], again, atol=2e-3)  # float16 storage
    # an interrupted build resumes: only the missing chunk is made again, identically
    (tmp_path / "chunk-00001.npz").unlink()
    assert build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=5, size=48, chunk_size=2, progress=False) == 6
    for a, b in zip(first, load_cache(tmp_path), strict=True):
        np.testing.assert_array_equal(a[2], b[2])
    # a chunk another process has claimed is left to it
    (tmp_path / "chunk-00003.lock").touch()
    assert build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=8, size=48, chunk_size=2, progress=False) == 6
    with pytest.raises(InputError, match="made with"):
        build_cache(tmp_path, synth_photos, "wiener", patches=8, size=48, chunk_size=2, progress=False)
    with pytest.raises(InputError, match="64-pixel"):
        build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=8, size=64, chunk_size=2, progress=False)
    with pytest.raises(InputError, match=r"\(linear light 100%\)"):
        build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=8, size=48, chunk_size=2, progress=False,
                    synth=BlurSynthesizer(linear_prob=1.0))
    with pytest.raises(InputError, match=r"\(grey 30%\)"):
        build_cache(tmp_path, synth_photos, CHEAP_PRIOR, patches=8, size=48, chunk_size=2, progress=False,
                    synth=BlurSynthesizer(grey_prob=0.3))
    with pytest.raises(InputError, match="no complete chunks"):
        load_cache(tmp_path / "empty")


def test_a_cache_from_before_the_grey_share_is_read_by_its_light(tmp_path: Path, photo: np.ndarray) -> None:
    """Older chunks stored only the blur's light under the key 'light'; they stay usable for the same recipe."""
    synth = BlurSynthesizer(linear_prob=1.0)
    build_cache(tmp_path, {"a": photo}, CHEAP_PRIOR, patches=2, size=48, chunk_size=2, progress=False, synth=synth)
    chunk = tmp_path / "chunk-00000.npz"
    with np.load(chunk) as data:
        fields = {name: data[name] for name in data.files if name != "recipe"}
    np.savez(chunk, **fields, light=np.array("linear light 100%"))  # the layout before the grey share
    assert build_cache(tmp_path, {"a": photo}, CHEAP_PRIOR, patches=2, size=48, chunk_size=2, progress=False,
                       synth=synth) == 2
    with pytest.raises(InputError, match=r"\(linear light 100%\), not 48-pixel patches .*\(linear light 100%, grey"):
        build_cache(tmp_path, {"a": photo}, CHEAP_PRIOR, patches=2, size=48, chunk_size=2, progress=False,
                    synth=BlurSynthesizer(linear_prob=1.0, grey_prob=0.5))


def test_a_chunk_whose_claimant_died_is_claimed_again(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    host, dead_pid = socket.gethostname(), int(finished.stdout)
    lock = tmp_path / "chunk-00000.lock"
    lock.write_text(f"{host} {dead_pid}")  # a builder that was killed mid-chunk
    assert claim(lock)
    assert lock.read_text() == f"{host} {os.getpid()}"
    assert not claim(lock), "a lock held by a live process (this one) is respected"
    lock.write_text(f"elsewhere.invalid {dead_pid}")
    assert not claim(lock), "another host's process cannot be checked, so its claim stands"


def test_prior_pairs_crop_all_three_images_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(size=(40, 40, 3)).astype(np.float32)
    # blurred = base, prior = base + 1, sharp = base + 2: any crop/flip must keep the offsets
    source = PriorPairs([(base, base + 1, base + 2)])
    inputs, targets = source.batch(6, 24, rng)
    assert inputs.shape == (6, 24, 24, 6) and targets.shape == (6, 24, 24, 3)
    np.testing.assert_allclose(inputs[..., 3:] - inputs[..., :3], 1.0, atol=1e-6)
    np.testing.assert_allclose(targets - inputs[..., :3], 2.0, atol=1e-6)
    with pytest.raises(InputError, match="smaller"):
        source.batch(1, 48, rng)


def test_validation_triplets_are_cached(tmp_path: Path, photo: np.ndarray) -> None:
    pairs = [(photo[:48, :48], photo[:48, :48]), (photo[48:96, :48], photo[48:96, :48])]
    joint = validation_triplets(tmp_path, pairs, CHEAP_PRIOR)
    assert [j[0].shape for j in joint] == [(48, 48, 6)] * 2
    assert (tmp_path / "validation-2-48x48.npz").is_file()
    again = validation_triplets(tmp_path, pairs, CHEAP_PRIOR)
    np.testing.assert_array_equal(joint[1][0], again[1][0])
    # other crops (another light, other photographs) of the same size get their own prior, not the cached one
    brighter = [(np.clip(b * 1.2, 0, 1).astype(np.float32), s) for b, s in pairs]
    other = validation_triplets(tmp_path, brighter, CHEAP_PRIOR)
    model = load_model(REGISTRY.parse(CHEAP_PRIOR), torch.device("cpu"))
    expected = model(torch.from_numpy(brighter[0][0]).permute(2, 0, 1)[None]).image[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(other[0][0][..., 3:], expected, atol=2e-3)


def _refiner_file(path: Path, prior: str) -> Path:
    net = Seed001Generator(width=8, scale=2, in_channels=6)
    torch.nn.init.zeros_(net.final_conv.weight)
    torch.nn.init.zeros_(net.final_conv.bias)
    meta = {"arch": "seed001", "arch_kwargs": json.dumps({"width": 8, "scale": 2, "in_channels": 6}), "prior": prior}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def test_a_weights_file_with_a_prior_loads_as_a_refiner(tmp_path: Path, photo: np.ndarray) -> None:
    weights = _refiner_file(tmp_path / "refiner.safetensors", CHEAP_PRIOR)
    model = load_model(REGISTRY.parse(f"seed001-gan:weights={weights}"), torch.device("cpu"))
    assert isinstance(model, RefinerModel)
    assert CHEAP_PRIOR.split(":")[0] in model.version
    prior = load_model(REGISTRY.parse(CHEAP_PRIOR), torch.device("cpu"))
    colour = torch.from_numpy(photo[:45, :51]).permute(2, 0, 1)[None]  # odd sides: padded and cropped back
    out = model(colour)
    assert out.image.shape == colour.shape
    # zero residual: the refiner returns its prior's result
    torch.testing.assert_close(out.image, prior(colour).image, atol=1e-6, rtol=0)
    grey = colour.mean(dim=1, keepdim=True)
    assert model(grey).image.shape == grey.shape


def test_refiner_and_member_share_one_l0_blind_run(tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "l0-blind:candidates=1,polish=0,iterations=2"
    weights = _refiner_file(tmp_path / "refiner.safetensors", spec)
    shared_results.clear()
    member = load_model(REGISTRY.parse(spec), torch.device("cpu"))
    refiner = load_model(REGISTRY.parse(f"seed001-gan:weights={weights}"), torch.device("cpu"))
    calls: list[tuple[int, ...]] = []
    inner = member.inner  # type: ignore[attr-defined]
    original = type(inner).__call__

    def counting(self: object, x: torch.Tensor) -> object:
        calls.append(tuple(x.shape))
        return original(self, x)  # type: ignore[arg-type]

    monkeypatch.setattr(type(inner), "__call__", counting)
    sharp = photo[:64, :64].astype(np.float64)
    blurred = blur_image(sharp, random_motion_kernel(9, np.random.default_rng(1)), noise_sigma=0.005,
                         rng=np.random.default_rng(2))
    x = torch.from_numpy(blurred).permute(2, 0, 1)[None].float()
    alone = member(x)
    refined = refiner(x)
    assert len(calls) == 1  # the refiner's prior reused the member's result
    assert refined.kernels is not None and torch.equal(refined.kernels, alone.kernels)
    torch.testing.assert_close(refined.image, alone.image, atol=1e-6, rtol=0)
    member(x.flip(-1))
    assert len(calls) == 2  # another input is computed afresh
    shared_results.clear()


def test_cli_trains_a_refiner_on_a_cached_prior(tmp_path: Path, photo: np.ndarray) -> None:
    import cv2

    from models.train_cli import train_command

    sharp_dir = tmp_path / "sharp"
    sharp_dir.mkdir()
    for i in range(3):
        crop = photo[i * 20 : i * 20 + 120, :120]
        cv2.imwrite(str(sharp_dir / f"{i}.png"), cv2.cvtColor((crop * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    runner = CliRunner()
    args = ["seed001", "-o", str(tmp_path / "run"), "--sharp", str(sharp_dir), "--prior", CHEAP_PRIOR,
            "--prior-patches", "4", "--prior-size", "64", "--patch", "32", "--steps", "4", "--steps-per-epoch", "2",
            "--batch-size", "2", "--val-count", "2", "--val-size", "64", "--val-fraction", "0.34",
            "--arch-option", "width=8", "--no-adversarial", "--no-progress"]
    result = runner.invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert "refining" in result.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "best.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["prior"] == CHEAP_PRIOR and json.loads(meta["arch_kwargs"])["in_channels"] == 6
    assert "the prior" in (tmp_path / "run" / "train.log").read_text()
    too_big = runner.invoke(train_command, [*args[:2], str(tmp_path / "big"), *args[3:-2], "--patch", "96",
                                            "--no-progress"])
    assert too_big.exit_code != 0 and "--prior-size" in too_big.output
    # trained on blur in linear light, the refiner's prior runs there too, and its weights say so
    linear = [*args[:2], str(tmp_path / "linear"), *args[3:], "--light", "linear"]
    result = runner.invoke(train_command, linear)
    assert result.exit_code == 0, result.output
    assert "(linear light 100%)" in result.output
    with safe_open(str(tmp_path / "linear" / "best.safetensors"), framework="pt") as fh:
        recorded = REGISTRY.parse(fh.metadata()["prior"])
    assert recorded == REGISTRY.parse(CHEAP_PRIOR + ",light=linear")
    # a share of black-and-white scenes is said in the log and kept apart in the cache
    grey = [*args[:2], str(tmp_path / "grey"), *args[3:], "--grey-share", "0.5"]
    result = runner.invoke(train_command, grey)
    assert result.exit_code == 0, result.output
    assert "(grey 50%)" in result.output
    refused = runner.invoke(train_command, ["seed001", "-o", str(tmp_path / "refused"), "--pairs", str(sharp_dir),
                                            "--grey-share", "0.5", "--no-progress"])
    assert refused.exit_code != 0 and "--grey-share applies to synthetic blur only" in refused.output


def test_tiling_and_self_ensemble_wrap_the_network_not_the_prior(tmp_path: Path, photo: np.ndarray) -> None:
    weights = _refiner_file(tmp_path / "refiner.safetensors", CHEAP_PRIOR)
    prior = load_model(REGISTRY.parse(CHEAP_PRIOR), torch.device("cpu"))
    x = torch.from_numpy(photo[:100, :90]).permute(2, 0, 1)[None]
    expected = prior(x).image
    for options in ("tile=48,tile_overlap=8", "self_ensemble=true", "tile=48,tile_overlap=8,self_ensemble=true"):
        model = load_model(REGISTRY.parse(f"seed001-gan:weights={weights},{options}"), torch.device("cpu"))
        assert isinstance(model, RefinerModel), options
        # a prior run tile by tile would taper every tile's borders: the zero-residual result would differ
        torch.testing.assert_close(model(x).image, expected, atol=1e-5, rtol=0, msg=options)
        assert options.split(",")[0].split("=")[0] in model.version


def test_the_registered_refiner_refuses_weights_without_a_prior(tmp_path: Path) -> None:
    from jobs.errors import WeightsError

    net = Seed002UNet(width=4, in_channels=6)
    meta = {"arch": "seed002", "arch_kwargs": json.dumps({"width": 4, "in_channels": 6})}
    path = tmp_path / "no-prior.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(WeightsError, match="not a refiner"):
        load_model(REGISTRY.parse(f"seed002-refine:weights={path}"), torch.device("cpu"))


def test_the_shipped_refiner_records_l0_blind_and_returns_its_kernel(photo: np.ndarray) -> None:
    shared_results.clear()
    model = load_model(REGISTRY.parse("seed002-refine"), torch.device("cpu"))
    assert isinstance(model, RefinerModel) and model.prior.info.name == "l0-blind"
    sharp = photo[:96, :96].astype(np.float64)
    blurred = blur_image(sharp, random_motion_kernel(11, np.random.default_rng(3)), noise_sigma=0.005,
                         rng=np.random.default_rng(4))
    out = model(torch.from_numpy(blurred).permute(2, 0, 1)[None].float())
    assert out.kernels is not None and abs(float(out.kernels.sum()) - 1.0) < 1e-4
    assert {"kernel_size", "kernel_sparsity", "kernel_fallback"} <= set(out.metrics)  # l0-blind's diagnostics
    shared_results.clear()
