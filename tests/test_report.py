"""``deblur report``: the table equals the stored metrics' means, and the HTML
page is self-contained and renders.

Given evaluation and deblur jobs run for real (Redis, a worker process,
moto_server, SQLite), when the report is built, then its figures are the
means of what SQL holds, every picture is a data URI, the crops are the
detailed windows of the images in S3, and headless Chromium draws the page
(the screenshot is kept under test-artifacts/).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from producer.report import detail_window, histogram_svg
from tests.conftest import missing_service
from tests.evaluation_stack import MEMBERS, Stack, running_stack, sample_pairs, upload_pairs
from tests.test_end_to_end import run_cli, wait_done

CHROMIUM = "/usr/bin/chromium"
IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')


# ------------------------------------------------------------ pure helpers


def test_detail_window_finds_the_textured_region() -> None:
    from skimage import data

    photo = data.camera()
    canvas = np.full((300, 400), 0.5)
    canvas[150:250, 260:380] = photo[200:300, 200:320] / 255.0
    top, left, h, w = detail_window(canvas, size=100)
    assert (h, w) == (100, 100)
    assert 150 - 5 <= top <= 150 + 5 and 260 <= left <= 280
    # windows are clipped to small images
    assert detail_window(canvas[:40, :60], size=100) == (0, 0, 40, 60)


def test_histogram_counts_every_value_and_colours_losses_red() -> None:
    values = [-1.0, -0.5, 0.5, 1.0, 2.0, 2.5, 3.0, float("inf")]
    svg = histogram_svg(values, "gain")
    counts = [int(c) for c in re.findall(r"<title>[^<]*: (\d+)</title></rect>", svg)]
    assert sum(counts) == 7  # the infinite value is left out
    red = re.findall(r'fill="#c0392b"><title>[^<]*: (\d+)<', svg)
    assert sum(int(c) for c in red) == 2
    assert "n = 7" in svg and "http" not in svg
    assert "no finite values" in histogram_svg([float("inf")], "gain")


def _recorded_job(url: str, gains: list[float]) -> str:
    """An evaluation job whose done images have input PSNR 25 and the given ensemble gains."""
    from db import queries
    from db.engine import ensure_schema, session_scope

    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "evaluate", {"models": list(MEMBERS), "output": None})
        inputs = [f"s3://b/blur/{i}.png" for i in range(len(gains))]
        queries.insert_images(session, job.id, [{"input_uri": u, "reference_uri": u.replace("blur", "sharp")}
                                                for u in inputs], batch=0)
        queries.record_outcomes(session, job.id, [
            queries.ImageOutcome(u, "done", inference_s=0.5 + i, metrics=[
                ("input", "psnr", 25.0), ("input", "ssim", 0.8), (MEMBERS[0], "psnr", 25.0 + 2 * g),
                (MEMBERS[1], "psnr", 25.0), ("ensemble", "psnr", 25.0 + g), ("ensemble", "ssim", 0.9)])
            for i, (u, g) in enumerate(zip(inputs, gains, strict=True))
        ])
        return job.id


def test_stats_rank_worst_and_best_without_repeating_images(tmp_path: Path) -> None:
    from db.engine import session_scope
    from producer.report import build_table, collect_stats

    url = f"sqlite:///{tmp_path / 'r.db'}"
    job = _recorded_job(url, [1.0, -0.5, 3.0, 2.0, 0.25])
    with session_scope(url) as session:
        table = build_table(session, job)
        rows = {r.model: r for r in table.rows}
        assert rows["ensemble"].values["psnr"] == pytest.approx(25 + 5.75 / 5)
        assert rows[MEMBERS[0]].values["delta_psnr"] == pytest.approx(2 * 5.75 / 5)
        # inference_s values were written above (0.5 .. 4.5): this checks the report's mean, it times nothing
        assert rows["ensemble"].seconds_per_image == pytest.approx(2.5)
        assert rows["input"].values["ssim"] == pytest.approx(0.8) and rows[MEMBERS[1]].values["ssim"] is None
        stats = collect_stats(session, table, 2)
        assert [r["input"] for r in stats.worst] == ["s3://b/blur/1.png", "s3://b/blur/4.png"]
        assert [r["input"] for r in stats.best] == ["s3://b/blur/2.png", "s3://b/blur/3.png"]
        assert sorted(stats.gains[MEMBERS[0]]) == [-1.0, 0.5, 2.0, 4.0, 6.0]
        # fewer images than 2n: split in halves, nothing shown twice
        stats = collect_stats(session, table, 4)
        assert [r["input"][-5:] for r in stats.worst] == ["1.png", "4.png", "0.png"]
        assert [r["input"][-5:] for r in stats.best] == ["2.png", "3.png"]


def test_infinite_values_are_left_out_of_the_means_and_counted(database_url: str) -> None:
    """An image identical to its reference has an infinite PSNR: it does not make the mean infinite, and the
    table, its notes and its JSON say how many values were left out (SQLite and PostgreSQL store infinity)."""
    import io

    from rich.console import Console

    from db import queries
    from db.engine import session_scope
    from producer.report import build_table
    from producer.report_cli import print_table

    job = _recorded_job(database_url, [1.0, 3.0, 2.0])
    with session_scope(database_url) as session:
        queries.record_outcomes(session, job, [queries.ImageOutcome("s3://b/blur/0.png", "done", metrics=[
            ("input", "psnr", float("inf")), ("input", "ssim", 1.0), (MEMBERS[0], "psnr", float("-inf")),
            (MEMBERS[1], "psnr", 25.0), ("ensemble", "psnr", 30.0), ("ensemble", "ssim", 0.9)])])
        summary = {(r["model"], r["name"]): r for r in queries.metric_summary(session, job)}
        table = build_table(session, job)
    assert summary[("input", "psnr")] == {"model": "input", "name": "psnr", "mean": 25.0, "count": 2,
                                          "non_finite": 1}
    assert summary[("ensemble", "psnr")]["non_finite"] == 0
    rows = {r.model: r for r in table.rows}
    assert rows["input"].values["psnr"] == pytest.approx(25.0) and rows["input"].images == 2
    assert rows[MEMBERS[0]].values["psnr"] == pytest.approx(25.0 + 2 * 2.5) and rows[MEMBERS[0]].images == 2
    assert rows["ensemble"].values["psnr"] == pytest.approx((30.0 + 28.0 + 27.0) / 3)
    assert [r["non_finite"] for r in table.to_dict()["rows"]] == [{"psnr": 1}, {"psnr": 1}, {}, {}]
    assert "inf" not in table.markdown()
    printed = io.StringIO()
    print_table(table, Console(file=printed, width=200))
    assert f"infinite values are not in the means (a PSNR is infinite where an image equals its reference): " \
           f"1 of input psnr, 1 of {MEMBERS[0]} psnr" in " ".join(printed.getvalue().split())
    json.dumps(table.to_dict(), allow_nan=False)


def test_a_job_without_done_images_still_renders(tmp_path: Path) -> None:
    from db.engine import session_scope
    from producer.report import Report, build_table, collect_stats, render_html

    url = f"sqlite:///{tmp_path / 'r.db'}"
    job = _recorded_job(url, [])
    with session_scope(url) as session:
        table = build_table(session, job)
        stats = collect_stats(session, table, 3)
    assert all(r.images == 0 and r.values["psnr"] is None for r in table.rows)
    assert table.markdown().count("—") >= 3 * 4
    page = render_html(Report(table, stats, [], [], [], "now"))
    assert page.count("no finite values") == 3 and "<img" not in page


def test_a_model_spec_is_text_not_markup_in_the_html_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec is free text after the model's name (a checkpoint path): it was written into the page unescaped, so a
    job's model could run script in whoever opened its report."""
    import producer.report as report_module
    from db.engine import session_scope
    from producer.report import Report, build_table, collect_stats, render_html

    url = f"sqlite:///{tmp_path / 'r.db'}"
    job = _recorded_job(url, [])
    with session_scope(url) as session:
        table = build_table(session, job)
        stats = collect_stats(session, table, 3)
    assert table.kind == "evaluate"
    table.rows[-1].model = "nafnet-gopro:path=/w/<script>alert(1)</script>.pt"
    monkeypatch.setattr(report_module, "_crop_section", lambda *_: "")  # no crops to draw: only the paragraph
    page = render_html(Report(table, stats, [object()], [], [], "now"))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ------------------------------------------------------------- real jobs


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("report")
    with running_stack(redis_url, s3_endpoint, f"sqlite:///{tmp / 'deblur.db'}", tmp) as running:
        upload_pairs(running.s3, "report-eval", sample_pairs(3))
        yield running


