"""``deblur usage``: what the workers spent, per team, model, device, worker and period, on SQLite and PostgreSQL.

Given jobs with labels whose images finished on known days, on known devices and
workers, in every state, when usage is asked for a period and grouped, then each
group holds exactly the images that finished in the period (done and failed, never
pending or cancelled), their megapixels and seconds; and after ``deblur db prune``
deleted the old jobs the same question gets the same answer from the rollups.
Every test selects its own jobs by a label unique to it, because the PostgreSQL
database is shared by the session's tests.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

pytestmark = [pytest.mark.integration]

NOW = datetime.now(timezone.utc) - timedelta(minutes=1)  # never in the future: other tests list the newest jobs
OLD = NOW - timedelta(days=200)


def _job(session, run: str, team: str, kind: str = "deblur", models=("l0-blind:1", "seed002-refine:2"),  # type: ignore[no-untyped-def]
         status: str = "done", finished: datetime | None = None, ensemble: str | None = None) -> str:
    from db.schema import Job

    job = Job(id=str(uuid.uuid4()), kind=kind, status=status, total=0, created_at=(finished or NOW) - timedelta(hours=1),
              finished_at=finished, spec={"models": list(models), "ensemble": ensemble,
                                          "labels": {"run": run, "team": team}})
    session.add(job)
    session.flush()
    return job.id


def _image(session, job_id: str, status: str, finished: datetime | None, size=(1000, 500),  # type: ignore[no-untyped-def]
           device: str | None = "cuda:0", worker: str | None = "gpu-a", seconds=(0.5, 4.0, 0.25)) -> None:
    from db.schema import Image

    download, inference, upload = seconds
    session.add(Image(job_id=job_id, input_uri=f"s3://b/in/{uuid.uuid4().hex}.png", status=status,
                      finished_at=finished, width=size[0] if status == "done" else None,
                      height=size[1] if status == "done" else None, device=device, worker=worker,
                      download_s=download, inference_s=inference, upload_s=upload))


@pytest.fixture
def history(env):  # type: ignore[no-untyped-def]
    """Two teams' jobs: what each group must hold is written next to the rows."""
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    run = uuid.uuid4().hex
    day1, day2 = NOW - timedelta(days=3, hours=2), NOW - timedelta(days=1)
    with session_scope(url) as session:
        ingest = _job(session, run, "ingest", finished=day2)
        for _ in range(3):  # 3 done on a GPU, day 1: 1.5 MP, 12 model s, 14.25 worker s
            _image(session, ingest, "done", day1)
        _image(session, ingest, "failed", day2, seconds=(0.5, 2.0, 0.0))  # seconds count, megapixels do not
        _image(session, ingest, "cancelled", None, device=None, worker=None, seconds=(0, 0, 0))
        archive = _job(session, run, "archive", models=("wiener",), status="running")
        _image(session, archive, "done", day2, size=(2000, 2000), device="cpu", worker="cpu-b",
               seconds=(1.0, 10.0, 1.0))
        _image(session, archive, "pending", None, device=None, worker=None, seconds=(0, 0, 0))
        _image(session, archive, "done", NOW - timedelta(days=40))  # before the period
        evaluation = _job(session, run, "archive", kind="evaluate", finished=day2, ensemble="archive-v1")
        _image(session, evaluation, "done", day2, size=(100, 100), device="cuda:1", worker="gpu-a")
        other = _job(session, uuid.uuid4().hex, "ingest", finished=day2)  # another run's: never counted
        _image(session, other, "done", day2)
    return {"run": run, "url": url, "ingest": ingest, "archive": archive, "evaluation": evaluation,
            "day1": day1.date().isoformat(), "day2": day2.date().isoformat()}


def _report(history, by=(), since=NOW - timedelta(days=30), until=NOW, **kwargs):  # type: ignore[no-untyped-def]
    from jobs.settings import load_settings
    from producer.usage import usage_report

    return usage_report(load_settings(), since, until, by=by, labels={"run": history["run"], **kwargs.pop(
        "labels", {})}, **kwargs)


