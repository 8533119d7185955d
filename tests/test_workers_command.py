"""``deblur workers``: the nodes that answer, and a liveness probe that fails for a worker of no use.

Given a real Celery worker process (prefork pool) on a real Redis, when it is
listed and probed, then it shows as consuming the queue; once it stops
consuming (as after a failed GPU) the probe exits 1 saying so, and once it is
gone the probe exits 1 for no answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.e2e_helpers import WorkerProcess, service_env, use_services

pytestmark = [pytest.mark.integration]


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The session's Redis (the database plays no part here: one SQLite file, not both databases)."""
    return use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home")


def invoke(*args: str):  # type: ignore[no-untyped-def]
    from producer.cli import main

    return CliRunner().invoke(main, list(args))


def test_workers_lists_a_node_and_the_probe_fails_once_it_stops_consuming_or_is_gone(  # type: ignore[no-untyped-def]
        env, tmp_path, monkeypatch) -> None:
    import producer.workers
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    app = app_for(load_settings())
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log", pool="prefork")
    try:
        worker.wait_ready(app)
        listed = invoke("workers", "--timeout", "2")  # a broadcast waits for the whole time limit
        assert listed.exit_code == 0 and worker.name in listed.output and env["DEBLUR_QUEUE"] in listed.output
        probe = invoke("workers", "--check", worker.name)
        assert probe.exit_code == 0 and "healthy" in probe.output, probe.output
        monkeypatch.setattr(producer.workers, "this_host", lambda: "localhost")  # the test worker's node host
        assert invoke("workers", "--check", "--timeout", "2").exit_code == 0
        # a worker of another queue on the same machine is healthy: it was called 'not consuming' and restarted
        other = WorkerProcess({**service_env(env), "DEBLUR_QUEUE": f"{env['DEBLUR_QUEUE']}-other"},
                              tmp_path / "other.log", pool="prefork")
        try:
            other.wait_ready(app)
            both = invoke("workers", "--check", "--timeout", "2")
            assert both.exit_code == 0 and f"{env['DEBLUR_QUEUE']}-other" in both.output, both.output
            listed = invoke("workers", worker.name, other.name, "--format", "json")
            assert {node["state"] for node in json.loads(listed.stdout)} == {"ok"}, listed.output
            asked = invoke("workers", "--check", "--queue", env["DEBLUR_QUEUE"], other.name)
            assert asked.exit_code == 1 and f"not consuming {env['DEBLUR_QUEUE']!r}" in asked.output, asked.output
        finally:
            other.stop()

        # what a failed GPU makes a worker do to itself (worker.tasks.stop_consuming)
        app.control.cancel_consumer(env["DEBLUR_QUEUE"], destination=[worker.name], reply=True, timeout=10)
        deadline = time.monotonic() + 30  # on a loaded machine the worker may answer after the request's wait
        while (stopped := invoke("workers", "--check", worker.name)).exit_code == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stopped.exit_code == 1 and "not consuming" in stopped.output and "restart" in stopped.output
        assert invoke("workers", "--check", "--timeout", "2").exit_code == 1
    finally:
        worker.stop()
    gone = invoke("workers", "--check", worker.name, "--timeout", "1")
    assert gone.exit_code == 1 and "no answer" in gone.output
    monkeypatch.setattr(producer.workers, "this_host", lambda: "no-such-host")
    nobody = invoke("workers", "--check", "--timeout", "1")
    assert nobody.exit_code == 1 and "no worker of this machine" in nobody.output


