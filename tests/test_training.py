"""Training data, losses and the loop: determinism, loss going down, checkpoints and resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jobs.errors import InputError
from models.synthetic_blur import other_photographs, sample_photographs, unseen_photographs
from models.training.data import (
    BlurSynthesizer,
    PairedImages,
    SyntheticPairs,
    package_photographs,
    pairs_from_folder,
    split_photographs,
    synthetic_validation_set,
    to_float_rgb,
)
from models.training.loop import TrainConfig, train
from models.training.losses import (
    Seed001Loss,
    Seed002Loss,
    fourier_loss,
    psnr,
    sobel_loss,
    ssim,
)

torch.set_num_threads(1)

SMALL_BLUR = BlurSynthesizer(motion_size=(5, 9), defocus_radius=(1.0, 2.5), gaussian_sigma=(0.6, 1.2))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 96x128 crop of a real photograph, float RGB."""
    return to_float_rgb(sample_photographs()["astronaut"])[40:136, 180:308]


def test_synthesizer_kernels_are_normalised_and_blur_shrinks_by_the_margin(photo: np.ndarray) -> None:
    synth = BlurSynthesizer()
    rng = np.random.default_rng(0)
    for _ in range(10):
        k = synth.sample_kernel(rng)
        assert k.shape[0] % 2 == 1 and k.shape[0] <= synth.max_kernel
        assert abs(k.sum() - 1) < 1e-9 and (k >= 0).all()
    k = synth.sample_kernel(rng)
    out = synth.degrade(photo, k, rng)
    assert out.shape == (photo.shape[0] - k.shape[0] + 1, photo.shape[1] - k.shape[1] + 1, 3)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


def test_synthesizer_blurs_in_linear_light_when_asked(photo: np.ndarray) -> None:
    kernel = np.zeros((9, 9))
    kernel[4, :] = 1 / 9  # a horizontal streak
    quiet = {"noise_prob": 0.0, "jpeg_prob": 0.0}
    stored = BlurSynthesizer(**quiet).degrade(photo, kernel, np.random.default_rng(0))
    linear = BlurSynthesizer(linear_prob=1.0, **quiet).degrade(photo, kernel, np.random.default_rng(0))
    assert linear.shape == stored.shape and linear.dtype == np.float32
    # averaging light then encoding is brighter than averaging the encoded values (the curve is concave)
    assert (linear >= stored - 1e-5).all() and float((linear - stored).mean()) > 0.005
    assert BlurSynthesizer(linear_prob=1.0).light == "linear light 100%" and BlurSynthesizer().light == ""
    with pytest.raises(ValueError, match="linear_prob"):
        BlurSynthesizer(linear_prob=1.5)


def test_synthetic_pairs_are_blurred_aligned_and_reproducible(photo: np.ndarray) -> None:
    source = SyntheticPairs([photo], SMALL_BLUR, kernel_bank=4)
    b1, s1 = source.batch(3, 32, np.random.default_rng(5))
    source2 = SyntheticPairs([photo], SMALL_BLUR, kernel_bank=4)
    b2, s2 = source2.batch(3, 32, np.random.default_rng(5))
    assert b1.shape == s1.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    # blurred patches are close to, but not, their sharp targets (aligned, not shifted)
    gain = psnr(torch.from_numpy(b1).permute(0, 3, 1, 2), torch.from_numpy(s1).permute(0, 3, 1, 2))
    assert (gain > 15).all() and torch.isfinite(gain).all()