def _groups(report) -> dict[tuple[str, ...], dict]:  # type: ignore[no-untyped-def]
    return {tuple(line.group.values()): line.to_dict() for line in report.lines}


def test_usage_counts_finished_images_per_team_device_and_period(history) -> None:  # type: ignore[no-untyped-def]
    report = _report(history, by=["label:team"])
    groups = _groups(report)
    assert set(groups) == {("ingest",), ("archive",)}
    ingest = groups[("ingest",)]
    assert (ingest["jobs"], ingest["images_done"], ingest["images_failed"]) == (1, 3, 1)
    assert ingest["megapixels"] == pytest.approx(1.5)
    assert ingest["model_seconds"] == pytest.approx(14.0)  # 3 × 4 + the failed image's 2
    assert ingest["worker_seconds"] == pytest.approx(3 * 4.75 + 2.5)
    assert ingest["model_seconds_per_megapixel"] == pytest.approx(14.0 / 1.5, abs=1e-4)  # rounded to 4 places
    archive = groups[("archive",)]
    assert (archive["jobs"], archive["images_done"], archive["images_failed"]) == (2, 2, 0)
    assert archive["megapixels"] == pytest.approx(4.0 + 0.01)
    total = report.total.to_dict()
    assert (total["jobs"], total["images_done"], total["images_failed"]) == (3, 5, 1)
    assert report.rolled_up_days is False

    by_device = _groups(_report(history, by=["device", "worker"]))
    assert {key: (g["images_done"], g["images_failed"]) for key, g in by_device.items()} == {
        ("cuda", "gpu-a"): (4, 1), ("cpu", "cpu-b"): (1, 0)}  # cuda:0 and cuda:1 are one device kind

    by_day = _groups(_report(history, by=["day"]))
    assert {key: g["images_done"] for key, g in by_day.items()} == {(history["day1"],): 3, (history["day2"],): 2}
    assert _groups(_report(history, by=["month"]))[(history["day2"][:7],)]["images_done"] >= 2

    by_model = _groups(_report(history, by=["model"]))
    assert set(by_model) == {("l0-blind:1 + seed002-refine:2",), ("wiener",),
                             ("archive-v1 (l0-blind:1 + seed002-refine:2)",)}

    from producer.client import Client  # the Python client gives the same report

    same = Client().usage(since=NOW - timedelta(days=30), until=NOW, by=["label:team"], labels={"run": history["run"]})
    assert same.to_dict() == report.to_dict()

    only_evaluations = _report(history, by=["job"], kind="evaluate")
    assert [line.group["job"] for line in only_evaluations.lines] == [history["evaluation"]]
    narrow = _report(history, since=NOW - timedelta(days=2))  # day 2 only
    assert (narrow.total.done, narrow.total.failed) == (2, 1)
    wider = _report(history, since=NOW - timedelta(days=60))  # the archive image of 40 days ago too
    assert wider.total.done == 6


