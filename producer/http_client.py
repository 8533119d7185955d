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
:class:`UnknownJobError`, a finished one :class:`JobFinishedError`, a missing
or wrong token :class:`ApiAccessError`. A server that is unavailable (503, or
no connection) is asked again with back-off, honouring ``Retry-After``, before
:class:`TransientError` is raised. A submission is asked again only when the
connection could not be opened (nothing was sent): a 503 or a lost answer may
come from a job that was made and failed part-way, so it is raised, saying to
look with :meth:`HttpClient.jobs` or submit again with the same ``job_key``.

The calls are those of :class:`producer.client.Client`, with three
differences: :meth:`HttpClient.results` yields every image page by page
instead of a list, :meth:`HttpClient.usage` returns the API's JSON document
instead of a report object, and :meth:`HttpClient.verify` is quick by default
(as the API is).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from jobs.errors import DeblurError, InputError, JobFinishedError, TransientError, UnknownJobError
from jobs.statuses import FINISHED_JOB_STATUSES



class ApiAccessError(DeblurError):
    """The API refused the token (401) or what the token's client may do (403)."""


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
        makes it idempotent: the same key returns the first job (and lets a lost answer be asked again).

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
        try:
            created = self._call("POST", "/v1/jobs", json={k: v for k, v in body.items() if v is not None},
                                 headers=headers, repeatable=False, timeout=self.long_timeout)
        except TransientError as exc:
            if isinstance(exc.__cause__, httpx.ConnectError):
                raise  # nothing was sent
            raise TransientError(f"{exc}. The job may have been made: see jobs(), or submit again with the same "
                                 "job_key (a key returns the first job while it stands)") from exc
        return created["id"] or ""

    def status(self, job_id: str) -> dict[str, Any]:
        """State, counts per status, images/s, ETA, review counts, spec."""
        return self._call("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 2.0) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; :class:`TimeoutError` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status(job_id)
            if info["status"] in FINISHED_JOB_STATUSES:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['status']} after {timeout} s: {info['counts']}")
            time.sleep(interval)

    def jobs(self, labels: Mapping[str, str] | None = None, status: str | None = None, mine: bool = False,
             limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs first; only those with all of ``labels``, in ``status``, or submitted with this
        client's token (``mine``), when given."""
        params: dict[str, Any] = {"limit": limit, "label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        if status:
            params["status"] = status
        if mine:
            params["mine"] = "true"
        return self._call("GET", "/v1/jobs", params=params)  # type: ignore[return-value]

    def results(self, job_id: str, status: str | None = None, review: bool = False,
                page_size: int = 500, history: bool = False) -> Iterator[dict[str, Any]]:
        """Every image of a job (or only those in ``status``, or flagged for ``review``), page by page, in image
        order: pages follow the last image's id, so an image whose status changes while the job is read is
        neither skipped nor repeated. With ``history``, each image's ``earlier_attempts`` too."""
        params: dict[str, Any] = {"limit": page_size, "after": 0}
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
        # a 503 (refused before any work) is asked again, a lost answer is not: the server may still be reading
        # every output, and asking again would start a second full read
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
              **kwargs: Any) -> Any:
        """One request; the answer's JSON, or the project's error for its status.

        A connection that could not be opened is always tried again (nothing was sent). A 503 is tried again only
        for ``repeatable`` requests (GETs by default), and a lost answer only for those and ``resend_lost`` (by
        default as ``repeatable``): the others may have done their work, or be doing it still.
        """
        repeatable = method == "GET" if repeatable is None else repeatable
        resend_lost = repeatable if resend_lost is None else resend_lost
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                unsent = isinstance(exc, httpx.ConnectError)
                if not (resend_lost or unsent) or attempt >= self.retries:
                    what = "unreachable" if unsent else "did not answer"
                    raise TransientError(f"deblur API at {self._http.base_url} {what}: {exc}") from exc
                delay = self.backoff * 2 ** attempt
            else:
                if response.status_code != 503 or not repeatable or attempt >= self.retries:
                    return _answer(response)
                delay = _retry_after(response, self.backoff * 2 ** attempt)
            time.sleep(delay)
            attempt += 1


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, min(float(response.headers.get("Retry-After", default)), 60.0))
    except ValueError:
        return default


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # FastAPI's validation errors: name each field
        return "; ".join(f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'request'}: {item.get('msg')}"
                         for item in detail if isinstance(item, dict))
    return str(detail)


def _answer(response: httpx.Response) -> Any:
    code = response.status_code
    if code < 400:
        return response.json()
    detail = _detail(response)
    if code == 404:
        raise UnknownJobError(detail)
    if code == 409:
        raise JobFinishedError(detail)
    if code in (400, 422):
        raise InputError(detail)
    if code in (401, 403):
        raise ApiAccessError(f"{code}: {detail}")
    if code in (502, 503, 504):
        raise TransientError(f"{code}: {detail}")
    raise DeblurError(f"deblur API answered {code}: {detail}")
