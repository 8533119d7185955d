"""Submission against a real Redis, S3 endpoint and database (no worker).

Validation refuses bad jobs before anything is written or enqueued; the
listing of a large prefix is streamed page by page; idempotency keys return
the first job.
"""

from __future__ import annotations

import json
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import redis
from click.testing import CliRunner

from jobs.errors import JobFinishedError

pytestmark = [pytest.mark.integration]


@pytest.fixture
def s3(env):  # type: ignore[no-untyped-def]
    client = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="in/a.png", Body=b"fake png bytes are fine for submission")
    client.put_object(Bucket=bucket, Key="in/sub/b.jpg", Body=b"x")
    return client, bucket


def invoke(*args: str):  # type: ignore[no-untyped-def]
    from producer.cli import main

    return CliRunner().invoke(main, list(args))


def queue_length(env: dict[str, str]) -> int:
    """Messages waiting in the queue, over all its priority lists (kombu keeps one per level)."""
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    keys = [k for k in client.keys(env["DEBLUR_QUEUE"] + "*") if client.type(k) == b"list"]
    return sum(int(client.llen(k)) for k in keys)


def job_count(env: dict[str, str]) -> int:
    from sqlalchemy import func, inspect, select

    from db.engine import get_engine
    from db.schema import Job

    engine = get_engine(env["DEBLUR_DATABASE_URL"])
    if not inspect(engine).has_table("jobs"):
        return 0
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["s3://{b}/in/", "--output", "s3://{b}/out/", "--model", "nafnet-gorpo"], "unknown model 'nafnet-gorpo'"),
        (["s3://{b}/in/", "--output", "s3://{b}/out/", "--model", "wiener:psf=disk"], "needs radius"),
        (["s3://{b}/in/", "--output", "s3://{b}/out/", "--model", "seed001-gan"], "ships no weights, so every image"),
        (["s3:/{b}/in/", "--output", "s3://{b}/out/"], "not an S3 URI"),
        (["s3://{b}/in/", "--output", "s3://A_bad_bucket/out/"], "not a valid bucket name"),
        (["s3://missing-bucket-xyz/in/", "--output", "s3://{b}/out/"], "missing-bucket-xyz"),
        (["s3://{b}/in/", "--output", "s3://{b}/in/restored/"], "inside input prefix"),
        (["s3://{b}/in/", "--output", "s3://{b}/in/"], "inside input prefix"),
        (["s3://{b}/in/nope.png", "--output", "s3://{b}/out/"], "does not exist"),
        (["s3://{b}/empty/", "--output", "s3://{b}/out/"], "no images"),
        (["s3://{b}/in/", "--output", "s3://{b}/out/", "--model", "spandrel"], "needs the checkpoint to load"),
        # renamed a.jpg, its output would replace an original a.jpg beside it
        (["s3://{b}/in/a.png", "--output", "s3://{b}/in/", "--output-format", "jpeg"], "is the folder of the input"),
        (["s3://{b}/in/", "--output", "s3://{b}/out/", "--model", "wiener", "--model", "wiener:3"], "named twice"),
        (["s3://{b}/" + "k" * 1100 + ".png", "--output", "s3://{b}/out/"], "S3 keys are at most 1024 bytes"),
    ],
)
def test_invalid_jobs_are_refused_before_anything_is_written(env, s3, args, message) -> None:  # type: ignore[no-untyped-def]
    _, bucket = s3
    jobs_before = job_count(env)  # the PostgreSQL database is shared by the session's tests
    result = invoke("submit", *[a.format(b=bucket) for a in args])
    assert result.exit_code != 0
    assert message in result.output
    assert job_count(env) == jobs_before
    assert queue_length(env) == 0


def test_an_evaluation_whose_sharp_prefix_holds_no_image_is_refused(env, s3) -> None:  # type: ignore[no-untyped-def]
    """A mistyped --sharp prefix was accepted, and every image then failed on the workers for want of its
    reference."""
    _, bucket = s3
    jobs_before = job_count(env)
    result = invoke("evaluate", "--blurred", f"s3://{bucket}/in/", "--sharp", f"s3://{bucket}/sharpp/",
                    "--model", "wiener")
    assert result.exit_code != 0 and f"sharp prefix s3://{bucket}/sharpp/ holds no images" in result.output, \
        result.output
    assert job_count(env) == jobs_before and queue_length(env) == 0


