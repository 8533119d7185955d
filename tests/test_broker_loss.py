"""A broker that lost its messages (restarted without persistence, flushed, restored from an older snapshot) is
found by the workers' sweep, and the images those messages carried are sent again.

Real Redis (the session's, and for the end-to-end case a server of the test's own that it restarts), SQLite and
PostgreSQL, and real worker processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import redis
from sqlalchemy import select, update

from tests.conftest import free_port, stop, wait_for_port
from tests.e2e_helpers import WorkerProcess, queued_tasks, service_env, use_services
from tests.test_batch_claims import make_job
from tests.test_end_to_end import run_cli, wait_done

pytestmark = [pytest.mark.integration]


def queries_now(session):  # type: ignore[no-untyped-def]
    from db.queries import database_now

    return database_now(session)


def _check_fails_in(monkeypatch, watch, step: str) -> None:  # type: ignore[no-untyped-def]
    """Run ``watch.check()`` with the database failing in ``db.broker_marks.<step>``; it raises."""
    import db.broker_marks

    def fail(*_, **__):  # type: ignore[no-untyped-def]
        raise ConnectionError("the database went away")

    with monkeypatch.context() as patched:
        patched.setattr(db.broker_marks, step, fail)
        with pytest.raises(ConnectionError):
            watch.check()


def _watch(**changes):  # type: ignore[no-untyped-def]
    from jobs.settings import load_settings
    from worker.broker_watch import BrokerWatch

    return BrokerWatch(replace(load_settings(), **changes))


def _mark(url: str, queue: str) -> tuple[int, object]:
    from db.engine import session_scope
    from db.schema import BrokerMark

    with session_scope(url) as s:
        row = s.execute(select(BrokerMark.counter, BrokerMark.lost_before).where(BrokerMark.queue == queue)).one()
        return int(row[0]), row[1]


def _sent(env: dict[str, str]) -> list[tuple[str, list[str], object]]:
    """(job, inputs, slot) of every batch message waiting in the test's queue."""
    return [(m["job_id"], sorted(i["input"] for i in m["images"]), m.get("slot"))
            for m in (args[0] for _, args in queued_tasks(env))]


def _clear_queue(env: dict[str, str]) -> None:
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    for key in client.keys(env["DEBLUR_QUEUE"] + "*"):
        client.delete(key)


def _count(client, key: str) -> int:  # type: ignore[no-untyped-def]
    return int(client.get(key).split(b":")[1])


def test_the_first_check_starts_the_count_and_later_ones_find_no_loss(env) -> None:  # type: ignore[no-untyped-def]
    from jobs.settings import load_settings

    url, queue = load_settings().resolved_database_url(), env["DEBLUR_QUEUE"]
    watch = _watch()
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    assert watch.check() is False
    assert _mark(url, queue) == (1, None)
    assert _count(client, watch.key) == 1
    for expected in (2, 3):
        assert watch.check() is False
        assert _mark(url, queue)[0] == expected
        assert _count(client, watch.key) == expected
    # another worker of the queue, started later, carries on the same count
    assert _watch().check() is False
    assert _count(client, watch.key) == 4


