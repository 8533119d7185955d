"""What people see when something is off, and while they wait.

Given credentials missing their secret, a Flower port already taken, a job no worker serves, a Ctrl-C while
waiting, output that is not a terminal, an --output-format mapping, records of local restorations, a cancelled job
whose last image still runs and a bucket that does not exist, then each command says what happened and what to do
in a line or two, with the exit code its help documents, and never a traceback. The database, Redis, S3 (moto)
and the subprocesses are real; only the delays are shortened (module constants) and, for Ctrl-C in this process,
the interrupt is raised where a terminal's would land.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from producer.cli import main
from tests.e2e_helpers import ROOT


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def services(redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Redis, moto and a SQLite file of this test's own; a queue no worker consumes."""
    from tests.e2e_helpers import use_services

    return use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home")


def waiting_job(images: int = 3, **spec: Any) -> tuple[str, list[str]]:
    """A queued deblur job on DEBLUR_QUEUE with ``images`` pending images, written through db.queries."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from jobs.settings import load_settings

    settings = load_settings()
    url = settings.resolved_database_url()
    ensure_schema(url)
    uris = [f"s3://archive/in/{n}.png" for n in range(images)]
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"models": ["wiener"], "output": "s3://archive/out/",
                                                        "queue": settings.queue, **spec})
        queries.insert_images(session, job.id, [{"input_uri": u, "output_uri": u.replace("/in/", "/out/")}
                                                for u in uris], batch=0)
        queries.finish_submission(session, job.id, images, "queued")
        return job.id, uris


# ------------------------------------------------------------------ 1. credentials without their secret


def test_an_access_key_without_its_secret_is_named_like_missing_credentials(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 refuses AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY while it builds the client, before any
    request: that PartialCredentialsError came out as a traceback from submit, submit --dry-run and verify."""
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"sqlite:///{tmp_path / 'deblur.db'}")
    # an endpoint of its own: no client cached by another test for the same endpoint
    monkeypatch.setenv("DEBLUR_S3_ENDPOINT_URL", f"http://127.0.0.1:1/{uuid.uuid4().hex}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    for args in (["submit", "s3://archive/extra/", "-o", "s3://archive/out/", "--model", "wiener", "--dry-run"],
                 ["submit", "s3://archive/extra/", "-o", "s3://archive/out/", "--model", "wiener"],
                 ["verify", "--records", "s3://archive/restored/"]):
        result = invoke(*args)
        text = one_line(result.output)
        assert result.exit_code == 1, (args, result.output)  # as for missing credentials: 'error:', exit 1
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output and "error: S3 at http://127.0.0.1:1/" in text
        assert "no S3 credentials" in text and "AWS_SECRET_ACCESS_KEY" in text, text

    from jobs.settings import load_settings
    from producer.doctor import check_storage

    found = check_storage(load_settings(), ["archive"])
    assert found.status == "fail" and "missing: AWS_SECRET_ACCESS_KEY" in found.detail, found
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in found.hint


# ------------------------------------------------------------------ 2. Flower on a port that is taken


