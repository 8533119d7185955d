"""The HTTP client as a backend uses it: against a real ``deblur api`` process and a real worker.

Given the API served in its own process (a client token required) in front of
Redis, ``moto_server`` and SQL, and a real worker, when a job is submitted,
awaited, paged through and accounted for with :class:`HttpClient`, then the
answers match what the worker did and refusals arrive as the project's own
errors. Its retry rules are checked against a small HTTP server on loopback
that answers 503 before it answers.
"""

from __future__ import annotations

import http.server
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import free_port
from tests.e2e_helpers import (LoopbackHttpServer, WorkerProcess, mixed_samples, reply, serving_api, service_env,
                                upload)

pytestmark = [pytest.mark.integration]

MODEL = "wiener:psf=motion:length=7,angle=30"


def test_a_job_through_the_http_client(env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from jobs.celery_app import app_for
    from jobs.errors import InputError, JobFinishedError, JobKeyReusedError, UnknownJobError
    from jobs.settings import load_settings
    from producer.api_clients import add_client
    from producer.http_client import ApiAccessError, HttpClient

    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"http-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    samples = mixed_samples()[:5]
    upload(s3, bucket, "in/", samples)
    clients = tmp_path / "clients"
    token = add_client(clients, "ingest")
    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    with serving_api({**env, "DEBLUR_API_CLIENTS": str(clients)}, tmp_path / "api.log") as url, \
            HttpClient(url, token=token) as api:
        worker.wait_ready(app_for(load_settings()))
        try:
            key = f"nightly-{uuid.uuid4().hex}"
            job_id = api.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", models=[MODEL],
                                job_key=key, batch_size=2, labels={"team": "ingest"})
            assert api.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", models=[MODEL],
                              job_key=key, batch_size=2, labels={"team": "ingest"}) == job_id, \
                "the same key with the same request gives the same job"
            with pytest.raises(JobKeyReusedError, match=job_id):  # once read as "the job finished"
                api.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", models=[MODEL], job_key=key)
            info = api.wait(job_id, timeout=240, interval=0.5)
        finally:
            worker.stop()
        assert info["status"] == "done" and info["counts"]["done"] == len(samples)
        assert info["spec"]["labels"] == {"team": "ingest", "api-client": "ingest"}

        images = list(api.results(job_id, page_size=2))  # three pages
        assert sorted(i["input"] for i in images) == sorted(f"s3://{bucket}/in/{s.relative}" for s in samples)
        assert all(i["status"] == "done" and i["output"] for i in images)
        assert list(api.results(job_id, review=True)) == []  # wiener has no blind estimate to doubt
        assert [i["earlier_attempts"] for i in api.results(job_id, history=True)] == [[]] * len(samples)
        assert [j["id"] for j in api.jobs(mine=True)] == [job_id]
        assert [j["id"] for j in api.all_jobs(mine=True, page_size=1)] == [job_id]  # pages of one, then none
        spent = api.usage(since="1h", by=["label:api-client"], labels={"team": "ingest"})
        [mine] = [g for g in spent["groups"] if g["label:api-client"] == "ingest"]
        assert mine["images_done"] >= len(samples)
        assert api.queue()["down"] == {}
        assert api.verify(job_id)["intact"] == len(samples)

        with pytest.raises(InputError, match="models.0: .*unknown model 'wienr'"):
            api.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/other/", models=["wienr"])
        with pytest.raises(UnknownJobError):
            api.status(str(uuid.uuid4()))
        with pytest.raises(JobFinishedError):
            api.cancel(job_id)
        with HttpClient(url, token="wrong") as stranger, pytest.raises(ApiAccessError, match="401"):
            stranger.jobs()


class FlakyServer(LoopbackHttpServer):
    """A loopback HTTP server that answers 503 (Retry-After: 0) ``failures`` times, then 200 with a JSON body."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if len(outer.requests) <= outer.failures:
                    body, code = b'{"detail": "the database is unreachable"}', 503
                else:
                    body, code = json.dumps({"id": "j", "status": "done", "counts": {}, "cancelled": 0}).encode(), 200
                reply(self, code, "application/json", body, {"Retry-After": "0"} if code == 503 else None)

            do_GET = do_POST = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self._serve(Handler)


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer(failures=2)
    yield server
    server.close()


def test_unavailable_answers_are_retried_only_where_that_cannot_duplicate(flaky: FlakyServer) -> None:
    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    with HttpClient(flaky.url, retries=3, backoff=0.01) as api:
        assert api.status("j")["status"] == "done"  # two 503s, then an answer
        assert len(flaky.requests) == 3

        # a 503 may come from a job made and failed part-way (its key released): never repeated, key or not
        for key in (None, "k"):
            flaky.requests.clear()
            with pytest.raises(TransientError, match="503.*may have been made"):
                api.submit(["s3://b/in/"], output="s3://b/out/", job_key=key)
            assert flaky.requests == [("POST", "/v1/jobs")]

        flaky.requests.clear()
        flaky.failures = 3
        assert api.cancel("j") == 0  # cancelling twice changes nothing: repeated
        assert len(flaky.requests) == 4

    with HttpClient(flaky.url, retries=1, backoff=0.01) as impatient:
        flaky.requests.clear()
        with pytest.raises(TransientError, match="503"):
            impatient.status("j")
        assert len(flaky.requests) == 2


def test_no_server_is_a_transient_error_after_the_retries() -> None:
    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    with HttpClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as api:
        with pytest.raises(TransientError, match="unreachable"):
            api.status("j")
        with pytest.raises(TransientError, match="unreachable") as refused:  # nothing sent: tried again, then this
            api.submit(["s3://b/in/"], output="s3://b/out/")
        assert "may have been made" not in str(refused.value)


def test_the_http_client_needs_no_database_broker_or_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; import producer.http_client; "
            "print(sorted(m for m in ('torch', 'sqlalchemy', 'celery', 'boto3') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parent.parent)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


def test_a_lost_answer_to_verify_is_not_asked_again() -> None:
    """verify may read every output for minutes; a read that timed out once started up to five such reads."""
    import httpx

    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    sent: list[str] = []

    def timing_out(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        raise httpx.ReadTimeout("no answer in time", request=request)

    with HttpClient("http://deblur.test", retries=3, backoff=0.01, transport=httpx.MockTransport(timing_out)) as api:
        with pytest.raises(TransientError, match="did not answer"):
            api.verify("j")
        assert sent == ["/v1/jobs/j/verify"]
        sent.clear()
        with pytest.raises(TransientError):
            api.status("j")  # a read is asked again
        assert len(sent) == 4


def test_results_from_a_server_older_than_id_paging_are_read_by_offset() -> None:
    """An older server ignores 'after' and sends no next_after: the client once stopped after the first page."""
    import httpx

    from producer.http_client import HttpClient

    items = [{"id": i, "input": f"s3://b/in/{i}.png"} for i in range(1, 6)]

    def old_server(request: httpx.Request) -> httpx.Response:
        offset, limit = int(request.url.params.get("offset", 0)), int(request.url.params["limit"])
        page = items[offset:offset + limit]
        more = offset + len(page) < len(items)
        return httpx.Response(200, json={"items": page, "next_offset": offset + len(page) if more else None})

    with HttpClient("http://deblur.test", transport=httpx.MockTransport(old_server)) as api:
        assert [r["id"] for r in api.results("j", page_size=2)] == [1, 2, 3, 4, 5]
