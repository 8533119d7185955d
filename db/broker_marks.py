"""The counts a queue's workers write to the broker and to the database, read and written in one place.

:mod:`worker.broker_watch` compares them to find a broker that lost its messages; these are its queries. Each is
its own short statement: no transaction here waits on the broker.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.queries import as_utc, database_now
from db.schema import BrokerMark


def _row(broker: str, queue: str) -> tuple:  # type: ignore[type-arg]
    return BrokerMark.broker == broker, BrokerMark.queue == queue


def advance(session: Session, broker: str, queue: str) -> tuple[int, int, str, float] | None:
    """Take the queue's next count; returns it with the largest count confirmed written to the broker, the
    database's token and the count's age in seconds, or None when the queue has no count yet (:func:`start`)."""
    now = database_now(session)
    row = session.execute(
        update(BrokerMark).where(*_row(broker, queue))
        .values(counter=BrokerMark.counter + 1, checked_at=now)
        .returning(BrokerMark.counter, BrokerMark.confirmed, BrokerMark.token, BrokerMark.created_at)
    ).first()
    if row is None:
        return None
    return int(row[0]), int(row[1]), str(row[2]), (now - as_utc(row[3])).total_seconds()


def start(session: Session, broker: str, queue: str) -> str | None:
    """Give the queue its first count, 1 (none confirmed yet), and a token of its own; returns the token, or None
    when another worker gave the queue a count first."""
    token = uuid.uuid4().hex
    try:
        with session.begin_nested():
            now = database_now(session)
            session.add(BrokerMark(broker=broker, queue=queue, counter=1, confirmed=0, token=token, losses=0,
                                   created_at=now, checked_at=now))
    except IntegrityError:
        return None
    return token


def confirm(session: Session, broker: str, queue: str, count: int) -> None:
    """The broker's key holds ``count`` or more: a broker found to hold less later lost it since."""
    session.execute(update(BrokerMark).where(*_row(broker, queue)).values(
        confirmed=case((BrokerMark.confirmed < count, count), else_=BrokerMark.confirmed)))


def note_loss(session: Session, broker: str, queue: str) -> tuple[datetime, int, int]:
    """Record that the broker was found to have lost the queue's messages now; returns that moment (by the
    database's clock), the loss's number, and a fresh count to write to the broker again (larger than any count
    confirmed so far: one taken before the loss may not be). A loss found while an earlier one is still being
    mended moves the moment on: the images sent again since were lost once more."""
    now = database_now(session)
    number, counter = session.execute(
        update(BrokerMark).where(*_row(broker, queue))
        .values(lost_before=now, losses=BrokerMark.losses + 1, counter=BrokerMark.counter + 1)
        .returning(BrokerMark.losses, BrokerMark.counter)
    ).one()
    return now, int(number), int(counter)


def loss_rewritten(session: Session, broker: str, queue: str, losses: int) -> None:
    """The broker's key was written again after loss number ``losses``: a broker that restarted once more between
    the loss's record and that write lost what was sent meanwhile, so the loss's moment moves on to now, as a
    loss of its own (a worker mending the first does not end it)."""
    session.execute(update(BrokerMark).where(*_row(broker, queue), BrokerMark.losses == losses)
                    .values(lost_before=database_now(session), losses=BrokerMark.losses + 1))


def take_mending(session: Session, broker: str, queue: str, holder: str,
                 lease_s: float) -> tuple[datetime, int] | None:
    """Make ``holder`` the one worker of the queue sending again what the last loss took, for ``lease_s`` seconds;
    returns that loss's moment and number, or None when there is none or another holder's lease is live."""
    now = database_now(session)
    # one sender per queue, whatever address found the loss: the images are the queue's (a broker reached under
    # two addresses has a row for each, and both find the loss). The queue's rows are locked first, so two
    # addresses' workers asking at once take turns (PostgreSQL: neither would see the other's lease otherwise)
    session.execute(select(BrokerMark.id).where(BrokerMark.queue == queue).order_by(BrokerMark.id).with_for_update())
    other = aliased(BrokerMark)
    sending_elsewhere = select(other.id).where(other.queue == queue, other.broker != broker,
                                               other.mending_until >= now).exists()
    row = session.execute(
        update(BrokerMark)
        .where(*_row(broker, queue), BrokerMark.lost_before.is_not(None),
               (BrokerMark.mending_until.is_(None)) | (BrokerMark.mending_until < now), ~sending_elsewhere)
        .values(mending_until=now + timedelta(seconds=lease_s), mending_by=holder)
        .returning(BrokerMark.lost_before, BrokerMark.losses)
    ).first()
    return (as_utc(row[0]), int(row[1])) if row is not None else None


def renew_mending(session: Session, broker: str, queue: str, holder: str, lease_s: float) -> bool:
    """Extend ``holder``'s lease; False when it no longer holds it (it ran out and another worker took it)."""
    result = session.execute(
        update(BrokerMark).where(*_row(broker, queue), BrokerMark.mending_by == holder)
        .values(mending_until=database_now(session) + timedelta(seconds=lease_s)))
    return bool(result.rowcount)


def end_mending(session: Session, broker: str, queue: str, holder: str, losses: int, mended: bool) -> None:
    """Give ``holder``'s lease back (if it still holds it); with ``mended``, every image loss number ``losses``
    took is on its way again, and the loss is over unless another was found meanwhile."""
    if mended:
        session.execute(update(BrokerMark).where(*_row(broker, queue), BrokerMark.losses == losses,
                                                 BrokerMark.mending_by == holder)
                        .values(lost_before=None))
    session.execute(update(BrokerMark).where(*_row(broker, queue), BrokerMark.mending_by == holder)
                    .values(mending_until=None, mending_by=None))


def unmended(session: Session) -> list[tuple[str, str, datetime]]:
    """Every (broker, queue, moment) whose loss of messages the workers are still sending again, for ``deblur
    doctor``."""
    return [(broker, queue, as_utc(moment)) for broker, queue, moment in session.execute(
        select(BrokerMark.broker, BrokerMark.queue, BrokerMark.lost_before)
        .where(BrokerMark.lost_before.is_not(None)).order_by(BrokerMark.queue))]