def _finished(job_id: str) -> str:
    info = wait_done(job_id)
    if info["counts"]["failed"]:
        pytest.fail(f"job {job_id} failed: {[r['error'] for r in _stored_rows(job_id) if r['error']]}")
    assert info["status"] == "done" and info["counts"]["done"] == 3, info
    return job_id


@pytest.fixture(scope="module")
def evaluation_job(stack: Stack) -> str:
    models = [arg for m in MEMBERS for arg in ("--model", m)]
    return _finished(run_cli("evaluate", "--blurred", "s3://report-eval/blur/", "--sharp", "s3://report-eval/sharp/",
                             *models, "--output", "s3://report-eval/out/", "-q").strip())


def _report(job: str, *args: str) -> str:
    return run_cli("report", job, *args)


def _stored_rows(job: str) -> list[dict[str, Any]]:
    return json.loads(run_cli("results", job, "--format", "json"))


def _mean(rows: list[dict[str, Any]], model: str, name: str) -> float:
    return float(np.mean([r["metrics_by_model"][model][name] for r in rows]))


def _data_pngs(page: str) -> list[np.ndarray]:
    sources = IMG_SRC.findall(page)
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]
        arr = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert arr is not None and arr.size > 0
        images.append(arr)
    return images


def _screenshot(page: Path, target: Path, tmp: Path) -> np.ndarray:
    """Render ``page`` in headless Chromium; returns the screenshot's pixels."""
    binary = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_service("chromium is not installed (apt-get install -y chromium, or run 'make test')")
    target.unlink(missing_ok=True)
    subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={target}", "--window-size=1280,2000",
         page.resolve().as_uri()],
        check=True, timeout=120, capture_output=True,
    )
    shot = cv2.imread(str(target))
    assert shot is not None, f"no screenshot written at {target}"
    return shot