def test_a_manifest_column_that_names_no_uri_is_the_users_own(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A CSV manifest with a notes column was refused: its second column was always read as a sharp reference."""
    _, bucket = s3
    manifest = tmp_path / "scans.csv"
    manifest.write_text(f"uri,note\ns3://{bucket}/in/a.png,hello\ns3://{bucket}/in/sub/b.jpg,\n")
    result = invoke("submit", str(manifest), "--output", f"s3://{bucket}/out/", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(invoke("results", result.stdout.strip(), "--format", "json").stdout)
    assert sorted((r["input"], r["reference"]) for r in rows) == [(f"s3://{bucket}/in/a.png", None),
                                                                  (f"s3://{bucket}/in/sub/b.jpg", None)]


def test_a_listing_of_uris_with_dot_segments_is_submitted_again_as_a_manifest(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """'deblur results --format uris', the documented manifest for a second pass, was refused when a key held
    '.', '..' or '//' segments, which a prefix's listing restores like any other key."""
    client, bucket = s3
    odd = ["in/odd/dot/../x.png", "in/odd/./y.png", "in/odd//z.png"]
    for key in odd:
        client.put_object(Bucket=bucket, Key=key, Body=b"\x89PNG")
    first = invoke("submit", f"s3://{bucket}/in/odd/", "--output", f"s3://{bucket}/out/", "-q")
    assert first.exit_code == 0, first.output
    listed = tmp_path / "second-pass.txt"
    listed.write_text(invoke("results", first.stdout.strip(), "--format", "uris").stdout)
    again = invoke("submit", str(listed), "--output", f"s3://{bucket}/again/", "-q")
    assert again.exit_code == 0, again.output
    rows = json.loads(invoke("results", again.stdout.strip(), "--format", "json").stdout)
    assert sorted(r["input"] for r in rows) == sorted(f"s3://{bucket}/{key}" for key in odd)
    preview = invoke("submit", str(listed), "--output", f"s3://{bucket}/third/", "--dry-run")
    assert all(f"s3://{bucket}/third/{key}" in preview.output for key in odd), preview.output  # kept as listed


def test_a_job_whose_outputs_an_unfinished_job_has_still_to_write_is_refused(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two jobs writing the same output keys were both accepted: whichever ran last won, and the other kept 'done'
    over outputs replaced under it (a nightly run while last night's still ran, two models into one prefix).
    Jobs into one prefix whose keys differ (a long manifest split in parts) still run side by side, and a
    finished job's outputs may be written over."""
    from jobs.settings import load_settings
    from producer.tracking import cancel_job

    client, bucket = s3
    first = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "wiener", "-q")
    assert first.exit_code == 0, first.output
    jobs_before = job_count(env)
    for args in ([f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "richardson-lucy"],
                 [f"s3://{bucket}/in/sub/b.jpg", "--output", f"s3://{bucket}/out/sub/"],  # one key, inside
                 [f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--dry-run"]):  # nor is it previewed
        refused = invoke("submit", *args)
        assert refused.exit_code == 2, (args, refused.output)
        assert f"is one job {first.stdout.strip()} (queued) has still to write" in " ".join(refused.output.split())
    assert job_count(env) == jobs_before
    part = tmp_path / "part-2.txt"  # the same prefix, other keys: no image written twice
    client.put_object(Bucket=bucket, Key="more/c.png", Body=b"x")
    part.write_text(f"s3://{bucket}/more/c.png\n")
    other = invoke("submit", str(part), "--output", f"s3://{bucket}/out/", "-q")
    assert other.exit_code == 0, other.output
    cancel_job(load_settings(), first.stdout.strip())  # finished: its outputs may be written over
    again = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "wiener", "-q")
    assert again.exit_code == 0, again.output

    # a job whose producer died mid-listing held the prefix for good: nothing marked it failed before the check
    from datetime import timedelta

    from sqlalchemy import update

    from db import queries
    from db.engine import session_scope
    from db.schema import Job

    with session_scope(env["DEBLUR_DATABASE_URL"]) as session:
        session.execute(update(Job).where(Job.id == again.stdout.strip()).values(
            status="submitting", updated_at=queries.utcnow() - timedelta(seconds=queries.SUBMISSION_STALE_S + 60)))
    after_death = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "-q")
    assert after_death.exit_code == 0, after_death.output
    with session_scope(env["DEBLUR_DATABASE_URL"]) as session:
        assert queries.get_job(session, again.stdout.strip()).status == "failed"


def test_a_retry_whose_outputs_another_unfinished_job_has_still_to_write_is_refused(env, s3) -> None:  # type: ignore[no-untyped-def]
    """'deblur retry' sent a failed image again while a newer job into the same prefix had still to write it:
    both wrote it. It is refused now, nothing sent; '--all' still retries the other jobs and exits 2."""
    from sqlalchemy import update

    from db.engine import session_scope
    from db.schema import Image

    _, bucket = s3
    first = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/re/", "-q")
    assert first.exit_code == 0, first.output
    first_id = first.stdout.strip()
    with session_scope(env["DEBLUR_DATABASE_URL"]) as session:  # a worker failed one image; the other waits
        session.execute(update(Image).where(Image.job_id == first_id, Image.input_uri == f"s3://{bucket}/in/a.png")
                        .values(status="failed", error="decode failed"))
    second = invoke("submit", f"s3://{bucket}/in/a.png", "--output", f"s3://{bucket}/re/", "-q")
    assert second.exit_code == 0, second.output  # the first job no longer has to write a.png's output
    queued = queue_length(env)
    refused = invoke("retry", first_id, "--failed")
    assert refused.exit_code == 2, refused.output
    assert f"is one job {second.stdout.strip()} (queued) has still to write" in " ".join(refused.output.split())
    if env["DEBLUR_DATABASE_URL"].startswith("sqlite"):  # PostgreSQL is shared: --all would retry other tests' jobs
        every = invoke("retry", "--all", "--failed")
        assert every.exit_code == 2, every.output
        assert "jobs not retried: another job has still to write their outputs" in " ".join(every.output.split())
        assert f"re-enqueued 0 images of job {second.stdout.strip()}" in every.output  # the others were retried
    assert queue_length(env) == queued
    rows = json.loads(invoke("results", first_id, "--format", "json").stdout)
    assert {r["input"]: r["status"] for r in rows}[f"s3://{bucket}/in/a.png"] == "failed"


def test_a_relative_weights_or_checkpoint_path_is_refused_before_anything_is_sent(env, s3) -> None:  # type: ignore[no-untyped-def]
    """'weights=runs/u1/best.safetensors' was accepted and failed on every image: each worker looked for it in
    its own working folder. An absolute path is accepted (the file is the workers' to read)."""
    _, bucket = s3
    jobs_before = job_count(env)
    for spec in ("seed002-unet:weights=runs/u1/best.safetensors", "spandrel:path=models/nafnet.pth"):
        refused = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/rel/", "--model", spec)
        assert refused.exit_code == 2, (spec, refused.output)
        assert "is a relative path" in " ".join(refused.output.split()), refused.output
    assert job_count(env) == jobs_before
    absolute = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/rel/", "--dry-run",
                      "--model", "seed002-unet:weights=/shared/weights/best.safetensors")
    assert absolute.exit_code == 0, absolute.output


def test_job_key_returns_the_first_job(env, s3) -> None:  # type: ignore[no-untyped-def]
    _, bucket = s3
    key = f"nightly-{uuid.uuid4().hex[:6]}"
    args = ["submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--job-key", key, "-q"]
    jobs_before = job_count(env)
    first = invoke(*args)
    second = invoke(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert first.stdout.strip() == second.stdout.strip()
    assert job_count(env) == jobs_before + 1
    assert queue_length(env) == 1  # two images, one batch, sent once


def test_manifest_and_single_keys(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="in/IMG 0001, copy.png", Body=b"\x89PNG")  # a comma is no CSV column
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# scans to redo\ns3://{bucket}/in/IMG 0001, copy.png\ns3://{bucket}/in/a.png\n\n"
                        f"s3://{bucket}/in/sub/b.jpg\n")
    result = invoke("submit", str(manifest), f"s3://{bucket}/in/a.png", "--output", f"s3://{bucket}/out/",
                    "--batch-size", "1", "-q")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    rows = json.loads(invoke("results", job_id, "--format", "json").stdout)
    # the duplicate of a.png (manifest and argument) is one image
    assert sorted(r["input"] for r in rows) == [f"s3://{bucket}/in/IMG 0001, copy.png", f"s3://{bucket}/in/a.png",
                                                 f"s3://{bucket}/in/sub/b.jpg"]
    assert all(r["reference"] is None for r in rows)
    assert queue_length(env) == 3  # one task per image (batches of 1): the one named twice is sent once


@pytest.fixture(scope="module")
def bucket_of_5000_keys(s3_endpoint: str) -> str:
    """A bucket holding 5,000 one-byte objects under ``big/``, filled once for both databases' runs
    (the S3 endpoint takes about half a minute to store them; submission only reads them)."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"big-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    keys = [f"big/{i // 100:03d}/{i:05d}.png" for i in range(5000)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"."), keys))
    return bucket


def test_streaming_listing_of_5000_keys(env, bucket_of_5000_keys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from producer.submit import JobRequest, submit

    bucket = bucket_of_5000_keys

    events: list[str] = []
    settings = load_settings()
    s3_for_submit = __import__("jobs.storage", fromlist=["s3_client"]).s3_client(settings)
    s3_for_submit.meta.events.register("after-call.s3.ListObjectsV2", lambda **_: events.append("page"))
    app = app_for(settings)
    real_send = app.send_task

    def recording_send(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("send")
        return real_send(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", recording_send)
    tracemalloc.start()
    result = submit(JobRequest(kind="deblur", inputs=[f"s3://{bucket}/big/"], output=f"s3://{bucket}/out/",
                               batch_size=10), settings)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert result.total == 5000
    assert events.count("page") == 5 and events.count("send") == 500
    # the first tasks go out before the second listing page is read: the listing is never collected first
    second_page = events.index("page", events.index("page") + 1)
    assert events.index("send") < second_page
    assert queue_length(env) == 500
    assert peak < 60 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


def test_python_client_submit_status_cancel(env, s3) -> None:  # type: ignore[no-untyped-def]
    from jobs.errors import JobKeyReusedError
    from producer.client import Client

    _, bucket = s3
    client = Client()
    job_id = client.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", models=["wiener:2"], job_key=bucket)
    assert client.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", models=["wiener:2"],
                         job_key=bucket) == job_id
    with pytest.raises(JobKeyReusedError, match=f"was used for another request \\(job {job_id}\\)"):
        client.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/", job_key=bucket)  # another ensemble
    info = client.status(job_id)
    assert info["status"] == "queued" and info["counts"]["pending"] == 2 and info["spec"]["models"] == ["wiener:2"]
    assert client.cancel(job_id) == 2
    assert client.wait(job_id, timeout=5)["status"] == "cancelled"
    assert {r["status"] for r in client.results(job_id)} == {"cancelled"}
    assert client.verify(job_id).checked == 0  # nothing was done, so nothing to read back


def test_missing_s3_credentials_say_what_to_set(s3_endpoint, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without credentials boto3 can sign nothing; the error names the variables and the local stack."""
    from producer.cli import main

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path / "home"))  # no local stack's connection file
    monkeypatch.setenv("DEBLUR_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"sqlite:///{tmp_path / 'deblur.db'}")
    from jobs import storage

    storage._client.cache_clear()  # clients are cached per endpoint: an earlier test's holds its credentials
    try:
        result = CliRunner().invoke(main, ["submit", "s3://photos/in/", "--output", "s3://photos/out/"])
    finally:
        storage._client.cache_clear()  # and this one holds none: later tests must not get it
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "bucket 'photos': no S3 credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message and "'deblur stack up'" in message


def test_a_broker_that_does_not_answer_fails_the_job_and_says_what_to_do(env, s3, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not a kombu traceback: the job is marked failed, the message names it and the setting to fix."""
    import socket

    from producer.client import Client

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("DEBLUR_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    _, bucket = s3
    result = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/")

    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert "Traceback" not in message and "the broker did not take job" in message
    assert "the job is marked failed and nothing was queued" in message and "DEBLUR_BROKER_URL" in message
    job_id = message.split("the broker did not take job ")[1].split("'s tasks")[0]
    monkeypatch.setenv("DEBLUR_BROKER_URL", env["DEBLUR_BROKER_URL"])
    info = Client().status(job_id)
    assert info["status"] == "failed"
    assert queue_length(env) == 0
    # the rows written and never sent are cancelled, as said: a broker loss must not send them (worker.broker_watch)
    assert info["counts"]["pending"] == 0 and info["counts"]["cancelled"] == sum(info["counts"].values()) > 0


def test_a_database_that_does_not_answer_is_named_without_its_password(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"postgresql+psycopg://archivist:s3cret@127.0.0.1:{port}/jobs")
    for args in (["status"], ["results", "abcd"]):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        message = " ".join(result.output.split())
        assert f"the database at postgresql+psycopg://archivist:***@127.0.0.1:{port}/jobs failed" in message
        assert "Connection refused" in message and "DEBLUR_DATABASE_URL" in message
        assert "s3cret" not in message and "Traceback" not in message


def test_outputs_that_would_overwrite_an_image_are_refused_before_anything_is_written(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two folders each holding a.png mirrored into one output prefix once wrote both to the same key, and an
    output prefix over a manifest's keys wrote over its inputs: either loses an image, so neither is submitted."""
    client, b = s3
    for key in ("x/a.png", "y/a.png", "o/x/a.png"):
        client.put_object(Bucket=b, Key=key, Body=b"png")

    def manifest(name: str, *keys: str) -> str:
        (tmp_path / name).write_text("".join(f"s3://{b}/{k}\n" for k in keys))
        return str(tmp_path / name)

    both = f"s3://{b}/x/a.png and s3://{b}/y/a.png would both be written to s3://{b}/out/a.png"
    cases = [
        ([f"s3://{b}/x/", f"s3://{b}/y/", "--output", f"s3://{b}/out/"], both),
        ([f"s3://{b}/x/a.png", f"s3://{b}/y/a.png", "--output", f"s3://{b}/out/"], both),
        ([manifest("m1.txt", "x/a.png", "o/x/a.png"), "--output", f"s3://{b}/o/"],
         f"the output of s3://{b}/x/a.png would overwrite the input s3://{b}/o/x/a.png"),
        ([manifest("m2.txt", "x/a.png"), "--output", f"s3://{b}/"],
         f"the output of s3://{b}/x/a.png would overwrite the input s3://{b}/x/a.png"),
    ]
    jobs_before = job_count(env)
    for args, message in cases:
        result = invoke("submit", *args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
    assert job_count(env) == jobs_before and queue_length(env) == 0

    # a manifest keeps each key's whole path, so the same two names do not collide there
    result = invoke("submit", manifest("m3.txt", "x/a.png", "y/a.png"), f"s3://{b}/x/a.png", "--output",
                    f"s3://{b}/out/", "-q")
    assert result.exit_code == 0, result.output
    from sqlalchemy import select

    from db.engine import get_engine
    from db.schema import Image

    with get_engine(env["DEBLUR_DATABASE_URL"]).connect() as conn:
        outputs = conn.execute(select(Image.output_uri).where(Image.job_id == result.stdout.strip())).scalars()
        assert sorted(outputs) == [f"s3://{b}/out/x/a.png", f"s3://{b}/out/y/a.png"]


def test_dry_run_lists_what_would_be_submitted_and_writes_nothing(env, s3) -> None:  # type: ignore[no-untyped-def]
    client, b = s3
    for kernel in ("in/a.kernel.png", "in/sub/b.kernel.l0-blind.png"):  # an earlier job's artefacts: not photographs
        client.put_object(Bucket=b, Key=kernel, Body=b"png")
    for other in ("in/scan.HEIC", "in/sub/README", "in/empty-folder/"):  # a folder marker is no file to report
        client.put_object(Bucket=b, Key=other, Body=b"")
    jobs_before = job_count(env)
    result = invoke("submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "would submit 2 images; nothing was written or enqueued (--dry-run)"
    assert lines[1:] == [f"  s3://{b}/in/a.png → s3://{b}/out/a.png", f"  s3://{b}/in/sub/b.jpg → s3://{b}/out/sub/b.jpg",
                         "left out 2 files that are not images deblur reads (PNG, JPEG, TIFF, WebP, JPEG 2000, "
                         "BMP): .heic ×1, "
                         "no extension ×1; and 2 kernel PNGs of an earlier run"]
    refused = invoke("submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "--model", "nosuch", "--dry-run")
    assert refused.exit_code == 2 and "unknown model 'nosuch'" in refused.output  # validated as a submission is
    assert job_count(env) == jobs_before and queue_length(env) == 0

    # what a submission leaves out is said even with -q, on stderr, beside the job id
    submitted = invoke("submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "-q")
    assert submitted.exit_code == 0 and len(submitted.stdout.split()) == 1
    assert "note: left out 2 files that are not images deblur reads" in " ".join(submitted.stderr.split())


def test_skip_existing_submits_only_images_without_an_output(env, s3) -> None:  # type: ignore[no-untyped-def]
    """A nightly run over a growing prefix: what was restored before is left out, and with nothing new no job
    is made (exit 0, so a scheduler does not call it a failure)."""
    client, b = s3
    client.put_object(Bucket=b, Key="out/a.png", Body=b"restored earlier")
    args = ["submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "--skip-existing"]

    preview = invoke(*args, "--dry-run")
    assert preview.exit_code == 0, preview.output
    assert preview.output.splitlines() == [
        "would submit 1 images, leaving out 1 whose outputs already exist (--skip-existing); nothing was written or "
        "enqueued (--dry-run)", f"  s3://{b}/in/sub/b.jpg → s3://{b}/out/sub/b.jpg"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[0]
    assert "with 1 images, 1 left out whose outputs already exist" in " ".join(result.output.split())
    rows = json.loads(invoke("results", job_id, "--format", "json").stdout)
    assert [r["input"] for r in rows] == [f"s3://{b}/in/sub/b.jpg"]
    assert queue_length(env) == 1

    client.put_object(Bucket=b, Key="out/sub/b.jpg", Body=b"restored now")
    jobs_before = job_count(env)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ""  # no job id for a script to pick up
    assert "nothing to submit: all 2 images are left out whose outputs already exist" in " ".join(result.output.split())
    assert job_count(env) == jobs_before and queue_length(env) == 1


def test_a_submission_abandoned_mid_listing_gives_its_key_to_a_new_job(env, s3) -> None:  # type: ignore[no-untyped-def]
    """A producer killed while listing leaves a job 'submitting' with only some images enqueued. Submitting again
    with the same key once handed that broken job back for ever; after SUBMISSION_STALE_S without progress it is
    failed and the key starts a new, complete job. A keyless one, which no key finds, is failed by the next
    submission too. A submission still making progress keeps its key."""
    from datetime import timedelta

    from sqlalchemy import update

    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Job, utcnow

    _, b = s3
    url = env["DEBLUR_DATABASE_URL"]
    ensure_schema(url)
    keys = {"stale": f"killed-{uuid.uuid4().hex[:6]}", "live": f"busy-{uuid.uuid4().hex[:6]}", "keyless": None}
    ids = {}
    with session_scope(url) as session:
        for name, key in keys.items():
            job, created = queries.create_job(session, "deblur", {"inputs": []}, key)
            assert created and job.status == "submitting"
            ids[name] = job.id
        long_ago = utcnow() - timedelta(seconds=queries.SUBMISSION_STALE_S + 60)
        session.execute(update(Job).where(Job.id.in_([ids["stale"], ids["keyless"]])).values(updated_at=long_ago))

    shown = invoke("status", ids["stale"])
    assert "stalled: no submission progress for over 10 minutes" in " ".join(shown.output.split())
    assert "stalled" not in invoke("status", ids["live"]).output

    args = ["submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "-q"]
    fresh = invoke(*args, "--job-key", keys["stale"])
    assert fresh.exit_code == 0, fresh.output
    assert fresh.stdout.strip() != ids["stale"]
    busy = invoke(*args, "--job-key", keys["live"])
    assert busy.exit_code == 0 and busy.stdout.strip() == ids["live"]  # still being submitted: the same job
    told = invoke(*[a for a in args if a != "-q"], "--job-key", keys["live"])  # it once said "with 0 images"
    assert f"already being submitted (same --job-key): job {ids['live']} with 0 images listed so far" in \
        " ".join(told.output.split()), told.output
    with session_scope(url) as session:
        old = queries.get_job(session, ids["stale"])
        assert old.status == "failed" and old.job_key is None and "submission interrupted" in (old.error or "")
        assert queries.get_job(session, fresh.stdout.strip()).job_key == keys["stale"]
        keyless = queries.get_job(session, ids["keyless"])
        assert keyless.status == "failed" and "the images it sent are restored" in (keyless.error or "")
        assert queries.get_job(session, ids["live"]).status == "submitting"


def _submit_acting_after_the_first_chunk(s3, monkeypatch, act, window: int = 0):  # type: ignore[no-untyped-def]
    """Submit six images listed two by two, calling ``act(job_id)`` after the first two, as another process
    would act on the job meanwhile; returns the submission's result and the totals its progress reported."""
    import producer.submit as submit_module
    from jobs.settings import load_settings
    from producer.submit import JobRequest, submit
    from producer.tracking import list_jobs

    client, bucket = s3
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"many/{i}.png", Body=b"x")
    monkeypatch.setattr(submit_module, "ROWS_PER_TRANSACTION", 2)
    settings = load_settings()
    seen: list[int] = []

    def progress(total: int) -> None:
        seen.append(total)
        if len(seen) == 1:
            act(list_jobs(settings, status="submitting", limit=1)[0]["id"])

    request = JobRequest(kind="deblur", inputs=[f"s3://{bucket}/many/"], output=f"s3://{bucket}/out/",
                         models=["wiener"], batch_size=2, window=window)
    try:
        return submit(request, settings, progress=progress), seen
    except JobFinishedError as exc:  # what the producer says of a job cancelled meanwhile
        return exc, seen


def test_a_windowed_submission_that_breaks_off_cancels_the_batches_its_window_never_sent(  # type: ignore[no-untyped-def]
        env, s3, monkeypatch) -> None:
    """A windowed job whose listing broke off (Ctrl-C, a listing error) was failed with its unsent batches left
    pending for good, since no worker sends a failed job's next batch, while its error said they were restored."""
    import producer.submit as submit_module
    from db import queries
    from db.engine import session_scope
    from jobs.settings import load_settings
    from producer.submit import JobRequest, submit

    client, bucket = s3
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"many/{i}.png", Body=b"x")
    monkeypatch.setattr(submit_module, "ROWS_PER_TRANSACTION", 4)

    def interrupted(total: int) -> None:
        raise KeyboardInterrupt  # after the first chunk: four one-image batches written, the window sent one

    request = JobRequest(kind="deblur", inputs=[f"s3://{bucket}/many/"], output=f"s3://{bucket}/out/",
                         models=["wiener"], batch_size=1, window=1)
    with pytest.raises(KeyboardInterrupt):
        submit(request, load_settings(), progress=interrupted)
    with session_scope(load_settings().resolved_database_url()) as session:
        [job] = [j for j in queries.recent_jobs(session, 50) if (j.spec or {}).get("output") == f"s3://{bucket}/out/"]
        counts = queries.status_counts(session, job.id)
        assert (job.status, counts["pending"], counts["cancelled"], job.total) == ("failed", 1, 3, 4), counts
        assert "after 1 images were queued" in job.error, job.error


@pytest.mark.parametrize("window", [0, 1])
def test_a_job_cancelled_while_it_is_listed_stays_cancelled_and_its_listing_stops(  # type: ignore[no-untyped-def]
        env, s3, monkeypatch, window) -> None:
    """Another process cancels the job after the first chunk of rows: the producer lists no further, the rows it
    wrote after the cancellation are cancelled too, and the job does not come back as queued with images that
    no worker will ever take (workers drop a cancelled job's batches)."""
    from jobs.settings import load_settings
    from producer.tracking import cancel_job, job_status

    cancelled: list[str] = []

    def cancel(job_id: str) -> None:
        cancelled.append(job_id)
        cancel_job(load_settings(), job_id)

    refused, seen = _submit_acting_after_the_first_chunk(s3, monkeypatch, cancel, window)
    assert seen == [2]  # the listing stopped after the chunk during which the job was cancelled
    # it once answered as if the job had been submitted whole
    assert isinstance(refused, JobFinishedError), refused
    assert f"job {cancelled[0]} was cancelled while this producer was still listing it: 2 images" in str(refused)
    info = job_status(load_settings(), cancelled[0])
    assert info["status"] == "cancelled", info
    assert info["counts"]["pending"] == 0 and info["counts"]["cancelled"] == info["total"] == 2
    assert queue_length(env) == 1  # the first chunk's batch only (a worker drops it: the job is cancelled)


def test_a_retry_while_the_job_is_listed_does_not_cut_its_listing_short(env, s3, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """'deblur retry' on a job still submitting (its first images failed, say) leaves it submitting: the producer
    lists every input and makes the job queued, instead of taking the retry for a cancellation."""
    from jobs.settings import load_settings
    from producer.retry import retry_images
    from producer.tracking import job_status

    def retry(job_id: str) -> None:
        assert retry_images(load_settings(), job_id, failed=False, stalled_after=0) == 2

    result, seen = _submit_acting_after_the_first_chunk(s3, monkeypatch, retry)
    assert seen == [2, 4, 6] and result.total == 6
    info = job_status(load_settings(), result.job_id)
    assert info["status"] == "queued" and info["counts"]["pending"] == 6, info
    assert queue_length(env) == 3 + 1  # the three batches, and the retried first one


def test_labels_are_kept_with_the_job_and_select_it_in_listings(env, s3) -> None:  # type: ignore[no-untyped-def]
    """Teams label their jobs and find them again among everyone's, on SQLite and PostgreSQL alike; a label that
    is not one is refused before anything is written."""
    from producer.client import Client

    _, bucket = s3
    team = f"ingest-{uuid.uuid4().hex[:6]}"  # the PostgreSQL database is shared: a value of this test's own
    first = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/a/", "--label", f"team={team}",
                   "--label", "collection=1923 negatives", "-q")
    assert first.exit_code == 0, first.output
    first_id = first.stdout.strip()
    client = Client()
    second_id = client.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/b/", labels={"team": team})
    other_id = client.submit([f"s3://{bucket}/in/"], output=f"s3://{bucket}/c/", labels={"team": team + "-x"})

    assert client.status(first_id)["spec"]["labels"] == {"team": team, "collection": "1923 negatives"}
    assert "labels: team=" + team + " collection=1923 negatives" in invoke("status", first_id).output
    mine = client.jobs(labels={"team": team})
    assert [j["id"] for j in mine] == [second_id, first_id]  # newest first; the other team's job is not there
    assert [j["id"] for j in client.jobs(labels={"team": team, "collection": "1923 negatives"})] == [first_id]
    assert client.jobs(labels={"team": team}, status="done") == []
    listed = json.loads(invoke("status", "--label", f"team={team}", "--format", "json").stdout)
    assert [j["id"] for j in listed] == [second_id, first_id] and listed[1]["labels"]["collection"] == "1923 negatives"
    assert other_id not in invoke("status", "--label", f"team={team}").output

    before = job_count(env)
    for bad in ("team", "bad key=x", "=x", "api-client=someone"):  # the last is the HTTP API's to set
        refused = invoke("submit", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/d/", "--label", bad)
        assert refused.exit_code == 2 and "--label" in refused.output, refused.output
    assert job_count(env) == before
    assert invoke("status", first_id, "--label", "team=x").exit_code == 2  # a selection needs no JOB


def test_a_job_failed_as_abandoned_under_a_live_producer_is_not_reported_as_submitted(env, s3, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another submission took the job for abandoned while this producer was still listing it: the producer stops,
    and says so with an error instead of printing the job id as if every image had been submitted."""
    from db import queries
    from db.engine import session_scope
    from jobs.errors import TransientError

    def fail(job_id: str) -> None:
        with session_scope(env["DEBLUR_DATABASE_URL"]) as session:
            queries.set_job_state(session, job_id, status="failed", job_key=None)

    with pytest.raises(TransientError, match="was marked failed while this producer was still listing it"):
        _submit_acting_after_the_first_chunk(s3, monkeypatch, fail)
    from producer.tracking import list_jobs
    from jobs.settings import load_settings

    [failed] = [j for j in list_jobs(load_settings(), limit=5) if j["status"] == "failed"][:1]
    assert failed["total"] == 2  # the images it queued (the first chunk) are counted, not left at 0


def test_a_listing_that_yields_nothing_for_long_still_shows_the_producer_alive(env, s3, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Millions of keys already restored (--skip-existing) yield no image for a long time; the producer beats for
    its job from the listing itself, so no other submission fails it as abandoned meanwhile."""
    from datetime import timedelta

    from sqlalchemy import select, update

    from db import queries
    from db.engine import ensure_schema, session_scope
    from db.schema import Job, utcnow
    from producer.submit import _Heartbeat

    url = env["DEBLUR_DATABASE_URL"]
    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "deblur", {"inputs": []})
        job_id = job.id
    heartbeat = _Heartbeat(url)
    heartbeat.tick()  # before the job exists: nothing to beat for
    heartbeat.start(job_id)
    long_ago = utcnow() - timedelta(seconds=queries.SUBMISSION_STALE_S + 60)
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=long_ago))
    heartbeat.tick()  # within the interval: no write
    with session_scope(url) as session:
        assert queries.fail_abandoned_submissions(session) == 0 or queries.job_status_of(session, job_id) == "failed"
        session.execute(update(Job).where(Job.id == job_id).values(status="submitting", updated_at=long_ago))
    monkeypatch.setattr(_Heartbeat, "INTERVAL_S", 0.0)
    heartbeat.tick()
    with session_scope(url) as session:
        queries.fail_abandoned_submissions(session)
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "submitting"
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))


def test_a_used_job_key_returns_its_job_even_when_skip_existing_leaves_nothing(env, s3) -> None:  # type: ignore[no-untyped-def]
    """A keyed nightly submission sent again after its job finished (a retry by the HTTP client, say) gets the
    first job back, not 'nothing to submit' and no id."""
    client, b = s3
    key = f"nightly-{uuid.uuid4().hex[:6]}"
    args = ["submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "--skip-existing", "--job-key", key, "-q"]
    first = invoke(*args)
    assert first.exit_code == 0 and first.stdout.strip(), first.output
    for name in ("out/a.png", "out/sub/b.jpg"):
        client.put_object(Bucket=b, Key=name, Body=b"restored")
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == first.stdout.strip()


def test_manifests_are_read_whole_before_anything_is_written(env, s3, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A spreadsheet's CSV starts with a byte-order mark, which once hid its first row's URI (taken for a header,
    so that image was never restored). A bad row far down, or a bucket that does not exist, is refused before the
    first rows are written and enqueued."""
    client, b = s3
    client.put_object(Bucket=b, Key="sharp/a.png", Body=b"png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"s3://{b}/in/a.png,s3://{b}/sharp/a.png\ns3://{b}/in/sub/b.jpg,s3://{b}/sharp/a.png\n",
                     encoding="utf-8-sig")
    result = invoke("evaluate", "--blurred", str(pairs), "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(invoke("results", result.stdout.strip(), "--format", "json").stdout)
    assert sorted(r["input"] for r in rows) == [f"s3://{b}/in/a.png", f"s3://{b}/in/sub/b.jpg"]

    header = tmp_path / "header.csv"  # a header after a comment is still a header
    header.write_text(f"# pairs\nblurred,sharp\ns3://{b}/in/a.png,s3://{b}/sharp/a.png\n")
    assert invoke("evaluate", "--blurred", str(header), "--dry-run").exit_code == 0

    jobs_before, queued_before = job_count(env), queue_length(env)
    bad_row = tmp_path / "bad.csv"
    bad_row.write_text("".join(f"s3://{b}/in/a.png,s3://{b}/sharp/a.png\n" for _ in range(3))
                       + f"s3://Bad_Bucket/x.png,s3://{b}/sharp/a.png\n")
    refused = invoke("evaluate", "--blurred", str(bad_row))
    assert refused.exit_code == 2 and f"{bad_row}:4" in refused.output and "not a valid bucket name" in refused.output
    missing = tmp_path / "missing.txt"
    missing.write_text(f"s3://{b}/in/a.png\ns3://no-such-bucket-{uuid.uuid4().hex[:6]}/x.png\n")
    refused = invoke("submit", str(missing), "--output", f"s3://{b}/out/")
    assert refused.exit_code != 0 and "no-such-bucket" in refused.output
    assert job_count(env) == jobs_before and queue_length(env) == queued_before


def test_outputs_over_references_or_above_the_input_are_refused(env, s3) -> None:  # type: ignore[no-untyped-def]
    """An evaluation's outputs written into its sharp references would replace the ground truth; an output prefix
    above the input's folder lands among files that are not the job's (in/in/a.png → in/a.png, an original
    beside the input replaced); a mistyped prefix among several is named instead of passed over."""
    client, b = s3
    for key in ("sharp/a.png", "sharp/sub/b.jpg", "in/in/a.png"):
        client.put_object(Bucket=b, Key=key, Body=b"png")
    jobs_before, queued_before = job_count(env), queue_length(env)
    cases = [
        (["evaluate", "--blurred", f"s3://{b}/in/", "--sharp", f"s3://{b}/sharp/", "--output", f"s3://{b}/sharp/"],
         "lies inside the sharp references' prefix"),
        (["evaluate", "--blurred", f"s3://{b}/in/", "--sharp", f"s3://{b}/sharp/", "--output",
          f"s3://{b}/sharp/restored/"], "lies inside the sharp references' prefix"),
        (["submit", f"s3://{b}/in/", "--output", f"s3://{b}/"],
         f"output prefix s3://{b}/ holds the input s3://{b}/in/: the outputs would be written among the files"),
        # an original beside the input prefix was replaced: in/in/a.png → in/a.png, sharp/sub/b.jpg → sharp/b.jpg
        (["submit", f"s3://{b}/sharp/sub/", "--output", f"s3://{b}/sharp/"],
         f"output prefix s3://{b}/sharp/ holds the input s3://{b}/sharp/sub/"),
        (["submit", f"s3://{b}/sharp/sub/b.jpg", "--output", f"s3://{b}/"],
         f"output prefix s3://{b}/ holds the input s3://{b}/sharp/sub/b.jpg"),
        (["submit", f"s3://{b}/in/", f"s3://{b}/inn/", "--output", f"s3://{b}/out/"],
         f"input prefix s3://{b}/inn/ holds no images"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code != 0, result.output
        assert message in " ".join(result.output.split())
    assert job_count(env) == jobs_before and queue_length(env) == queued_before


def test_keys_with_a_doubled_slash_keep_their_own_outputs(env, s3) -> None:  # type: ignore[no-untyped-def]
    """An uploader's doubled slash (in//x.png beside in/x.png) once mapped both to out/x.png; the listed path is
    mirrored as it is, and the worker reads and writes such keys as stored."""
    from jobs.s3uri import parse_s3_uri

    client, b = s3
    client.put_object(Bucket=b, Key="in//a.png", Body=b"png")
    result = invoke("submit", f"s3://{b}/in/", "--output", f"s3://{b}/out/", "-q")
    assert result.exit_code == 0, result.output
    from sqlalchemy import select

    from db.engine import get_engine
    from db.schema import Image

    with get_engine(env["DEBLUR_DATABASE_URL"]).connect() as conn:
        rows = conn.execute(select(Image.input_uri, Image.output_uri)
                            .where(Image.job_id == result.stdout.strip())).all()
    assert sorted(tuple(r) for r in rows) == [
        (f"s3://{b}/in//a.png", f"s3://{b}/out//a.png"), (f"s3://{b}/in/a.png", f"s3://{b}/out/a.png"),
        (f"s3://{b}/in/sub/b.jpg", f"s3://{b}/out/sub/b.jpg")]
    assert parse_s3_uri(f"s3://{b}/in//a.png", exact=True).key == "in//a.png"
    with pytest.raises(Exception, match="empty"):
        parse_s3_uri(f"s3://{b}/in//a.png")  # typed by a person: refused, as before
