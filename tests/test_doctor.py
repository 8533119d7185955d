"""``deblur doctor``: each part a job needs, checked for real, with what to do about each that is not ready.

Given the real services (Redis, ``moto_server``, SQLite and PostgreSQL) and a
real worker, the doctor finds every part ready; given a broker that does not
answer (its URL carrying a password), a schema behind the release, a bucket
that does not exist, a broken clients file and a worker that lacks a batch field, it
names each problem with its remedy, exits 1, and never prints the password.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from tests.conftest import free_port
from tests.e2e_helpers import WorkerProcess, service_env

pytestmark = [pytest.mark.integration]


def doctor(*args: str):  # type: ignore[no-untyped-def]
    from producer.cli import main

    return CliRunner().invoke(main, ["doctor", *args])


def test_a_ready_installation(empty_database_url: str, redis_url: str, s3_endpoint: str,  # type: ignore[no-untyped-def]
                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.engine import ensure_schema
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from tests.e2e_helpers import use_services

    # a database of its own: other tests' unfinished jobs wait on queues no worker serves, which the doctor names
    env = use_services(monkeypatch, redis_url, s3_endpoint, empty_database_url, tmp_path / "home")
    settings = load_settings()
    ensure_schema(settings.resolved_database_url())
    bucket = f"doctor-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket=bucket)
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log", pool="prefork")
    try:
        worker.wait_ready(app_for(settings))
        found = doctor("--bucket", bucket, "--format", "json")
        text = doctor("--bucket", bucket)
        # a worker that stopped consuming (as after a failed GPU) answers, consumes nothing and needs a restart
        app_for(settings).control.cancel_consumer(settings.queue, destination=[worker.name], reply=True, timeout=5)
        stopped = doctor("--format", "json")
    finally:
        worker.stop()
    workers = {c["part"]: c for c in json.loads(stopped.stdout)["checks"]}["workers"]
    assert stopped.exit_code == 1 and workers["status"] == "fail" and worker.name in workers["detail"]
    assert "restart" in workers["hint"]
    assert found.exit_code == 0, found.output
    report = json.loads(found.stdout)
    assert report["ok"] is True
    assert {c["part"]: c["status"] for c in report["checks"]} == {
        "database": "ok", "broker": "ok", "workers": "ok", "queues": "ok", "storage": "ok"}
    checks = {c["part"]: c["detail"] for c in report["checks"]}
    assert worker.name in checks["workers"] and bucket in checks["storage"] and "(current)" in checks["database"]
    assert text.exit_code == 0 and text.output.count("ok  ") == 5, text.output


def test_each_problem_is_named_with_its_remedy(empty_database_url: str, redis_url: str, s3_endpoint: str,  # type: ignore[no-untyped-def]
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.engine import upgrade
    from tests.e2e_helpers import use_services

    upgrade(empty_database_url, "0005")
    clients = tmp_path / "clients"
    clients.write_text("half a line\n")
    env = use_services(monkeypatch, redis_url, s3_endpoint, empty_database_url, tmp_path / "home",
                       DEBLUR_API_CLIENTS=str(clients))
    # a worker of a release that says it lacks a batch field this one sends
    older = WorkerProcess({**service_env(env), "TEST_WORKER_FIELDS": "output_format,quality,sidecar"},
                          tmp_path / "older.log", app="tests.older_worker_app")
    try:
        from jobs.celery_app import app_for
        from jobs.settings import load_settings

        older.wait_ready(app_for(load_settings()))
        found = doctor("--bucket", "no-such-bucket", "--format", "json")
    finally:
        older.stop()
    assert found.exit_code == 1
    checks = {c["part"]: c for c in json.loads(found.stdout)["checks"]}
    assert checks["database"]["status"] == "warn" and "schema 0005" in checks["database"]["detail"]
    assert "deblur db upgrade" in checks["database"]["hint"]
    assert checks["workers"]["status"] == "warn" and older.name in checks["workers"]["detail"]
    assert "outdated" in checks["workers"]["detail"] and "upgrade" in checks["workers"]["hint"]
    assert checks["storage"]["status"] == "fail" and "404" in checks["storage"]["detail"]
    assert checks["api clients"]["status"] == "fail" and "line 1" in checks["api clients"]["detail"]

    # a broker that does not answer: named, with its remedy, and its password never shown
    monkeypatch.setenv("DEBLUR_BROKER_URL", f"redis://:s3cretpw@127.0.0.1:{free_port()}/0")
    down = doctor()
    assert down.exit_code == 1 and "s3cretpw" not in down.output
    assert "fail  broker" in down.output and "redis-server" in down.output, down.output
    assert "not asked: the broker does not answer" in down.output


def test_a_queue_no_worker_serves_and_a_broker_loss_being_mended_are_named(  # type: ignore[no-untyped-def]
        empty_database_url: str, redis_url: str, s3_endpoint: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs wait on the queue they were submitted to: one whose workers all stopped would hold them back for good,
    and only the backlog alert would hint at it."""
    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import BrokerMark
    from tests.e2e_helpers import use_services
    from worker.broker_watch import broker_identity

    env = use_services(monkeypatch, redis_url, s3_endpoint, empty_database_url, tmp_path / "home")
    ensure_schema(empty_database_url)
    with session_scope(empty_database_url) as s:
        for queue, count in (("gpu-large", 3), (env["DEBLUR_QUEUE"], 0), ("broken-off", 2)):
            job, _ = queries.create_job(s, "deblur", {"models": ["wiener"], "queue": queue})
            queries.insert_images(s, job.id, [{"input_uri": f"s3://b/{queue}/{n}.png"} for n in range(count)], 0)
            queries.finish_submission(s, job.id, count, "queued")
        # failed as its submission broke off: the images it sent are still restored, so they need a worker
        queries.set_job_state(s, job.id, status="failed")
        failed_alone, _ = queries.create_job(s, "deblur", {"models": ["wiener"], "queue": "all-failed"})
        queries.insert_images(s, failed_alone.id, [{"input_uri": "s3://b/f.png"}], 0)
        queries.record_outcomes(s, failed_alone.id, [queries.ImageOutcome(input_uri="s3://b/f.png", status="failed")])
        queries.set_job_state(s, failed_alone.id, status="failed")
    quiet = json.loads(doctor("--format", "json").stdout)
    checks = {c["part"]: c for c in quiet["checks"]}
    assert checks["queues"]["status"] == "warn"
    assert "'gpu-large' has 1 unfinished job(s) with 3 image(s) waiting and no worker" in checks["queues"]["detail"]
    assert "'broken-off' has 1 unfinished job(s) with 2 image(s) waiting" in checks["queues"]["detail"]
    assert "all-failed" not in checks["queues"]["detail"]  # nothing of it waits
    assert env["DEBLUR_QUEUE"] not in checks["queues"]["detail"]  # nothing of it waits
    assert "deblur worker --queue NAME" in checks["queues"]["hint"]
    with session_scope(empty_database_url) as s:
        s.add(BrokerMark(broker=broker_identity(redis_url), queue="gpu-large", counter=5, token="t" * 32,
                         checked_at=queries.database_now(s), lost_before=queries.database_now(s)))
    lost = {c["part"]: c for c in json.loads(doctor("--format", "json").stdout)["checks"]}["queues"]
    assert "the broker lost queue 'gpu-large'" in lost["detail"] and "append-only" in lost["hint"]
