"""--output-format and --sidecar: restorations written in another format than their input's (a JPEG's kept
lossless as PNG), and a provenance record next to each.

The conversion is checked by independent readers (OpenCV, Pillow), the renamed keys and the refusals through a
real S3 endpoint and database, and the worker's part with the batch a real submission enqueued.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image, ImageCms
from skimage import data

from jobs.errors import InputError
from jobs.layout import OUTPUT_FORMATS, parse_output_format, with_output_format
from worker.imageio import as_format, decode_image, encode_image, quantise

RGB = np.ascontiguousarray(data.astronaut()[90:154, 150:230])  # 64x80
ALPHA = np.ascontiguousarray(data.camera()[300:364, 100:180])
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _pil(array: np.ndarray, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def _cv_read(encoded: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)


def test_a_jpegs_restoration_is_kept_lossless_with_its_metadata() -> None:
    exif = Image.Exif()
    exif[0x013B] = "Studio Nadar"
    image = decode_image(_pil(RGB, "JPEG", quality=80, exif=exif, icc_profile=ICC), "reel/1931.jpg")
    restored = np.clip(image.pixels * 1.1 - 0.05, 0, 1)  # anything but the input
    for fmt in ("png", "tiff", "jp2"):
        target = as_format(image, fmt)
        assert (target.format, target.dtype, target.pixels is image.pixels) == (fmt, np.uint8, True)
        output = encode_image(target, restored)
        seen = tifffile.imread(io.BytesIO(output)) if fmt == "tiff" else _cv_read(output)[..., ::-1]
        np.testing.assert_array_equal(seen, quantise(restored, np.dtype(np.uint8)))  # not a second lossy pass
        reread = Image.open(io.BytesIO(output))
        if fmt != "jp2":  # Pillow reads no ICC or EXIF from JPEG 2000; the box test covers them there
            assert reread.info.get("icc_profile") == ICC and reread.getexif().get(0x013B) == "Studio Nadar"
    assert as_format(image, "jpeg") is image


def test_depth_and_alpha_follow_what_the_target_format_holds() -> None:
    rgba16 = np.dstack([RGB, ALPHA]).astype(np.uint16) * 257 + 3
    ok, buffer = cv2.imencode(".png", rgba16[..., [2, 1, 0, 3]])
    assert ok
    image = decode_image(buffer.tobytes(), "scan.png")
    webp = as_format(image, "webp")
    assert webp.dtype == np.uint8 and webp.alpha.dtype == np.uint8
    np.testing.assert_array_equal(webp.alpha, np.rint(rgba16[..., 3] / 257).astype(np.uint8))
    assert np.asarray(Image.open(io.BytesIO(encode_image(webp, image.pixels)))).shape == (64, 80, 4)
    jp2 = as_format(image, "jp2")
    assert jp2.dtype == np.uint16 and np.array_equal(jp2.alpha, image.alpha)  # 16 bits kept where they fit

    floats = decode_image(_tiff_float(), "f.tif")
    png = as_format(floats, "png")
    assert png.dtype == np.uint16
    assert _cv_read(encode_image(png, floats.pixels)).dtype == np.uint16

    grey_alpha = decode_image(_pil(np.dstack([RGB[..., 0], ALPHA]), "PNG"), "ga.png")
    bmp = Image.open(io.BytesIO(encode_image(as_format(grey_alpha, "bmp"), grey_alpha.pixels)))
    assert bmp.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(bmp)[..., 3], ALPHA)
    np.testing.assert_array_equal(np.asarray(bmp)[..., 1], RGB[..., 0])


def _tiff_float() -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, RGB.astype(np.float32) / 255, photometric="rgb", metadata=None)
    return out.getvalue()


def test_images_a_format_cannot_hold_are_refused_naming_what_can() -> None:
    rgba = decode_image(_pil(np.dstack([RGB, ALPHA]), "PNG"), "logo.png")
    with pytest.raises(InputError, match="alpha channel, which JPEG cannot hold; write it as PNG, TIFF"):
        as_format(rgba, "jpeg")
    pages = io.BytesIO()
    with tifffile.TiffWriter(pages) as tif:
        tif.write(RGB, photometric="rgb", metadata=None)
        tif.write(RGB[::-1], photometric="rgb", metadata=None)
    multi = decode_image(pages.getvalue(), "book.tif")
    with pytest.raises(InputError, match=r"multi-page TIFF \(2 pages\) cannot be written as PNG"):
        as_format(multi, "png")
    assert as_format(multi, "tiff") is multi


def test_output_keys_take_the_formats_extension() -> None:
    assert with_output_format("1931/reel.JPG", "png") == "1931/reel.png"
    assert with_output_format("a.b/scan", "tiff") == "a.b/scan.tif"
    assert with_output_format("x.y.jpeg", "jp2") == "x.y.jp2"
    assert with_output_format("x.jpeg", None) == with_output_format("x.jpeg", "jpg") == "x.jpeg"  # its own
    # only some inputs: the TIFF master stays a TIFF, the access copies become PNG
    assert [with_output_format(n, "jpeg=png,webp=png") for n in ("m.tif", "a.jpg", "b.webp", "noext")] == [
        "m.tif", "a.png", "b.png", "noext"]
    assert parse_output_format("JPG=tif, webp=png") == {"jpeg": "tiff", "webp": "png"}
    for bad, why in (("gif", "unknown image format 'gif'"), ("jpeg=png,webp", "'webp' is not FROM=TO")):
        with pytest.raises(InputError, match=why):
            parse_output_format(bad)
    assert set(OUTPUT_FORMATS) == {"png", "jpeg", "tiff", "webp", "jp2", "bmp"}


def test_local_restore_converts_and_refuses_names_that_would_collide(tmp_path: Path) -> None:
    from producer.cli import main

    scans = tmp_path / "scans"
    (scans / "1931").mkdir(parents=True)
    (scans / "1931" / "reel.jpg").write_bytes(_pil(RGB, "JPEG", quality=85))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["restore", str(scans), "-o", str(out), "--model", "wiener",
                                       "--output-format", "png"])
    assert result.exit_code == 0, result.output
    written = out / "1931" / "reel.png"
    assert written.read_bytes().startswith(b"\x89PNG") and not (out / "1931" / "reel.jpg").exists()
    (scans / "1931" / "reel.tif").write_bytes(_tiff_float())
    clash = CliRunner().invoke(main, ["restore", str(scans), "-o", str(tmp_path / "o2"), "--model", "wiener",
                                      "--output-format", "png"])
    assert clash.exit_code != 0 and "would both be written to" in clash.output


# ---------------------------------------------------------------- through S3, SQL and the worker's batch


@pytest.fixture
def bucket(env):  # type: ignore[no-untyped-def]
    client = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    name = f"fmt-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.mark.integration
def test_a_prefix_converted_to_png_is_written_under_png_keys(env, bucket) -> None:  # type: ignore[no-untyped-def]
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from tests.e2e_helpers import queued_tasks
    from tests.test_end_to_end import run_cli
    from worker.pipeline import run_batch

    s3, b = bucket
    s3.put_object(Bucket=b, Key="in/1931/reel.jpg", Body=_pil(RGB, "JPEG", quality=80))
    s3.put_object(Bucket=b, Key="in/logo.webp", Body=_pil(np.dstack([RGB, ALPHA]), "WEBP", lossless=True))
    dry = run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--output-format", "png", "--dry-run")
    assert f"s3://{b}/in/1931/reel.jpg → s3://{b}/out/1931/reel.png" in dry
    job_id = run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--model", "wiener", "--output-format",
                     "png", "-q").strip()
    [(_, args)] = queued_tasks(env)
    assert args[0]["output_format"] == "png"
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings())["done"] == 2
    for key, channels in (("out/1931/reel.png", 3), ("out/logo.png", 4)):
        stored = s3.get_object(Bucket=b, Key=key)
        assert stored["ContentType"] == "image/png"
        assert _cv_read(stored["Body"].read()).shape == (64, 80, channels)
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert sorted((r["output"], r["format"]) for r in rows) == [  # the input's format is what is recorded
        (f"s3://{b}/out/1931/reel.png", "jpeg"), (f"s3://{b}/out/logo.png", "webp")]

    plain = run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/again/", "--model", "wiener", "-q").strip()
    [(_, again)] = [task for task in queued_tasks(env) if task[1][0]["job_id"] == plain]
    assert "output_format" not in again[0] and "quality" not in again[0]  # a worker of the last release takes it


@pytest.mark.integration
def test_only_the_formats_named_are_converted(env, bucket) -> None:  # type: ignore[no-untyped-def]
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from producer.cli import main
    from tests.e2e_helpers import queued_tasks
    from tests.test_end_to_end import run_cli
    from worker.pipeline import run_batch

    s3, b = bucket
    s3.put_object(Bucket=b, Key="in/access.jpg", Body=_pil(RGB, "JPEG", quality=80))
    master = io.BytesIO()
    tifffile.imwrite(master, (RGB.astype(np.uint16) * 257), photometric="rgb", metadata=None)
    s3.put_object(Bucket=b, Key="in/master.tif", Body=master.getvalue())
    job_id = run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--model", "wiener", "--output-format",
                     "jpg=png", "-q").strip()
    [(_, args)] = queued_tasks(env)
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings())["done"] == 2
    assert s3.get_object(Bucket=b, Key="out/access.png")["Body"].read().startswith(b"\x89PNG")
    kept = tifffile.imread(io.BytesIO(s3.get_object(Bucket=b, Key="out/master.tif")["Body"].read()))
    assert kept.dtype == np.uint16 and kept.shape == RGB.shape  # the master stays a 16-bit TIFF
    assert "out/ (JPEG as PNG; other formats as they are)" in " ".join(run_cli("status", job_id).split())
    typo = CliRunner().invoke(main, ["submit", f"s3://{b}/in/", "-o", f"s3://{b}/o2/", "--output-format", "jpeg=gif"])
    assert typo.exit_code == 2 and "unknown image format 'gif'" in typo.output


@pytest.mark.integration
def test_names_that_collide_once_converted_are_refused_before_anything_is_enqueued(  # type: ignore[no-untyped-def]
        env, bucket) -> None:
    from producer.cli import main

    s3, b = bucket
    s3.put_object(Bucket=b, Key="in/a.jpg", Body=b"x")
    s3.put_object(Bucket=b, Key="in/a.tif", Body=b"x")
    result = CliRunner().invoke(main, ["submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--output-format", "png"])
    assert result.exit_code != 0 and f"would both be written to s3://{b}/out/a.png" in " ".join(result.output.split())
    from jobs.settings import load_settings
    from producer.submit import JobRequest, submit

    evaluation = JobRequest(kind="evaluate", inputs=[f"s3://{b}/in/"], references=f"s3://{b}/in/",
                            output_format="png")
    with pytest.raises(InputError, match="--output-format, --quality and --sidecar apply to deblur jobs only"):
        submit(evaluation, load_settings())


# ---------------------------------------------------------------- provenance records (--sidecar)


@pytest.mark.integration
def test_a_provenance_record_travels_next_to_each_output(env, bucket) -> None:  # type: ignore[no-untyped-def]
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from tests.e2e_helpers import queued_tasks
    from tests.test_end_to_end import run_cli
    from worker.pipeline import run_batch

    s3, b = bucket
    scan = _pil(RGB, "JPEG", quality=85)
    s3.put_object(Bucket=b, Key="in/1931/reel.jpg", Body=scan)
    job_id = run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--model", "wiener", "--model",
                     "l0-blind", "--output-format", "png", "--sidecar", "-q").strip()
    [(_, args)] = queued_tasks(env)
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings())["done"] == 1
    output = s3.get_object(Bucket=b, Key="out/1931/reel.png")["Body"].read()
    stored = s3.get_object(Bucket=b, Key="out/1931/reel.png.deblur.json")
    assert stored["ContentType"] == "application/json"
    record = json.loads(stored["Body"].read())
    [row] = json.loads(run_cli("results", job_id, "--format", "json"))
    assert record["schema"] == "deblur-provenance/1" and record["job"] == job_id
    assert record["input"] == {"uri": f"s3://{b}/in/1931/reel.jpg", "sha256": hashlib.sha256(scan).hexdigest(),
                               "format": "jpeg", "bit_depth": 8, "width": 80, "height": 64, "pages": 1}
    assert record["output"] == {"uri": f"s3://{b}/out/1931/reel.png", "sha256": hashlib.sha256(output).hexdigest(),
                                "format": "png"}
    assert record["model_versions"] == row["model_versions"] and "l0-blind" in record["models"][1]
    assert record["metrics"] == row["metrics_by_model"]  # every figure the database holds, by model
    assert record["kernels"] == [f"s3://{b}/out/1931/reel.png.kernel.png"]  # the whole output name, as the record
    assert record["settings"]["output_format"] == "png" and record["worker"] == row["worker"]
    shown = " ".join(run_cli("status", job_id).split())
    assert f"output: s3://{b}/out/ as PNG, each with a provenance record" in shown

    # the output prefix submitted again: the records are named as an earlier run's, not as unknown files
    dry = run_cli("submit", f"s3://{b}/out/", "-o", f"s3://{b}/again/", "--dry-run")
    assert "1 kernel PNG and 1 provenance record of an earlier run" in " ".join(dry.split())


def test_local_restore_writes_the_record_next_to_the_file(tmp_path: Path) -> None:
    from producer.cli import main

    source = tmp_path / "reel.jpg"
    source.write_bytes(_pil(RGB, "JPEG", quality=85))
    result = CliRunner().invoke(main, ["restore", str(source), "-o", str(tmp_path / "out"), "--model", "wiener",
                                       "--sidecar"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "reel.jpg.deblur.json").read_text())
    assert record["output"]["sha256"] == hashlib.sha256((tmp_path / "out" / "reel.jpg").read_bytes()).hexdigest()
    assert record["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.integration
def test_outputs_are_verified_against_their_records_without_the_database(  # type: ignore[no-untyped-def]
        env, bucket, tmp_path) -> None:
    """A tree of restorations copied elsewhere, or whose job was pruned, is still checked: by its records."""
    from jobs.messages import BatchMessage
    from jobs.settings import load_settings
    from producer.cli import main
    from tests.e2e_helpers import queued_tasks
    from tests.test_end_to_end import run_cli
    from worker.pipeline import run_batch

    s3, b = bucket
    for name in ("a.jpg", "b.jpg"):
        s3.put_object(Bucket=b, Key=f"in/{name}", Body=_pil(RGB, "JPEG", quality=85))
    run_cli("submit", f"s3://{b}/in/", "-o", f"s3://{b}/out/", "--model", "wiener", "--sidecar", "-q")
    [(_, args)] = queued_tasks(env)
    assert run_batch(BatchMessage.from_payload(args[0]), load_settings())["done"] == 2
    for key in ("a.jpg", "a.jpg.deblur.json", "b.jpg", "b.jpg.deblur.json"):  # the tree copied elsewhere
        s3.copy_object(Bucket=b, Key=f"copy/{key}", CopySource={"Bucket": b, "Key": f"out/{key}"})

    # images that have no record beside them (one sorting between an output and its record, one after all) are
    # named, not passed over in silence, and not failures: nothing says what they should be
    for key in ("copy/a.jpg-2.png", "copy/zz.png", "copy/_members/wiener/a.jpg", "copy/a.jpg.kernel.png"):
        s3.put_object(Bucket=b, Key=key, Body=b"png")
    intact = CliRunner().invoke(main, ["verify", "--records", f"s3://{b}/copy/", "--quick"])
    assert intact.exit_code == 0, intact.output
    assert f"records under s3://{b}/copy/: 2 outputs checked, 2 intact, 0 missing, 0 changed" in intact.output
    said = " ".join(intact.output.split())
    assert "2 images without a provenance record beside them" in said
    assert f"no record: s3://{b}/copy/a.jpg-2.png" in said and f"no record: s3://{b}/copy/zz.png" in said
    s3.put_object(Bucket=b, Key="copy/a.jpg", Body=b"replaced by a botched sync")
    s3.delete_object(Bucket=b, Key="copy/b.jpg")
    broken = CliRunner().invoke(main, ["verify", "--records", f"s3://{b}/copy/"])
    message = " ".join(broken.output.split())
    assert broken.exit_code == 1 and "2 outputs checked, 0 intact, 1 missing, 1 changed" in message
    assert f"changed: s3://{b}/copy/a.jpg (from s3://{b}/in/a.jpg)" in message

    folder = tmp_path / "restored"  # the same on local files
    folder.mkdir()
    for key in ("a.jpg", "a.jpg.deblur.json"):
        (folder / key).write_bytes(s3.get_object(Bucket=b, Key=f"out/{key}")["Body"].read())
    (folder / "orphan.png").write_bytes(b"png")
    local = " ".join(CliRunner().invoke(main, ["verify", "--records", str(folder)]).output.split())
    assert "1 output checked, 1 intact" in local and f"no record: {folder / 'orphan.png'}" in local
    (folder / "a.jpg").write_bytes(b"truncated")
    assert CliRunner().invoke(main, ["verify", "--records", str(folder)]).exit_code == 1
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(main, ["verify", "--records", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "no provenance records (*.deblur.json) under" in " ".join(empty.output.split())
    refused = CliRunner().invoke(main, ["verify", "--records", str(folder), "--mark-failed"])
    assert refused.exit_code == 2 and "--mark-failed needs a JOB" in refused.output


def test_kernels_of_two_outputs_with_one_stem_do_not_collide() -> None:
    """A TIFF master and its JPEG access copy in one folder once shared ``scan.kernel.png``: one kernel was lost
    and both rows named the other. The kernel keeps the output's whole name; two settings of one blind model are
    told apart by their whole keys; a report finds a job's members' kernels from the first one's name, whichever
    naming wrote them."""
    from jobs.layout import is_kernel_artefact, kernel_labels, kernel_uri, member_kernel_uri
    from jobs.s3uri import S3URI

    tif, jpg = S3URI("b", "out/scan.tif"), S3URI("b", "out/scan.jpg")
    assert kernel_uri(tif) != kernel_uri(jpg)
    labels = kernel_labels(["l0-blind:kernel=31", "seed001-refine"])
    assert labels == {"l0-blind:kernel=31": "l0-blind", "seed001-refine": "seed001-refine"}
    assert str(kernel_uri(tif, labels["l0-blind:kernel=31"])) == "s3://b/out/scan.tif.kernel.l0-blind.png"
    twice = kernel_labels(["l0-blind:kernel=21", "l0-blind:kernel=35"])
    assert len(set(twice.values())) == 2 and all(is_kernel_artefact(kernel_uri(tif, label).key)
                                                 for label in twice.values())
    assert is_kernel_artefact(kernel_uri(tif).key)
    new = "s3://b/out/scan.tif.kernel.l0-blind.png"
    old = "s3://b/out/scan.kernel.l0-blind.png"  # as an earlier release named it
    assert member_kernel_uri(new, "l0-blind", "seed001-refine") == "s3://b/out/scan.tif.kernel.seed001-refine.png"
    assert member_kernel_uri(old, "l0-blind", "seed001-refine") == "s3://b/out/scan.kernel.seed001-refine.png"
    assert member_kernel_uri(new, "l0-blind", "l0-blind") == new
