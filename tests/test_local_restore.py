"""``deblur restore FILE... --output DIR``: the worker's per-image path on local files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from skimage import data

from models.synthetic_blur import blur_image, linear_motion_kernel


def test_restore_writes_same_names_and_a_bad_file_fails_alone(tmp_path: Path) -> None:
    from producer.cli import main

    sharp = data.astronaut()[100:196, 150:278] / 255.0
    blurred = blur_image(sharp, linear_motion_kernel(7, 30))
    png = tmp_path / "in" / "photo.png"
    tif = tmp_path / "in" / "scan16.tif"
    bad = tmp_path / "in" / "broken.jpg"
    png.parent.mkdir()
    cv2.imwrite(str(png), np.rint(blurred[..., ::-1] * 255).astype(np.uint8))
    cv2.imwrite(str(tif), np.rint(blurred[..., ::-1] * 65535).astype(np.uint16))
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["restore", str(png), str(bad), str(tif), "--output", str(out),
                                       "--model", "wiener:psf=motion:length=7,angle=30"])

    assert result.exit_code == 1, result.output  # one file failed
    assert "broken.jpg" in result.output
    assert f"failed {bad}:" in result.output  # the whole path on one line, however long (not wrapped at 80)
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "scan16.tif"]
    restored = cv2.imread(str(out / "scan16.tif"), cv2.IMREAD_UNCHANGED)
    assert restored.dtype == np.uint16 and restored.shape == (96, 128, 3)
    restored8 = cv2.imread(str(out / "photo.png"))[..., ::-1] / 255.0
    error_in = np.mean((blurred - sharp) ** 2)
    error_out = np.mean((restored8 - sharp) ** 2)
    assert error_out < error_in * 0.8


def test_a_model_error_fails_that_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only unreadable files: an exception from a model or the encoder skips its file and the run goes on,
    as on the workers, with the error named and exit code 1."""
    from producer.cli import main
    from worker import local_restore

    files = []
    for name in ("a.png", "b.png", "c.png"):
        files.append(tmp_path / name)
        cv2.imwrite(str(files[-1]), np.full((24, 24, 3), 128, np.uint8))
    real = local_restore.restore_file

    def restore_file(path: Path, *args: Any, **kwargs: Any) -> dict[str, float | None]:
        if path.name == "b.png":
            raise RuntimeError("padding size should be less than the input dimension")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(local_restore, "restore_file", restore_file)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", *map(str, files), "--output", str(out), "--model", "wiener"])

    assert result.exit_code == 1, result.output
    assert f"failed {files[1]}: RuntimeError: padding size" in result.output
    assert result.output.rstrip().endswith("1 of 3 failed")  # a closing count, after the per-file lines
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]


def test_thumbnails_and_slivers_restore_through_the_default_ensemble(tmp_path: Path) -> None:
    """A 1x1 RGB pixel once failed in the shared-result digest (odd strides on size-1 dimensions) and a 5x5 crop
    inside l0-blind; every tiny file now comes back, at its own size."""
    from producer.cli import main

    rng = np.random.default_rng(0)
    files = {"pixel.png": (1, 1, 3), "tiny.png": (5, 5, 3), "sliver.png": (1, 300), "small.png": (12, 20, 3)}
    for name, shape in files.items():
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, shape, dtype=np.uint8))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", *(str(tmp_path / n) for n in files), "--output", str(out)])

    assert result.exit_code == 0, result.output
    for name, shape in files.items():
        assert cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED).shape == shape