def test_a_grey_share_makes_that_share_of_scenes_black_and_white_and_nothing_else(photo: np.ndarray) -> None:
    quiet = {"noise_prob": 0.0, "jpeg_prob": 0.0}

    def spreads(synth: BlurSynthesizer, count: int = 60) -> tuple[np.ndarray, np.ndarray]:
        blurred, sharp = SyntheticPairs([photo], synth, kernel_bank=0).batch(count, 24, np.random.default_rng(3))
        return np.ptp(blurred, axis=3).max(axis=(1, 2)), np.ptp(sharp, axis=3).max(axis=(1, 2))

    blurred, sharp = spreads(BlurSynthesizer(grey_prob=1.0, **quiet))
    assert (sharp == 0).all() and (blurred < 1e-6).all()  # target and input alike, luminance in every channel
    grey = np.ones((2, 2, 3)) * np.array([0.2, 0.5, 0.9])
    assert np.allclose(BlurSynthesizer(grey_prob=1.0).scene(grey, np.random.default_rng(0)),
                       0.299 * 0.2 + 0.587 * 0.5 + 0.114 * 0.9)
    _, sharp = spreads(BlurSynthesizer(grey_prob=0.3, **quiet), count=200)
    assert 0.2 < float((sharp == 0).mean()) < 0.4
    # no share, no extra random draw: the default stream, and so every earlier run, is unchanged
    a = SyntheticPairs([photo], BlurSynthesizer(), kernel_bank=0).batch(4, 24, np.random.default_rng(9))
    b = SyntheticPairs([photo], BlurSynthesizer(grey_prob=0.0), kernel_bank=0).batch(4, 24, np.random.default_rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    assert BlurSynthesizer(grey_prob=0.3, linear_prob=0.5).recipe == "linear light 50%, grey 30%"
    assert BlurSynthesizer().recipe == ""
    with pytest.raises(ValueError, match="grey_prob"):
        BlurSynthesizer(grey_prob=-0.1)


def test_package_photographs_split_keeps_validation_out() -> None:
    photos = package_photographs()
    train_imgs, val_imgs = split_photographs(photos)
    assert {"chelsea", "coffee"} <= set(val_imgs)
    assert not set(train_imgs) & set(val_imgs)
    assert len(train_imgs) >= 10
    assert all(img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32 for img in photos.values())


def test_other_photographs_are_new_to_the_blind_benchmark_but_not_to_training() -> None:
    others = other_photographs()
    assert len(others) == 4
    assert all(img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 for img in others.values())
    assert not set(others) & set(sample_photographs())  # the blind method was tuned on those
    training = package_photographs()  # the learned models were trained on these: they include the others' pictures
    for name, img in others.items():
        assert any(t.shape == img.shape and np.allclose(t, img / 255.0, atol=1e-6) for t in training.values()), name


def test_unseen_photographs_are_in_neither_training_nor_tuning_sets() -> None:
    unseen = unseen_photographs()
    assert set(unseen) == {"ascent", "aero"}  # PyWavelets is in the test extra
    assert all(img.shape == (512, 512, 3) and img.dtype == np.uint8 for img in unseen.values())
    known = [img / 255.0 for img in sample_photographs().values()] + list(package_photographs().values())
    for name, img in unseen.items():
        grey = img[..., 0] / 255.0
        for other in known:
            other_grey = other if other.ndim == 2 else other[..., 0]
            assert not (other_grey.shape == grey.shape and np.allclose(other_grey, grey, atol=1e-3)), name


def test_losses_are_zero_on_identical_images_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert torch.isinf(psnr(x, x)).all()
    for fn in (sobel_loss, fourier_loss):
        assert float(fn(x, x)) == pytest.approx(0.0, abs=1e-6)
        assert float(fn(x, y)) > 0
    assert float(Seed002Loss()(x, y)["total"]) > float(Seed002Loss()(x, x)["total"])
    terms = Seed001Loss()(x, y, torch.zeros(2, 1, 3, 3))
    assert set(terms) == {"mse", "ssim", "adv", "total"}
    assert float(terms["adv"]) == pytest.approx(np.log(2), rel=1e-5)


def _config(tmp_path: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        arch="seed002", output_dir=tmp_path, arch_kwargs={"width": 4}, steps=30, steps_per_epoch=10,
        batch_size=4, patch=32, optimizer="adam", lr=3e-3, schedule="constant", seed=3, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _data(photo: np.ndarray) -> tuple[SyntheticPairs, list[tuple[np.ndarray, np.ndarray]]]:
    return (
        SyntheticPairs([photo], SMALL_BLUR, kernel_bank=8),
        synthetic_validation_set([photo], count=2, size=48, synth=SMALL_BLUR),
    )


def test_short_training_lowers_the_loss_and_is_deterministic(tmp_path: Path, photo: np.ndarray) -> None:
    source, val = _data(photo)
    reports = train(_config(tmp_path / "a"), source, val)
    assert [r.step for r in reports] == [10, 20, 30]
    assert reports[-1].train_loss < reports[0].train_loss
    source, val = _data(photo)
    again = train(_config(tmp_path / "b"), source, val)
    assert [r.train_loss for r in again] == [r.train_loss for r in reports]
    assert [r.val_psnr for r in again] == [r.val_psnr for r in reports]
    log = (tmp_path / "a" / "train.log").read_text()
    assert "epoch 3 step 30" in log and "val PSNR" in log
    assert (tmp_path / "a" / "best.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "last.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["step"] == "30" and meta["arch"] == "seed002"
    assert float(meta["val_psnr"]) == pytest.approx(reports[-1].val_psnr, abs=1e-4)


def test_resume_continues_exactly(tmp_path: Path, photo: np.ndarray) -> None:
    source, val = _data(photo)
    straight = train(_config(tmp_path / "straight", steps=20), source, val)
    source, val = _data(photo)
    train(_config(tmp_path / "split", steps=10), source, val)
    source, val = _data(photo)  # a fresh process: the bank comes back from the checkpoint
    resumed = train(_config(tmp_path / "split", steps=20, resume=True), source, val)
    assert [r.step for r in resumed] == [20]
    assert resumed[-1].train_loss == straight[-1].train_loss
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gan_training_checkpoints_the_discriminator(tmp_path: Path, photo: np.ndarray) -> None:
    source, val = _data(photo)
    cfg = _config(tmp_path, arch="seed001", arch_kwargs={"width": 8}, steps=4, steps_per_epoch=2, patch=64,
                  batch_size=2, adversarial=True, disc_width=8, adv_start=2)
    reports = train(cfg, source, val)
    assert len(reports) == 2 and all(np.isfinite(r.val_psnr) for r in reports)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "disc" in ckpt and ckpt["arch"] == "seed001"
    assert json.loads(ckpt["arch_kwargs"]) == {"width": 8}


def test_config_names_bad_values(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="seed042"):
        TrainConfig(arch="seed042", output_dir=tmp_path)
    with pytest.raises(InputError, match="lion"):
        TrainConfig(arch="seed002", output_dir=tmp_path, optimizer="lion")
    with pytest.raises(InputError, match="64"):
        TrainConfig(arch="seed001", output_dir=tmp_path, patch=32)
    defaults = TrainConfig(arch="seed001", output_dir=tmp_path)
    assert (defaults.optimizer, defaults.lr, defaults.weight_decay, defaults.schedule) == ("adam", 5e-4, 5e-4, "plateau")
    assert TrainConfig(arch="seed002", output_dir=tmp_path).optimizer == "rmsprop"


def _write_gopro(root: Path, photo: np.ndarray, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        for kind in ("blur", "sharp"):
            (root / "scene1" / kind).mkdir(parents=True, exist_ok=True)
        sharp = photo
        blurred = np.clip(cv2.GaussianBlur(sharp, (5, 5), 1.5) + rng.normal(0, 0.01, sharp.shape), 0, 1)
        for kind, img in (("blur", blurred), ("sharp", sharp)):
            bgr = cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / "scene1" / kind / f"{i:06d}.png"), bgr)
    (root / "scene1" / "blur" / "extra.png").write_bytes((root / "scene1" / "blur" / "000000.png").read_bytes())


def test_gopro_folder_pairs(tmp_path: Path, photo: np.ndarray) -> None:
    _write_gopro(tmp_path, photo)
    pairs = pairs_from_folder(tmp_path)
    assert len(pairs) == 3  # extra.png has no sharp partner
    batch_b, batch_s = PairedImages(pairs).batch(2, 32, np.random.default_rng(0))
    assert batch_b.shape == batch_s.shape == (2, 32, 32, 3)
    with pytest.raises(InputError, match="GoPro layout"):
        pairs_from_folder(tmp_path / "scene1" / "blur")


def test_cli_help_and_environment_variables(tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.train_cli import train_command

    runner = CliRunner()
    help_text = runner.invoke(train_command, ["--help"]).output
    assert "GoPro layout" in help_text and "--resume" in help_text and "--max-minutes" in help_text
    _write_gopro(tmp_path / "data", photo, n=4)
    monkeypatch.setenv("DEBLUR_TRAIN_STEPS", "3")
    monkeypatch.setenv("DEBLUR_TRAIN_PATCH", "32")
    result = runner.invoke(
        train_command,
        ["seed002", "-o", str(tmp_path / "run"), "--pairs", str(tmp_path / "data"), "--steps-per-epoch", "3",
         "--arch-option", "width=4", "--batch-size", "2", "--val-size", "64", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "step 3: validation PSNR" in result.output
    assert (tmp_path / "run" / "best.safetensors").is_file()
    bad = runner.invoke(train_command, ["seed002", "-o", str(tmp_path / "x"), "--blurred-prefix", "s3://b/blur/"])
    assert bad.exit_code != 0 and "--sharp-prefix" in bad.output
    real = runner.invoke(train_command, ["seed002", "-o", str(tmp_path / "y"), "--pairs", str(tmp_path / "data"),
                                         "--light", "linear"])
    assert real.exit_code != 0 and "--light applies to synthetic blur only" in real.output


def test_seed003_trains_and_exports(tmp_path: Path, photo: np.ndarray) -> None:
    source, val = _data(photo)
    cfg = _config(tmp_path, arch="seed003", arch_kwargs={"hidden_dim": 32, "layers": 1, "heads": 2}, steps=2,
                  steps_per_epoch=2, optimizer=None, lr=None, schedule=None)
    assert (cfg.optimizer, cfg.loss) == ("adam", "l1")
    reports = train(cfg, source, val)
    assert len(reports) == 1 and np.isfinite(reports[0].train_loss)
    from models.learned import load_network

    net, meta = load_network(tmp_path / "best.safetensors", "seed003")
    assert meta["step"] == "2" and net.vit.hidden_dim == 32


def test_log_balance_averages_each_terms_logarithm() -> None:
    torch.manual_seed(1)
    sharp = torch.rand(3, 3, 24, 24)
    restored = (sharp + torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1) * torch.randn_like(sharp)).clamp(0, 1)
    mse = (restored - sharp).pow(2).flatten(1).mean(1)
    dssim = 1 - ssim(restored, sharp)
    got = Seed001Loss(balance="log")(restored, sharp)["total"]
    assert torch.allclose(got, torch.log(mse + 1e-8).mean() + 0.3 * torch.log(dssim + 1e-8).mean())
    # a plain mean is dominated by the worst image; the log mean is not
    plain = Seed002Loss()(restored, sharp)["total"]
    assert float(plain) == pytest.approx(float(Seed002Loss()(restored, sharp)["mae"] + 0.5 * sobel_loss(restored, sharp)
                                               + 0.5 * fourier_loss(restored, sharp)), rel=1e-5)
    with pytest.raises(ValueError, match="balance"):
        Seed002Loss(balance="median")(restored, sharp)


def test_init_weights_start_from_a_file(tmp_path: Path, photo: np.ndarray) -> None:
    source, val = _data(photo)
    train(_config(tmp_path / "first", steps=10), source, val)
    weights = tmp_path / "first" / "best.safetensors"
    source, val = _data(photo)
    reports = train(_config(tmp_path / "tuned", steps=1, steps_per_epoch=1, init=weights, lr=1e-9), source, val)
    first = train(_config(tmp_path / "again", steps=1, steps_per_epoch=1, lr=1e-9), *_data(photo))
    # with a negligible learning rate the fine-tuned net is the initial one, not a fresh one
    assert reports[0].val_psnr != first[0].val_psnr
    with pytest.raises(InputError, match="not 'seed001'"):
        train(_config(tmp_path / "bad", arch="seed001", arch_kwargs={"width": 8}, patch=64, init=weights,
                      adversarial=False), *_data(photo))


def test_pairs_from_s3_prefixes(s3_endpoint: str, photo: np.ndarray) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="train-pairs")
    ok, png = cv2.imencode(".png", (photo[..., ::-1] * 255).astype(np.uint8))
    assert ok
    for key in ("blur/a/1.png", "sharp/a/1.png", "blur/a/2.png", "sharp/a/2.png", "blur/only.png", "blur/notes.txt"):
        client.put_object(Bucket="train-pairs", Key=key, Body=png.tobytes())
    from models.training.data import pairs_from_s3

    pairs = pairs_from_s3("s3://train-pairs/blur/", "s3://train-pairs/sharp/", client=client)
    assert len(pairs) == 2
    assert pairs[0][0].shape == photo.shape
    with pytest.raises(InputError, match="no pairs"):
        pairs_from_s3("s3://train-pairs/sharp/a/", "s3://train-pairs/blur/x/", client=client)


# --- runs are not lost: refusal to overwrite, interruption, atomic copies -------------------------------------------

def test_a_new_run_into_a_folder_holding_one_is_refused(tmp_path: Path, photo: np.ndarray) -> None:
    from models.train_cli import train_command

    run, export = tmp_path / "run", tmp_path / "deploy" / "model.safetensors"
    train(_config(run, steps=10, export=export), *_data(photo))
    kept = {p: p.read_bytes() for p in (run / "best.safetensors", run / "last.pt", run / "last.safetensors", export)}
    with pytest.raises(InputError, match="holds a run at step 10; pass --resume to go on, or choose another --output"):
        train(_config(run, steps=20, export=export), *_data(photo))
    # the CLI refuses before loading any data, with the exit code of its other input errors
    result = CliRunner().invoke(train_command, ["seed002", "-o", str(run), "--steps", "20", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert f"{run} holds a run at step 10; pass --resume to go on, or choose another --output" in result.output
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert [r.step for r in train(_config(run, steps=20, resume=True), *_data(photo))] == [20]  # resuming is fine


def _signal_from_a_thread(signum: int) -> None:
    """Send this process ``signum`` from another thread (the main thread's handler runs once it is back)."""
    import os
    import threading

    sender = threading.Thread(target=os.kill, args=(os.getpid(), signum))
    sender.start()
    sender.join()


class _SignalAtBatch:
    """A pair source that has ``signum`` sent to this process while drawing its ``at``-th batch (mid-step)."""

    def __init__(self, inner: SyntheticPairs, at: int, signum: int) -> None:
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def batch(self, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls == self.at:
            _signal_from_a_thread(self.signum)
        return self.inner.batch(size, patch, rng)

    def state_dict(self) -> dict[str, object]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.load_state_dict(state)


def test_ctrl_c_mid_epoch_saves_that_step_and_the_resume_matches_an_unbroken_run(
    tmp_path: Path, photo: np.ndarray
) -> None:
    import signal

    from models.training.loop import TrainingInterrupted

    cfg = {"steps": 20, "schedule": "cosine"}  # a per-step schedule, restored exactly too
    straight = train(_config(tmp_path / "straight", **cfg), *_data(photo))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    source, val = _data(photo)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(tmp_path / "split", **cfg), _SignalAtBatch(source, 7, signal.SIGINT), val)
    assert (stopped.value.step, stopped.value.exit_code) == (7, 130)
    assert stopped.value.checkpoint == tmp_path / "split" / "last.pt"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["running_count"]) == (7, 0, 7)  # no epoch counted, no validation
    assert "stopped by SIGINT at step 7" in (tmp_path / "split" / "train.log").read_text()
    resumed = train(_config(tmp_path / "split", resume=True, **cfg), *_data(photo))
    assert [r.step for r in resumed] == [10, 20]
    assert [(r.train_loss, r.val_psnr, r.lr) for r in resumed] == [(r.train_loss, r.val_psnr, r.lr) for r in straight]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigterm_stops_the_cli_with_exit_143_and_says_how_to_resume(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from models.train_cli import train_command

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    for name, img in (("a.png", photo), ("b.png", photo[:, ::-1])):
        cv2.imwrite(str(sharp / name), cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    real_batch = SyntheticPairs.batch
    calls: list[int] = []

    def batch(self: SyntheticPairs, *args: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            _signal_from_a_thread(signal.SIGTERM)
        return real_batch(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SyntheticPairs, "batch", batch)
    run = tmp_path / "run"
    args = ["seed002", "-o", str(run), "--sharp", str(sharp), "--steps-per-epoch", "4", "--patch", "32",
            "--batch-size", "2", "--arch-option", "width=4", "--val-count", "1", "--val-size", "32", "--no-progress"]
    stopped = CliRunner().invoke(train_command, [*args, "--steps", "1000"])
    assert stopped.exit_code == 143, stopped.output
    assert (f"stopped at step 3: checkpoint saved to {run / 'last.pt'}; to go on from there, run the same command "
            "with --resume") in " ".join(stopped.output.split())
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["running_count"]) == (3, 0, 3)
    assert not (run / "best.safetensors").exists()  # nothing validated yet
    resumed = CliRunner().invoke(train_command, [*args, "--steps", "5", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "step 5: validation PSNR" in resumed.output
    assert "resumed from" in (run / "train.log").read_text()


def test_best_weights_and_export_are_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from models.training.loop import _replace_with_copy

    source, target = tmp_path / "new.safetensors", tmp_path / "deploy" / "model.safetensors"
    source.write_bytes(b"new weights" * 1000)
    target.parent.mkdir()
    target.write_bytes(b"old weights")

    def torn(src: object, dst: object, *args: object) -> None:
        dst.write(b"new wei")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", torn)
    with pytest.raises(OSError, match="No space"):
        _replace_with_copy(source, target)
    assert target.read_bytes() == b"old weights" and sorted(target.parent.iterdir()) == [target]
    monkeypatch.undo()
    _replace_with_copy(source, target)
    assert target.read_bytes() == source.read_bytes() and sorted(target.parent.iterdir()) == [target]


# --- which data is trained on and validated on ---------------------------------------------------------------------

def test_validation_split_is_by_a_hash_of_each_name(tmp_path: Path, photo: np.ndarray) -> None:
    from models.training.data import Split, held_out_names

    names = [f"img{i:03d}.png" for i in range(200)]
    held = set(held_out_names(names, 0.1))
    assert 10 <= len(held) <= 30  # about a tenth
    grown = set(held_out_names(names + [f"new{i}.png" for i in range(100)], 0.1))
    assert grown & set(names) == held  # adding files moves none of the others
    assert set(held_out_names(names[:100], 0.1)) == held & set(names[:100])  # nor does removing some
    assert held_out_names(list(reversed(names)), 0.1) == sorted(held)  # the order does not matter
    # small sets: at least one held out of two or more, none of one, none when asked for none
    assert len(held_out_names(["a.png", "b.png", "c.png"], 0.1)) == 1
    assert len(held_out_names(["a.png", "b.png"], 0.9)) == 1  # and something is left to train on
    assert held_out_names(["a.png"], 0.1) == [] and held_out_names(names, 0.0) == []
    # a resume whose split would train on a held-out item (or validate on a trained one) is refused
    train(_config(tmp_path, steps=10), *_data(photo), split=Split(("a", "b"), ("c",)))
    with pytest.raises(InputError, match=r"would train on 1 item\(s\) it held out for validation \(c\)"):
        train(_config(tmp_path, steps=20, resume=True), *_data(photo), split=Split(("a", "b", "c"), ()))
    with pytest.raises(InputError, match=r"validate on 1 item\(s\) it trained on \(b\)"):
        train(_config(tmp_path, steps=20, resume=True), *_data(photo), split=Split(("a",), ("b", "c")))
    # a new file on either side is fine
    reports = train(_config(tmp_path, steps=20, resume=True), *_data(photo), split=Split(("a", "b", "d"), ("c", "e")))
    assert [r.step for r in reports] == [20]


def _write_scenes(root: Path, scenes: dict[str, int], size: tuple[int, int] = (40, 48)) -> None:
    rng = np.random.default_rng(0)
    for scene, frames in scenes.items():
        for kind in ("blur", "sharp"):
            (root / scene / kind).mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            cv2.imwrite(str(root / scene / "sharp" / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / scene / "blur" / f"{i:03d}.png"), cv2.GaussianBlur(img, (5, 5), 1.5))


def test_gopro_pairs_are_split_by_scene(tmp_path: Path) -> None:
    from models.training.data import held_out_names, named_pairs_from_folder, split_pairs

    _write_scenes(tmp_path / "gopro", {f"GOPR{i:04d}": 3 for i in range(12)})
    pairs = named_pairs_from_folder(tmp_path / "gopro")
    assert pairs[0].name == "GOPR0000/blur/000.png" and pairs[0].scene == "GOPR0000"
    training, validation, unit = split_pairs(pairs, 0.1)
    assert unit == "scene" and validation and training
    val_scenes = {p.scene for p in validation}
    assert not val_scenes & {p.scene for p in training}  # validation scenes are unseen
    assert len(validation) == 3 * len(val_scenes)  # whole scenes
    # one scene: frames are the unit
    _write_scenes(tmp_path / "one", {"only": 4})
    training, validation, unit = split_pairs(named_pairs_from_folder(tmp_path / "one"), 0.1)
    assert unit == "pair" and training and validation
    assert sorted(p.name for p in validation) == held_out_names([f"only/blur/{i:03d}.png" for i in range(4)], 0.1)


def test_a_mismatched_pair_is_refused_when_loaded_naming_both_files(tmp_path: Path) -> None:
    _write_scenes(tmp_path, {"S": 2})
    cv2.imwrite(str(tmp_path / "S" / "blur" / "001.png"), np.zeros((32, 48, 3), np.uint8))
    expected = (f"blurred '{tmp_path / 'S' / 'blur' / '001.png'}' is 48x32 pixels but its sharp partner "
                f"'{tmp_path / 'S' / 'sharp' / '001.png'}' is 48x40")
    with pytest.raises(InputError) as error:
        pairs_from_folder(tmp_path)
    assert expected in str(error.value)


def test_unmatched_files_are_reported_and_data_options_are_exclusive(tmp_path: Path, photo: np.ndarray) -> None:
    from models.train_cli import train_command
    from models.training.data import named_pairs_from_folder

    _write_gopro(tmp_path / "data", photo)  # with blur/extra.png, which has no sharp partner
    (tmp_path / "data" / "scene1" / "blur" / "x.jpg").write_bytes(b"")
    (tmp_path / "data" / "scene1" / "sharp" / "x.png").write_bytes(b"")
    said: list[str] = []
    assert len(named_pairs_from_folder(tmp_path / "data", report=said.append)) == 3
    assert said == ["matched 3 pairs; left out 2 blurred files without a sharp partner of the same name and "
                    "extension (scene1/blur/extra.png, scene1/blur/x.jpg); left out 1 sharp file without a blurred "
                    "partner (scene1/sharp/x.png)"]
    result = CliRunner().invoke(train_command, ["seed002", "-o", str(tmp_path / "run"), "--pairs",
                                                str(tmp_path / "data"), "--sharp", str(tmp_path / "data")])
    assert result.exit_code == 2 and "--pairs and --sharp are different training data: choose one" in result.output
    assert not (tmp_path / "run").exists()


def test_small_images_and_small_data_are_handled_at_load(tmp_path: Path) -> None:
    """Images smaller than the patch are refused by name at load; one pair trains without validation and claims
    no best weights; three pairs hold one out."""
    from models.train_cli import train_command

    _write_scenes(tmp_path / "three", {"S": 3}, size=(64, 64))
    args = ["seed002", "--pairs", str(tmp_path / "three"), "--arch-option", "width=4", "--batch-size", "2",
            "--steps", "2", "--steps-per-epoch", "1", "--no-progress"]
    small = CliRunner().invoke(train_command, [*args, "-o", str(tmp_path / "a")])
    assert small.exit_code == 2, small.output
    assert "is 64x64 pixels, smaller than the 128-pixel training patch (and 1 more training image): pass --patch " \
           "64 or smaller" in " ".join(small.output.split())
    assert str(tmp_path / "three" / "S" / "blur") in small.output.replace("\n", "")
    three = CliRunner().invoke(train_command, [*args, "-o", str(tmp_path / "b"), "--patch", "32"])
    assert three.exit_code == 0, three.output
    assert "validation: 1 of 3 pairs of one scene" in three.output and "best weights:" in three.output
    _write_scenes(tmp_path / "one", {"S": 1}, size=(64, 64))
    export = tmp_path / "deploy" / "m.safetensors"
    args[2] = str(tmp_path / "one")
    one = CliRunner().invoke(train_command, [*args, "-o", str(tmp_path / "c"), "--patch", "32", "--export", str(export)])
    assert one.exit_code == 0, one.output
    assert "warning: nothing is held out for validation" in one.output
    assert "not validated, so no best weights; latest:" in one.output and "best.safetensors" not in one.output
    assert not (tmp_path / "c" / "best.safetensors").exists()
    assert export.read_bytes() == (tmp_path / "c" / "last.safetensors").read_bytes()


def test_s3_pairs_report_unmatched_keys_and_refuse_a_mismatched_pair(s3_endpoint: str, photo: np.ndarray) -> None:
    import boto3

    from models.training.data import named_pairs_from_s3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="train-mismatch")
    png = cv2.imencode(".png", (photo[..., ::-1] * 255).astype(np.uint8))[1].tobytes()
    crop = cv2.imencode(".png", (photo[:80, :, ::-1] * 255).astype(np.uint8))[1].tobytes()
    for key, body in (("blur/a/1.png", png), ("sharp/a/1.png", png), ("blur/b/2.png", png), ("sharp/b/2.png", png),
                      ("blur/only.png", png)):
        client.put_object(Bucket="train-mismatch", Key=key, Body=body)
    said: list[str] = []
    pairs = named_pairs_from_s3("s3://train-mismatch/blur/", "s3://train-mismatch/sharp/", client=client,
                                report=said.append)
    assert [(p.name, p.scene) for p in pairs] == [("a/1.png", "a"), ("b/2.png", "b")]
    assert said == ["matched 2 pairs; left out 1 blurred file without a sharp partner of the same name and extension "
                    "(s3://train-mismatch/blur/only.png)"]
    client.put_object(Bucket="train-mismatch", Key="blur/b/2.png", Body=crop)
    with pytest.raises(InputError, match=r"blurred 's3://train-mismatch/blur/b/2.png' is 128x80 pixels but its sharp "
                                         r"partner 's3://train-mismatch/sharp/b/2.png' is 128x96"):
        named_pairs_from_s3("s3://train-mismatch/blur/", "s3://train-mismatch/sharp/", client=client)