def test_workers_say_which_batch_fields_they_understand_and_jobs_wait_for_outdated_ones(  # type: ignore[no-untyped-def]
        env, tmp_path, monkeypatch) -> None:
    """A worker of this release says which optional batch fields it knows. A node of a release that says it
    lacks one (a plain Celery app on the queue stands in for it) is listed as outdated, and a job whose batches
    carry that field is refused while it is on the queue, with nothing written or sent. A node too old to say
    anything is taken to know the fields of the release before the question."""
    import boto3
    import numpy as np
    from PIL import Image
    from sqlalchemy import func, select

    from db.engine import ensure_schema, session_scope
    from db.schema import Job
    from jobs.celery_app import app_for
    from jobs.errors import InputError
    from jobs.messages import FIELDS_BEFORE_INFO, OPTIONAL_FIELDS
    from jobs.settings import load_settings
    import producer.workers
    from producer.workers import check_workers_know, worker_states

    settings = load_settings()
    app = app_for(settings)
    current = WorkerProcess(service_env(env), tmp_path / "current.log", pool="prefork")
    silent = WorkerProcess(service_env(env), tmp_path / "silent.log", app="tests.older_worker_app")
    lacking = WorkerProcess({**service_env(env), "TEST_WORKER_FIELDS": "output_format,quality,sidecar"},
                            tmp_path / "lacking.log", app="tests.older_worker_app")
    try:
        for worker in (current, silent, lacking):
            worker.wait_ready(app)
        states = {s.name: s for s in worker_states(settings, [current.name, silent.name, lacking.name], timeout=10)}
        assert states[current.name].fields == tuple(sorted(OPTIONAL_FIELDS)) and states[current.name].release
        assert states[silent.name].answered and states[silent.name].fields is None
        assert states[silent.name].known_fields == FIELDS_BEFORE_INFO and states[silent.name].missing_fields() == []
        assert states[lacking.name].release == "0.0.1-test" and states[lacking.name].missing_fields() == ["slot"]

        listed = invoke("workers", "--timeout", "3", "--format", "json")
        assert listed.exit_code == 0, listed.output
        nodes = {node["name"]: node for node in json.loads(listed.stdout)}
        assert nodes[lacking.name]["state"].startswith("outdated") and "slot" in nodes[lacking.name]["state"]
        assert nodes[silent.name]["state"] == "ok" and nodes[silent.name]["release"] is None
        assert nodes[current.name]["state"] == "ok" and "slot" in nodes[current.name]["message_fields"]
        table = invoke("workers", current.name, silent.name, lacking.name)
        assert table.exit_code == 0 and "outdated" in table.output and "release" in table.output

        # 'slot' predates the question, so a submission does not even ask; a field added after it would be asked
        # about: pretend 'slot' were such a field
        check_workers_know(settings, ["slot"], timeout=5)
        monkeypatch.setattr(producer.workers, "FIELDS_BEFORE_INFO", ("output_format", "quality", "sidecar"))
        check_workers_know(settings, ["sidecar", "output_format"], timeout=5)  # every node knows these
        with pytest.raises(InputError, match=f"{lacking.name}.*do not know the batch field.*slot") as refusal:
            check_workers_know(settings, ["slot"], timeout=5)
        # a silent node predates such a field too; this release's worker knows it
        assert silent.name in str(refusal.value) and current.name not in str(refusal.value)

        s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
        s3.create_bucket(Bucket="windows")
        png = tmp_path / "a.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
        s3.upload_file(str(png), "windows", "in/a.png")
        url = settings.resolved_database_url()
        ensure_schema(url)
        with session_scope(url) as session:
            before = session.scalar(select(func.count()).select_from(Job))
        refused = invoke("submit", "s3://windows/in/", "-o", "s3://windows/out/", "--model", "wiener",
                         "--window", "2")
        assert refused.exit_code == 2 and "upgrade them first" in refused.output, refused.output
        with session_scope(url) as session:
            assert session.scalar(select(func.count()).select_from(Job)) == before
    finally:
        for worker in (lacking, silent, current):
            worker.stop()


