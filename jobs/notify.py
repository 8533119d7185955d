"""Job-finished notifications: a JSON POST to the URL a job was submitted with.

Backend teams would otherwise poll. A job submitted with ``notify_url`` (``deblur
submit --notify URL``, the HTTP API's ``notify_url``) gets one POST each time it
finishes: done, failed or cancelled (and again after a retry finishes it anew).
Whoever makes the transition (the worker that records the last image, the
producer when a job finishes while it is still being submitted, or a cancel)
enqueues a ``deblur.notify_job`` task; a worker delivers it, retrying with
back-off while the receiver is down or answers with an error, so a receiver that
restarts does not lose the message. Deliveries are at least once: the body's
``delivery`` id is the same on every attempt, so a receiver can drop repeats.

With ``DEBLUR_NOTIFY_SECRET`` set, each POST carries
``X-Deblur-Signature: sha256=<hex HMAC-SHA256 of the body with that secret>``.
"""

from __future__ import annotations

import hashlib
import http.client
import hmac
import json
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

from jobs.errors import InputError, TransientError
from jobs.settings import Settings

NOTIFY_TASK = "deblur.notify_job"
EVENT = "job.finished"
TIMEOUT_S = 10.0


def check_notify_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; raises InputError naming the problem otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"notify URL {url!r} is not an absolute http:// or https:// URL with a host")
    return url


def announce(settings: Settings, job_id: str) -> None:
    """Enqueue the notification of a job that has just finished (the task finds the URL in the job's spec).

    It goes at the most urgent priority: a notification takes a moment, and queued behind another job's
    thousands of batches it would arrive hours after the job finished.
    """
    from jobs.celery_app import PRIORITY_LEVELS, app_for, broker_priority

    delivery = str(uuid.uuid4())
    app_for(settings).send_task(NOTIFY_TASK, args=[job_id, delivery], queue=settings.queue,
                                priority=broker_priority(PRIORITY_LEVELS - 1))


def announce_if_wanted(settings: Settings, job_id: str, spec: dict[str, Any] | None) -> None:
    """:func:`announce` when the job's ``spec`` asks for notifications."""
    if spec and spec.get("notify_url"):
        announce(settings, job_id)


def body(job: dict[str, Any], delivery: str) -> bytes:
    """The JSON document POSTed: the event, a delivery id and the job's status as ``deblur status`` reports it."""
    return json.dumps({"event": EVENT, "delivery": delivery, "job": job}, sort_keys=True, default=str).encode()


def deliver(url: str, payload: bytes, secret: str | None = None, timeout: float = TIMEOUT_S) -> int:
    """POST ``payload`` to ``url``; returns the HTTP status.

    Raises:
        TransientError: the receiver could not be reached, timed out, or
            answered 5xx, 408 or 429: worth trying again later.
        InputError: any other non-2xx answer (a 404, say): trying again will not help.
    """
    headers = {"Content-Type": "application/json", "User-Agent": "deblur-notify/1", "X-Deblur-Event": EVENT}
    if secret:
        signature = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
        headers["X-Deblur-Signature"] = f"sha256={signature}"
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:  # http(s) checked at submission
            return int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientError(f"notify {url}: the receiver answered {exc.code}") from None
        if 300 <= exc.code < 400:
            raise InputError(f"notify {url}: the receiver answered {exc.code}, a redirect to "
                             f"{exc.headers.get('Location')!r}; not followed (it would turn the POST into a GET "
                             "without the body): submit with the URL it names") from None
        raise InputError(f"notify {url}: the receiver answered {exc.code}; not retried") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(f"notify {url}: cannot reach the receiver ({reason!r})") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a hop: urllib would follow a 301/302 as a GET without the body, and the
    notification would be reported delivered while nothing was."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)
