"""Notify URLs into the operator's own network (SSRF): refused at submission and again by the worker before it
sends, unless DEBLUR_NOTIFY_ALLOW_NETWORKS allows the network. The receivers are real HTTP servers on loopback;
only the DNS answers of a rebinding name are played by a resolver stand-in."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner

from jobs.errors import ConfigurationError, InputError
from jobs.notify import body, check_notify_url, deliver
from jobs.settings import Settings, load_settings
from tests.e2e_helpers import HookReceiver, queued_tasks, serving_api, use_services
from tests.test_end_to_end import run_cli

ALLOW = "DEBLUR_NOTIFY_ALLOW_NETWORKS"
PAYLOAD = body({"id": "j", "status": "done"}, "d-1")


@pytest.mark.parametrize(("url", "address", "kind"), [
    ("http://127.0.0.1:18799/internal-admin/delete-everything", "names 127.0.0.1", "a loopback address"),
    ("http://127.0.0.1:6379/", "names 127.0.0.1", "a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "names 169.254.169.254", "the cloud metadata service"),
    ("http://[::ffff:127.0.0.1]:6379/", "(IPv4 127.0.0.1)", "a loopback address"),
    ("http://2130706433/", "'2130706433', that resolves to 127.0.0.1", "a loopback address"),
    ("http://127.1/hook", "'127.1', that resolves to 127.0.0.1", "a loopback address"),
    ("http://localhost:8080/hook", "'localhost', that resolves to", "a loopback address"),
    ("http://[::1]/hook", "names ::1", "a loopback address"),
    ("http://10.1.2.3/hook", "names 10.1.2.3", "a private address"),
    ("https://172.16.0.9/hook", "names 172.16.0.9", "a private address"),
    ("http://192.168.1.1/hook", "names 192.168.1.1", "a private address"),
    ("http://[fc00::1]/hook", "names fc00::1", "a private address"),
    ("http://[fe80::1]/hook", "names fe80::1", "a link-local address"),
    ("http://100.64.0.1/hook", "names 100.64.0.1", "a shared address"),
    ("http://0.0.0.0:6379/", "names 0.0.0.0", "the unspecified address"),
    ("http://224.0.0.1/hook", "names 224.0.0.1", "a multicast address"),
    ("http://[ff02::1]/hook", "names ff02::1", "a multicast address"),
    ("http://240.0.0.1/hook", "names 240.0.0.1", "a reserved address"),
])
def test_a_url_into_the_local_network_is_refused_naming_the_address_and_the_setting(
        url: str, address: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW, raising=False)
    with pytest.raises(InputError) as refused:
        check_notify_url(url)
    message = str(refused.value)
    assert message.startswith(f"notify URL {url!r}")  # the HTTP API locates it at notify_url by this
    assert address in message and kind in message and f"can allow its network with {ALLOW}" in message


def test_the_operator_allows_networks_and_a_mapped_address_is_judged_by_its_ipv4(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Given DEBLUR_NOTIFY_ALLOW_NETWORKS, addresses in those networks pass (::ffff:127.0.0.1 as 127.0.0.1),
    others are still refused; public and (for now) unresolvable hosts pass at submission."""
    monkeypatch.setenv(ALLOW, "127.0.0.0/8, 10.20.0.0/16")
    for url in ("http://127.0.0.1:6379/", "http://[::ffff:127.0.0.1]:6379/", "http://10.20.3.4/hook",
                "https://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook", "http://hooks.invalid/deblur"):
        assert check_notify_url(url) == url
    for url, kind in (("http://10.21.0.1/hook", "a private address"), ("http://[::1]/hook", "a loopback address"),
                      ("http://169.254.169.254/", "the cloud metadata service")):
        with pytest.raises(InputError, match=kind):
            check_notify_url(url)

    with HookReceiver() as hook:
        mapped = hook.url.replace("127.0.0.1", "[::ffff:127.0.0.1]")
        monkeypatch.setenv(ALLOW, "")
        with pytest.raises(InputError, match=r"\(IPv4 127\.0\.0\.1\), a loopback address"):
            deliver(mapped, PAYLOAD)
        assert hook.requests == []
        monkeypatch.setenv(ALLOW, "127.0.0.1/32")
        try:
            socket.create_connection(("::ffff:127.0.0.1", hook.server.server_address[1]), 2).close()
        except OSError:
            pytest.skip("this host cannot reach IPv4 through an IPv6 socket")
        assert deliver(mapped, PAYLOAD) == 204
    assert [sent for _, sent in hook.requests] == [PAYLOAD]