def test_flower_on_a_taken_port_says_so_and_exits_2(tmp_path: Path) -> None:
    """The local stack's Flower holds the port 'deblur flower' takes by default there: an OSError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home = tmp_path / "home"
        (home / "stack").mkdir(parents=True)
        (home / "stack" / "connection.json").write_text(json.dumps({"flower_port": port}))
        env = {**_child_env(), "DEBLUR_HOME": str(home), "DEBLUR_BROKER_URL": "redis://127.0.0.1:1/0"}
        run = subprocess.run([sys.executable, "-m", "producer.cli", "flower", "--basic-auth", "admin:secret"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr  # a setting to change, as 2 means for every command
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert f"port {port} on 127.0.0.1 is already in use by the local stack's Flower" in errors[0]
    assert "--port" in errors[0]
    assert "Exit codes: 0 stopped; 2" in one_line(invoke("flower", "--help").output)


def test_the_api_on_a_taken_port_says_so_and_exits_2(tmp_path: Path) -> None:
    """'deblur api' on a port in use printed uvicorn's error and exited 3, which means failed images."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**_child_env(), "DEBLUR_HOME": str(tmp_path / "home"), "DEBLUR_API_TOKEN": "t",
               "DEBLUR_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}"}
        run = subprocess.run([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: port {port} on 127.0.0.1 is already in use; choose a free one with --port N "
                      "(or DEBLUR_API_PORT)"], run.stderr


def _child_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------ 3. a job nobody serves


def test_watching_a_job_no_worker_serves_says_so_once(services: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """'submit --wait' and 'status --watch' waited for ever, silently, on a queue no worker consumes."""
    from producer import tracking

    # the delays, shortened (raising=False: without the feature the test fails on what is printed)
    monkeypatch.setattr(tracking, "POLL_INTERVAL_S", 0.05, raising=False)
    monkeypatch.setattr(tracking, "IDLE_WARNING_S", 0.0, raising=False)
    monkeypatch.setattr(tracking, "IDLE_REPEAT_S", 3600.0, raising=False)
    job, _ = waiting_job()
    real, polls = tracking.job_status, []

    def polled(settings: Any, job_id: str) -> dict[str, Any]:
        polls.append(job_id)
        if len(polls) == 8:  # the user gives up: the watch ends
            tracking.cancel_job(settings, job_id)
        return real(settings, job_id)

    monkeypatch.setattr(tracking, "job_status", polled)
    result = invoke("status", job[:8], "--watch")
    text = one_line(result.output)
    assert result.exit_code == 0, result.output
    queue_name = services["DEBLUR_QUEUE"]
    assert text.count(f"'deblur worker --queue {queue_name}'") == 1, result.output  # once, not at every poll
    assert f"job {job[:8]}: no image has started" in text
    # a worker busy in a solo pool does not answer: it is not called absent for certain
    assert f"no worker that answered consumes '{queue_name}'" in text and "does not answer" in text


# ------------------------------------------------------------------ 4. Ctrl-C while waiting


def test_ctrl_c_while_waiting_leaves_the_job_running_and_exits_130(services: dict[str, str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C printed click's 'Aborted!' and exited 1, which the help gives to a service that did not answer."""
    import boto3

    from jobs.settings import load_settings
    from producer import tracking

    client = boto3.client("s3", endpoint_url=services["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"ctrlc-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="in/a.png", Body=_png())
    real, polls = tracking.job_status, []

    def interrupted(settings: Any, job_id: str) -> dict[str, Any]:
        polls.append(job_id)
        if len(polls) % 2 == 0:  # the second read of each watch: a Ctrl-C mid-wait
            raise KeyboardInterrupt
        return real(settings, job_id)

    monkeypatch.setattr(tracking, "job_status", interrupted)
    submitted = invoke("submit", f"s3://{bucket}/in/", "-o", f"s3://{bucket}/out/", "--model", "wiener", "--wait")
    job = submitted.stdout.split()[0]
    watched = invoke("status", job, "--watch")
    for result in (submitted, watched):
        text = one_line(result.output)
        assert result.exit_code == 130, result.output
        assert "Aborted!" not in text
        assert f"job {job} keeps running" in text and f"'deblur status {job[:8]} --watch'" in text, text
    assert real(load_settings(), job)["status"] == "queued"  # untouched: it waits for a worker
    for command in ("submit", "evaluate", "status"):
        assert "130 with --" in one_line(invoke(command, "--help").output), command


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_real_sigint_during_status_watch_exits_130(services: dict[str, str]) -> None:
    """The same through the signal a terminal sends, in a process of its own whose output is a pipe: its first
    progress line comes at once (not a terminal: plain lines instead of a bar drawn only at the end)."""
    job, _ = waiting_job()
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "status", job, "--watch"], cwd=ROOT,
                            env={**_child_env(), **services}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=60)  # the process is watching once it prints
        assert first.startswith(job[:8]) and "0/3 finished" in first, first
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    rest = "".join(lines.queue)
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest and f"job {job} keeps running" in one_line(rest), rest


# ------------------------------------------------------------------ 5. progress when not on a terminal


def test_watch_prints_plain_progress_lines_when_not_on_a_terminal(services: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Piped to a file or a CI log, the bar was drawn once, at the end: nothing said the job was moving."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer import tracking

    monkeypatch.setattr(tracking, "POLL_INTERVAL_S", 0.01, raising=False)
    monkeypatch.setattr(tracking, "PLAIN_MIN_GAP_S", 0.0, raising=False)
    job, uris = waiting_job()
    url = load_settings().resolved_database_url()
    real = tracking.job_status

    def one_more_done(settings: Any, job_id: str) -> dict[str, Any]:
        info = real(settings, job_id)
        reads.append(job_id)
        left = [u for u in uris if u not in done]
        if left and len(reads) > 1:  # a worker finishes one image between two reads of the watch's loop
            with session_scope(url) as session:
                queries.mark_running(session, job_id, left[:1], "w1")
                queries.record_outcomes(session, job_id, [queries.ImageOutcome(left[0], "done")])
                queries.finish_if_complete(session, job_id)
            done.append(left[0])
        return info

    done: list[str] = []
    reads: list[str] = []
    monkeypatch.setattr(tracking, "job_status", one_more_done)
    result = invoke("status", job, "--watch")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if line.startswith(job[:8])]
    for n in range(4):
        assert any(f"{n}/3 finished" in line for line in progress), result.output
    assert "[done]" in progress[-1] and len(progress) == len(set(progress)), progress


def test_plain_progress_lines_are_not_repeated_more_often_than_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from producer import tracking

    monkeypatch.setattr(tracking, "PLAIN_MIN_GAP_S", 3600.0)
    monkeypatch.setattr(tracking, "PLAIN_EVERY_S", 3600.0)
    buffer = io.StringIO()
    plain = tracking._PlainProgress(Console(file=buffer, width=200))

    def info(done: int, status: str = "running") -> dict[str, Any]:
        counts = {"done": done, "failed": 0, "cancelled": 0, "running": 0, "pending": 5 - done}
        return {"id": "abcdef0123", "status": status, "total": 5, "counts": counts, "finished": done,
                "images_per_s": None, "eta_s": None}

    for done in range(5):  # counts change at every read, within the minimum gap: the first line only
        plain.show(info(done))
    plain.show(info(5, "done"), last=True)  # the end is always said
    assert [line.split("  ")[1] for line in buffer.getvalue().splitlines()] == ["0/5 finished", "5/5 finished"]


# ------------------------------------------------------------------ 6. --output-format in 'deblur status'


def test_status_describes_the_output_format_in_words() -> None:
    """A mapping read 'output: s3://archive/of/ as JPEG as PNG, WEBP as PNG'; one format reads as before."""
    from producer.tracking import print_status

    def output_line(output_format: str) -> list[str]:
        buffer = io.StringIO()
        counts = {"done": 1, "failed": 0, "cancelled": 0, "running": 0, "pending": 0}
        print_status({"id": "abcdef0123", "kind": "deblur", "status": "done", "total": 1, "counts": counts,
                      "images_per_s": None, "eta_s": None, "error": None,
                      "spec": {"models": ["wiener"], "output": "s3://archive/of/", "output_format": output_format}},
                     Console(file=buffer, width=400))
        return [line for line in buffer.getvalue().splitlines() if line.startswith("output:")]

    assert output_line("png") == ["output: s3://archive/of/ as PNG"]
    assert output_line("jpeg=png,webp=png") == [
        "output: s3://archive/of/ (JPEG as PNG, WEBP as PNG; other formats as they are)"]


# ------------------------------------------------------------------ 7. verify --records of a local folder


def test_verify_records_advises_the_command_that_can_read_the_inputs(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """'deblur submit' was advised for local restorations, and it cannot take local files."""
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path / "home"))
    for source, advice, not_advised in (
            ("/photos/scan.png", "'deblur restore'", "'deblur submit'"),  # written by 'deblur restore --sidecar'
            ("s3://archive/scans/scan.png", "'deblur submit'", "'deblur restore'")):  # a tree copied from S3
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        record = {"input": {"uri": source}, "output": {"sha256": hashlib.sha256(b"gone").hexdigest()}}
        (folder / "scan.png.deblur.json").write_text(json.dumps(record))  # its output was deleted since
        result = invoke("verify", "--records", str(folder))
        text = one_line(result.output)
        assert result.exit_code == 1, result.output
        assert "1 missing" in text and f"with {advice}" in text and not_advised not in text, text


# ------------------------------------------------------------------ 8. no ETA once a job finished


def test_a_cancelled_job_with_an_image_still_running_shows_no_eta(services: dict[str, str]) -> None:
    """Cancelling leaves running images to finish: the remaining count made an ETA for a job that is over."""
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.tracking import cancel_job, job_status, print_status

    job, uris = waiting_job()
    settings = load_settings()
    with session_scope(settings.resolved_database_url()) as session:
        queries.mark_running(session, job, uris[:2], "w1")
        queries.record_outcomes(session, job, [queries.ImageOutcome(uris[0], "done")])
    cancel_job(settings, job)
    info = job_status(settings, job)
    assert info["status"] == "cancelled" and info["counts"]["running"] == 1 and info["images_per_s"]
    assert info["eta_s"] == 0.0  # nothing is waited for any more
    buffer = io.StringIO()
    print_status(info, Console(file=buffer, width=400))
    assert "throughput:" in buffer.getvalue() and "ETA" not in buffer.getvalue()


# ------------------------------------------------------------------ 9. doctor --bucket of a missing bucket


def test_doctor_says_a_missing_bucket_does_not_exist(services: dict[str, str]) -> None:
    """It said 'ClientError: ... (404) HeadBucket ... Not Found → check DEBLUR_S3_ENDPOINT_URL and the AWS_*
    credentials'; submit says the bucket does not exist."""
    from jobs.settings import load_settings
    from producer.doctor import check_storage

    found = check_storage(load_settings(), ["nosuch"])
    assert found.status == "fail"
    assert "bucket 'nosuch' does not exist or is not accessible" in found.detail and "404" in found.detail
    assert "ClientError" not in found.detail and found.hint.startswith("create it"), found