def test_usage_survives_pruning_from_rollups(history) -> None:  # type: ignore[no-untyped-def]
    """The pruned jobs' images are gone; their usage, per day, device and worker, is not."""
    from sqlalchemy import func, select, update

    from db.engine import session_scope
    from db.schema import Image, Job
    from producer.cli import main

    groupings = ["label:team", "device", "worker", "day", "job", "model"]
    before = _report(history, by=groupings)
    # a report that reads a job's images just before a prune commits, and its rollups just after, sees both:
    # the rollup of a job whose images were read is left out
    from sqlalchemy import delete

    from db.schema import UsageRollup
    from db.usage import roll_up_job

    with session_scope(history["url"]) as session:
        assert roll_up_job(session, history["ingest"]) > 0
    assert _report(history, by=groupings).total.to_dict() == before.total.to_dict()
    with session_scope(history["url"]) as session:
        session.execute(delete(UsageRollup).where(UsageRollup.job_id == history["ingest"]))
    # age the finished jobs past a 90-day retention (the images keep their finish times)
    with session_scope(history["url"]) as session:
        session.execute(update(Job).where(Job.id.in_([history["ingest"], history["evaluation"]]))
                        .values(finished_at=OLD))
    result = CliRunner().invoke(main, ["db", "prune", "--older-than", "90", "--yes"])
    assert result.exit_code == 0, result.output
    with session_scope(history["url"]) as session:
        left = session.scalar(select(func.count()).select_from(Image).where(
            Image.job_id.in_([history["ingest"], history["evaluation"]])))
    assert left == 0

    after = _report(history, by=groupings)
    assert after.rolled_up_days is True
    assert [line.to_dict() for line in after.lines] == [line.to_dict() for line in before.lines]  # rounded figures
    assert after.total.to_dict() == before.total.to_dict()
    # rollups keep whole days: a period from the middle of day 1 still holds day 1's pruned images
    mid_day1 = datetime.fromisoformat(history["day1"]).replace(tzinfo=timezone.utc) + timedelta(hours=23)
    assert _report(history, since=mid_day1).total.done == before.total.done
    # ... and a period that ends before day 1 holds none of them
    assert _report(history, until=mid_day1 - timedelta(days=1)).total.done == 0
    # filters apply to rollups as to live rows
    assert _report(history, labels={"team": "ingest"}).total.to_dict()["images_done"] == 3
    assert _report(history, kind="evaluate").total.done == 1


def test_usage_cli_table_csv_json_and_refusals(history) -> None:  # type: ignore[no-untyped-def]
    from producer.cli import main

    runner = CliRunner()
    base = ["usage", "--label", f"run={history['run']}", "--since", "30d"]
    table = runner.invoke(main, [*base, "--by", "label:team"])
    assert table.exit_code == 0, table.output
    assert "ingest" in table.output and "archive" in table.output and "total" in table.output

    rows = list(csv.DictReader(io.StringIO(runner.invoke(main, [*base, "--by", "label:team", "--format",
                                                                "csv"]).output)))
    assert {row["label:team"]: int(row["images_done"]) for row in rows} == {"archive": 2, "ingest": 3}
    assert set(rows[0]) >= {"jobs", "megapixels", "model_seconds", "worker_seconds", "model_seconds_per_megapixel"}

    document = json.loads(runner.invoke(main, [*base, "--by", "device", "--format", "json"]).output)
    assert document["by"] == ["device"] and document["total"]["images_done"] == 5
    assert {g["device"]: g["images_done"] for g in document["groups"]} == {"cpu": 1, "cuda": 4}

    dated = runner.invoke(main, ["usage", "--label", f"run={history['run']}", "--since", history["day2"],
                                 "--until", (NOW + timedelta(days=1)).date().isoformat(), "--format", "json"])
    assert json.loads(dated.output)["total"]["images_done"] == 2

    for args, expected in ((["--by", "team"], "not a grouping"), (["--by", "day", "--by", "day"], "given twice"),
                           (["--by", "label:bad key"], "after 'label:' comes a label's name"),
                           (["--since", "yesterday"], "expected a time ago"), (["--label", "team"], "KEY=VALUE"),
                           (["--since", "1d", "--until", "2d"], "must come after")):
        refused = runner.invoke(main, ["usage", *args])
        assert refused.exit_code == 2, (args, refused.output)
        assert expected in refused.output, (args, refused.output)


