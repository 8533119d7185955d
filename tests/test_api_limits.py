"""What the HTTP API refuses, and how large its answers may grow: a real ``deblur api`` process in front of a real
Redis, ``moto_server`` and SQL database, as in ``tests/test_api.py``.

A reviewer posing as an integrator found that NaN in a body got a 500 and broke the connection, that a refusal
quoted a 100,000-URI body back (16 MB), that a body of any size was parsed, and that an ensemble of 200 copies of
one model was accepted.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.e2e_helpers import mixed_samples, serving_api, upload, use_services

pytestmark = [pytest.mark.integration]

TOKEN = f"token-{uuid.uuid4().hex}"


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return use_services(monkeypatch, redis_url, s3_endpoint, database_url, tmp_path / "home",
                        DEBLUR_API_TOKEN=TOKEN)


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[httpx.Client, Any, str]]:
    """An API client, the S3 client and a bucket holding one image under in/."""
    s3 = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    name = f"limits-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    upload(s3, name, "in/", mixed_samples()[:1])
    with serving_api(env, tmp_path / "api.log") as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
        yield client, s3, name


def _post(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST ``text`` as JSON, as it is: Python's json writes NaN and Infinity, which httpx's json= would refuse."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def test_numbers_json_cannot_carry_are_refused_by_name_and_the_connection_lives_on(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/"}
    for field, value in (("strength", "NaN"), ("priority", "NaN"), ("window", "-Infinity"), ("quality", "1e999"),
                         ("crop_border", "Infinity")):
        text = json.dumps(good)[:-1] + f', "{field}": {value}}}'
        response = _post(client, "/v1/jobs", text)
        assert response.status_code == 422, (field, response.status_code, response.text)
        assert field in {e["loc"][-1] for e in response.json()["detail"]}, response.text
        assert _post(client, "/v1/jobs/preview", text).status_code == 422
    retried = _post(client, f"/v1/jobs/{uuid.uuid4()}/retry", '{"stalled": true, "stalled_after": NaN}')
    assert retried.status_code == 422 and retried.json()["detail"][0]["loc"] == ["body", "stalled_after"]
    assert client.get("/v1/jobs", params={"limit": 1}).status_code == 200  # the same connection, still answered


def test_a_refusal_quotes_what_it_refuses_briefly(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    bad = [f"http://{name}/{i}.png" for i in range(5000)]  # 5,000 URIs that are no S3 URIs
    response = client.post("/v1/jobs", json={"inputs": bad, "output": f"s3://{name}/out/"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 21 and detail[-1]["msg"] == "and 4980 more error(s) like these", detail[-1]
    assert detail[0]["loc"] == ["body", "inputs", 0] and detail[0]["input"] == bad[0]
    assert len(response.content) < 20_000, len(response.content)
    huge = "x" * 1_000_000
    response = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/",
                                             "labels": {"team": huge}})
    assert response.status_code == 422 and len(response.content) < 10_000, len(response.content)
    listed = client.post("/v1/jobs", json={"inputs": {"a": 1}, "output": f"s3://{name}/out/"})
    assert listed.status_code == 422 and listed.json()["detail"][0]["input"] == "(an object of 1 field(s))"


def test_an_over_long_key_is_a_refusal_not_an_outage(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    response = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/" + "k" * 2000 + ".png"],
                                             "output": f"s3://{name}/out/"})
    assert response.status_code == 422, response.text  # S3 answered 414, and the API said 503: try again
    [error] = response.json()["detail"]
    assert "S3 keys are at most 1024 bytes" in error["msg"] and len(error["msg"]) < 500, error
    response = client.post("/v1/jobs/preview", json={"inputs": [f"s3://{name}/in/"],
                                                     "output": f"s3://{name}/" + "o/" * 600})
    assert response.status_code == 422 and "at most 1024 bytes" in response.text, response.text


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(served, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from producer.api import MAX_BODY_BYTES

    client, _, name = served
    filler = "s" * (MAX_BODY_BYTES + 1)
    announced = client.post("/v1/jobs", content=json.dumps({"inputs": [filler]}).encode(),
                            headers={"Content-Type": "application/json"})
    assert announced.status_code == 413 and "list more images under an S3 prefix" in announced.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b'{"inputs": ["'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"s" * (1 << 20)
        yield b'"]}'

    streamed = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "list more images under an S3 prefix" in streamed.text


def test_an_ensemble_is_bounded_and_names_each_model_once(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/"}
    response = client.post("/v1/jobs/preview", json={**good, "models": ["wiener"] * 200})
    assert response.status_code == 422, response.text
    response = client.post("/v1/jobs/preview", json={**good, "models": ["wiener:psf=motion:length=7", "wiener",
                                                                        "wiener:psf=motion:length=7:3"]})
    assert response.status_code == 422 and "named twice in the ensemble" in response.text, response.text
    response = client.post("/v1/jobs/preview", json={**good, "models": ["wiener", "wiener:psf=motion:length=7"]})
    assert response.status_code == 200, response.text


def test_preview_counts_an_input_named_twice_once_as_the_job_does(served) -> None:  # type: ignore[no-untyped-def]
    client, s3, name = served
    [key] = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="in/")["Contents"]]
    named = [f"s3://{name}/{key}", f"s3://{name}/{key}", f"s3://{name}/in/"]
    response = client.post("/v1/jobs/preview", json={"inputs": named, "output": f"s3://{name}/out/"})
    assert response.status_code == 200 and response.json()["total"] == 1, response.text
    assert len(response.json()["sample"]) == 1


def test_a_job_key_sent_again_with_another_request_is_refused_not_answered_with_the_first_job(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    key = f"nightly-{uuid.uuid4().hex[:8]}"
    asked = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/", "models": ["wiener"], "job_key": key}
    first = client.post("/v1/jobs", json=asked)
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=asked)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    for changed in ({**asked, "models": ["richardson-lucy"]}, {**asked, "priority": 9},
                    {**asked, "inputs": [f"s3://{name}/elsewhere/"]}):
        refused = client.post("/v1/jobs", json=changed)
        assert refused.status_code == 409, refused.text  # it once returned the first job, as if this were it
        assert first.json()["id"] in refused.json()["detail"] and "use a new key" in refused.json()["detail"]
    header = {k: v for k, v in asked.items() if k != "job_key"}
    assert client.post("/v1/jobs", json=header, headers={"Idempotency-Key": key}).status_code == 200


def test_fields_of_the_other_job_kind_and_conflicting_formats_are_refused(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/"}
    for extra, field in (({"sharp": f"s3://{name}/sharp/"}, "sharp"), ({"gopro": True}, "sharp"),
                         ({"output_format": "jpeg=png,jpg=tiff"}, "output_format")):
        response = client.post("/v1/jobs/preview", json={**good, **extra})
        assert response.status_code == 422, (extra, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", field], (extra, error)
    evaluation = {"kind": "evaluate", "inputs": [f"s3://{name}/in/"], "sharp": f"s3://{name}/in/",
                  "output_format": "png"}
    response = client.post("/v1/jobs/preview", json=evaluation)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "output_format"]


def test_refusals_name_the_apis_fields_not_the_command_lines_flags(served) -> None:  # type: ignore[no-untyped-def]
    """'--skip-existing needs --output' told an API client about flags it has never seen."""
    client, _, name = served
    evaluation = {"kind": "evaluate", "inputs": [f"s3://{name}/in/"], "sharp": f"s3://{name}/in/",
                  "skip_existing": True}
    response = client.post("/v1/jobs/preview", json=evaluation)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "output"], error  # what is missing
    assert error["msg"].startswith("skip_existing needs output:"), error
    unpaired = client.post("/v1/jobs/preview", json={"kind": "evaluate", "inputs": [f"s3://{name}/in/"]})
    assert unpaired.status_code == 422, unpaired.text
    assert "needs sharp PREFIX, gopro, or a manifest" in unpaired.json()["detail"][0]["msg"], unpaired.text


def test_values_of_the_wrong_json_type_are_refused_not_coerced(served) -> None:  # type: ignore[no-untyped-def]
    client, _, name = served
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/out/"}
    for field, value in (("priority", True), ("priority", "7"), ("sidecar", "yes"), ("batch_size", 2.5)):
        response = client.post("/v1/jobs/preview", json={**good, field: value})
        assert response.status_code == 422, (field, value, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", field]
    assert client.post("/v1/jobs/preview", json={**good, "strength": 1, "priority": 7}).status_code == 200
    # a whole number written with a point (some encoders write every number so) is still a whole number
    assert client.post("/v1/jobs/preview", json={**good, "priority": 7.0, "quality": 90.0}).status_code == 200
    assert client.post("/v1/jobs/preview", json={**good, "priority": 7.5}).status_code == 422


def test_outputs_an_unfinished_job_has_still_to_write_are_a_conflict_named_only_to_who_may_see_it(  # type: ignore[no-untyped-def]
        served) -> None:
    client, _, name = served
    good = {"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/busy/"}
    first = client.post("/v1/jobs", json=good)
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json={**good, "models": ["richardson-lucy"]})
    assert again.status_code == 409 and first.json()["id"] in again.json()["detail"], again.text
    previewed = client.post("/v1/jobs/preview", json={**good, "models": ["richardson-lucy"]})
    assert previewed.status_code == 409, previewed.text


def _fail_image(database_url: str, job_id: str, input_uri: str) -> None:
    """Record ``input_uri`` of ``job_id`` as failed, as a worker would."""
    from sqlalchemy import update

    from db.engine import session_scope
    from db.schema import Image

    with session_scope(database_url) as session:
        session.execute(update(Image).where(Image.job_id == job_id, Image.input_uri == input_uri)
                        .values(status="failed", error="decode failed"))


def test_a_retry_whose_outputs_another_unfinished_job_has_still_to_write_is_a_conflict(  # type: ignore[no-untyped-def]
        served, env) -> None:
    """A retry sent a failed image again while a newer job into the same prefix had still to write it: both
    wrote it. It is a 409 now (OutputsBusyError in HttpClient, as for a submission), and nothing is sent."""
    from jobs.errors import OutputsBusyError
    from producer.http_client import HttpClient

    client, s3, name = served
    sample = s3.list_objects_v2(Bucket=name, Prefix="in/")["Contents"][0]["Key"]
    # a key long enough that the answer quoting it and its output is shortened: the job's id must survive that
    key = f"in/{'k' * 900}.{sample.rsplit('.', 1)[-1]}"
    s3.copy_object(Bucket=name, Key=key, CopySource={"Bucket": name, "Key": sample})
    first = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/again/"})
    assert first.status_code == 201, first.text
    _fail_image(env["DEBLUR_DATABASE_URL"], first.json()["id"], f"s3://{name}/{key}")
    # its output is the failed image's, which the first job no longer has to write: accepted
    folder = key.removeprefix("in/").rpartition("/")[0]  # a key keeps only its name below the output prefix
    output = f"s3://{name}/again/" + (f"{folder}/" if folder else "")
    second = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/{key}"], "output": output})
    assert second.status_code == 201, second.text
    refused = client.post(f"/v1/jobs/{first.json()['id']}/retry")
    assert refused.status_code == 409, refused.text
    assert f"is one job {second.json()['id']} (queued) has still to write" in refused.json()["detail"]
    [failed] = client.get(f"/v1/jobs/{first.json()['id']}/images", params={"status": "failed"}).json()["items"]
    assert failed["input"] == f"s3://{name}/{key}"  # not made pending: nothing was sent
    http = HttpClient(str(client.base_url), token=TOKEN, retries=0)
    with pytest.raises(OutputsBusyError) as caught:
        http.retry(first.json()["id"])
    assert caught.value.other_job == second.json()["id"]
    assert caught.value.output == f"s3://{name}/again/{key.removeprefix('in/')}"
    with pytest.raises(OutputsBusyError):  # a submission's conflict is the same error, not JobFinishedError
        http.submit([f"s3://{name}/in/"], output=f"s3://{name}/again/")


def test_a_malformed_job_id_is_named_once(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = served
    response = client.get("/v1/jobs/0123abcd")
    assert response.status_code == 422
    [error] = response.json()["detail"]  # the route and the job's reader both declare it: it was listed twice
    assert error["loc"] == ["path", "job_id"], error


def test_the_schema_documents_the_answers_the_routes_give(served) -> None:  # type: ignore[no-untyped-def]
    """401, 403 and 503 were given by every guarded route but documented by none, 404 and 409 had no body, and
    POST /v1/jobs' 422 had lost its shape."""
    client, _, _ = served
    schema = client.get("/openapi.json").json()
    status = schema["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert {"200", "401", "404", "503"} <= set(status), sorted(status)
    assert status["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorMessage"}
    cancel = schema["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert {"401", "403", "404", "409", "503"} <= set(cancel), sorted(cancel)
    created = schema["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert created == {"$ref": "#/components/schemas/ValidationRefusal"}
    assert "401" not in schema["paths"]["/healthz"]["get"]["responses"]  # open to load balancers
    assert "paused" in schema["components"]["schemas"]["JobStatus"]["properties"]["status"]["enum"]
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    anonymous = httpx.get(str(client.base_url) + "/v1/jobs")
    assert anonymous.status_code == 401 and set(anonymous.json()) == {"detail"}
    assert isinstance(anonymous.json()["detail"], str)


def test_jobs_are_listed_page_by_page_none_skipped_or_repeated(served) -> None:  # type: ignore[no-untyped-def]
    """GET /v1/jobs returned the newest 1,000 at most, with no way to the older ones."""
    client, _, name = served
    tag = uuid.uuid4().hex[:8]
    made = []
    for number in range(5):
        answer = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/o{number}/",
                                               "labels": {"batch": tag}})
        assert answer.status_code == 201, answer.text
        made.append(answer.json()["id"])
    seen: list[str] = []
    before = None
    while True:
        page = client.get("/v1/jobs", params={"label": f"batch={tag}", "limit": 2,
                                              **({"before": before} if before else {})}).json()
        if not page:
            break
        seen += [job["id"] for job in page]
        before = page[-1]["id"]
    # each once; newest first (jobs made within one clock tick come in id order, so compare as sets as well)
    assert len(seen) == len(set(seen)) == 5 and set(seen) == set(made) and seen[0] in made[-2:]
    unknown = client.get("/v1/jobs", params={"before": str(uuid.uuid4())})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["query", "before"]


def test_resuming_a_finished_job_is_a_conflict_as_pausing_it_is(served) -> None:  # type: ignore[no-untyped-def]
    """Pausing a finished job answered 409, resuming it 200 'changed: false'."""
    client, _, name = served
    job = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/resumed/",
                                        "window": 1}).json()["id"]
    assert client.post(f"/v1/jobs/{job}/pause").status_code == 200
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    for action in ("pause", "resume"):
        answer = client.post(f"/v1/jobs/{job}/{action}")
        assert answer.status_code == 409 and "already finished (cancelled)" in answer.json()["detail"], answer.text


def test_a_job_can_be_polled_without_its_spec(served) -> None:  # type: ignore[no-untyped-def]
    """Each poll of a job submitted with 100,000 URIs carried its whole spec: 3 MB every two seconds."""
    client, _, name = served
    job = client.post("/v1/jobs", json={"inputs": [f"s3://{name}/in/"], "output": f"s3://{name}/polled/"}).json()
    light = client.get(f"/v1/jobs/{job['id']}", params={"spec": "false"}).json()
    whole = client.get(f"/v1/jobs/{job['id']}").json()
    assert light["spec"] is None and whole["spec"]["output"] == f"s3://{name}/polled/"
    assert {k: v for k, v in light.items() if k not in ("spec", "images_per_s", "eta_s")} == \
        {k: v for k, v in whole.items() if k not in ("spec", "images_per_s", "eta_s")}