def test_the_probe_fails_a_worker_hung_in_a_batch_past_the_visibility_timeout() -> None:
    """A worker's main process answers the probe even while its pool child hangs in a batch (a hung GPU call): the
    probe stayed green for ever. A batch running past the visibility timeout (after which the broker gave it to
    another worker) now makes the node unhealthy."""
    import time

    from producer.workers import WorkerState, _longest_running

    now = time.time()
    assert _longest_running([]) is None and _longest_running([{"id": "x"}]) is None
    assert 99 < _longest_running([{"time_start": now - 100}, {"time_start": now - 5}]) < 110
    busy = WorkerState("deblur@h", answered=True, queues=("deblur",), active=1, longest_running_s=600.0)
    hung = WorkerState("deblur@h", answered=True, queues=("deblur",), active=1, longest_running_s=4000.0)
    assert busy.problem("deblur", stuck_after=3600) is None
    assert "stuck: a batch has run for 4000 s" in (hung.problem("deblur", stuck_after=3600) or "")
    assert hung.problem("deblur") is None  # not asked to judge it


def test_a_job_naming_a_model_the_queues_workers_cannot_run_is_refused_before_anything_is_sent(  # type: ignore[no-untyped-def]
        env, tmp_path, monkeypatch) -> None:
    """A job naming an official model whose weights the workers lack, or a non-commercial one they were not
    allowed, was accepted and every image failed on the workers. The workers say which models they cannot run;
    the submission (and its preview) is refused naming the worker and what to do, and accepted once the weights
    are there, read afresh."""
    import boto3
    import numpy as np
    from PIL import Image

    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from models.catalog import REGISTRY
    from producer.workers import worker_states

    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("DEBLUR_WEIGHTS_DIR", str(weights))  # the producer's folder: no weights here either
    settings = load_settings()
    worker = WorkerProcess({**service_env(env), "DEBLUR_WEIGHTS_DIR": str(weights)}, tmp_path / "worker.log",
                           pool="prefork")
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"models-{env['DEBLUR_QUEUE']}"
    s3.create_bucket(Bucket=bucket)
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    s3.upload_file(str(png), bucket, "in/a.png")
    try:
        worker.wait_ready(app_for(settings))
        [state] = worker_states(settings, [worker.name], timeout=10)
        assert "nafnet-gopro" in state.models_unavailable and "wiener" not in state.models_unavailable
        assert "licensed" in state.models_unavailable["mprnet-gopro"]
        [listed] = [node for node in json.loads(invoke("workers", worker.name, "--format", "json").stdout)]
        assert "no weights" in listed["models_unavailable"]["nafnet-gopro"]
        args = [f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "-q"]
        for extra in ([], ["--dry-run"]):
            refused = invoke("submit", *args, "--model", "nafnet-gopro", *extra)
            assert refused.exit_code == 2, refused.output
            said = " ".join(refused.output.split())
            assert f"{worker.name} cannot run nafnet-gopro: no weights" in said, said
            assert "deblur models pull nafnet-gopro" in said, said
        unlicensed = invoke("submit", *args, "--model", "mprnet-gopro")
        assert unlicensed.exit_code == 2 and "DEBLUR_ALLOW_NONCOMMERCIAL" in unlicensed.output, unlicensed.output
        # a job that names its own checkpoint does not need the workers' copy, only the licence's opt-in
        own = invoke("submit", *args, "--model", "nafnet-gopro:path=/shared/weights/mine.pth", "--dry-run")
        assert own.exit_code == 0, own.output
        own_unlicensed = invoke("submit", *args, "--model", "mprnet-gopro:path=/shared/weights/mine.pth", "--dry-run")
        assert own_unlicensed.exit_code == 2 and "DEBLUR_ALLOW_NONCOMMERCIAL" in own_unlicensed.output
        assert invoke("status", "--format", "json").stdout.strip() in ("", "[]")  # nothing was submitted
        (weights / REGISTRY.get("nafnet-gopro").weights.filename).write_bytes(b"pulled")  # type: ignore[union-attr]
        accepted = invoke("submit", *args, "--model", "nafnet-gopro", "--dry-run")
        assert accepted.exit_code == 0, accepted.output
    finally:
        worker.stop()
