"""The queue's Prometheus metrics, read from a real database and a real Redis broker.

Given jobs submitted at two priorities with no worker running, a batch taken
and not acknowledged, and image rows put in every state an operator watches
for (running past the visibility timeout, back in the queue after a worker
died, finished now, finished long ago), the exposition's figures are exactly
those; it parses with Prometheus' own parser. Jobs submitted to other queues
than the reader's show under their own queue label. A source that does not answer
reads ``deblur_up 0`` and the scrape still answers (the CLI exits 1 and still
writes its file). The alerting rules shipped in ``deploy/`` use only series
that exist.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import redis
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.e2e_helpers import ROOT, use_services

pytestmark = [pytest.mark.integration]


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The session's services, on a Redis database of this module's own: the broker's 'unacked' hash is shared by
    every queue of a database, and this module counts it."""
    own_database = redis_url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(own_database).flushdb()
    return use_services(monkeypatch, own_database, s3_endpoint, database_url, tmp_path / "home")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return found[(name, tuple(sorted(labels.items())))]


def submit_fake_images(env: dict[str, str], count: int, priority: int, batch_size: int) -> str:
    from jobs.settings import load_settings
    from producer.submit import JobRequest, submit

    client = boto3.client("s3", endpoint_url=env["DEBLUR_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = f"m-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    for i in range(count):
        client.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=b"submission does not decode images")
    result = submit(JobRequest(kind="deblur", inputs=[f"s3://{bucket}/in/"], output=f"s3://{bucket}/out/",
                               models=["wiener"], priority=priority, batch_size=batch_size), load_settings())
    return result.job_id


def test_metrics_count_the_backlog_the_broker_and_every_state_an_operator_watches(env) -> None:  # type: ignore[no-untyped-def]
    from db.engine import session_scope
    from db.schema import Image, Job, utcnow
    from jobs.celery_app import app_for
    from jobs.settings import load_settings
    from producer.metrics import RECENT_WINDOW_S, render_metrics

    settings = load_settings()
    # the PostgreSQL database is shared by the tests this process runs: its figures are compared as increases
    before = samples(render_metrics(settings).text)

    def grown(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return value(found, name, **labels) - value(before, name, **labels)

    urgent = submit_fake_images(env, 3, priority=7, batch_size=2)  # two batches
    routine = submit_fake_images(env, 1, priority=2, batch_size=8)  # one

    first = samples(render_metrics(settings).text)
    assert value(first, "deblur_up", source="database") == 1 and value(first, "deblur_up", source="broker") == 1
    assert grown(first, "deblur_jobs", status="queued") == 2
    assert grown(first, "deblur_backlog_images", status="pending") == 4
    waiting = {p: value(first, "deblur_broker_waiting_batches", queue=settings.queue, priority=str(p))
               for p in range(10)}
    assert waiting == {**dict.fromkeys(range(10), 0), 7: 2, 2: 1}
    assert value(first, "deblur_broker_unacked_batches") == 0
    assert value(first, "deblur_oldest_unfinished_job_age_seconds") >= 0  # a gauge's value, not a timing
    assert grown(first, "deblur_stalled_images") == 0 and grown(first, "deblur_worker_lost_images") == 0
    assert value(first, "deblur_recent_window_seconds") == RECENT_WINDOW_S  # the exported constant

    # a worker takes the most urgent batch and has not acknowledged it yet
    # (kept open while scraping: a channel closed cleanly puts its unacknowledged messages back)
    connection = app_for(settings).connection_for_read()
    taken = connection.default_channel.basic_get(settings.queue, no_ack=False)
    assert taken is not None and taken.headers["task"] == "deblur.process_batch"

    now = utcnow()
    with session_scope(settings.resolved_database_url()) as session:
        a, b, c = session.query(Image).filter(Image.job_id == urgent).order_by(Image.id).all()
        long_ago = now - timedelta(seconds=settings.visibility_timeout + 60)
        a.status, a.started_at, a.unfinished_starts = "running", long_ago, 1
        b.status, b.unfinished_starts = "pending", 1  # started once, its worker died: back in the queue
        c.status, c.finished_at, c.width, c.height, c.inference_s = "done", now, 2000, 1500, 4.0
        (d,) = session.query(Image).filter(Image.job_id == routine).all()
        d.status, d.finished_at = "failed", now - timedelta(seconds=RECENT_WINDOW_S + 3600)
        old = Job(kind="deblur", spec={}, status="done", total=1, created_at=now - timedelta(days=3),
                  finished_at=now - timedelta(days=2))
        session.add(old)
        session.flush()
        session.add(Image(job_id=old.id, input_uri="s3://x/old.png", status="done", width=4000, height=3000,
                          inference_s=60.0, finished_at=now - timedelta(days=2)))

    try:
        found = samples(render_metrics(settings).text)
    finally:
        connection.release()
    assert grown(found, "deblur_jobs", status="queued") == 2 and grown(found, "deblur_jobs", status="done") == 1
    backlog = {s: grown(found, "deblur_backlog_images", status=s) for s in ("pending", "running", "done", "failed")}
    assert backlog == {"pending": 1, "running": 1, "done": 1, "failed": 1}  # the old job's image is history
    assert grown(found, "deblur_stalled_images") == 1
    assert grown(found, "deblur_worker_lost_images") == 1  # b; a has one start, its own
    recent = {s: grown(found, "deblur_images_finished_recently", status=s) for s in ("done", "failed", "cancelled")}
    assert recent == {"done": 1, "failed": 0, "cancelled": 0}
    assert grown(found, "deblur_megapixels_restored_recently") == pytest.approx(3.0)
    assert grown(found, "deblur_inference_seconds_recently") == pytest.approx(4.0)  # the 4.0 s stored above
    assert value(found, "deblur_broker_waiting_batches", queue=settings.queue, priority="7") == 1
    assert value(found, "deblur_broker_unacked_batches") == 1

    # the same figures for people, under 'deblur status' without a job (the taken batch went back when its
    # connection closed)
    from producer.cli import main

    listing = CliRunner().invoke(main, ["status"])
    assert listing.exit_code == 0, listing.output
    assert urgent[:8] in listing.output and "queue: " in listing.output
    assert "restored" in listing.output and "model s per image" in listing.output
    assert " 0.0 MP/min" not in listing.output  # 3 MP in 15 minutes reads 0.20, not 0.0
    assert "stalled: " in listing.output and "deblur retry JOB --stalled" in listing.output
    assert "lost their worker" in listing.output
    assert "broker: 3 batches waiting (priority 7: 2, priority 2: 1), 0 taken by workers" in listing.output


def test_the_broker_figures_cover_every_queue_unfinished_jobs_were_submitted_to(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Jobs keep the queue they were submitted to: batches in queues that no worker consumes, and that are not the
    reader's DEBLUR_QUEUE, still show in the scrape (a series per queue) and in 'deblur status' (summed, then by
    queue)."""
    from jobs.settings import load_settings
    from producer.cli import main
    from producer.metrics import queues_to_read, render_metrics

    # a job that predates recorded queues (None) is sent again to the configured queue, which is read first
    assert queues_to_read("deblur", {None, "b", "deblur", "a"}) == ["deblur", "a", "b"]

    suffix = uuid.uuid4().hex[:6]
    ghost, other, reader = f"ghost-{suffix}", f"other-{suffix}", f"reader-{suffix}"
    monkeypatch.setenv("DEBLUR_QUEUE", ghost)
    submit_fake_images(env, 3, priority=7, batch_size=2)  # two batches
    monkeypatch.setenv("DEBLUR_QUEUE", other)
    submit_fake_images(env, 1, priority=2, batch_size=8)  # one
    monkeypatch.setenv("DEBLUR_QUEUE", reader)  # neither job's queue

    found = samples(render_metrics(load_settings()).text)

    def waiting(queue: str) -> dict[int, float]:
        return {p: n for p in range(10) if (n := value(found, "deblur_broker_waiting_batches", queue=queue,
                                                       priority=str(p)))}

    assert waiting(ghost) == {7: 2} and waiting(other) == {2: 1}
    assert waiting(reader) == {}  # the configured queue has its series, empty

    listing = CliRunner().invoke(main, ["status"])
    assert listing.exit_code == 0, listing.output
    assert (f"broker: 3 batches waiting (priority 7: 2, priority 2: 1; by queue: {ghost!r} 2, {other!r} 1), "
            "0 taken by workers") in listing.output


def test_a_source_that_does_not_answer_reads_up_0_and_the_scrape_still_answers(env, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from jobs.settings import load_settings
    from producer.cli import main
    from producer.metrics import render_metrics

    monkeypatch.setenv("DEBLUR_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    exposition = render_metrics(load_settings())
    found = samples(exposition.text)
    assert value(found, "deblur_up", source="broker") == 0 and value(found, "deblur_up", source="database") == 1
    assert not any(name.startswith("deblur_broker_") for name, _ in found)
    assert ("deblur_jobs", (("status", "queued"),)) in found  # the database's series are still there
    assert "ConnectionError" in exposition.down["broker"]
    import asyncio

    import httpx

    from producer.api import create_app

    async def queue_summary() -> dict:  # type: ignore[type-arg]
        transport = httpx.ASGITransport(app=create_app(load_settings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            return (await api.get("/v1/queue")).json()  # type: ignore[no-any-return]

    summary = asyncio.run(queue_summary())  # the API's JSON summary answers too, saying what is down
    assert summary["waiting_batches"] is None and "broker" in summary["down"] and summary["jobs"] is not None

    target = tmp_path / "textfile" / "deblur.prom"
    target.parent.mkdir()
    result = CliRunner().invoke(main, ["metrics", "-o", str(target)])
    assert result.exit_code == 1
    assert "the broker did not answer" in result.output and "deblur config" in result.output
    assert value(samples(target.read_text()), "deblur_up", source="broker") == 0
    assert [p.name for p in target.parent.iterdir()] == ["deblur.prom"]  # no temporary file left beside it

    monkeypatch.setenv("DEBLUR_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    found = samples(render_metrics(load_settings()).text)
    assert value(found, "deblur_up", source="database") == 0
    assert not any(name in {"deblur_jobs", "deblur_backlog_images"} for name, _ in found)


def test_cli_prints_the_exposition_and_exits_0_when_everything_answers(env) -> None:  # type: ignore[no-untyped-def]
    from producer.cli import main

    result = CliRunner().invoke(main, ["metrics"])
    assert result.exit_code == 0, result.output
    found = samples(result.output)
    assert value(found, "deblur_up", source="database") == 1 and value(found, "deblur_up", source="broker") == 1


def series_in(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (parsed: a syntax error raises), histogram suffixes removed.

    Each API replica exports the same deblur_* figures, so a deblur_* series may only be read through max() or
    min() across replicas: one selected bare or summed fails here (two replicas would double it). The broker's
    waiting batches have a series per queue, so they are taken by queue (a max by priority alone would keep the
    largest queue's figure and drop the others)."""
    import promql_parser

    found: set[str] = set()

    def visit(node, parent=None) -> None:  # type: ignore[no-untyped-def]
        if type(node).__name__ == "VectorSelector":
            found.add(re.sub(r"_(bucket|sum|count)$", "", node.name))
            if node.name.startswith("deblur_"):
                kind = type(parent).__name__
                taken = (str(parent.op) if kind == "AggregateExpr" else parent.func.name if kind == "Call"
                         else "nothing")
                assert taken in {"max", "min", "absent"}, f"{node.name} read through {taken} in {expression}"
            if node.name == "deblur_broker_waiting_batches":
                modifier = getattr(parent, "modifier", None)
                assert modifier is not None and str(modifier.type).endswith("By") and "queue" in modifier.labels, \
                    f"{node.name} not taken per queue in {expression}"
        for attr in ("lhs", "rhs", "expr", "vector_selector", "args", "param"):
            child = getattr(node, attr, None)
            for item in child if isinstance(child, list) else [child] if child is not None else []:
                visit(item, node)

    visit(promql_parser.parse(expression))
    return found


def test_shipped_alerts_and_dashboard_are_promql_over_series_that_exist(env) -> None:  # type: ignore[no-untyped-def]
    import json

    import flower.events

    from jobs.settings import load_settings
    from producer.metrics import render_metrics

    exposed = {family.name for family in text_string_to_metric_families(render_metrics(load_settings()).text)}
    flower_names = set(re.findall(r"['\"](flower_[a-z_]+)['\"]", Path(flower.events.__file__).read_text()))
    assert {"flower_worker_online", "flower_task_runtime_seconds"} <= flower_names
    known = exposed | flower_names
    with pytest.raises(ValueError):
        series_in('min(deblur_up{source="database"}')  # the parser does refuse what Prometheus would
    with pytest.raises(AssertionError, match="through sum"):
        series_in("sum(deblur_stalled_images) > 0")  # two API replicas would double it
    with pytest.raises(AssertionError, match="per queue"):
        series_in("sum(max by (priority) (deblur_broker_waiting_batches))")  # the largest queue's lists only

    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 6
    for rule in alerts:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used = series_in(rule["expr"])
        assert used and used <= known, f"{rule['alert']} uses {sorted(used - known)}"

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "deblur-dashboard.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(targets) >= 10
    shown: set[str] = set()
    for target in targets:
        used = series_in(target["expr"])
        assert used <= known, f"{target['expr']} uses {sorted(used - known)}"
        shown |= used
    assert exposed - shown <= {"deblur_scrape_duration_seconds"}, f"not on the dashboard: {exposed - shown}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    api_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "deblur-api")
    assert api_job["metrics_path"] == "/metrics" and api_job["authorization"]["type"] == "Bearer"
