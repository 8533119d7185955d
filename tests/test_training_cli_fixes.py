"""``deblur train`` fixes: resuming into other options or with a new rate, refiners' priors, reproducible and
readable weight files, and messages (time-limited ETA, a finished run, --init with a checkpoint)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from jobs.errors import InputError
from models.synthetic_blur import sample_photographs
from models.train_cli import train_command
from models.training.data import BlurSynthesizer, SyntheticPairs, synthetic_validation_set, to_float_rgb
from models.training.loop import TrainConfig, train

torch.set_num_threads(1)

SMALL_BLUR = BlurSynthesizer(motion_size=(5, 9), defocus_radius=(1.0, 2.5), gaussian_sigma=(0.6, 1.2))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 96x128 crop of a real photograph, float RGB."""
    return to_float_rgb(sample_photographs()["astronaut"])[40:136, 180:308]


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small sharp photographs as PNG files (one is held out for validation by --val-fraction 0.34)."""
    folder = tmp_path_factory.mktemp("sharp")
    photos = sample_photographs()
    for name in ("astronaut", "chelsea", "coffee"):
        rgb = to_float_rgb(photos[name])[:96, :128]
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor((rgb * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    return folder


def _cli(run: Path, sharp_dir: Path, *extra: str, arch: str = "seed002") -> Result:
    """``deblur train`` on synthetic blur of ``sharp_dir`` with a tiny network, patches and validation."""
    args = [arch, "-o", str(run), "--sharp", str(sharp_dir), "--patch", "32", "--batch-size", "2",
            "--val-fraction", "0.34", "--val-count", "2", "--val-size", "64", "--steps-per-epoch", "2"]
    if arch == "seed002":
        args += ["--arch-option", "width=4"]
    return CliRunner().invoke(train_command, [*args, *extra])


def _config(run: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        arch="seed002", output_dir=run, arch_kwargs={"width": 4}, steps=2, steps_per_epoch=2, batch_size=2,
        patch=32, optimizer="adam", lr=3e-3, schedule="constant", seed=3, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _data(photo: np.ndarray) -> tuple[SyntheticPairs, list[tuple[np.ndarray, np.ndarray]]]:
    return (SyntheticPairs([photo], SMALL_BLUR, kernel_bank=4),
            synthetic_validation_set([photo], count=1, size=48, synth=SMALL_BLUR))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. resuming into other architecture options ------------------------------------------------------------------

def test_resuming_with_other_architecture_options_is_refused_naming_both(tmp_path: Path, sharp_dir: Path) -> None:
    run = tmp_path / "run"
    assert _cli(run, sharp_dir, "--steps", "2", "--no-progress").exit_code == 0
    kept = (run / "last.pt").read_bytes()
    result = _cli(run, sharp_dir, "--steps", "4", "--resume", "--arch-option", "width=8", "--no-progress")
    assert result.exit_code == 2, result.output  # a usage error, not a size-mismatch traceback
    assert ('is a seed002 network with the options {"width": 4}, but {"width": 8} were asked for: resume with the '
            "same options (--arch-option, --prior), or start a new run with another --output") in result.output
    assert (run / "last.pt").read_bytes() == kept


# --- 2. a --lr given on resume ------------------------------------------------------------------------------------

def test_a_lr_given_on_resume_replaces_the_runs_rate_and_is_said(
    tmp_path: Path, photo: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(_config(run, lr=3e-3), *_data(photo))
    train(_config(run, steps=4, lr=5e-4, resume=True), *_data(photo))
    assert "resuming with --lr 0.0005 instead of the run's 0.003" in capsys.readouterr().err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["lr"] == pytest.approx(5e-4) and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    # without --lr the run goes on at its own rate (not the recipe's 1e-3), and nothing is said
    train(_config(run, steps=6, lr=None, resume=True), *_data(photo))
    assert "--lr" not in capsys.readouterr().err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["lr"] == pytest.approx(5e-4) and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert "a --lr given replaces it" in CliRunner().invoke(train_command, ["--help"]).output


def test_a_new_lr_scales_a_cosine_schedule_from_where_it_was(tmp_path: Path, photo: np.ndarray) -> None:
    """The schedule's own factor at each step is kept; only the base rate it multiplies changes."""
    run = tmp_path / "run"
    cosine = {"schedule": "cosine", "steps_per_epoch": 2}
    train(_config(run, **{**cosine, "steps": 2}), *_data(photo))
    train(_config(run, **{**cosine, "steps": 4}, resume=True), *_data(photo))  # same --lr: the run's own curve
    same = torch.load(run / "last.pt", weights_only=True)
    train(_config(tmp_path / "halved", **{**cosine, "steps": 2}), *_data(photo))
    train(_config(tmp_path / "halved", **{**cosine, "steps": 4}, lr=1.5e-3, resume=True), *_data(photo))
    halved = torch.load(tmp_path / "halved" / "last.pt", weights_only=True)
    assert halved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(same["optimizer"]["param_groups"][0]["lr"] / 2)
    assert halved["schedule"]["base_lrs"] == pytest.approx([1.5e-3])


