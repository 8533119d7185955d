"""The counts a queue's workers write to the broker and to the database, read and written in one place.

:mod:`worker.broker_watch` compares them to find a broker that lost its messages; these are its queries.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.queries import as_utc, database_now
from db.schema import BrokerMark


def advance(session: Session, broker: str, queue: str) -> tuple[int, str] | None:
    """Add one to the queue's count and return it with the database's token, holding the queue's row until the
    transaction ends (so the workers of one queue compare and write the broker's copy one at a time); None when
    the queue has no count yet."""
    row = session.execute(
        update(BrokerMark).where(BrokerMark.broker == broker, BrokerMark.queue == queue)
        .values(counter=BrokerMark.counter + 1, checked_at=database_now(session))
        .returning(BrokerMark.counter, BrokerMark.token)
    ).first()
    return (int(row[0]), str(row[1])) if row is not None else None


def start(session: Session, broker: str, queue: str) -> str | None:
    """Give the queue its first count, 1, and a token of its own; returns the token, or None when another worker
    gave it one first."""
    token = uuid.uuid4().hex
    try:
        with session.begin_nested():
            session.add(BrokerMark(broker=broker, queue=queue, counter=1, token=token,
                                   checked_at=database_now(session)))
    except IntegrityError:
        return None
    return token


def note_loss(session: Session, broker: str, queue: str) -> datetime:
    """Record that the broker was found to have lost the queue's messages now; returns that moment (by the
    database's clock). A loss found while an earlier one is still being mended moves the moment on: the images
    sent again since were lost once more."""
    now = database_now(session)
    session.execute(update(BrokerMark).where(BrokerMark.broker == broker, BrokerMark.queue == queue)
                    .values(lost_before=now))
    return now


def loss_to_mend(session: Session, broker: str, queue: str) -> datetime | None:
    """The moment of the queue's last loss whose images are still being sent again, or None."""
    moment = session.scalar(select(BrokerMark.lost_before)
                            .where(BrokerMark.broker == broker, BrokerMark.queue == queue))
    return as_utc(moment) if moment is not None else None


def mended(session: Session, broker: str, queue: str) -> None:
    """Every image the last loss took is on its way again (call with the queue's row held: :func:`advance`)."""
    session.execute(update(BrokerMark).where(BrokerMark.broker == broker, BrokerMark.queue == queue)
                    .values(lost_before=None))


def unmended(session: Session) -> list[tuple[str, str, datetime]]:
    """Every (broker, queue, moment) whose loss of messages the workers are still sending again, for ``deblur
    doctor``."""
    return [(broker, queue, as_utc(moment)) for broker, queue, moment in session.execute(
        select(BrokerMark.broker, BrokerMark.queue, BrokerMark.lost_before)
        .where(BrokerMark.lost_before.is_not(None)).order_by(BrokerMark.queue))]