def test_usage_without_by_shows_the_total_once_and_csv_has_it_even_when_zero(history) -> None:  # type: ignore[no-untyped-def]
    from producer.cli import main

    runner = CliRunner()
    base = ["usage", "--label", f"run={history['run']}", "--since", "30d"]
    table = runner.invoke(main, base)
    assert table.exit_code == 0, table.output
    body = [line for line in table.output.splitlines() if line.startswith("│")]
    assert len(body) == 1, table.output  # the total, not the one group and the total again
    assert [cell.strip() for cell in body[0].strip("│").split("│")][:2] == ["3", "5"]  # jobs, done

    total = list(csv.DictReader(io.StringIO(runner.invoke(main, [*base, "--format", "csv"]).output)))
    assert [int(row["images_done"]) for row in total] == [5]

    empty = ["usage", "--label", f"run={uuid.uuid4().hex}", "--since", "30d", "--format", "csv"]
    zero = list(csv.DictReader(io.StringIO(runner.invoke(main, empty).output)))
    assert [(row["jobs"], row["images_done"], row["megapixels"]) for row in zero] == [("0", "0", "0.0")]
    assert runner.invoke(main, [*empty, "--by", "label:team"]).output.splitlines() == [
        "label:team,jobs,images_done,images_failed,megapixels,model_seconds,worker_seconds,"
        "model_seconds_per_megapixel"]  # with --by, no group: the header alone (no total row in CSV)


def test_periods_in_other_time_zones_and_naive_times_are_taken_as_utc(history) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta, timezone

    berlin = timezone(timedelta(hours=1))
    utc_report = _report(history, since=NOW - timedelta(days=2), until=NOW)
    same = _report(history, since=(NOW - timedelta(days=2)).astimezone(berlin), until=NOW.astimezone(berlin))
    naive = _report(history, since=(NOW - timedelta(days=2)).replace(tzinfo=None), until=NOW.replace(tzinfo=None))
    assert same.total.to_dict() == naive.total.to_dict() == utc_report.total.to_dict()
    assert utc_report.total.done == 2


def test_parse_moment_reads_relative_times_and_utc_dates() -> None:
    from jobs.errors import InputError
    from producer.usage import parse_moment

    assert parse_moment("30d", now=NOW) == NOW - timedelta(days=30)
    assert parse_moment("1.5h", now=NOW) == NOW - timedelta(minutes=90)
    assert parse_moment("2w", now=NOW) == NOW - timedelta(days=14)
    assert parse_moment("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_moment("2026-11-01T08:00+01:00") == datetime(2026, 11, 1, 7, tzinfo=timezone.utc)
    assert parse_moment("2026-11-01T08:00Z") == datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(InputError, match="--until '3 days'"):
        parse_moment("3 days", option="--until")


def _attempt(url: str, job_id: str, uri: str, status: str, finished: datetime, seconds: float) -> None:
    """A worker's attempt at ``uri``: claimed, recorded with ``seconds`` of model time, finished at ``finished``."""
    from sqlalchemy import update

    from db import queries
    from db.engine import session_scope
    from db.schema import Image

    with session_scope(url) as session:
        queries.mark_running(session, job_id, [uri], "gpu-a")
        queries.record_outcomes(session, job_id, [queries.ImageOutcome(
            uri, status, error=None if status == "done" else "out of memory", width=1000, height=1000,
            device="cuda:0", worker="gpu-a", download_s=0.5, inference_s=seconds, upload_s=0.5)])
        session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri == uri)
                        .values(finished_at=finished))


