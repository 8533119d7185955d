"""The HTTP API as backend teams use it: a real server process and an HTTP client.

Given a running ``deblur api`` (uvicorn in its own process, bearer token set)
in front of a real Redis, ``moto_server`` and SQL database, when jobs are
submitted, followed, paged, summarised, cancelled and retried over HTTP with
``httpx``, then the answers match what a real worker process did; bad
requests get 401, 404 or 422 naming the field.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner

from tests.e2e_helpers import WorkerProcess, mixed_samples, serving_api, service_env, upload, use_services

pytestmark = [pytest.mark.integration]

TOKEN = f"token-{uuid.uuid4().hex}"
MODEL = "wiener:psf=motion:length=7,angle=30"


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return use_services(monkeypatch, redis_url, s3_endpoint, database_url, tmp_path / "home",
                        DEBLUR_API_TOKEN=TOKEN, DEBLUR_NOTIFY_ALLOW_NETWORKS="127.0.0.0/8")  # hooks on loopback


@pytest.fixture
def bucket(env: dict[str, str]) -> tuple[Any, str]:
    client = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    name = f"api-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def api(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serving_api(env, tmp_path / "api.log") as url:
        yield url


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        info = response.json()
        if info["status"] in {"done", "failed", "cancelled"}:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s: {info}")


def all_pages(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(path, params={**params, "offset": offset})
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= params["limit"]
        items += body["items"]
        offset = body["next_offset"]
    return items


def test_job_lifecycle_over_http(env, bucket, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s3, name = bucket
    samples = mixed_samples()[:4]
    upload(s3, name, "in/", samples)
    s3.put_object(Bucket=name, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n not really a png")
    body = {"kind": "deblur", "inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/", "models": [MODEL],
            "batch_size": 2}

    # No worker yet: a job cancelled now keeps every image cancelled.
    doomed = client.post("/v1/jobs", json={**body, "output": f"s3://{name}/doomed/"})
    assert doomed.status_code == 201, doomed.text
    doomed_id = doomed.json()["id"]
    cancelled = client.post(f"/v1/jobs/{doomed_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json() == {"id": doomed_id, "status": "cancelled",
                                                                 "cancelled": 5}
    assert client.post(f"/v1/jobs/{doomed_id}/cancel").json()["cancelled"] == 0

    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    worker = WorkerProcess(service_env(env), tmp_path / "worker.log")
    try:
        worker.wait_ready(app_for(load_settings()))
        key = {"Idempotency-Key": f"batch-{uuid.uuid4().hex}"}
        first = client.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == 201, first.text
        created = first.json()
        uuid.UUID(created["id"])
        assert created["created"] is True and created["total"] == 5
        assert first.headers["location"] == created["status_url"] == f"/v1/jobs/{created['id']}"
        again = client.post("/v1/jobs", json=body, headers=key)
        assert again.status_code == 200 and again.json()["id"] == created["id"] and not again.json()["created"]
        job_id = created["id"]

        info = wait_finished(client, job_id)
        assert info["status"] == "done", info
        assert info["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 1, "cancelled": 0}
        assert info["review"] == {"not_restored": 0, "judged_sharp": 0}  # wiener has no blind estimate to doubt
        assert client.get(f"/v1/jobs/{job_id}/images", params={"review": "true"}).json()["total"] == 0

        # operators see the same outcomes in the Prometheus metrics (the database is shared: at least)
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        from prometheus_client.parser import text_string_to_metric_families

        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in text_string_to_metric_families(scrape.text) for s in family.samples}
        assert found[("deblur_up", (("source", "database"),))] == found[("deblur_up", (("source", "broker"),))] == 1
        assert found[("deblur_images_finished_recently", (("status", "done"),))] >= 4
        assert found[("deblur_images_finished_recently", (("status", "failed"),))] >= 1
        assert found[("deblur_jobs", (("status", "cancelled"),))] >= 1
        assert info["images_per_s"] > 0 and info["eta_s"] == 0
        assert info["spec"]["models"] == [MODEL]

        images = all_pages(client, f"/v1/jobs/{job_id}/images", limit=2)
        assert len(images) == 5 and len({i["id"] for i in images}) == 5
        # pages by image id (next_after) neither skip nor repeat an image whose status changes between them
        first = client.get(f"/v1/jobs/{job_id}/images", params={"limit": 2, "after": 0}).json()
        assert [i["id"] for i in first["items"]] == [i["id"] for i in images[:2]] and first["next_offset"] is None
        rest = client.get(f"/v1/jobs/{job_id}/images", params={"limit": 10, "after": first["next_after"]}).json()
        assert [i["id"] for i in rest["items"]] == [i["id"] for i in images[2:]] and rest["next_after"] is None
        for params in ({"after": 0, "worst": 2}, {"after": 0, "offset": 1}, {"offset": 2**64}):
            assert client.get(f"/v1/jobs/{job_id}/images", params=params).status_code == 422, params
        assert {i["input"] for i in images} == {f"s3://{name}/in/{s.relative}" for s in samples} | {
            f"s3://{name}/in/broken.png"}
        done = [i for i in images if i["status"] == "done"]
        for image in done:
            assert image["output"] == image["input"].replace("/in/", "/out/")
            s3.head_object(Bucket=name, Key=image["output"].removeprefix(f"s3://{name}/"))
            assert image["metrics"]["laplacian_variance"] > 0
            assert image["metrics_by_model"]["ensemble"]["laplacian_variance"] == image["metrics"][
                "laplacian_variance"]

        failed = client.get(f"/v1/jobs/{job_id}/images", params={"status": "failed"}).json()
        assert failed["total"] == 1 and failed["next_offset"] is None
        assert failed["items"][0]["input"].endswith("broken.png") and "broken.png" in failed["items"][0]["error"]

        worst = client.get(f"/v1/jobs/{job_id}/images",
                           params={"worst": 3, "metric": "laplacian_variance", "limit": 2}).json()
        assert worst["total"] == 3 and worst["next_offset"] == 2
        rest = client.get(f"/v1/jobs/{job_id}/images",
                          params={"worst": 3, "metric": "laplacian_variance", "limit": 2, "offset": 2}).json()
        assert len(rest["items"]) == 1 and rest["next_offset"] is None
        values = [i["metrics"]["laplacian_variance"] for i in worst["items"] + rest["items"]]
        # a deblur job has no psnr: worst ranks it by sharpness by default, and a metric it lacks is refused
        default = client.get(f"/v1/jobs/{job_id}/images", params={"worst": 3, "limit": 3}).json()
        assert [i["id"] for i in default["items"]] == [i["id"] for i in worst["items"] + rest["items"]]
        lacking = client.get(f"/v1/jobs/{job_id}/images", params={"worst": 3, "metric": "psnr"})
        assert lacking.status_code == 422 and lacking.json()["detail"][0]["loc"] == ["query", "metric"]
        assert values == sorted(i["metrics"]["laplacian_variance"] for i in done)[:3]

        summary = client.get(f"/v1/jobs/{job_id}/summary").json()
        rows = {(r["model"], r["name"]): r for r in summary["metrics"]}
        sharpness = rows[("ensemble", "laplacian_variance")]
        assert sharpness["count"] == 4
        expected = sum(i["metrics"]["laplacian_variance"] for i in done) / 4
        assert sharpness["mean"] == pytest.approx(expected, rel=1e-9)
        assert rows[("input", "laplacian_variance")]["count"] == 4

        # fixity: by the checksums the store kept (no output read), then one output lost
        checked = client.post(f"/v1/jobs/{job_id}/verify").json()
        assert (checked["checked"], checked["intact"], checked["by_store_checksum"], checked["problems"]) == (4, 4, 4, 0)
        lost = done[0]["output"]
        s3.delete_object(Bucket=name, Key=lost.removeprefix(f"s3://{name}/"))
        found = client.post(f"/v1/jobs/{job_id}/verify", json={"quick": False}).json()
        assert found["missing"] == [[done[0]["input"], lost]] and found["problems"] == 1 and found["intact"] == 3
        assert client.post(f"/v1/jobs/{uuid.uuid4()}/verify").status_code == 404

        # Each image compared with itself: the input's PSNR is +inf, sent as "inf".
        upload(s3, name, "pairs/", samples[:2])
        evaluation = client.post("/v1/jobs", json={"kind": "evaluate", "inputs": [f"s3://{name}/pairs/"],
                                                   "sharp": f"s3://{name}/pairs/", "models": [MODEL]})
        assert evaluation.status_code == 201, evaluation.text
        eval_id = evaluation.json()["id"]
        assert wait_finished(client, eval_id)["counts"]["done"] == 2
        pairs = client.get(f"/v1/jobs/{eval_id}/images").json()["items"]
        assert [p["metrics"]["input_psnr"] for p in pairs] == ["inf", "inf"]
        assert all(p["metrics"]["input_ssim"] == pytest.approx(1.0) for p in pairs)
        assert all(isinstance(p["metrics"]["psnr"], float) and p["output"] is None for p in pairs)
        means = {(r["model"], r["name"]): r["mean"] for r in client.get(f"/v1/jobs/{eval_id}/summary").json()[
            "metrics"]}
        assert means[("input", "psnr")] == "inf" and isinstance(means[("ensemble", "psnr")], float)

        retried = client.post(f"/v1/jobs/{job_id}/retry", json={"failed": True})
        assert retried.status_code == 200 and retried.json() == {"id": job_id, "requeued": 1}
        info = wait_finished(client, job_id)
        assert info["counts"]["failed"] == 1 and info["counts"]["done"] == 4
        again_failed = client.get(f"/v1/jobs/{job_id}/images", params={"status": "failed"}).json()["items"][0]
        assert again_failed["attempts"] == 2, "the retried image was processed a second time"
        [with_history] = client.get(f"/v1/jobs/{job_id}/images",
                                    params={"status": "failed", "history": "true"}).json()["items"]
        [before] = with_history["earlier_attempts"]  # its first failure, kept when the retry reset it
        assert (before["status"], before["error"], before["worker"]) == (
            "failed", again_failed["error"], again_failed["worker"])
        assert client.get(f"/v1/jobs/{job_id}/images").json()["items"][0]["earlier_attempts"] is None  # unasked
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409

        # what the worker spent on each job, as a backend charging teams back reads it
        spent = client.get("/v1/usage", params={"since": "1h", "by": ["job", "kind"]})
        assert spent.status_code == 200, spent.text
        groups = {group["job"]: group for group in spent.json()["groups"]}
        # the corrupt image failed twice (once, then after the retry): both attempts count
        assert (groups[job_id]["kind"], groups[job_id]["images_done"], groups[job_id]["images_failed"]) == (
            "deblur", 4, 2)
        assert groups[job_id]["megapixels"] == pytest.approx(
            sum(i["width"] * i["height"] for i in done) / 1e6, abs=1e-6)
        assert (groups[eval_id]["kind"], groups[eval_id]["images_done"]) == ("evaluate", 2)
        assert doomed_id not in groups, "a cancelled job's images never ran"
    finally:
        worker.kill()  # nothing left to finish gracefully; SIGTERM's warm shutdown takes seconds
        worker.stop()

    doomed_info = client.get(f"/v1/jobs/{doomed_id}").json()
    assert doomed_info["status"] == "cancelled" and doomed_info["counts"]["cancelled"] == 5
    listed = client.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in listed] == [eval_id, job_id, doomed_id], "newest first"


def test_bad_requests_are_refused_with_the_reason(env, bucket, api, client) -> None:  # type: ignore[no-untyped-def]
    s3, name = bucket
    upload(s3, name, "in/", mixed_samples()[:1])
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/"}

    health = httpx.get(api + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok",
                                                           "checks": {"database": "ok", "broker": "ok"}}
    assert httpx.get(api + "/docs").status_code == 200
    schema = httpx.get(api + "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images", "/v1/jobs/{job_id}/summary",
            "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry", "/v1/jobs/{job_id}/verify", "/v1/models",
            "/healthz", "/metrics", "/v1/queue", "/v1/usage"} <= set(schema["paths"])
    assert "JobSubmission" in schema["components"]["schemas"]

    anonymous = httpx.get(api + "/v1/jobs")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert httpx.get(api + "/metrics").status_code == 401  # job counts are the operator's, like the rest
    assert httpx.get(api + "/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(api + "/v1/jobs", json=good).status_code == 401
    assert httpx.get(api + "/v1/usage").status_code == 401
    for params, field, message in (({"by": "team"}, "by", "not a grouping"),
                                   ({"since": "yesterday"}, "since", "expected a time ago"),
                                   ({"label": "team"}, "label", "KEY=VALUE"),
                                   ({"since": "1d", "until": "2d"}, "until", "must come after")):
        response = client.get("/v1/usage", params=params)
        assert response.status_code == 422, (params, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["query", field] and message in error["msg"], (params, error)

    def job_ids() -> set[str]:
        # the PostgreSQL database is shared by the session, so compare before/after
        return {j["id"] for j in client.get("/v1/jobs", params={"limit": 1000}).json()}

    before = job_ids()

    def refused(payload: Any, **kwargs: Any) -> list[dict[str, Any]]:
        response = client.post("/v1/jobs", json=payload, **kwargs)
        assert response.status_code == 422, response.text
        return response.json()["detail"]  # type: ignore[no-any-return]

    [error] = refused({**good, "models": ["wiener", "nafnet-gorpo"]})
    assert error["loc"] == ["body", "models", 1] and "unknown model 'nafnet-gorpo'" in error["msg"]
    [error] = refused({**good, "output_format": "jpeg=gif"})
    assert error["loc"] == ["body", "output_format"] and "unknown image format 'gif'" in error["msg"]
    assert {tuple(e["loc"]) for e in refused({"output": 3, "strength": 2, "colour": "red"})} == {
        ("body", "inputs"), ("body", "output"), ("body", "strength"), ("body", "colour")}
    malformed = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422
    [error] = refused({**good, "inputs": ["s3://no-such-bucket-here/in/"]})
    assert error["loc"] == ["body", "inputs"] and "no-such-bucket-here" in error["msg"]
    [error] = refused({**good, "output": "s3://no-such-bucket-here/out/"})
    assert error["loc"] == ["body", "output"] and "no-such-bucket-here" in error["msg"]
    [error] = refused({**good, "inputs": [f"s3://{name}/in/missing.png"]})
    assert error["loc"] == ["body", "inputs"] and "missing.png does not exist" in error["msg"]
    [error] = refused({**good, "output": f"s3://{name}/in/restored/"})
    assert error["loc"] == ["body", "output"] and "inside input prefix" in error["msg"]
    [error] = refused({"inputs": good["inputs"]})
    assert error["loc"] == ["body", "output"] and "output" in error["msg"]
    [error] = refused({**good, "kind": "evaluate"})
    assert error["loc"] == ["body", "sharp"]
    [error] = refused({**good, "job_key": "a"}, headers={"Idempotency-Key": "b"})
    assert error["loc"] == ["body", "job_key"]
    [error] = refused({**good, "window": -1})
    assert error["loc"] == ["body", "window"]
    [error] = refused({**good, "labels": {"bad key": "x"}})
    assert error["loc"] == ["body", "labels"] and "not a label name" in error["msg"]
    assert job_ids() == before, "a refused submission writes nothing"

    windowed = client.post("/v1/jobs", json={**good, "output": f"s3://{name}/windowed/", "window": 4})
    assert windowed.status_code == 201, windowed.text
    status = client.get(windowed.json()["status_url"]).json()
    assert status["batches"] == {"window": 4, "listed": 1, "sent": 1, "in_flight": 1}
    queue = client.get("/v1/queue").json()  # the whole queue, as 'deblur status' and /metrics show it
    assert queue["down"] == {} and queue["recent_window_s"] == 900
    assert queue["waiting_batches"]["5"] >= 1 and queue["images"]["pending"] >= 1 and queue["jobs"]["queued"] >= 1
    assert httpx.get(api + "/v1/queue").status_code == 401
    before |= {windowed.json()["id"]}
    pause_url = f"/v1/jobs/{windowed.json()['id']}/pause"
    assert client.post(pause_url).json() == {"id": windowed.json()["id"], "status": "paused", "changed": True,
                                             "sent": 0}
    assert client.post(pause_url).json()["changed"] is False
    assert client.get(windowed.json()["status_url"]).json()["status"] == "paused"
    resumed = client.post(f"/v1/jobs/{windowed.json()['id']}/resume").json()
    assert resumed == {"id": windowed.json()["id"], "status": "queued", "changed": True, "sent": 0}  # its one batch
    team = f"api-{uuid.uuid4().hex[:6]}"
    unwindowed = client.post("/v1/jobs", json={**good, "output": f"s3://{name}/unwindowed/",
                                                "labels": {"team": team}}).json()["id"]
    before |= {unwindowed}
    labelled = client.get("/v1/jobs", params={"label": f"team={team}"}).json()
    assert [(j["id"], j["labels"]) for j in labelled] == [(unwindowed, {"team": team})]
    assert client.get("/v1/jobs", params={"label": f"team={team}", "status": "done"}).json() == []
    bad_label = client.get("/v1/jobs", params={"label": "team"})
    assert bad_label.status_code == 422 and bad_label.json()["detail"][0]["loc"] == ["query", "label"]
    no_window = client.post(f"/v1/jobs/{unwindowed}/pause")
    assert no_window.status_code == 422 and "no window" in no_window.json()["detail"][0]["msg"]

    # Requests racing on one idempotency key (the server runs them in parallel threads) share one job.
    key = {"Idempotency-Key": f"race-{uuid.uuid4().hex}"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/jobs", json=good, headers=key), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1 and job_ids() - before == {answers[0].json()["id"]}

    unknown = client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("no job with id")
    for path in ("/images", "/summary"):
        assert client.get(f"/v1/jobs/{uuid.uuid4()}{path}").status_code == 404
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/retry").status_code == 404
    not_uuid = client.get("/v1/jobs/not-a-uuid")
    assert not_uuid.status_code == 422 and not_uuid.json()["detail"][0]["loc"] == ["path", "job_id"]
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    # numbers too large for the database or the calendar are refused by name, not answered with a 500
    assert client.get("/v1/usage", params={"since": "999999999d"}).status_code == 422
    assert client.post("/v1/jobs", json={**good, "window": 10**30}).status_code == 422

    models = client.get("/v1/models").json()
    wiener = next(m for m in models if m["name"] == "wiener")
    assert wiener["family"] == "classic" and wiener["weights_present"] is True


def test_cli_refuses_an_open_address_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.api_cli import api_command, is_loopback

    monkeypatch.delenv("DEBLUR_API_TOKEN", raising=False)
    result = CliRunner().invoke(api_command, ["--address", "0.0.0.0"])
    assert result.exit_code == 2 and "without a token" in result.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    help_text = CliRunner().invoke(api_command, ["--help"]).output
    assert "DEBLUR_API_TOKEN" in help_text and "/docs" in help_text


def test_preview_skip_existing_and_colliding_outputs_over_http(env, bucket, client) -> None:  # type: ignore[no-untyped-def]
    s3, name = bucket
    sample = mixed_samples()[:1]
    upload(s3, name, "in/", sample)
    upload(s3, name, "again/", sample)
    body = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/", "skip_existing": True}

    collide = client.post("/v1/jobs", json={**body, "inputs": [f"s3://{name}/in/", f"s3://{name}/again/"]})
    assert collide.status_code == 422 and "would both be written to" in collide.json()["detail"][0]["msg"]

    s3.put_object(Bucket=name, Key="in/scan.heic", Body=b"HEIC is not read")
    seen = client.post("/v1/jobs/preview", json=body)
    assert seen.status_code == 200, seen.text
    assert seen.json() == {"total": 1, "skipped": 0, "ignored": {".heic": 1}, "sample": [
        {"input": f"s3://{name}/in/{sample[0].relative}", "output": f"s3://{name}/out/{sample[0].relative}",
         "reference": None}]}
    refused = client.post("/v1/jobs/preview", json={**body, "notify_url": "hooks/deblur"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "notify_url"]

    first = client.post("/v1/jobs", json={**body, "notify_url": "http://127.0.0.1:9/hook"})
    assert first.status_code == 201, first.text
    assert (first.json()["total"], first.json()["skipped"], first.json()["ignored"]) == (1, 0, {".heic": 1})
    s3.put_object(Bucket=name, Key=f"out/{sample[0].relative}", Body=b"restored")
    nothing = client.post("/v1/jobs", json=body)
    assert nothing.status_code == 200, nothing.text
    assert nothing.json() == {"id": None, "created": False, "total": 0, "skipped": 1, "ignored": {".heic": 1},
                              "status_url": None, "submitting": False}


def test_client_tokens_name_the_submitter_and_read_only_clients_change_nothing(  # type: ignore[no-untyped-def]
        env, bucket, tmp_path) -> None:
    """Given a clients file with a submitting and a read-only client beside the shared token, the API labels each
    client's jobs with its name, refuses the read-only one every change (403), and follows the file as it is
    edited: a removed client is refused (401), a broken file refuses everyone (503) until it is mended."""
    from producer.api_clients import RECHECK_S, add_client, remove_client

    s3, name = bucket
    upload(s3, name, "in/", mixed_samples()[:2])
    clients_file = tmp_path / "api-clients"
    ingest = add_client(clients_file, "ingest-backend")
    grafana = add_client(clients_file, "grafana", scope="read")
    web = add_client(clients_file, "web", limits={"max_priority": 4, "window": 2})
    private = add_client(clients_file, "private", limits={"see": "own"})
    body = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/", "models": [MODEL],
            "labels": {"team": "ingest"}}

    def as_(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    with serving_api({**env, "DEBLUR_API_CLIENTS": str(clients_file)}, tmp_path / "api.log") as api, \
            httpx.Client(base_url=api, timeout=60) as http:
        created = http.post("/v1/jobs", json=body, headers=as_(ingest))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        job = http.get(f"/v1/jobs/{job_id}", headers=as_(grafana))  # a read-only client reads
        assert job.status_code == 200 and job.json()["spec"]["labels"] == {"team": "ingest",
                                                                           "api-client": "ingest-backend"}
        shared = http.post("/v1/jobs", json={**body, "output": f"s3://{name}/shared/"}, headers=as_(TOKEN))
        assert shared.status_code == 201, shared.text  # the shared token still works, and names no client
        assert http.get(f"/v1/jobs/{shared.json()['id']}", headers=as_(TOKEN)).json()["spec"]["labels"] == {
            "team": "ingest"}
        unowned = http.post(f"/v1/jobs/{shared.json()['id']}/cancel", headers=as_(ingest))
        assert unowned.status_code == 403 and "the command line or the shared token" in unowned.json()["detail"]
        assert http.post(f"/v1/jobs/{shared.json()['id']}/cancel", headers=as_(TOKEN)).status_code == 200

        # a limited client: nothing above its priority, and never more than its window in the broker
        too_urgent = http.post("/v1/jobs", json={**body, "priority": 6}, headers=as_(web))
        assert too_urgent.status_code == 403 and "up to priority 4" in too_urgent.json()["detail"], too_urgent.text
        previewed = http.post("/v1/jobs/preview", json={**body, "priority": 6}, headers=as_(web))
        assert previewed.status_code == 403, previewed.text  # a preview refuses what a submission would
        unasked = http.post("/v1/jobs", json={**body, "output": f"s3://{name}/web-default/"}, headers=as_(web))
        assert unasked.status_code == 201, unasked.text  # the default priority (5) is brought down to the limit
        unasked_id = unasked.json()["id"]
        assert http.get(f"/v1/jobs/{unasked_id}", headers=as_(web)).json()["spec"]["priority"] == 4
        # each client's job keys are its own
        keyed = {who: http.post("/v1/jobs", json={**body, "priority": 3, "output": f"s3://{name}/keyed-{who}/"},
                                headers={**as_(token), "Idempotency-Key": "nightly-1"}).json()["id"]
                 for who, token in (("web", web), ("ingest", ingest))}
        assert keyed["web"] != keyed["ingest"]
        again = http.post("/v1/jobs", json={**body, "priority": 3, "output": f"s3://{name}/keyed-web/"},
                          headers={**as_(web), "Idempotency-Key": "nightly-1"})
        assert again.status_code == 200 and again.json()["id"] == keyed["web"]
        for who, token in (("web", web), ("ingest", ingest)):
            http.post(f"/v1/jobs/{keyed[who]}/cancel", headers=as_(token))
        # a client changes its own jobs only
        foreign = http.post(f"/v1/jobs/{job_id}/cancel", headers=as_(web))
        assert foreign.status_code == 403 and "submitted by another client" in foreign.json()["detail"]
        assert http.post(f"/v1/jobs/{unasked_id}/cancel", headers=as_(web)).status_code == 200
        windows = {}
        for asked in (None, 0, 1, 5):
            limited = http.post("/v1/jobs", json={**body, "priority": 3, "window": asked,
                                                  "output": f"s3://{name}/web-{asked}/"}, headers=as_(web))
            assert limited.status_code == 201, limited.text
            windows[asked] = http.get(f"/v1/jobs/{limited.json()['id']}", headers=as_(web)).json()["spec"]["window"]
            http.post(f"/v1/jobs/{limited.json()['id']}/cancel", headers=as_(web))
        assert windows == {None: 2, 0: 2, 1: 1, 5: 2}

        for path, payload in (("/v1/jobs", body), (f"/v1/jobs/{job_id}/cancel", None),
                              (f"/v1/jobs/{job_id}/retry", {"failed": True}), (f"/v1/jobs/{job_id}/verify", None)):
            refused = http.post(path, json=payload, headers=as_(grafana))
            assert refused.status_code == 403 and "may only read" in refused.json()["detail"], (path, refused.text)
        # a preview lists the store with the server's credentials: it needs the submit scope too
        assert http.post("/v1/jobs/preview", json=body, headers=as_(grafana)).status_code == 403
        # (into a prefix of its own: the job submitted with ``body`` still has body's outputs to write)
        preview = http.post("/v1/jobs/preview", json={**body, "output": f"s3://{name}/preview/"},
                            headers=as_(ingest))
        assert preview.status_code == 200 and preview.json()["total"] == 2

        # a client that sees only its own jobs: the others' answer as if they did not exist
        own = http.post("/v1/jobs", json={**body, "output": f"s3://{name}/private/"}, headers=as_(private))
        assert own.status_code == 201, own.text
        own_id = own.json()["id"]
        nobody = uuid.uuid4()
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/images", f"/v1/jobs/{job_id}/summary"):
            hidden = http.get(path, headers=as_(private))
            missing = http.get(path.replace(job_id, str(nobody)), headers=as_(private))
            # word for word what a job that does not exist answers: nothing tells the two apart
            assert hidden.status_code == missing.status_code == 404, (path, hidden.text)
            assert hidden.json()["detail"] == missing.json()["detail"].replace(str(nobody), job_id)
        changed = http.post(f"/v1/jobs/{job_id}/cancel", headers=as_(private))
        assert changed.status_code == 404 and changed.json()["detail"] == hidden.json()["detail"]
        assert http.get(f"/v1/jobs/{own_id}", headers=as_(private)).status_code == 200
        assert [j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}, headers=as_(private)).json()] == [
            own_id]
        spent = http.get("/v1/usage", params={"by": "label:api-client"}, headers=as_(private))
        assert spent.status_code == 200 and {g["label:api-client"] for g in spent.json()["groups"]} <= {"private"}
        assert http.post(f"/v1/jobs/{own_id}/cancel", headers=as_(private)).status_code == 200
        assert http.get(f"/v1/jobs/{own_id}", headers=as_(ingest)).status_code == 200  # the others still see all

        mine = http.get("/v1/jobs", params={"mine": "true", "limit": 1000}, headers=as_(ingest)).json()
        assert [j["id"] for j in mine] == [keyed["ingest"], job_id]  # newest first
        assert http.get("/v1/jobs", params={"mine": "true"}, headers=as_(grafana)).json() == []
        anonymous_mine = http.get("/v1/jobs", params={"mine": "true"}, headers=as_(TOKEN))
        assert anonymous_mine.status_code == 422 and anonymous_mine.json()["detail"][0]["loc"] == ["query", "mine"]
        forged = http.post("/v1/jobs", json={**body, "labels": {"api-client": "someone-else"}}, headers=as_(ingest))
        assert forged.status_code == 422 and forged.json()["detail"][0]["loc"] == ["body", "labels"], forged.text
        assert "set by the HTTP API" in forged.json()["detail"][0]["msg"]

        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=as_(ingest)).status_code == 200

        def status_after_edit(token: str) -> int:
            deadline = time.monotonic() + 10 * RECHECK_S + 5
            while True:
                code = http.get("/v1/jobs", headers=as_(token)).status_code
                if code != 200 or time.monotonic() > deadline:
                    return code
                time.sleep(0.2)

        assert remove_client(clients_file, "ingest-backend")
        assert status_after_edit(ingest) == 401  # revoked without a restart
        assert http.get("/v1/jobs", headers=as_(grafana)).status_code == 200
        original = clients_file.read_text()
        clients_file.write_text(original + "half a line\n")
        broken = status_after_edit(grafana)
        assert broken == 503, broken
        clients_file.write_text(original)
        deadline = time.monotonic() + 10
        while http.get("/v1/jobs", headers=as_(grafana)).status_code != 200:
            assert time.monotonic() < deadline, "the mended file was not read again"
            time.sleep(0.2)
    assert "API clients file refused" in (tmp_path / "api.log").read_text()
