"""A Python client of the HTTP API, for backends that reach deblur over HTTP only.

:class:`producer.client.Client` talks to the database and the broker directly,
which a service behind a network policy usually cannot. ``HttpClient`` does the
same through ``deblur api`` with a bearer token (a client's own, see ``deblur
api-client add``, or the shared one) and needs only ``httpx``:

>>> from producer.http_client import HttpClient
>>> api = HttpClient("https://deblur.internal", token=os.environ["DEBLUR_TOKEN"])
>>> job = api.submit(["s3://archive/scans/"], output="s3://archive/restored/", job_key="nightly-2026-12-07")
>>> api.wait(job)["counts"]
{'pending': 0, 'running': 0, 'done': 120, 'failed': 0, 'cancelled': 0}
>>> for image in api.results(job, review=True):   # every page, one image at a time
...     print(image["input"], image["review"])

Errors are the project's own (:mod:`jobs.errors`), so code written against
``Client`` handles them alike: a refused request raises :class:`InputError`
with the server's message and the field it names, an unknown job
:class:`UnknownJobError`, a finished one :class:`JobFinishedError`, an output another
unfinished job has still to write :class:`OutputsBusyError`, a job key
sent again with another request :class:`JobKeyReusedError`, a missing or
wrong token :class:`ApiAccessError`. An answer the API never gives (a 404
from a route it lacks, a body that is not JSON, a redirect: a wrong base URL,
or a proxy's login or error page) raises :class:`UnexpectedAnswerError`, naming
the status, the content type and the start of the body.

A request that was never sent (the connection could not be opened, or not in
time, or no pooled connection came free) is sent again with back-off, and so
are reads (and cancel, pause, resume, which change nothing the second time)
that got a 503 or lost their answer (the connection broke or timed out after
the request went out, or a proxy answered 502 or 504), honouring
``Retry-After``, before :class:`TransientError` is raised. A submission with a
``job_key`` whose answer was lost (502 and 504 included) is sent again too: the
server returns the first job for the key. Without a key it is not, and a 503 is
never sent again, key or not (it may come from a job that was made and failed
part-way, which releases its key): the error says to look with
:meth:`HttpClient.jobs` or submit again with the same ``job_key``.

The calls are those of :class:`producer.client.Client`, with three
differences: :meth:`HttpClient.results` yields every image page by page
instead of a list (pages of at most the API's maximum, whatever ``page_size``
asks), :meth:`HttpClient.usage` returns the API's JSON document instead of a
report object, and :meth:`HttpClient.verify` is quick by default (as the API
is).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from jobs.errors import (
    DeblurError,
    InputError,
    JobFinishedError,
    JobKeyReusedError,
    OutputsBusyError,
    TransientError,
    UnknownJobError,
)
from jobs.statuses import FINISHED_JOB_STATUSES

MAX_PAGE_SIZE = 1000  # the API's largest page (producer.api.MAX_PAGE): larger pages are refused with a 422

# what the API answers, word for word, for a job that does not exist (or is hidden from the client): a 404 that
# says anything else comes from a route the server lacks, so the base URL is not that of a deblur API
_UNKNOWN_JOB = "no job with id"

# the request never left: no connection could be opened (in time), no pooled connection came free, or the proxy
# would not open a tunnel to the server. Every other transport error may follow a request the server received.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


class ApiAccessError(DeblurError):
    """The API refused the token (401) or what the token's client may do (403)."""


class UnexpectedAnswerError(DeblurError):
    """An answer the deblur API never gives: a 404 from a route it lacks, a body that is not JSON, a redirect.

    The base URL is most likely not a deblur API's (a wrong host, port or path prefix), or something in between (a
    proxy's login or error page) answered instead. The message names the status, the content type and the start
    of the body. Not an :class:`UnknownJobError`: the job may well exist.
    """