# --- 3. a refiner's prior -----------------------------------------------------------------------------------------

def test_a_registered_refiner_refuses_another_prior_pointing_to_the_bare_architecture(
    tmp_path: Path, sharp_dir: Path
) -> None:
    from models.training.prior import check_prior

    run = tmp_path / "run"
    result = _cli(run, sharp_dir, "--prior", "wiener:psf=motion:length=7,angle=0", "--steps", "2",
                  arch="seed002-refine")
    assert result.exit_code == 2, result.output
    assert "'seed002-refine' refines l0-blind" in result.output
    assert ("train the bare architecture: deblur train seed002 --prior 'wiener:psf=motion:length=7,angle=0' "
            "--arch-option width=16 -o RUN_DIR, then restore with -m seed002-unet:weights=RUN_DIR/best.safetensors"
            ) in " ".join(result.output.split())
    learned = _cli(run, sharp_dir, "--prior", "seed002-unet", "--steps", "2", arch="seed002")
    assert learned.exit_code == 2 and "a refiner's prior must be weight-free" in learned.output
    assert not run.exists()  # refused before any data was loaded or any prior run
    check_prior("seed002-refine", "l0-blind:light=linear")  # its own prior, with options: fine
    check_prior("seed002", "wiener:psf=motion:length=7,angle=0")  # the bare architecture takes any
    check_prior("seed002-unet", "richardson-lucy")


