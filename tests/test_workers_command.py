"""``deblur workers``: the nodes that answer, and a liveness probe that fails for a worker of no use.

Given a real Celery worker process (prefork pool) on a real Redis, when it is
listed and probed, then it shows as consuming the queue; once it stops
consuming (as after a failed GPU) the probe exits 1 saying so, and once it is
gone the probe exits 1 for no answer.
"""

from __future__ import annotations

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

        # what a failed GPU makes a worker do to itself (worker.tasks.stop_consuming)
        app.control.cancel_consumer(env["DEBLUR_QUEUE"], destination=[worker.name], reply=True, timeout=10)
        stopped = invoke("workers", "--check", worker.name)
        assert stopped.exit_code == 1 and "not consuming" in stopped.output and "restart" in stopped.output
        assert invoke("workers", "--check", "--timeout", "2").exit_code == 1
    finally:
        worker.stop()
    gone = invoke("workers", "--check", worker.name, "--timeout", "1")
    assert gone.exit_code == 1 and "no answer" in gone.output
    monkeypatch.setattr(producer.workers, "this_host", lambda: "no-such-host")
    nobody = invoke("workers", "--check", "--timeout", "1")
    assert nobody.exit_code == 1 and "no worker of this machine" in nobody.output