class HttpClient:
    """The HTTP API at ``base_url`` (``http://127.0.0.1:8000``), as ``token``'s client."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 1.0, transport: httpx.BaseTransport | None = None,
                 long_timeout: float = 3600.0) -> None:
        """``timeout`` bounds each call, except those that list or read a whole job (submit, preview, verify:
        minutes for millions of images), which wait ``long_timeout``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)
        self.retries = retries
        self.backoff = backoff
        self.long_timeout = long_timeout

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ jobs

    def submit(self, inputs: Sequence[str], output: str, models: Sequence[str] = (), *,
               job_key: str | None = None, **options: Any) -> str:
        """Submit a deblur job; returns its id (empty when ``skip_existing`` left nothing to do). ``job_key``
        makes it idempotent: the same key returns the first job, so with a key a lost answer (a broken or timed-out
        connection, a proxy's 502 or 504) is sent again with back-off, as reads are. Without one it is raised as a
        :class:`TransientError` saying the job may have been made; so is a 503, key or not.

        ``options`` are the API's job fields (``strength``, ``priority``, ``window``, ``labels``,
        ``notify_url``, ``skip_existing``, ``output_format``, ``sidecar``, ...; see ``/docs``).
        """
        body = {"kind": "deblur", "inputs": list(inputs), "output": output, "models": list(models), **options}
        return self._create(body, job_key)

    def evaluate(self, blurred: Sequence[str], sharp: str | None = None, models: Sequence[str] = (), *,
                 job_key: str | None = None, **options: Any) -> str:
        """Submit an evaluation job (``sharp``: the prefix of the sharp images, or ``gopro=True``)."""
        body = {"kind": "evaluate", "inputs": list(blurred), "sharp": sharp, "models": list(models), **options}
        return self._create(body, job_key)

    def preview(self, inputs: Sequence[str], output: str, models: Sequence[str] = (), sample: int = 5,
                **options: Any) -> dict[str, Any]:
        """What a deblur job would hold (total, skipped, ignored, sample); nothing is written or enqueued."""
        body = {"kind": "deblur", "inputs": list(inputs), "output": output, "models": list(models), **options}
        return self._call("POST", "/v1/jobs/preview", json=body, params={"sample": sample},
                          timeout=self.long_timeout)

    def _create(self, body: dict[str, Any], job_key: str | None) -> str:
        headers = {"Idempotency-Key": job_key} if job_key else {}
        # a 503 is not sent again even with a key: a submission that failed part-way answers 503 and releases its
        # key, so sending it again would make a second job beside the first one's queued images
        created = self._call("POST", "/v1/jobs", json={k: v for k, v in body.items() if v is not None},
                             headers=headers, repeatable=False, resend_lost=bool(job_key), timeout=self.long_timeout,
                             if_received=". The job may have been made: see jobs(), or submit again with the same "
                                         "job_key (a key returns the first job while it stands)")
        return created["id"] or ""

    def status(self, job_id: str, spec: bool = True) -> dict[str, Any]:
        """State, counts per status, images/s, ETA, review counts, and the spec unless ``spec`` is False (it
        holds every URI the job was submitted with)."""
        return self._call("GET", f"/v1/jobs/{job_id}", params=None if spec else {"spec": "false"})

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 2.0) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; :class:`TimeoutError` after ``timeout`` s. Polls leave
        the spec out (megabytes for a job of 100,000 named URIs); the finished job is returned whole."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status(job_id, spec=False)
            if info["status"] in FINISHED_JOB_STATUSES:
                return self.status(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['status']} after {timeout} s: {info['counts']}")
            time.sleep(interval)

    def jobs(self, labels: Mapping[str, str] | None = None, status: str | None = None, mine: bool = False,
             limit: int = 20, before: str | None = None) -> list[dict[str, Any]]:
        """The newest jobs first; only those with all of ``labels``, in ``status``, or submitted with this
        client's token (``mine``), when given. One page of at most ``limit``: pass its last id as ``before`` for
        the next (:meth:`all_jobs` walks them all)."""
        params: dict[str, Any] = {"limit": limit, "label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        if status:
            params["status"] = status
        if mine:
            params["mine"] = "true"
        if before:
            params["before"] = before
        return self._call("GET", "/v1/jobs", params=params)  # type: ignore[return-value]

    def all_jobs(self, labels: Mapping[str, str] | None = None, status: str | None = None, mine: bool = False,
                 page_size: int = MAX_PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Every job :meth:`jobs` would list, newest first, page by page: none skipped or repeated while jobs
        arrive."""
        before: str | None = None
        while True:
            page = self.jobs(labels, status, mine, min(page_size, MAX_PAGE_SIZE), before)
            yield from page
            if len(page) < min(page_size, MAX_PAGE_SIZE):
                return
            before = page[-1]["id"]

    def results(self, job_id: str, status: str | None = None, review: bool = False,
                page_size: int = 500, history: bool = False) -> Iterator[dict[str, Any]]:
        """Every image of a job (or only those in ``status``, or flagged for ``review``), page by page, in image
        order: pages follow the last image's id, so an image whose status changes while the job is read is
        neither skipped nor repeated. With ``history``, each image's ``earlier_attempts`` too.

        ``page_size`` above the API's maximum (:data:`MAX_PAGE_SIZE`) is read in pages of that maximum: every image
        is still yielded, in more requests."""
        params: dict[str, Any] = {"limit": min(page_size, MAX_PAGE_SIZE), "after": 0}
        if status:
            params["status"] = status
        if review:
            params["review"] = "true"
        if history:
            params["history"] = "true"
        while True:
            page = self._call("GET", f"/v1/jobs/{job_id}/images", params=params)
            yield from page["items"]
            if "next_after" in page:
                if page["next_after"] is None:
                    return
                params["after"] = page["next_after"]
            else:  # a server older than id paging ignores 'after': go on by offset, as it pages
                if page.get("next_offset") is None:
                    return
                params.pop("after", None)
                params["offset"] = page["next_offset"]

    def summary(self, job_id: str) -> dict[str, Any]:
        """The mean of every metric per model, and how many images it covers."""
        return self._call("GET", f"/v1/jobs/{job_id}/summary")

    def cancel(self, job_id: str) -> int:
        """Cancel the job's pending images; returns how many."""
        return int(self._call("POST", f"/v1/jobs/{job_id}/cancel", repeatable=True)["cancelled"])

    def pause(self, job_id: str) -> bool:
        """Hold back a job with a window; False when it was paused already."""
        return bool(self._call("POST", f"/v1/jobs/{job_id}/pause", repeatable=True)["changed"])

    def resume(self, job_id: str) -> int | None:
        """Let a paused job go on; returns the batches sent to fill its window, or None when it was not paused."""
        answer = self._call("POST", f"/v1/jobs/{job_id}/resume", repeatable=True)
        return int(answer["sent"]) if answer["changed"] else None

    def retry(self, job_id: str, failed: bool = True, stalled_after: int | None = None) -> int:
        """Send failed (and, with ``stalled_after`` seconds, stalled) images again; returns how many."""
        body: dict[str, Any] = {"failed": failed, "stalled": stalled_after is not None}
        if stalled_after is not None:
            body["stalled_after"] = stalled_after
        return int(self._call("POST", f"/v1/jobs/{job_id}/retry", json=body)["requeued"])

    def verify(self, job_id: str, mark_failed: bool = False, quick: bool = True) -> dict[str, Any]:
        """Check the job's outputs against their recorded checksums (quick by default: the store's checksums,
        no output read back)."""
        # a 503 (refused before any work) is asked again, a lost answer (a proxy's 502 or 504 too) is not: the server
        # may still be reading every output, and asking again would start a second full read
        return self._call("POST", f"/v1/jobs/{job_id}/verify", json={"quick": quick, "mark_failed": mark_failed},
                          repeatable=not mark_failed, resend_lost=False, timeout=self.long_timeout)

    # ------------------------------------------------------------------ operations

    def queue(self) -> dict[str, Any]:
        """The whole queue: work left, the last minutes' outcomes, stalls, batches waiting by priority."""
        return self._call("GET", "/v1/queue")

    def usage(self, since: str = "30d", until: str | None = None, by: Sequence[str] = (),
              labels: Mapping[str, str] | None = None, kind: str | None = None) -> dict[str, Any]:
        """Images, megapixels and worker time per group (``by``: ``label:team``, ``model``, ``month``, ...)."""
        params: dict[str, Any] = {"since": since, "by": list(by),
                                  "label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        if until:
            params["until"] = until
        if kind:
            params["kind"] = kind
        return self._call("GET", "/v1/usage", params=params)

    def models(self) -> list[dict[str, Any]]:
        """Every registered model: family, licence, weights present, parameters."""
        return self._call("GET", "/v1/models")  # type: ignore[return-value]

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, *, repeatable: bool | None = None, resend_lost: bool | None = None,
              if_received: str = "", **kwargs: Any) -> Any:
        """One request; the answer's JSON, or the project's error for its status.

        It is sent again with back-off (``Retry-After`` when the answer gives one), up to ``retries`` times:

        - always when it was never sent (the connection could not be opened, or not in time; no pooled connection
          came free; the proxy would not open a tunnel to the server);
        - on a 503 (the API refused before doing anything) only when ``repeatable`` (GETs by default);
        - on a lost answer (the connection broke or timed out after the request went out) or a proxy's 502 or 504
          (it lost the answer or stopped waiting for it) only when ``resend_lost`` (by default as ``repeatable``):
          the server may have done the work, or be doing it still.

        ``if_received`` is added to the :class:`TransientError` raised when some attempt may have reached the
        server (a request that may have done its work).
        """
        repeatable = method == "GET" if repeatable is None else repeatable
        resend_lost = repeatable if resend_lost is None else resend_lost
        attempt = 0
        received = False  # some attempt may have reached the server
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                unsent = isinstance(exc, _UNSENT)
                received = received or not unsent
                if not (resend_lost or unsent) or attempt >= self.retries:
                    what = "unreachable" if unsent else "did not answer"
                    raise TransientError(f"deblur API at {self._http.base_url} {what}: {exc}"
                                         f"{if_received if received else ''}") from exc
                delay = self.backoff * 2 ** attempt
            else:
                received = True
                code = response.status_code
                again = (code == 503 and repeatable) or (code in (502, 504) and resend_lost)
                if not again or attempt >= self.retries:
                    try:
                        return _answer(response)
                    except TransientError as exc:
                        if not if_received:
                            raise
                        raise TransientError(f"{exc}{if_received}") from exc
                delay = _retry_after(response, self.backoff * 2 ** attempt)
            time.sleep(delay)
            attempt += 1


# the API's 409 for an output another unfinished job has still to write (producer.submit, producer.retry)
_BUSY_OUTPUT = re.compile(r"output (?P<output>.+?) (?:\(of .*?\) )?is one (?:job (?P<job>[0-9a-f-]{36})|an unfinished "
                          r"job of another client)", re.DOTALL)


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, min(float(response.headers.get("Retry-After", default)), 60.0))
    except ValueError:
        return default


def _shown(response: httpx.Response) -> str:
    """The answer as a person would look at it: its status, content type and the start of its body."""
    body = " ".join(response.text.split())
    body = repr(body[:200] + ("…" if len(body) > 200 else "")) if body else "an empty body"
    return (f"{response.request.method} {response.request.url} answered {response.status_code} "
            f"({response.headers.get('Content-Type') or 'no content type'}): {body}")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        document = response.json()
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _detail(response: httpx.Response) -> str:
    detail = (_json_object(response) or {}).get("detail")
    if detail is None:  # not the API's error document (a proxy's page, say): show what came
        return _shown(response)
    if isinstance(detail, list):  # FastAPI's validation errors: name each field
        return "; ".join(f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'request'}: {item.get('msg')}"
                         for item in detail if isinstance(item, dict))
    return str(detail)


