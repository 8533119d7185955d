"""Job labels: a team's own names for a job (``team=ingest``, ``collection=1923-negatives``).

They are stored with the job, shown by ``deblur status``, sent in job-finished
notifications and the API's job documents, and select jobs in listings
(``deblur status --label team=ingest``, ``GET /v1/jobs?label=team=ingest``), so
a backend can find its own jobs among everyone's and tie them to its records.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping

from jobs.errors import InputError

API_CLIENT_LABEL = "api-client"  # set by the HTTP API from the caller's token (producer.api_clients), never by hand
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
MAX_LABELS = 20
MAX_VALUE = 255


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` as a plain dict, or :class:`InputError` naming the first label that is not allowed.

    Keys are 1-63 characters of letters, digits and ``_ . - /``, starting with a letter or digit; values are
    text of at most 255 characters; a job has at most 20 labels.
    """
    if len(labels) > MAX_LABELS:
        raise InputError(f"--label: at most {MAX_LABELS} labels a job, got {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise InputError(f"--label: {key!r} is not a label name: 1-63 letters, digits, '_', '.', '-' or '/', "
                             "starting with a letter or digit, e.g. team=ingest")
        if not isinstance(value, str) or len(value) > MAX_VALUE or any(_unprintable(c) for c in value):
            raise InputError(f"--label {key}: the value must be text of at most {MAX_VALUE} characters without "
                             "control characters")
    return dict(labels)


def _unprintable(character: str) -> bool:
    """A control or format character (C0 and C1 controls, DEL, bidirectional overrides, line and paragraph
    separators, byte-order marks): in a terminal or a notification it can rewrite what the rest of a line says."""
    return unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp")


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` texts (as ``--label`` takes them) as a checked dict; a key given twice keeps its last value."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--label {item!r}: expected KEY=VALUE, e.g. team=ingest")
        labels[key.strip()] = value.strip()  # ' team = ingest ' is team=ingest, as a filter typed without spaces
    return check_labels(labels)


def check_submitted_labels(labels: Mapping[str, str], api_client: str | None = None) -> dict[str, str]:
    """A new job's labels: ``labels`` checked, plus ``api-client`` when the HTTP API knows who submits it.

    A submission that sets ``api-client`` itself is refused, so the label always names the token that
    submitted the job.
    """
    if any(key.lower() == API_CLIENT_LABEL for key in labels):  # API-Client too: it reads as the same label
        raise InputError(f"--label {API_CLIENT_LABEL}: this label is set by the HTTP API from the token that "
                         "submits the job; choose another name")
    checked = check_labels(labels)
    if api_client is not None:
        if len(checked) >= MAX_LABELS:
            raise InputError(f"--label: at most {MAX_LABELS - 1} labels a job submitted by an API client "
                             f"(it adds {API_CLIENT_LABEL}), got {len(checked)}")
        checked[API_CLIENT_LABEL] = api_client
    return checked