@pytest.mark.parametrize(("value", "complaint"), [
    ("10.0.0.0/33", "'10.0.0.0/33' is not a network in CIDR notation"),
    ("10.0.0.1/8", "'10.0.0.1/8' is not a network in CIDR notation such as 10.0.0.0/8, 127.0.0.1/32 or fd00::/8: "
                   "did you mean 10.0.0.0/8?"),
    ("127.0.0.1/32,intranet", "'intranet' is not a network"),
])
def test_a_mistyped_allowed_network_is_named(value: str, complaint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW, value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"{ALLOW}={value!r}: ") and complaint in str(refused.value)


def test_no_local_network_is_allowed_unless_the_operator_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW, raising=False)
    assert Settings().notify_allowed_networks() == () == load_settings().notify_allowed_networks()
    monkeypatch.setenv(ALLOW, " 10.0.0.0/8 , 127.0.0.1,fd00::/8,")
    assert load_settings().notify_allowed_networks() == tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "127.0.0.1/32", "fd00::/8"))


class Resolver:
    """A DNS stand-in for one name: each lookup gets the first of ``answers``, which is then used up unless it is
    the last; other names go to the system's resolver."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.answers: list[str] = []
        self.asked = 0
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != name:
                return real(host, port, *args, **kwargs)
            self.asked += 1
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return real(answer, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_rebound_to_a_local_address_after_submission_reaches_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a name that resolved to a public address at submission, when it resolves to the worker's loopback at
    delivery, nothing is sent; and the worker connects to the address it checked, not to a later answer."""
    monkeypatch.setenv(ALLOW, "")
    resolver = Resolver(monkeypatch, "hooks.rebind.test")
    with HookReceiver() as hook:
        url = f"http://hooks.rebind.test:{hook.server.server_address[1]}/hooks/deblur"
        resolver.answers = ["93.184.215.14"]
        assert check_notify_url(url) == url  # public when the job is submitted
        resolver.answers = ["127.0.0.1"]  # the worker's own answer
        with pytest.raises(InputError, match=r"'hooks.rebind.test', that resolves to 127\.0\.0\.1, a loopback addr"):
            deliver(url, PAYLOAD)
        assert hook.requests == []

        # the operator allows loopback: the lookup the worker checks says 127.0.0.1, a later one 127.0.0.2, where
        # nothing listens; delivered, so the connection went to the checked address and DNS was asked once
        monkeypatch.setenv(ALLOW, "127.0.0.0/8")
        resolver.answers, resolver.asked = ["127.0.0.1", "127.0.0.2"], 0
        assert deliver(url, PAYLOAD) == 204
        assert resolver.asked == 1
    assert [sent for _, sent in hook.requests] == [PAYLOAD]