def _answer(response: httpx.Response) -> Any:
    code = response.status_code
    if 300 <= code < 400:
        location = response.headers.get("Location")
        raise UnexpectedAnswerError(f"{_shown(response)}{f', to {location}' if location else ''}: the deblur API "
                                    "does not redirect; check the base URL (https instead of http?) or what proxy "
                                    "stands in between")
    if code < 300:
        try:
            return response.json()
        except ValueError:
            raise UnexpectedAnswerError(f"{_shown(response)}: not JSON, so not the deblur API's answer (a proxy's "
                                        "login or error page?); check the base URL") from None
    if code == 404:
        detail = (_json_object(response) or {}).get("detail")
        if isinstance(detail, str) and detail.startswith(_UNKNOWN_JOB):
            raise UnknownJobError(detail)
        raise UnexpectedAnswerError(f"{_shown(response)}: the URL does not look like a deblur API (it answers an "
                                    "unknown job with 'no job with id …'); check the base URL")
    detail = _detail(response)
    if code == 409:
        if detail.startswith("job key "):  # the key was used before with another request
            raise JobKeyReusedError(detail)
        busy = _BUSY_OUTPUT.match(detail)
        if busy:  # outputs another unfinished job has still to write (its id only when this client may read it)
            raise OutputsBusyError(detail, busy.group("job") or "", busy.group("output"))
        raise JobFinishedError(detail)
    if code in (400, 422):
        raise InputError(detail)
    if code in (401, 403):
        raise ApiAccessError(f"{code}: {detail}")
    if code in (502, 503, 504):
        raise TransientError(f"{code}: {detail}")
    raise DeblurError(f"deblur API answered {code}: {detail}")