def _non_trivial(shot: np.ndarray) -> None:
    assert shot.shape[:2] == (2000, 1280)
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 500, f"only {len(colours)} colours: the page did not draw its pictures"
    assert float(shot.std()) > 20


@pytest.mark.integration
def test_table_is_the_mean_of_the_stored_metrics(evaluation_job: str, tmp_path: Path) -> None:
    table = json.loads(_report(evaluation_job, "--format", "json", "--crops", "0",
                               "--html", str(tmp_path / "r.html")))
    rows = _stored_rows(evaluation_job)
    by_model = {r["model"]: r for r in table["rows"]}
    assert [r["model"] for r in table["rows"]] == ["input", *MEMBERS, "ensemble"]
    base = _mean(rows, "input", "psnr")
    for model, row in by_model.items():
        assert row["psnr"] == pytest.approx(_mean(rows, model, "psnr"), abs=1e-9)
        assert row["ssim"] == pytest.approx(_mean(rows, model, "ssim"), abs=1e-12)
        assert row["images"] == 3
        if model == "input":
            assert row["delta_psnr"] is None and row["seconds_per_image"] is None
        else:
            assert row["delta_psnr"] == pytest.approx(_mean(rows, model, "psnr") - base, abs=1e-9)
    # the table's s/image must be the mean of the stored per-image times (arithmetic, not a speed check)
    assert by_model["ensemble"]["seconds_per_image"] == pytest.approx(np.mean([r["inference_s"] for r in rows]))
    assert by_model["ensemble"]["delta_psnr"] > 0, "Wiener with the true PSF must beat the blurred input"
    markdown = _report(evaluation_job, "--format", "markdown", "--crops", "0", "--html", str(tmp_path / "r.html"))
    assert len(markdown.strip().splitlines()) == 2 + 4
    assert f"| {MEMBERS[0]} | {by_model[MEMBERS[0]]['psnr']:.2f} |" in markdown


@pytest.mark.integration
def test_html_report_is_self_contained_and_renders(evaluation_job: str, stack: Stack, tmp_path: Path,
                                                   artifacts: Path) -> None:
    page_path = tmp_path / "report.html"
    _report(evaluation_job, "--crops", "2", "--html", str(page_path))
    page = page_path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and 'src="//' not in page
    assert "<link" not in page and "<script" not in page
    pictures = _data_pngs(page)
    # 3 images ranked into 2 worst + 1 best, each blurred | 2 members | ensemble | sharp
    assert len(pictures) == 3 * 5
    assert page.count("<svg") == 3, "one gain histogram per member and for the ensemble"
    for label in (*MEMBERS, "ensemble", "blurred", "sharp"):
        assert f">{label}<" in page
    assert "not available" not in page

    # the sharp crop shown is the most detailed window of the sharp image in S3
    sharp_crops = [img for img in pictures if img.shape[:2] == (128, 160)]
    assert len(sharp_crops) == 15
    rows = {r["reference"]: r for r in _stored_rows(evaluation_job)}
    first_sharp = re.search(r"<h3>(s3://[^<]*?) —", page).group(1).replace("/blur/", "/sharp/")
    sharp = cv2.imdecode(np.frombuffer(stack.s3.get_object(Bucket="report-eval", Key=first_sharp.split("/", 3)[3])
                                       ["Body"].read(), np.uint8), cv2.IMREAD_COLOR)
    assert first_sharp in rows
    top, left, h, w = detail_window(cv2.cvtColor(sharp, cv2.COLOR_BGR2RGB) / 255.0)
    assert np.array_equal(pictures[4], sharp[top:top + h, left:left + w])
    psnr = rows[first_sharp]["metrics_by_model"]["ensemble"]["psnr"]
    assert f"{psnr:.2f} dB" in page

    shot = _screenshot(page_path, artifacts / "report-evaluation.png", tmp_path)
    _non_trivial(shot)


