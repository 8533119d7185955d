"""Job-finished notifications: delivered to a real HTTP server on loopback, signed, retried, announced once."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from pathlib import Path

import boto3
import pytest
import redis

from jobs.errors import InputError, TransientError
from jobs.notify import body, check_notify_url, deliver
from tests.e2e_helpers import HookReceiver, queued_tasks, use_services
from tests.test_end_to_end import run_cli

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)  # the receivers here listen on loopback: the operator allows it


def test_a_delivery_is_signed_and_only_failures_worth_retrying_say_so() -> None:
    payload = body({"id": "j", "status": "done"}, "d-1")
    with HookReceiver(answers=(200, 503, 429, 404)) as hook:
        assert deliver(hook.url, payload, secret="s3cret", allow=LOOPBACK) == 200
        with pytest.raises(TransientError, match="answered 503"):
            deliver(hook.url, payload, allow=LOOPBACK)
        with pytest.raises(TransientError, match="answered 429"):
            deliver(hook.url, payload, allow=LOOPBACK)
        with pytest.raises(InputError, match="answered 404; not retried"):
            deliver(hook.url, payload, allow=LOOPBACK)
    headers, sent = hook.requests[0]
    assert sent == payload and json.loads(sent) == {"event": "job.finished", "delivery": "d-1",
                                                    "job": {"id": "j", "status": "done"}}
    expected = hmac.new(b"s3cret", payload, hashlib.sha256).hexdigest()
    assert headers["X-Deblur-Signature"] == f"sha256={expected}" and headers["X-Deblur-Event"] == "job.finished"
    assert "X-Deblur-Signature" not in hook.requests[1][0]  # no secret, no signature
    with HookReceiver(answers=(302,), redirect_to="/moved") as moved:  # urllib would GET it without the body
        with pytest.raises(InputError, match="a redirect to '/moved'; not followed"):
            deliver(moved.url, payload, allow=LOOPBACK)
        assert len(moved.requests) == 1  # and nothing was sent to where it points
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(TransientError, match="cannot reach the receiver"):
        deliver(f"http://127.0.0.1:{port}/hook", payload, timeout=2, allow=LOOPBACK)
    for bad in ("ftp://host/x", "hooks/deblur", "http:///nohost"):
        with pytest.raises(InputError, match="not an absolute http"):
            check_notify_url(bad)


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home",
                       DEBLUR_NOTIFY_SECRET="hook-secret", DEBLUR_NOTIFY_ALLOW_NETWORKS="127.0.0.0/8")
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="hooked")
    from tests.test_evaluation_and_recovery import _pairs, _png

    s3.put_object(Bucket="hooked", Key="in/a.png", Body=_png(_pairs()[0][1]))
    return env


@pytest.mark.integration
def test_a_finished_job_is_announced_once_and_delivered_signed(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The worker that records the last image enqueues one notification; delivering it retries a 503."""
    from jobs.messages import BatchMessage
    from jobs.notify import NOTIFY_TASK
    from jobs.settings import load_settings
    from worker import runtime
    from worker.pipeline import run_batch
    from worker.tasks import notify_job

    monkeypatch.setitem(runtime._state, "settings", None)  # this process's worker settings: this test's services
    with HookReceiver(answers=(503,)) as hook:
        job_id = run_cli("submit", "s3://hooked/in/", "--output", "s3://hooked/out/", "--model", "wiener",
                         "--notify", hook.url, "-q").strip()
        [(name, args)] = queued_tasks(env)
        run_batch(BatchMessage.from_payload(args[0]), load_settings())
        run_batch(BatchMessage.from_payload(args[0]), load_settings())  # a redelivered batch: nothing new
        announced = [task for task in queued_tasks(env) if task[0] == NOTIFY_TASK]
        assert [a[1][0] for a in announced] == [job_id]  # once, though two tasks recorded the batch
        # in the most urgent of the transport's priority lists (the one named as the queue): ahead of any backlog
        urgent = redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).lrange(env["DEBLUR_QUEUE"], 0, -1)
        assert [json.loads(m)["headers"]["task"] for m in urgent] == [NOTIFY_TASK]
        delivery = announced[0][1][1]

        # run in this process, Celery makes the retry at once: the receiver answers 503, then 204
        assert notify_job.apply(args=[job_id, delivery]).get() == f"delivered to {hook.url} (204)"
        [(_, refused), (headers, sent)] = hook.wait_for(2)
    assert refused == sent  # the same document, delivery id included, on every attempt
    document = json.loads(sent)
    assert document["delivery"] == delivery and document["event"] == "job.finished"
    assert document["job"]["id"] == job_id and document["job"]["status"] == "done"
    assert document["job"]["counts"]["done"] == 1 and document["job"]["spec"]["notify_url"] == hook.url
    assert headers["X-Deblur-Signature"] == "sha256=" + hmac.new(b"hook-secret", sent, hashlib.sha256).hexdigest()


@pytest.mark.integration
def test_cancelling_announces_once_and_a_finished_job_cannot_be_cancelled(env) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from jobs.messages import BatchMessage
    from jobs.notify import NOTIFY_TASK
    from jobs.settings import load_settings
    from producer.cli import main
    from worker.pipeline import run_batch

    job_id = run_cli("submit", "s3://hooked/in/", "--output", "s3://hooked/out/", "--model", "wiener",
                     "--notify", "http://127.0.0.1:9/hook", "-q").strip()
    run_cli("cancel", job_id)
    run_cli("cancel", job_id)  # harmless, and not announced again
    assert [t[1][0] for t in queued_tasks(env) if t[0] == NOTIFY_TASK] == [job_id]

    plain = run_cli("submit", "s3://hooked/in/", "--output", "s3://hooked/out2/", "--model", "wiener", "-q").strip()
    run_cli("cancel", plain)  # no notify URL: nothing announced
    assert [t[1][0] for t in queued_tasks(env) if t[0] == NOTIFY_TASK] == [job_id]

    refused = CliRunner().invoke(main, ["submit", "s3://hooked/in/", "--output", "s3://hooked/o3/",
                                        "--notify", "hooks/deblur"])
    assert refused.exit_code == 2 and "notify URL 'hooks/deblur' is not an absolute http" in refused.output

    # a job that finished stays as it finished: the CLI once relabelled a done job 'cancelled'
    done = run_cli("submit", "s3://hooked/in/", "--output", "s3://hooked/o4/", "--model", "wiener", "-q").strip()
    [args] = [args for name, args in queued_tasks(env) if name != NOTIFY_TASK and args[0]["job_id"] == done]
    run_batch(BatchMessage.from_payload(args[0]), load_settings())
    late = CliRunner().invoke(main, ["cancel", done])
    assert late.exit_code == 2 and f"job {done} already finished (done); nothing to cancel" in late.output
    assert json.loads(run_cli("status", done, "--format", "json"))["status"] == "done"