def test_a_broker_that_lost_its_data_is_found_and_its_waiting_images_are_sent_again(env) -> None:  # type: ignore[no-untyped-def]
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, Job
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    assert watch.check() is False
    plain, plain_uris, _ = make_job(url, [["p0.png", "p1.png"], ["p2.png", "p3.png"]])
    windowed, win_uris, _ = make_job(url, [["w0.png", "w1.png"], ["w2.png"], ["w3.png"]], window=1)
    with session_scope(url) as s:
        assert queries.claim_window_batches(s, windowed, 1) == [0]  # batch 0 sent; 1 and 2 wait their turn
        # p1 done, p2 running under a live run's lease: neither waits for a message
        queries.record_outcomes(s, plain, [queries.ImageOutcome(input_uri=plain_uris["p1.png"], status="done")])
        queries.claim_images(s, plain, [plain_uris["p2.png"]], "alive@node", "a" * 32, lease_s=600)
    broken_off, broken_uris, _ = make_job(url, [["b0.png"]])  # failed as its producer stopped mid-listing
    cancelled, _, _ = make_job(url, [["c0.png"]])
    other_queue, _, _ = make_job(url, [["o0.png"]])
    legacy, _, _ = make_job(url, [["l0.png"]])
    with session_scope(url) as s:
        queries.cancel_job(s, cancelled)
        queries.set_job_state(s, broken_off, status="failed", error="submission interrupted")
        job = s.get(Job, other_queue)
        job.spec = {**job.spec, "queue": "some-other-queue"}
        job = s.get(Job, legacy)
        job.spec = {k: v for k, v in job.spec.items() if k != "queue"}
        # every image so far was sent a while ago
        s.execute(update(Image).where(Image.job_id.in_([plain, windowed, broken_off, cancelled, other_queue, legacy]),
                                      Image.status == "pending")
                  .values(sent_at=queries.database_now(s) - timedelta(minutes=1)))

    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)  # the broker restarted with nothing
    assert watch.check() is True
    watch.mend_grace_s = 0  # the loss may end as soon as nothing of it waits (test_a_loss_stays_open_...)
    counter, lost_before = _mark(url, env["DEBLUR_QUEUE"])
    assert lost_before is not None
    make_job(url, [["n0.png"]])  # submitted after the loss: its message is in the broker

    assert watch.send_lost() == 5
    assert sorted(_sent(env)) == sorted([
        (plain, sorted([plain_uris["p0.png"], plain_uris["p3.png"]]), None),
        (broken_off, [broken_uris["b0.png"]], None),  # "the images it enqueued are restored", as its error says
        (windowed, sorted([win_uris["w0.png"], win_uris["w1.png"]]), None),  # plain: the batch keeps its slot
    ])
    with session_scope(url) as s:
        statuses = dict(s.execute(select(Image.input_uri, Image.status).where(
            Image.job_id.in_([plain, windowed]))).all())
        assert statuses[plain_uris["p2.png"]] == "running" and statuses[plain_uris["p1.png"]] == "done"
        assert statuses[win_uris["w2.png"]] == "pending"
        assert s.get(Job, windowed).batches_in_flight == 1
    # sent once: the next pass finds them on their way
    _clear_queue(env)
    assert watch.send_lost() == 0
    assert _sent(env) == []
    # the next check finds nothing left of the loss (the legacy job is left to 'retry --stalled')
    assert watch.check() is False
    assert _mark(url, env["DEBLUR_QUEUE"]) == (counter + 1, None)


def test_a_broker_restored_from_an_older_snapshot_is_found_and_one_ahead_is_not(env) -> None:  # type: ignore[no-untyped-def]
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    for _ in range(3):
        assert watch.check() is False
    token = client.get(watch.key).split(b":")[0]
    client.set(watch.key, token + b":1")  # the snapshot was taken after the first check
    assert watch.check() is True
    assert _mark(url, env["DEBLUR_QUEUE"])[1] is not None
    client.set(watch.key, token + b":100")  # ahead of the database's (a check's write that outlived its rollback)
    assert watch.check() is False
    client.set(watch.key, b"garbage")
    assert watch.check() is True