def test_through_a_proxy_local_addresses_are_still_refused_and_the_proxy_resolves_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Given http_proxy, a URL naming a local address is refused before anything goes to the proxy, and a name the
    worker cannot resolve itself (egress only through the proxy) is handed to the proxy as before."""
    monkeypatch.setenv(ALLOW, "")
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with HookReceiver() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url.rsplit("/", 2)[0])
        with pytest.raises(InputError, match="names 169.254.169.254, a link-local address"):
            deliver("http://169.254.169.254/latest/meta-data/", PAYLOAD)
        assert proxy.requests == []
        assert deliver("http://receiver.invalid/hooks/deblur", PAYLOAD) == 204
    [(headers, sent)] = proxy.requests
    assert sent == PAYLOAD and headers["Host"] == "receiver.invalid"


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = use_services(monkeypatch, redis_url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}", tmp_path / "home",
                       DEBLUR_API_TOKEN="networks-token")
    monkeypatch.delenv(ALLOW, raising=False)
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="fenced")
    from tests.test_evaluation_and_recovery import _pairs, _png

    s3.put_object(Bucket="fenced", Key="in/a.png", Body=_png(_pairs()[0][1]))
    return env


@pytest.mark.integration
def test_the_cli_refuses_a_local_url_and_the_worker_checks_again_before_sending(  # type: ignore[no-untyped-def]
        env, monkeypatch, caplog) -> None:
    """Given a loopback receiver: refused at submission (nothing enqueued) until the operator allows loopback;
    when the allowance is withdrawn before the job finishes, the worker refuses the delivery, logs it and does not
    retry it."""
    from producer.cli import main
    from worker import runtime
    from worker.pipeline import run_batch
    from worker.tasks import notify_job
    from jobs.messages import BatchMessage
    from jobs.notify import NOTIFY_TASK

    with HookReceiver() as hook:
        submit = ["submit", "s3://fenced/in/", "--output", "s3://fenced/out/", "--model", "wiener", "--notify",
                  hook.url]
        refused = CliRunner().invoke(main, submit)
        assert refused.exit_code == 2, refused.output
        assert f"notify URL {hook.url!r} names 127.0.0.1, a loopback address" in refused.output
        assert f"{ALLOW} (e.g. {ALLOW}=127.0.0.1/32)" in refused.output
        assert queued_tasks(env) == [] and json.loads(run_cli("status", "--format", "json")) == []

        monkeypatch.setenv(ALLOW, "127.0.0.0/8")
        job_id = run_cli(*submit, "-q").strip()
        [(_, args)] = queued_tasks(env)
        monkeypatch.setenv(ALLOW, "")  # withdrawn; the worker reads its settings anew
        monkeypatch.setitem(runtime._state, "settings", None)
        run_batch(BatchMessage.from_payload(args[0]), load_settings())
        [(_, (announced, delivery))] = [t for t in queued_tasks(env) if t[0] == NOTIFY_TASK]
        assert announced == job_id
        with caplog.at_level(logging.ERROR, logger="worker.tasks"):
            outcome = notify_job.apply(args=[job_id, delivery])
        assert outcome.successful() and outcome.get().startswith(f"refused: notify URL {hook.url!r} names 127.0.0.1")
        assert f"notification of job {job_id} refused: notify URL {hook.url!r}" in caplog.text
        assert hook.requests == []


@pytest.fixture
def api(env: dict[str, str], tmp_path: Path) -> Iterator[httpx.Client]:
    with serving_api(env, tmp_path / "api.log") as url, httpx.Client(
            base_url=url, headers={"Authorization": "Bearer networks-token"}, timeout=60) as client:
        yield client


@pytest.mark.integration
def test_the_http_api_refuses_the_metadata_service_and_the_broker(env, api) -> None:  # type: ignore[no-untyped-def]
    """The reviewer's three URLs, over HTTP: each a 422 at notify_url naming the address; no job, nothing queued."""
    job = {"inputs": ["s3://fenced/in/a.png"], "output": "s3://fenced/ssrf/", "models": ["wiener"]}
    for url, says in (("http://127.0.0.1:18799/internal-admin/delete-everything", "names 127.0.0.1, a loopback"),
                      ("http://169.254.169.254/latest/meta-data/", "names 169.254.169.254, a link-local address"),
                      ("http://127.0.0.1:6379/", "names 127.0.0.1, a loopback")):
        for path in ("/v1/jobs", "/v1/jobs/preview"):
            answer = api.post(path, json={**job, "notify_url": url})
            assert answer.status_code == 422, answer.text
            [detail] = answer.json()["detail"]
            assert detail["loc"] == ["body", "notify_url"] and says in detail["msg"] and ALLOW in detail["msg"]
    listed = api.get("/v1/jobs")
    assert listed.status_code == 200 and listed.json() == []
    assert queued_tasks(env) == []