@pytest.mark.integration
def test_single_model_without_output_shows_what_exists(stack: Stack, tmp_path: Path) -> None:
    job = _finished(run_cli("evaluate", "--blurred", "s3://report-eval/blur/", "--sharp", "s3://report-eval/sharp/",
                            "--model", MEMBERS[0], "-q").strip())
    table = json.loads(_report(job, "--format", "json", "--crops", "1", "--html", str(tmp_path / "one.html")))
    assert [r["model"] for r in table["rows"]] == ["input", MEMBERS[0]]
    page = (tmp_path / "one.html").read_text(encoding="utf-8")
    # no --output: the restored image was not kept, blurred and sharp are shown
    assert "ran without --output, so no restored images were kept" in page and "not available" not in page
    assert re.findall(r"<figcaption>(\w+)<br>", page) == ["blurred", "sharp"] * 2
    assert len(_data_pngs(page)) == 2 * 2


@pytest.mark.integration
def test_missing_member_outputs_leave_blurred_ensemble_sharp(stack: Stack, tmp_path: Path) -> None:
    models = [arg for m in MEMBERS for arg in ("--model", m)]
    job = _finished(run_cli("evaluate", "--blurred", "s3://report-eval/blur/", "--sharp", "s3://report-eval/sharp/",
                            *models, "--output", "s3://report-eval/pruned/", "-q").strip())
    for obj in stack.s3.list_objects_v2(Bucket="report-eval", Prefix="pruned/_members/")["Contents"]:
        stack.s3.delete_object(Bucket="report-eval", Key=obj["Key"])
    _report(job, "--crops", "1", "--html", str(tmp_path / "pruned.html"))
    page = (tmp_path / "pruned.html").read_text(encoding="utf-8")
    assert "outputs (&lt;output&gt;/_members/) are not in storage" in page
    assert re.findall(r"<figcaption>(\w+)<br>", page) == ["blurred", "ensemble", "sharp"] * 2
    assert len(_data_pngs(page)) == 3 * 2


@pytest.mark.integration
def test_deblur_job_report_has_sharpness_table_crops_and_kernels(stack: Stack, tmp_path: Path,
                                                                 artifacts: Path) -> None:
    from models.catalog import REGISTRY

    if "l0-blind" not in REGISTRY:
        pytest.skip("the blind L0 model (which estimates kernels) is not registered in this checkout")
    job = _finished(run_cli("submit", "s3://report-eval/blur/", "--output", "s3://report-eval/restored/",
                            "--model", "l0-blind:kernel=15", "-q").strip())
    page_path = tmp_path / "deblur.html"
    table = json.loads(_report(job, "--format", "json", "--crops", "1", "--html", str(page_path)))
    rows = _stored_rows(job)
    assert [r["model"] for r in table["rows"]] == ["input", "ensemble"]
    for row in table["rows"]:
        assert row["laplacian_variance"] == pytest.approx(_mean(rows, row["model"], "laplacian_variance"))
        assert row["blur_effect"] == pytest.approx(_mean(rows, row["model"], "blur_effect"))
    ratio = table["rows"][1]["sharpness_ratio"]
    assert ratio == pytest.approx(_mean(rows, "ensemble", "laplacian_variance")
                                  / _mean(rows, "input", "laplacian_variance"))
    assert "l0-blind:kernel=15" in table["diagnostics"]
    page = page_path.read_text(encoding="utf-8")
    assert ">input<" in page and ">restored<" in page and "Laplacian var." in page
    kernels = re.findall(r'<figure class=k><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(kernels) == 2, "the best and the worst image each show their estimated kernel"
    kernel = cv2.imdecode(np.frombuffer(base64.b64decode(kernels[0]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert kernel.shape[0] == kernel.shape[1] and kernel.max() == 255
    assert len(_data_pngs(page)) == 2 * 2 + 2
    _non_trivial(_screenshot(page_path, artifacts / "report-deblur.png", tmp_path))


@pytest.mark.integration
def test_unknown_job_is_an_input_error(stack: Stack) -> None:
    from producer.cli import main

    result = CliRunner().invoke(main, ["report", "00000000-0000-0000-0000-000000000000"])
    assert result.exit_code == 2
    assert "no job with id" in result.output