def test_a_refiner_of_another_prior_is_told_how_it_loads(tmp_path: Path) -> None:
    """The advice given when seed002-refine is handed a refiner of another prior works as written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from jobs.errors import WeightsError
    from models.catalog import REGISTRY
    from models.learned import RefinerModel
    from models.loading import load_model

    shipped = Path(__file__).resolve().parents[1] / "models" / "weights" / "seed002-refine.safetensors"
    with safe_open(str(shipped), framework="pt") as fh:
        meta = dict(fh.metadata())
    other = tmp_path / "wiener-refiner.safetensors"
    save_file(load_file(str(shipped)), str(other), metadata={**meta, "prior": "wiener:psf=gaussian:sigma=3"})
    with pytest.raises(WeightsError, match=f"restore it as a refiner of wiener with '-m seed002-unet:weights={other}'"):
        load_model(REGISTRY.parse(f"seed002-refine:weights={other}"), torch.device("cpu"))
    model = load_model(REGISTRY.parse(f"seed002-unet:weights={other}"), torch.device("cpu"))
    assert isinstance(model, RefinerModel) and model.prior.info.name == "wiener"


# --- 4. byte-reproducible weights ---------------------------------------------------------------------------------

def test_identical_runs_write_byte_identical_weight_files(tmp_path: Path, photo: np.ndarray) -> None:
    from safetensors import safe_open

    from models.archs import build_network
    from models.training.loop import export_weights

    for name in ("a", "b"):
        train(_config(tmp_path / name), *_data(photo))
    for file in ("best.safetensors", "last.safetensors"):
        assert _sha256(tmp_path / "a" / file) == _sha256(tmp_path / "b" / file)
    # the same network and metadata always give the same bytes (safetensors' own order is random per call)
    torch.manual_seed(0)
    net = build_network("seed002", width=4)
    info: dict[str, object] = {f"key{i}": i for i in range(8)}
    digests = set()
    for i in range(4):
        export_weights(net, tmp_path / f"w{i}.safetensors", "seed002", {"width": 4}, info)
        digests.add(_sha256(tmp_path / f"w{i}.safetensors"))
    assert len(digests) == 1
    data = (tmp_path / "w0.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") % 8 == 0  # the header keeps the data aligned
    with safe_open(str(tmp_path / "w0.safetensors"), framework="pt") as fh:
        expected = {"arch": "seed002", "arch_kwargs": '{"width": 4}', **{k: str(v) for k, v in info.items()}}
        assert fh.metadata() == expected
        assert all(torch.equal(fh.get_tensor(k), v) for k, v in net.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# --- 5. readable weights ------------------------------------------------------------------------------------------

def test_every_file_training_writes_is_readable_like_the_rest(tmp_path: Path, photo: np.ndarray) -> None:
    old = os.umask(0o022)
    try:
        export = tmp_path / "deploy" / "model.safetensors"
        train(_config(tmp_path / "run", export=export), *_data(photo))
    finally:
        os.umask(old)
    files = [tmp_path / "run" / n for n in ("last.safetensors", "best.safetensors", "last.pt")] + [export]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


# --- 6. messages --------------------------------------------------------------------------------------------------

def test_with_a_time_limit_the_eta_is_bounded_by_it(tmp_path: Path, sharp_dir: Path) -> None:
    from models.training.loop import _eta_text

    # one step a second, a million steps to go, six seconds left: the run stops in six seconds, not in 11 days
    assert _eta_text(1, 1_000_000, now=101.0, start=100.0, deadline=107.0) == "00:06"
    assert _eta_text(10, 10, now=110.0, start=100.0, deadline=10_000.0) == "00:10"  # the steps end first
    result = _cli(tmp_path / "run", sharp_dir, "--steps", "2", "--max-minutes", "30", "--progress")
    assert result.exit_code == 0, result.output
    assert "eta=00:00" in result.output and "<" not in result.output  # no tqdm estimate from --steps alone
    plain = _cli(tmp_path / "plain", sharp_dir, "--steps", "2", "--progress")
    assert "eta=" not in plain.output and "<00:00" in plain.output  # without a limit, tqdm's own estimate


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path: Path, sharp_dir: Path) -> None:
    run = tmp_path / "run"
    assert _cli(run, sharp_dir, "--steps", "2", "--no-progress").exit_code == 0
    log = (run / "train.log").read_text()
    for steps in ("2", "1"):
        result = _cli(run, sharp_dir, "--steps", steps, "--resume", "--no-progress")
        assert result.exit_code == 0, result.output
        assert (f"nothing to do: the run in {run} is at step 2 of --steps {steps}; raise --steps to train further"
                in result.output)
    assert (run / "train.log").read_text() == log


def test_init_from_a_checkpoint_asks_for_a_safetensors_file(tmp_path: Path, photo: np.ndarray) -> None:
    train(_config(tmp_path / "first"), *_data(photo))
    with pytest.raises(InputError, match=r"--init takes a \.safetensors file, e.g. a run's best.safetensors or "
                                         r"last.safetensors \(its last.pt is a checkpoint for --resume"):
        train(_config(tmp_path / "tuned", init=tmp_path / "first" / "last.pt"), *_data(photo))