def test_folders_are_restored_with_their_layout_and_unsafe_plans_are_refused(tmp_path: Path) -> None:
    """A folder's images at any depth keep their paths inside it (an earlier run's kernel PNGs are no photographs);
    nothing is restored when an output would overwrite its input or another output, or when the output folder
    lies inside an input folder or above it."""
    from producer.cli import main

    scans = tmp_path / "scans"
    for relative in ("a.png", "1950/b.jpg", "1950/trip/c.tif", "notes.txt", "1950/b.kernel.l0-blind.png"):
        (scans / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".txt"):
            (scans / relative).write_text("not an image")
        else:
            cv2.imwrite(str(scans / relative), np.full((24, 32, 3), 90, np.uint8))
    single = tmp_path / "loose" / "a.png"
    single.parent.mkdir()
    cv2.imwrite(str(single), np.full((20, 20), 200, np.uint8))
    out = tmp_path / "out"

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["restore", *args, "--model", "wiener"])

    result = run(str(scans), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert ("note: left out 1 file that is not an image deblur reads (PNG, JPEG, TIFF, WebP, JPEG 2000, BMP): .txt ×1; "
            "and 1 kernel PNG of an earlier run") in " ".join(result.output.split())
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["1950/b.jpg", "1950/trip/c.tif", "a.png"]

    refusals = [
        ((str(scans / "a.png"), str(single), "--output", str(tmp_path / "o2")), "would both be written to"),
        ((str(single), "--output", str(single.parent)), "would be overwritten by its own restoration"),
        ((str(scans), "--output", str(scans / "restored")), "lies inside input folder"),
        # 1950/b.jpg would have replaced scans/b.jpg, a file that is no input of this run
        ((str(scans / "1950"), "--output", str(scans)), "holds the input"),
        # and so for a file: 1950/b.jpg into scans/ replaced scans/b.jpg, a.png as a.tif beside it an a.tif
        ((str(scans / "1950" / "b.jpg"), "--output", str(scans)), "holds the input"),
        ((str(scans / "a.png"), "--output", str(scans), "--output-format", "tiff"), "holds the input"),
        ((str(tmp_path / "loose"), str(tmp_path / "o3"), "--output", str(tmp_path / "o4")), None),
    ]
    (tmp_path / "o3").mkdir()
    for args, message in refusals:
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert (message or "no images (PNG, JPEG, TIFF, WebP, JPEG 2000, BMP) found in folder") in " ".join(
            result.output.split())
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()
    assert cv2.imread(str(single), cv2.IMREAD_UNCHANGED).max() == 200  # the input is untouched


def test_restore_file_announces_each_member_before_it_runs(tmp_path: Path) -> None:
    """A large scan takes minutes per model, so the progress line names the member at work."""
    from jobs.messages import BatchMessage, ImageItem
    from worker.local_restore import restore_file

    png = tmp_path / "photo.png"
    cv2.imwrite(str(png), np.rint(data.astronaut()[100:164, 150:214, ::-1] * 0.9).astype(np.uint8))
    models = ["wiener:psf=motion:length=7,angle=30", "richardson-lucy:psf=gaussian:sigma=1"]
    message = BatchMessage(job_id="local", kind="deblur", models=models, images=[ImageItem(input=str(png))])
    seen: list[str] = []
    restore_file(png, tmp_path / "out" / "photo.png", message, seen.append)
    assert seen == models
    assert (tmp_path / "out" / "photo.png").is_file()


def test_restore_with_linear_light_undoes_a_shake_that_blurred_light(tmp_path: Path) -> None:
    """``--light linear`` reaches l0-blind: on shake made in linear light it beats the stored-value default."""
    from producer.cli import main

    sharp = data.camera()[40:232, 150:342] / 255.0
    kernel = linear_motion_kernel(11, 20)
    blurred = blur_image(sharp, kernel, noise_sigma=0.003, rng=np.random.default_rng(0), light="linear")
    png = tmp_path / "shake.png"
    cv2.imwrite(str(png), np.rint(blurred * 255).astype(np.uint8))
    errors = {}
    for light in ("encoded", "linear"):
        out = tmp_path / light
        result = CliRunner().invoke(main, ["restore", str(png), "--output", str(out), "--model", "l0-blind",
                                           "--light", light])
        assert result.exit_code == 0, result.output
        errors[light] = float(np.mean((cv2.imread(str(out / "shake.png"), cv2.IMREAD_GRAYSCALE) / 255.0 - sharp) ** 2))
    assert errors["linear"] < 0.4 * errors["encoded"]  # measured: 0.0013 against 0.0114
    result = CliRunner().invoke(main, ["restore", str(png), "--output", str(tmp_path / "x"), "--light", "gamma"])
    assert result.exit_code == 2 and "gamma" in result.output


def test_symlinked_folders_are_followed_once_each(tmp_path: Path) -> None:
    """rglob does not enter symlinked folders; the walk does, and a link loop or a second link to a folder
    already read is skipped with a note, as is a link to nothing."""
    from producer.cli import main

    scans, elsewhere = tmp_path / "scans", tmp_path / "elsewhere"
    for folder in (scans / "1950", elsewhere):
        folder.mkdir(parents=True)
    for path in (scans / "a.png", scans / "1950" / "b.png", elsewhere / "linked.png"):
        cv2.imwrite(str(path), np.full((24, 32, 3), 90, np.uint8))
    (scans / "trip").symlink_to(elsewhere, target_is_directory=True)
    (scans / "1950" / "loop").symlink_to(scans, target_is_directory=True)
    (scans / "gone.png").symlink_to(tmp_path / "missing.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", str(scans), "--output", str(out), "--model", "wiener"])

    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["1950/b.png", "a.png", "trip/linked.png"]
    text = " ".join(result.output.split())
    assert f"skipped 1 linked folder already read under another path (a link loop or a second link): " \
           f"{scans / '1950' / 'loop'}" in text
    assert f"skipped 1 link to nothing: {scans / 'gone.png'}" in text
    assert text.endswith("3 of 3 restored")
    # a link into the output folder would read the outputs back as inputs
    (scans / "restored").symlink_to(out, target_is_directory=True)
    result = CliRunner().invoke(main, ["restore", str(scans), "--output", str(out), "--model", "wiener"])
    assert result.exit_code == 2 and "is a link into output folder" in result.output


