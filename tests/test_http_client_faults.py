"""The HTTP client when the network or what stands in front of the API misbehaves.

Given a real ``deblur api`` process (in front of Redis, ``moto_server`` and SQL) behind a small loopback proxy that
loses answers or answers 502/504 itself, or that proxy alone answering what a misconfigured gateway would (a login
page, a route the server lacks), when :class:`HttpClient` calls it, then a request is sent again exactly when that
cannot make a second job, and an answer that is not the API's raises an error that names it instead of a
``JSONDecodeError`` or an :class:`UnknownJobError`. Requests that never left (a connect or pool timeout) are raised
by an ``httpx`` mock transport, as the connection itself cannot be made to time out on loopback without timing.
"""

from __future__ import annotations

import http.server
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.e2e_helpers import LoopbackHttpServer, mixed_samples, reply, serving_api, upload

MODEL = "wiener:psf=motion:length=7,angle=30"
STUB_ANSWER = {"id": "j", "status": "done", "counts": {}, "cancelled": 0}

Step = str | int | tuple[int, str, str]


class Proxy(LoopbackHttpServer):
    """A loopback HTTP server in front of ``upstream`` (the real API), or of a stub answering ``STUB_ANSWER``.

    Each request takes the next of ``script``'s steps, and ``"forward"`` once the script runs out:

    - ``"forward"``: the upstream's answer;
    - ``"drop"``: forwarded, then the connection closed unanswered (a lost answer);
    - ``"forward+504"``: forwarded, then 504 (a gateway that stopped waiting for the server);
    - a status code, or ``(status, content type, body)``: answered without forwarding.

    ``requests`` holds each request's method and path, ``forwarded`` the upstream's JSON answers.
    """

    def __init__(self, upstream: str | None = None, script: list[Step] | None = None) -> None:
        self.script: list[Step] = list(script or [])
        self.requests: list[tuple[str, str]] = []
        self.forwarded: list[Any] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append((self.command, self.path.split("?")[0]))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                step = outer.script.pop(0) if outer.script else "forward"
                if isinstance(step, int):
                    step = (step, "text/html", f"<html><body><h1>{step}</h1>nginx</body></html>")
                if isinstance(step, tuple):
                    self._send(*step)
                    return
                if upstream is None:
                    code, kind, text = 200, "application/json", json.dumps(STUB_ANSWER)
                else:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("authorization", "content-type", "idempotency-key")}
                    answer = httpx.request(self.command, upstream + self.path, headers=headers, content=body,
                                           timeout=120)
                    outer.forwarded.append(answer.json())
                    code, kind, text = answer.status_code, answer.headers.get("Content-Type", ""), answer.text
                if step == "drop":
                    self.close_connection = True
                elif step == "forward+504":
                    self._send(504, "text/html", "<html><body>504 Gateway Time-out</body></html>")
                else:
                    self._send(code, kind, text)

            def _send(self, code: int, kind: str, text: str) -> None:
                reply(self, code, kind, text.encode())

            do_GET = do_POST = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self._serve(Handler)


@pytest.fixture
def stub() -> Iterator[Proxy]:
    proxy = Proxy()
    yield proxy
    proxy.close()


@pytest.fixture
def images(env: dict[str, str]) -> str:
    """A bucket holding three images under ``in/`` on the session's S3 endpoint; returns the bucket's name."""
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    upload(s3, bucket, "in/", mixed_samples()[:3])
    return bucket


