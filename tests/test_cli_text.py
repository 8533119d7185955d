"""The command line shows user text as typed and refuses bad paths before it works.

Given jobs whose labels, S3 keys, errors and model specs hold square brackets (rich's
markup) and CSV formula starts, when ``deblur status``, ``results``, ``usage`` and
``report`` print them, then they show the text as stored, never crash, and CSV cells
cannot become spreadsheet formulas. ``results --worst`` ranks by the metric the job's
kind has and refuses one it lacks; a SQLite DEBLUR_DATABASE_URL whose folder is missing
is named instead of being created; output files in missing folders are refused before
any work. Jobs are selected by a label unique to each test (PostgreSQL is shared).
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from producer.cli import main

@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands' rich consoles wide enough that no table cell is cut short with '…' or wrapped."""
    import producer.cli
    import producer.report_cli
    import producer.usage_cli

    for module in (producer.cli, producer.report_cli, producer.usage_cli):
        monkeypatch.setattr(module.out, "width", 400)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _job(kind: str, labels: dict[str, str], images: list[tuple[str, str, dict[str, float], str | None]],
         models: list[str] | None = None, error: str | None = None,
         extra_metrics: tuple[tuple[str, str, float], ...] = ()) -> str:
    """A finished job written straight through db.queries: ``images`` are (key, status, ensemble metrics, error);
    every done image's input gets each metric at 1.0."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, kind, {"models": models or ["wiener"], "output": "s3://archive/out/",
                                                    "labels": labels})
        uris = [f"s3://archive/in/{key}" for key, *_ in images]
        queries.insert_images(session, job.id, [
            {"input_uri": uri, "output_uri": uri.replace("/in/", "/out/"),
             "reference_uri": uri.replace("/in/", "/sharp/") if kind == "evaluate" else None} for uri in uris],
            batch=0)
        outcomes = []
        for uri, (_, status, metrics, image_error) in zip(uris, images):
            if status == "done":
                measured = [("input", name, 1.0) for name in metrics] + [
                    ("ensemble", name, value) for name, value in metrics.items()] + list(extra_metrics)
                outcomes.append(queries.ImageOutcome(uri, "done", output_uri=uri.replace("/in/", "/out/"),
                                                     inference_s=0.5, width=4, height=4, metrics=measured))
            else:
                outcomes.append(queries.ImageOutcome(uri, "failed", error=image_error))
        queries.record_outcomes(session, job.id, outcomes)
        job.status = "done"
        job.total = len(images)
        job.error = error
        return job.id


@pytest.mark.integration
def test_brackets_in_labels_keys_and_errors_are_shown_as_typed(env, wide) -> None:  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex
    draft = _job("deblur", {"run": run, "team": "[draft]"}, [
        ("scan[draft].png", "done", {"laplacian_variance": 2.0}, None),
        ("plain.png", "failed", {}, "cannot decode s3://archive/in/plain.png: [bold]not a PNG[/x]"),
    ], error="stopped: [bold]quota[/bold] reached [/x]")
    closing = _job("deblur", {"run": run, "team": "a[/x]b"}, [("one.png", "done", {"laplacian_variance": 1.0}, None)])

    shown = invoke("status", draft)
    assert shown.exit_code == 0, shown.output
    assert "labels: run=" in shown.output and "team=[draft]" in shown.output
    assert "stopped: [bold]quota[/bold] reached [/x]" in shown.output

    listed = invoke("status", "--label", f"run={run}")
    assert listed.exit_code == 0, listed.output
    assert "team=[draft]" in listed.output and "team=a[/x]b" in listed.output and closing in listed.output

    results = invoke("results", draft)
    assert results.exit_code == 0, results.output
    assert "scan[draft].png" in results.output
    assert "cannot decode s3://archive/in/plain.png: [bold]not a PNG[/x]" in results.output

    usage = invoke("usage", "--label", f"run={run}", "--by", "label:team")
    assert usage.exit_code == 0, usage.output
    assert "[draft]" in usage.output and "a[/x]b" in usage.output

    unknown = invoke("status", "ab[/x]cd")
    assert unknown.exit_code == 2 and "'ab[/x]cd'" in unknown.output and "Traceback" not in unknown.output


def test_an_error_message_keeps_its_brackets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "./scans[draft].txt", "-o", "s3://archive/out/")
    assert result.exit_code == 2
    assert "'./scans[draft].txt'" in result.output


@pytest.mark.integration
def test_report_shows_model_and_diagnostic_names_with_brackets(env, tmp_path, wide) -> None:  # type: ignore[no-untyped-def]
    from models.catalog import REGISTRY

    spec = "nafnet-gopro:path=/w/a[/x]b.pt"
    key = REGISTRY.parse(spec).key()
    job = _job("evaluate", {"run": uuid.uuid4().hex}, [
        ("a.png", "done", {"psnr": 26.0}, None), ("b.png", "done", {"psnr": 27.0}, None)],
        models=[spec], extra_metrics=((key, "psnr", 26.5), ("odd[/x]", "psnr", 1.0)))
    html = tmp_path / "r.html"
    result = invoke("report", job, "--crops", "0", "--html", str(html))
    assert result.exit_code == 0, result.output
    assert "a[/x]b.pt" in result.output and "odd[/x]: psnr 1" in result.output
    assert html.is_file()


@pytest.mark.integration
def test_worst_ranks_a_deblur_job_by_sharpness_and_refuses_a_metric_it_lacks(env) -> None:  # type: ignore[no-untyped-def]
    job = _job("deblur", {"run": uuid.uuid4().hex}, [
        ("a.png", "done", {"laplacian_variance": 3.0}, None), ("b.png", "done", {"laplacian_variance": 1.0}, None),
        ("c.png", "done", {"laplacian_variance": 2.0}, None)])
    worst = invoke("results", job, "--worst", "2", "--format", "uris")
    assert worst.exit_code == 0, worst.output
    assert worst.stdout.split() == ["s3://archive/in/b.png", "s3://archive/in/c.png"]  # the least sharp first

    for metric in ("psnr", "sharpnes"):  # psnr: deblur jobs have no reference; sharpnes: a typing error
        refused = invoke("results", job, "--worst", "2", "--metric", metric)
        assert refused.exit_code == 2, refused.output
        assert f"'{metric}'" in refused.output and "laplacian_variance" in refused.output

    evaluation = _job("evaluate", {"run": uuid.uuid4().hex}, [
        ("x.png", "done", {"psnr": 30.0, "ssim": 0.5}, None), ("y.png", "done", {"psnr": 20.0, "ssim": 0.9}, None)])
    by_psnr = invoke("results", evaluation, "--worst", "1", "--format", "uris")
    assert by_psnr.stdout.split() == ["s3://archive/in/y.png"]
    by_ssim = invoke("results", evaluation, "--worst", "1", "--metric", "ssim", "--format", "uris")
    assert by_ssim.stdout.split() == ["s3://archive/in/x.png"]


@pytest.mark.integration
def test_csv_cells_cannot_become_spreadsheet_formulas(env) -> None:  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex
    job = _job("deblur", {"run": run, "team": "=HYPERLINK(\"http://x\")"}, [
        ("=cmd.png", "done", {"laplacian_variance": 2.0}, None),
        ("plain.png", "failed", {}, "@SUM(A1)")])
    _job("deblur", {"run": run}, [("n.png", "done", {"laplacian_variance": 1.0}, None)])  # no team: '-'

    rows = list(csv.DictReader(io.StringIO(invoke("results", job, "--format", "csv").stdout)))
    assert [r["input"] for r in rows] == ["s3://archive/in/=cmd.png", "s3://archive/in/plain.png"]
    assert rows[1]["error"] == "'@SUM(A1)"

    usage = invoke("usage", "--label", f"run={run}", "--by", "label:team", "--format", "csv")
    teams = [r["label:team"] for r in csv.DictReader(io.StringIO(usage.stdout))]
    assert sorted(teams) == ["'=HYPERLINK(\"http://x\")", "-"]


def test_spreadsheet_safe_leaves_numbers_and_plain_text_alone() -> None:
    from producer.tracking import spreadsheet_safe

    assert [spreadsheet_safe(v) for v in ("=1+1", "+x", "-x", "@a", "\tx", "-", "-1.5", "-inf", "a=b", 3, -2.0)] == [
        "'=1+1", "'+x", "'-x", "'@a", "'\tx", "-", "-1.5", "-inf", "a=b", 3, -2.0]


# ------------------------------------------------------------ SQLite paths (no services needed)


def test_a_sqlite_url_in_a_missing_or_file_folder_is_named_not_created(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path / "home"))
    (tmp_path / "notadir").write_text("")
    missing = tmp_path / "nonexistent" / "dir"
    for url, folder, why in ((f"sqlite:///{tmp_path / 'notadir' / 'x.db'}", tmp_path / "notadir", "is a file"),
                             (f"sqlite:///{missing / 'x.db'}", tmp_path / "nonexistent", "does not exist")):
        monkeypatch.setenv("DEBLUR_DATABASE_URL", url)
        result = invoke("status", "abcd")
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "DEBLUR_DATABASE_URL" in result.output and str(folder) in result.output and why in result.output
    assert not (tmp_path / "nonexistent").exists()

    upgraded = invoke("db", "upgrade")  # asked for: the folder is made, with the schema
    assert upgraded.exit_code == 0, upgraded.output
    assert (missing / "x.db").is_file()
    listed = invoke("status", "--format", "json", "--label", "run=none")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []

    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"sqlite:///{tmp_path / 'notadir' / 'x.db'}")
    refused = invoke("db", "upgrade")
    assert refused.exit_code == 2 and "is a file, not a folder" in refused.output


def test_the_default_database_gets_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEBLUR_DATABASE_URL", raising=False)
    home = tmp_path / "new" / "home"
    monkeypatch.setenv("DEBLUR_HOME", str(home))
    listed = invoke("status", "--format", "json", "--label", "run=none")
    assert listed.exit_code == 0, listed.output
    assert (home / "deblur.db").is_file()


# ------------------------------------------------------------ output files, help texts


def test_output_files_in_missing_folders_are_refused_before_any_work(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"sqlite:///{tmp_path / 'nodb' / 'x.db'}")  # never reached
    for args in (("report", "some-job", "--html", "nodir/x.html"), ("metrics", "-o", "nodir/x.prom")):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "nodir" in result.output and "does not exist" in result.output and "Traceback" not in result.output


def test_help_examples_and_options_say_what_happens() -> None:
    from jobs.s3uri import parse_s3_uri

    top = invoke("--help").output
    assert "s3://b/" not in top
    line = next(text for text in top.splitlines() if "deblur submit s3://" in text)
    for word in line.split():
        if word.startswith("s3://"):
            parse_s3_uri(word)  # a valid bucket name: the example runs as printed
    assert "s3://b/" not in invoke("ensemble", "--help").output
    for command in ("submit", "evaluate"):
        assert "3 with --wait" in " ".join(invoke(command, "--help").output.split())

    pull = " ".join(invoke("models", "pull", "--help").output.split())
    assert "checksum verified" not in pull and "no registered sha256" in pull and "nothing is left behind" in pull
    assert "sha256 checked when known" in invoke("models", "--help").output
    status = " ".join(invoke("stack", "status", "--help").output.split())
    assert "--format [table|json] table for people" in status


def test_worker_loglevel_has_help() -> None:
    pytest.importorskip("celery")
    worker = " ".join(invoke("worker", "--help").output.split())
    assert "Log level of the worker" in worker


def test_labels_refuse_characters_that_rewrite_a_line_and_the_reserved_name_in_any_case() -> None:
    """Only C0 controls were refused: a right-to-left override, an 8-bit terminal escape or a line separator in a
    label reached 'deblur status' and notifications; 'API-Client' read as the API's own label; ' team = ingest '
    kept its spaces, so a filter typed without them missed the job."""
    from jobs.errors import InputError
    from jobs.labels import check_submitted_labels, parse_labels

    for value in ("a\u202eb", "\x9b2J", "x\u2028y", "\ufeffz", "del\x7f"):
        with pytest.raises(InputError, match="without control characters"):
            parse_labels([f"team={value}"])
    with pytest.raises(InputError, match="set by the HTTP API"):
        check_submitted_labels({"API-Client": "someone"})
    assert parse_labels([" team = ingest "]) == {"team": "ingest"}
    assert parse_labels(["place=Zürich ✓"]) == {"place": "Zürich ✓"}