def test_an_interrupted_write_leaves_no_output_that_looks_finished(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.messages import BatchMessage, ImageItem
    from worker import local_restore

    png = tmp_path / "photo.png"
    cv2.imwrite(str(png), np.full((24, 24, 3), 128, np.uint8))
    message = BatchMessage(job_id="local", kind="deblur", models=["wiener"], sidecar=True,
                           images=[ImageItem(input=str(png))])

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(local_restore.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        local_restore.restore_file(png, tmp_path / "out" / "photo.png", message)
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor its temporary file
    monkeypatch.undo()
    local_restore.restore_file(png, tmp_path / "out" / "photo.png", message)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.png", "photo.png.deblur.json"]


def test_a_model_that_cannot_be_loaded_stops_the_run_before_the_first_file(tmp_path: Path) -> None:
    from producer.cli import main

    files = []
    for name in ("a.png", "b.png"):
        files.append(tmp_path / name)
        cv2.imwrite(str(files[-1]), np.full((24, 24, 3), 128, np.uint8))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", *map(str, files), "--output", str(out),
                                       "--model", f"nafnet-gopro:path={tmp_path / 'missing.pth'}"])

    assert result.exit_code == 2, result.output
    assert result.output.count("missing.pth") == 1 and "does not exist" in result.output
    assert "failed" not in result.output and not out.exists()


def test_a_file_the_blind_model_left_as_it_came_is_said_so(tmp_path: Path) -> None:
    """'deblur restore' said 'ok ... 3 of 3 restored' for photographs l0-blind judged sharp and returned as they
    came, which the queue flags for review: the run now says which files came back unchanged and why."""
    from skimage import data

    from producer.cli import main

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    cv2.imwrite(str(sharp / "camera.png"), cv2.resize(data.camera(), (128, 128), interpolation=cv2.INTER_AREA))
    result = CliRunner().invoke(main, ["restore", str(sharp), "--output", str(tmp_path / "out"),
                                       "--model", "l0-blind:candidates=1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "as it came" in text and "found no blur worth removing" in text, text
    assert text.endswith("1 of 1 written; 1 of them as they came (1 judged sharp): look at them"), text