def test_a_retried_image_counts_each_attempt_in_its_own_period_and_after_pruning(env) -> None:  # type: ignore[no-untyped-def]
    """A retry once replaced the failed attempt on the image's row: its seconds vanished from usage, and from the
    month they were spent in. Every attempt now counts, on its own day, and the rollup of a pruned job keeps it."""
    from sqlalchemy import func, select, update

    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import EarlierAttempt, Job
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    run = uuid.uuid4().hex
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"models": ["wiener"], "labels": {"run": run, "team": "t"}})
        job_id = job.id
        queries.insert_images(session, job_id, [{"input_uri": "s3://b/in/a.png", "output_uri": "s3://o/a.png"}], 0)
        queries.finish_submission(session, job_id, 1, "queued")
    _attempt(url, job_id, "s3://b/in/a.png", "failed", NOW - timedelta(days=20), 30.0)
    with session_scope(url) as session:
        retried = queries.images_to_retry(session, job_id, failed=True, stalled_before=None)
        assert queries.reset_for_retry(session, job_id, retried) == {"s3://b/in/a.png"}
    _attempt(url, job_id, "s3://b/in/a.png", "done", NOW - timedelta(days=2), 4.0)

    def usage(days: int) -> tuple[int, int, float, float]:
        total = _report({"run": run}, since=NOW - timedelta(days=days)).total.to_dict()
        return total["images_done"], total["images_failed"], total["megapixels"], total["model_seconds"]

    assert usage(30) == (1, 1, pytest.approx(1.0), pytest.approx(34.0))
    assert usage(10) == (1, 0, pytest.approx(1.0), pytest.approx(4.0))  # the failed attempt stays on its day
    # ... and 'deblur results --history' shows it: when, how, why, where
    [row] = json.loads(_cli("results", job_id, "--history", "--format", "json"))
    [before] = row["earlier_attempts"]
    assert (before["status"], before["error"], before["worker"], before["inference_s"]) == (
        "failed", "out of memory", "gpu-a", 30.0)
    assert before["finished_at"].startswith((NOW - timedelta(days=20)).date().isoformat())
    header, line = list(csv.reader(io.StringIO(_cli("results", job_id, "--history", "--format", "csv"))))
    assert header[-2:] == ["earlier_attempts", "earlier_errors"] and line[-2] == "1"
    assert line[-1].endswith(": out of memory")
    empty = _cli("results", job_id, "--history", "--format", "csv", "--status", "pending")  # no rows, same columns
    assert next(csv.reader(io.StringIO(empty)))[-2:] == ["earlier_attempts", "earlier_errors"]
    assert "1, last failed: out of memory" in _cli("results", job_id, "--history")
    assert "earlier_attempts" not in json.loads(_cli("results", job_id, "--format", "json"))[0]
    with session_scope(url) as session:
        queries.finish_if_complete(session, job_id)
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=OLD))
        assert queries.delete_finished_job(session, job_id, NOW - timedelta(days=90)) == 1
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(EarlierAttempt)
                              .where(EarlierAttempt.job_id == job_id)) == 0
    assert usage(30) == (1, 1, pytest.approx(1.0), pytest.approx(34.0))  # from the rollups now


def test_an_output_found_missing_leaves_its_restoration_in_its_own_month(env) -> None:  # type: ignore[no-untyped-def]
    """'deblur verify --mark-failed' once moved a done image to failed at the time it was found: its megapixels and
    seconds left the month they were restored in, and the report for that month changed after it was sent."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    run = uuid.uuid4().hex
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"models": ["wiener"], "labels": {"run": run}})
        job_id = job.id
        queries.insert_images(session, job_id, [{"input_uri": "s3://b/in/a.png", "output_uri": "s3://o/a.png"}], 0)
        queries.finish_submission(session, job_id, 1, "queued")
    _attempt(url, job_id, "s3://b/in/a.png", "done", NOW - timedelta(days=40), 4.0)
    month = {"since": NOW - timedelta(days=45), "until": NOW - timedelta(days=35)}
    before = _report({"run": run}, **month).total.to_dict()
    assert (before["images_done"], before["model_seconds"]) == (1, pytest.approx(4.0))
    with session_scope(url) as session:
        queries.mark_image_failed(session, job_id, "s3://b/in/a.png", "output missing")
    assert _report({"run": run}, **month).total.to_dict() == before
    marked_by = datetime.now(timezone.utc) + timedelta(seconds=1)  # NOW was taken when the module was imported
    found = _report({"run": run}, since=NOW - timedelta(days=1), until=marked_by).total.to_dict()
    assert (found["images_done"], found["images_failed"], found["model_seconds"]) == (0, 1, 0.0)


def _cli(*args: str) -> str:
    """A deblur command's output (a wide terminal, so table cells are not folded)."""
    from producer.cli import main

    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output