@pytest.mark.parametrize("never_sent", [httpx.ConnectTimeout, httpx.PoolTimeout])
def test_a_request_that_never_left_is_sent_again_even_as_a_submission(never_sent: type[httpx.TimeoutException]) -> None:
    """No connection was made, so no job can have been: neither the error nor the lack of a key stops a retry."""
    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    sent: list[str] = []

    def never_leaving(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        raise never_sent("no connection in time", request=request)

    with HttpClient("http://deblur.test", retries=2, backoff=0.01, transport=httpx.MockTransport(never_leaving)) as api:
        with pytest.raises(TransientError, match="unreachable") as raised:
            api.submit(["s3://b/in/"], output="s3://b/out/")
        assert sent == ["/v1/jobs"] * 3
        assert "may have been made" not in str(raised.value)
        sent.clear()
        with pytest.raises(TransientError, match="unreachable"):
            api.verify("j")  # a lost answer to verify is not sent again; one never sent is
        assert len(sent) == 3


@pytest.mark.integration
def test_a_keyed_submission_whose_answer_was_lost_is_sent_again_and_gets_the_first_job(
        env: dict[str, str], images: str, tmp_path: Path) -> None:
    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    run = uuid.uuid4().hex
    with serving_api(env, tmp_path / "api.log") as url:
        proxy = Proxy(url, script=["drop", "forward+504"])
        try:
            with HttpClient(proxy.url, retries=3, backoff=0.01) as api:
                job_id = api.submit([f"s3://{images}/in/"], output=f"s3://{images}/out/", models=[MODEL],
                                    job_key=f"nightly-{run}", labels={"run": run})
                assert proxy.requests == [("POST", "/v1/jobs")] * 3
                # the server made the job once, and answered each request with it
                assert [(a["id"], a["created"]) for a in proxy.forwarded] == [(job_id, True), (job_id, False),
                                                                              (job_id, False)]
                assert [j["id"] for j in api.jobs(labels={"run": run})] == [job_id]

                # without a key, sending it again could make a second job: raised, saying so
                proxy.requests.clear()
                proxy.script = ["drop"]
                with pytest.raises(TransientError, match="did not answer.*may have been made"):
                    api.submit([f"s3://{images}/in/"], output=f"s3://{images}/other/", models=[MODEL],
                               labels={"run": run})
                assert proxy.requests == [("POST", "/v1/jobs")]
        finally:
            proxy.close()


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the server's routes, not its database
def test_a_wrong_base_url_is_not_taken_for_an_unknown_job(env: dict[str, str], tmp_path: Path) -> None:
    from jobs.errors import UnknownJobError
    from producer.http_client import HttpClient, UnexpectedAnswerError

    with serving_api(env, tmp_path / "api.log") as url:
        with HttpClient(url) as api, pytest.raises(UnknownJobError, match="no job with id"):
            api.status(str(uuid.uuid4()))
        with HttpClient(url + "/deblur") as misplaced:  # the API served under a path it is not under
            for call in (lambda: misplaced.status(str(uuid.uuid4())), lambda: misplaced.cancel(str(uuid.uuid4())),
                         lambda: list(misplaced.results(str(uuid.uuid4())))):
                with pytest.raises(UnexpectedAnswerError, match=r"answered 404 \(application/json\): "
                                   r"'\{\"detail\":\"Not Found\"\}': the URL does not look like a deblur API.*"
                                   r"check the base URL") as raised:
                    call()
                assert not isinstance(raised.value, UnknownJobError)


def test_answers_that_are_not_the_apis_name_their_status_type_and_body(stub: Proxy) -> None:
    from jobs.errors import InputError, UnknownJobError
    from producer.http_client import HttpClient, UnexpectedAnswerError

    login = "<html><head><title>Corp SSO</title></head><body>Sign in to continue</body></html>"
    stub.script = [(200, "text/html; charset=utf-8", login), (404, "application/json", "[1, 2]"),
                   (422, "application/json", '["no object"]'), (200, "application/json", "")]
    with HttpClient(stub.url, backoff=0.01) as api:
        with pytest.raises(UnexpectedAnswerError, match=r"GET .*/v1/jobs/j answered 200 \(text/html; charset=utf-8\): "
                                                        r"'<html><head><title>Corp SSO.*Sign in.*not JSON"):
            api.status("j")
        with pytest.raises(UnexpectedAnswerError, match=r"404 \(application/json\): '\[1, 2\]'") as raised:
            api.status("j")
        assert not isinstance(raised.value, UnknownJobError)
        with pytest.raises(InputError, match=r"422 \(application/json\): '\[\"no object\"\]'"):
            api.retry("j")
        with pytest.raises(UnexpectedAnswerError, match=r"200 \(application/json\): an empty body"):
            api.queue()
    assert len(stub.requests) == 4


@pytest.mark.integration
def test_results_in_pages_larger_than_the_api_allows_are_read_within_its_maximum(
        env: dict[str, str], images: str, tmp_path: Path) -> None:
    from producer.api import MAX_PAGE
    from producer.http_client import MAX_PAGE_SIZE, HttpClient

    assert MAX_PAGE_SIZE == MAX_PAGE, "the client's cap follows the server's"
    with serving_api(env, tmp_path / "api.log") as url, HttpClient(url) as api:
        job_id = api.submit([f"s3://{images}/in/"], output=f"s3://{images}/out/", models=[MODEL])  # no worker
        images_read = list(api.results(job_id, page_size=MAX_PAGE + 1000))
        assert len(images_read) == 3 and len({i["id"] for i in images_read}) == 3
        assert list(api.results(job_id, page_size=2)) == images_read


def test_bad_gateway_and_gateway_timeout_are_sent_again_where_a_lost_answer_is(stub: Proxy) -> None:
    from jobs.errors import TransientError
    from producer.http_client import HttpClient

    with HttpClient(stub.url, retries=3, backoff=0.01) as api:
        stub.script = [502, 504]
        assert api.status("j")["status"] == "done"
        assert stub.requests == [("GET", "/v1/jobs/j")] * 3

        stub.requests.clear()
        stub.script = [502, 504]
        assert api.submit(["s3://b/in/"], output="s3://b/out/", job_key="k") == "j"  # a key returns the first job
        assert stub.requests == [("POST", "/v1/jobs")] * 3

        for call in (lambda: api.submit(["s3://b/in/"], output="s3://b/out/"),  # no key: it may have been made
                     lambda: api.verify("j")):  # the server may still be reading every output
            stub.requests.clear()
            stub.script = [504]
            with pytest.raises(TransientError, match="504"):
                call()
            assert len(stub.requests) == 1

        stub.requests.clear()
        stub.script = [502] * 4
        with pytest.raises(TransientError, match="502: GET .* answered 502 \\(text/html\\)"):
            api.status("j")  # the retries spent: raised
        assert len(stub.requests) == 4