def test_another_databases_count_on_the_same_queue_is_named_not_taken_for_a_loss(env, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two deployments with databases of their own pointed at one broker and queue name: each finds the other's
    count. Taken for a loss, each would send all its waiting images again at every check, without end."""
    watch = _watch()
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    assert watch.check() is False
    client.set(watch.key, b"0123456789abcdef0123456789abcdef:7")
    with caplog.at_level("ERROR", logger="worker.broker_watch"):
        assert watch.check() is False
        client.set(watch.key, b"0123456789abcdef0123456789abcdef:8")
        assert watch.check() is False
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "another database's count for queue" in caplog.records[0].getMessage()


def test_images_a_refused_send_leaves_are_sent_by_the_next_pass(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import producer.dispatch
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    assert watch.check() is False
    job, uris, _ = make_job(url, [["a.png", "b.png"]])
    from db import queries
    from db.engine import session_scope
    from db.schema import Image

    with session_scope(url) as s:
        s.execute(update(Image).where(Image.job_id == job)
                  .values(sent_at=queries.database_now(s) - timedelta(minutes=1)))
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    assert watch.check() is True

    def refuse(*_, **__):  # type: ignore[no-untyped-def]
        raise ConnectionError("the broker refused the message")

    with monkeypatch.context() as patched:  # (undo() would also drop the env fixture's variables)
        patched.setattr(producer.dispatch, "send_plain_batches", refuse)
        assert watch.send_lost() == 0
    assert watch.send_lost() == 2
    assert _sent(env) == [(job, sorted(uris.values()), None)]


def test_workers_of_one_queue_checking_at_once_find_no_loss(env) -> None:  # type: ignore[no-untyped-def]
    """Workers write their counts in any order: the broker's key keeps the largest, and a check compares it with
    the largest count confirmed before it began, which was written before that."""
    watches = [_watch() for _ in range(4)]
    watches[0].check()
    found: list[bool] = []

    def run(watch) -> None:  # type: ignore[no-untyped-def]
        for _ in range(15):
            found.append(watch.check())

    threads = [threading.Thread(target=run, args=(w,)) for w in watches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [False] * 60


def _pause_before_writing(watch, during):  # type: ignore[no-untyped-def]
    """Make ``watch``'s next broker write run ``during()`` first: as if it paused between taking its count and
    writing it."""
    real = watch._write
    calls = []

    def write(*args):  # type: ignore[no-untyped-def]
        if not calls:
            calls.append(args)
            during()
        return real(*args)

    watch._write = write


def test_a_count_written_late_never_takes_the_key_back(env) -> None:  # type: ignore[no-untyped-def]
    """Worker A takes count 2 and pauses; B takes 3, writes and confirms it; A then writes 2. The key keeps 3, so
    B's next check finds no loss."""
    a, b = _watch(), _watch()
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    assert a.check() is False
    _pause_before_writing(a, lambda: b.check())
    assert a.check() is False
    assert _count(client, a.key) == 3
    assert b.check() is False and a.check() is False


def test_a_real_loss_is_not_followed_by_a_phantom_one(env) -> None:  # type: ignore[no-untyped-def]
    """Worker A takes its count, pauses; B confirms a larger one; the broker restarts; A finds the loss and writes
    the key again. Written with A's early count, the key fell below B's confirmed one, and the next check found a
    second loss that never happened, sending the queue's waiting images twice."""
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    a, b = _watch(), _watch()
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    for _ in range(2):
        assert a.check() is False

    def b_then_restart() -> None:
        assert b.check() is False
        client.delete(a.key)

    _pause_before_writing(a, b_then_restart)
    assert a.check() is True
    counter, _ = _mark(url, env["DEBLUR_QUEUE"])
    assert _count(client, a.key) == counter
    assert b.check() is False and a.check() is False


def test_a_loss_stays_open_for_images_whose_stamp_commits_late(env) -> None:  # type: ignore[no-untyped-def]
    """The sweep for abandoned images stamps and sends them in one transaction, and commits after the send: a
    worker that found the loss and sent everything it saw may end it before that commit lands, and the image in
    it would wait for good. The loss stays open for a grace period, and the next pass sends it."""
    from db.engine import session_scope
    from db.schema import Image
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    assert watch.check() is False
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    assert watch.check() is True
    moment = _mark(url, env["DEBLUR_QUEUE"])[1]
    assert watch.send_lost() == 0  # nothing waits yet: the loss stays open all the same
    assert _mark(url, env["DEBLUR_QUEUE"])[1] is not None
    job, uris, _ = make_job(url, [["late.png"]])  # the late commit: stamped before the loss, sent to the broker
    with session_scope(url) as s:                 # that then lost it
        s.execute(update(Image).where(Image.job_id == job).values(sent_at=moment - timedelta(seconds=1)))
    assert watch.send_lost() == 1
    assert _sent(env) == [(job, sorted(uris.values()), None)]
    watch.mend_grace_s = 0
    assert watch.send_lost() == 0 and _mark(url, env["DEBLUR_QUEUE"])[1] is None


def test_one_worker_at_a_time_sends_a_losss_images(env) -> None:  # type: ignore[no-untyped-def]
    """The mending lease has a holder: one whose lease ran out and was taken over can neither extend nor end its
    successor's."""
    from db import broker_marks
    from db.engine import session_scope
    from db.schema import BrokerMark
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    first, second = _watch(), _watch()
    assert first.check() is False
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(first.key)
    assert first.check() is True
    with session_scope(url) as s:
        assert broker_marks.take_mending(s, first.broker, first.queue, first.holder, 60) is not None
        assert broker_marks.take_mending(s, second.broker, second.queue, second.holder, 60) is None
        s.execute(update(BrokerMark).where(BrokerMark.queue == first.queue)  # the first's lease runs out
                  .values(mending_until=queries_now(s) - timedelta(seconds=1)))
        assert broker_marks.take_mending(s, second.broker, second.queue, second.holder, 60) is not None
        assert broker_marks.renew_mending(s, first.broker, first.queue, first.holder, 60) is False
        broker_marks.end_mending(s, first.broker, first.queue, first.holder, 1, mended=True)
        holder, lost_before = s.execute(select(BrokerMark.mending_by, BrokerMark.lost_before)
                                        .where(BrokerMark.queue == first.queue)).one()
    assert holder == second.holder and lost_before is not None


def test_one_broker_under_two_addresses_keeps_two_counts_and_one_sender(env, caplog) -> None:  # type: ignore[no-untyped-def]
    """Workers that reach one Redis as localhost and as 127.0.0.1 keep a row each. Sharing one key, the two counts
    fought: each took the other's for a second deployment's and stopped comparing, or, after a real loss, one
    wrote its smaller count back and the other found a loss that never happened. Each address now has a key of
    its own; both find a real loss, and one worker at a time sends its images."""
    from db import broker_marks
    from db.engine import session_scope
    from db.schema import Image
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    port = env["DEBLUR_BROKER_URL"].split(":")[2].split("/")[0]
    here, there = _watch(), _watch(broker_url=f"redis://localhost:{port}/0")
    assert here.broker != there.broker and here.key != there.key
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    with caplog.at_level("ERROR", logger="worker.broker_watch"):
        for _ in range(3):
            assert here.check() is False and there.check() is False
    assert caplog.records == []
    job, uris, _ = make_job(url, [["a.png", "b.png"]])
    with session_scope(url) as s:
        s.execute(update(Image).where(Image.job_id == job)
                  .values(sent_at=queries_now(s) - timedelta(minutes=1)))
    client.delete(here.key, there.key)  # the broker restarted
    assert here.check() is True and there.check() is True
    with session_scope(url) as s:  # while one address's worker sends, the other's waits
        assert broker_marks.take_mending(s, here.broker, here.queue, here.holder, 60) is not None
        assert broker_marks.take_mending(s, there.broker, there.queue, there.holder, 60) is None
        broker_marks.end_mending(s, here.broker, here.queue, here.holder, 0, mended=False)
    here.mend_grace_s = there.mend_grace_s = 0
    assert here.send_lost() + there.send_lost() == 2
    assert _sent(env) == [(job, sorted(uris.values()), None)]
    for _ in range(3):  # and no loss that never happened
        assert here.check() is False and there.check() is False


def test_a_loss_after_a_first_write_never_confirmed_is_found(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The first check wrote the key and its database step failed, so nothing was confirmed. Such a count was
    seeded again at every round, and a loss before a round that confirmed went unseen."""
    watch = _watch()
    _check_fails_in(monkeypatch, watch, "confirm")
    assert redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).get(watch.key) is not None
    _age_count(watch, timedelta(minutes=1))  # past the first write's grace
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    assert watch.check() is True


def _age_count(watch, by: timedelta) -> None:  # type: ignore[no-untyped-def]
    from db.engine import session_scope
    from db.schema import BrokerMark
    from jobs.settings import load_settings

    with session_scope(load_settings().resolved_database_url()) as s:
        s.execute(update(BrokerMark).where(BrokerMark.broker == watch.broker, BrokerMark.queue == watch.queue)
                  .values(created_at=queries_now(s) - by))


def test_workers_starting_together_find_no_loss(env) -> None:  # type: ignore[no-untyped-def]
    """Worker X starts the queue's count; before X writes it to the broker, worker Y's first round finds no key.
    Y took that for a loss, and sent the waiting backlog (on a new installation, the jobs submitted before the
    workers came up) a second time."""
    x, y = _watch(), _watch()
    found: list[bool] = []
    _pause_before_writing(x, lambda: found.append(y.check()))
    assert x.check() is False
    assert found == [False]
    assert x.check() is False and y.check() is False


def test_two_addresses_asking_at_once_get_one_mending_lease(env) -> None:  # type: ignore[no-untyped-def]
    """The queue's rows are locked before the lease is given: a second address's worker asking while the first's
    grant is not yet committed waits, then sees it, instead of both getting one (PostgreSQL)."""
    from db import broker_marks
    from db.engine import session_scope
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    port = env["DEBLUR_BROKER_URL"].split(":")[2].split("/")[0]
    here, there = _watch(), _watch(broker_url=f"redis://localhost:{port}/0")
    for watch in (here, there):
        assert watch.check() is False
    client = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    client.delete(here.key, there.key)
    assert here.check() is True and there.check() is True
    second: list[object] = []
    with session_scope(url) as s:
        assert broker_marks.take_mending(s, here.broker, here.queue, here.holder, 60) is not None

        def ask() -> None:
            with session_scope(url) as other:
                second.append(broker_marks.take_mending(other, there.broker, there.queue, there.holder, 60))

        thread = threading.Thread(target=ask)
        thread.start()
        thread.join(timeout=1)  # it waits for this transaction's lock
        assert thread.is_alive()
    thread.join()
    assert second == [None]


def test_a_clock_stepped_back_does_not_send_the_same_images_for_ever(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Resent images are stamped with the time read before the send; one before the loss's moment (a clock stepped
    back) left them waiting for a message sent before the loss, and the next step read them again, without end."""
    import db.queries
    import worker.broker_watch
    from db.engine import session_scope
    from db.schema import Image, utcnow
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    assert watch.check() is False
    job, uris, _ = make_job(url, [["a.png", "b.png", "c.png"]])
    with session_scope(url) as s:
        s.execute(update(Image).where(Image.job_id == job).values(sent_at=queries_now(s) - timedelta(minutes=5)))
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    assert watch.check() is True
    monkeypatch.setattr(worker.broker_watch, "SEND_AT_ONCE", 2)
    if url.startswith("sqlite"):  # SQLite's clock is this machine's; PostgreSQL's cannot be stepped from here
        monkeypatch.setattr(db.queries, "utcnow", lambda: utcnow() - timedelta(minutes=1))
    else:
        real = db.queries.database_now
        monkeypatch.setattr(db.queries, "database_now", lambda s: real(s) - timedelta(minutes=1))
    assert watch.send_lost() == 3
    assert sorted(i for _, inputs, _ in _sent(env) for i in inputs) == sorted(uris.values())
    assert watch.send_lost() == 0


def test_the_broker_identity_leaves_out_credentials_and_is_spelt_one_way() -> None:
    from worker.broker_watch import broker_identity, watches

    assert broker_identity("redis://user:secret@redis.internal:6380/2") == "redis://redis.internal:6380/2"
    assert broker_identity("rediss://:pw@host/0") == "rediss://host:6379/0"
    assert {broker_identity(u) for u in ("redis://redis:6379/", "redis://redis/0", "redis://redis:6379/0",
                                         "redis://redis")} == {"redis://redis:6379/0"}
    assert broker_identity("unix:///run/redis.sock?virtual_host=3") == "unix:///run/redis.sock?db=3"
    assert broker_identity("unix:///run/redis.sock") == "unix:///run/redis.sock?db=0"
    assert watches("redis://h/0") and not watches("memory://")


def test_a_loss_whose_recording_fails_is_found_again(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The loss is recorded before the broker's key is written again: a worker whose database fails (or that
    dies) in between leaves the key as the loss left it, and the next check finds it."""
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    for _ in range(2):
        assert watch.check() is False
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    _check_fails_in(monkeypatch, watch, "note_loss")
    assert redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).get(watch.key) is None
    assert watch.check() is True
    assert _mark(url, env["DEBLUR_QUEUE"])[1] is not None


def test_send_times_come_from_the_database_clock_and_images_listed_after_the_loss_are_left(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """A producer or worker whose clock runs ahead once stamped images with times after the loss's moment (so they
    were never sent again), and a job still being listed had every image listed after the loss sent twice at
    every sweep. Send times now come from the database's clock."""
    import db.queries
    from db import queries
    from db.engine import session_scope
    from db.schema import Image, Job, utcnow
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    watch = _watch()
    assert watch.check() is False
    with monkeypatch.context() as patched:
        if url.startswith("postgresql"):  # SQLite is a file on this machine: its clock is this machine's
            patched.setattr(db.queries, "utcnow", lambda: utcnow() + timedelta(minutes=2))  # this one runs ahead
        listing, uris, _ = make_job(url, [["a.png", "b.png"]])
        with session_scope(url) as s:
            queries.set_job_state(s, listing, status="submitting")
            # a batch of it handed over by a worker whose clock runs ahead: pending again, its rest sent anew
            queries.claim_images(s, listing, [uris["b.png"]], "ahead@node", "c" * 32)
            queries.release_claims(s, listing, [uris["b.png"]], "c" * 32)
    redis.Redis.from_url(env["DEBLUR_BROKER_URL"]).delete(watch.key)
    assert watch.check() is True
    with session_scope(url) as s:  # the producer lists on after the loss
        queries.insert_images(s, listing, [{"input_uri": "s3://later/c.png", "output_uri": "s3://later/out/c.png"}], 1)
        assert s.get(Job, listing).status == "submitting"
        assert s.scalar(select(Image.status).where(Image.input_uri == uris["b.png"])) == "pending"
    assert watch.send_lost() == 2
    assert _sent(env) == [(listing, sorted(uris.values()), None)]
    assert watch.send_lost() == 0


def test_no_database_transaction_waits_on_the_broker(tmp_path, redis_url, s3_endpoint, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A broker that accepts connections and never answers held SQLite's write lock for the whole socket time-out
    of each call: every other writer (records, claims, submissions) waited. The database is free meanwhile."""
    import socket
    import sqlite3

    from db.engine import ensure_schema

    database = tmp_path / "deblur.db"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    env = use_services(monkeypatch, f"redis://127.0.0.1:{silent.getsockname()[1]}/0", s3_endpoint,
                       f"sqlite:///{database}", tmp_path / "home")
    ensure_schema(f"sqlite:///{database}")
    watch = _watch()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            watch.check()
        except BaseException as exc:  # noqa: BLE001 - the broker's time-out is expected
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    connection, _ = silent.accept()  # the check is now waiting on the broker
    try:
        writer = sqlite3.connect(database, timeout=0)
        writer.execute("BEGIN IMMEDIATE")  # raises 'database is locked' if the check holds the write lock
        writer.rollback()
        writer.close()
    finally:
        connection.close()  # the check fails now instead of after the socket time-out
        silent.close()
        thread.join()
    assert errors and env


class _OwnRedis:
    """A Redis server of the test's own, without persistence, that the test can restart on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed")
        self.port, self.workdir = free_port(), workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 15, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def _three_images_and_a_broker_of_its_own(s3_endpoint: str, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                          bucket: str):
    """A Redis of the test's own, this process's settings pointed at it (a 4-s lease, so sweeps come every 4 s)
    and a bucket holding ``in/0.png`` .. ``in/2.png``; returns the broker, the settings' variables and S3."""
    from tests.test_batch_claims import _png

    broker = _OwnRedis(tmp_path / "redis")
    env = use_services(monkeypatch, broker.url, s3_endpoint, f"sqlite:///{tmp_path / 'deblur.db'}",
                       tmp_path / "home", DEBLUR_CLAIM_LEASE="4")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for number in range(3):
        s3.put_object(Bucket=bucket, Key=f"in/{number}.png", Body=_png(number))
    return broker, env, s3


def test_a_job_whose_messages_a_restarted_broker_lost_is_finished_by_the_next_worker(  # type: ignore[no-untyped-def]
        s3_endpoint, tmp_path, monkeypatch) -> None:
    """The job's messages were in a Redis that restarted without persistence while no worker ran. Before, its
    images stayed pending for good (until 'deblur retry --stalled'); the next worker's sweep finds the broker's
    count gone and sends them again."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    broker, env, s3 = _three_images_and_a_broker_of_its_own(s3_endpoint, tmp_path, monkeypatch, "lost-messages")
    worker = None
    try:
        app = app_for(load_settings())
        first = WorkerProcess(service_env(env), tmp_path / "first.log")
        first.wait_ready(app)
        # the first worker's sweep has counted once (its first round comes within one lease, 4 s here)
        client = redis.Redis.from_url(broker.url)
        _wait(lambda: client.keys("deblur:broker-mark:" + env["DEBLUR_QUEUE"] + ":*"), "the first count")
        first.stop()
        job_id = run_cli("submit", "s3://lost-messages/in/", "--output", "s3://lost-messages/out/",
                         "--model", "wiener", "--batch-size", "1", "-q").strip()
        assert len(queued_tasks(env)) == 3
        broker.stop()
        broker.start()  # no persistence: the three messages are gone
        assert queued_tasks(env) == []
        worker = WorkerProcess(service_env(env), tmp_path / "second.log")
        worker.wait_ready(app)
        info = wait_done(job_id, timeout=120)
    finally:
        if worker is not None and worker.proc.poll() is None:
            worker.stop()
        broker.stop()
    assert info["counts"]["done"] == 3, info
    assert "has lost queue" in worker.log.read_text(errors="replace")
    rows = json.loads(run_cli("results", job_id, "--format", "json"))
    assert sorted((row["status"], row["attempts"]) for row in rows) == [("done", 1)] * 3
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="lost-messages", Prefix="out/")["Contents"]) == [
        "out/0.png", "out/1.png", "out/2.png"]


def _wait(condition, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.2)


def test_a_broker_restarted_under_a_running_worker_loses_no_image(  # type: ignore[no-untyped-def]
        s3_endpoint, tmp_path, monkeypatch) -> None:
    """Redis restarts without persistence while a worker restores the first of three one-image batches: the two
    waiting batches are gone. The worker reconnects, finishes its image, and its sweep sends the other two again."""
    from jobs.celery_app import app_for
    from jobs.settings import load_settings

    broker, env, s3 = _three_images_and_a_broker_of_its_own(s3_endpoint, tmp_path, monkeypatch,
                                                           "restart-under-worker")
    gate = tmp_path / "gate"
    worker = WorkerProcess(dict(service_env(env), TEST_RESTORE_GATE=str(gate)), tmp_path / "worker.log",
                           app="tests.gated_worker_app")
    try:
        worker.wait_ready(app_for(load_settings()))
        client = redis.Redis.from_url(broker.url)
        _wait(lambda: client.keys("deblur:broker-mark:" + env["DEBLUR_QUEUE"] + ":*"), "the first count")
        job_id = run_cli("submit", "s3://restart-under-worker/in/", "--output", "s3://restart-under-worker/out/",
                         "--model", "wiener", "--batch-size", "1", "-q").strip()
        _wait(lambda: any(row["attempts"] for row in json.loads(run_cli("results", job_id, "--format", "json"))),
              "the first image's start")
        broker.stop()
        broker.start()  # the two batches waiting in Redis are gone
        assert queued_tasks(env) == []
        gate.touch()
        info = wait_done(job_id, timeout=120)
    finally:
        gate.touch()
        if worker.proc.poll() is None:
            worker.stop()
        broker.stop()
    assert info["counts"]["done"] == 3, info
    assert "has lost queue" in worker.log.read_text(errors="replace")
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="restart-under-worker", Prefix="out/")["Contents"]) == [
        "out/0.png", "out/1.png", "out/2.png"]
