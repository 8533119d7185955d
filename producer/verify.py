"""``deblur verify``: check that a job's outputs are still in storage, byte for byte as written.

Workers record the SHA-256 of every output they upload. An archive that keeps
the restorations for years wants to know, before it relies on them, that none
was deleted, truncated or overwritten since (a lifecycle rule, a second job
writing to the same prefix, a botched sync). Verification reads every done
image's output back, hashes it and compares; with ``mark_failed`` the missing
and changed ones become failed images, so ``deblur retry JOB --failed``
restores them again.

Reading back a million outputs costs their whole size in egress. Workers also
send each output's SHA-256 with its upload, and S3 keeps it with the object, so
``quick`` asks the store for it (a HEAD request) instead of reading the bytes.
That catches deleted, replaced and truncated outputs; it trusts the store to
have kept the bytes it acknowledged, which the full check does not. An output
whose store holds no SHA-256 (written before checksums were sent, replaced
without one, or a store that keeps none) is read in full even then.

:func:`verify_records` needs no database at all: it checks the outputs under a
prefix or folder against the provenance records written next to them
(``--sidecar``), so restorations copied elsewhere, or whose job was pruned,
can still be checked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import queries
from db.engine import ensure_schema, session_scope
from jobs.errors import InputError, StorageNotFoundError
from jobs.layout import SIDECAR_SUFFIX, is_sidecar
from jobs.s3uri import S3URI, parse_s3_uri
from jobs.settings import Settings
from jobs.storage import get_bytes, is_photograph, iter_objects, s3_client, stored_sha256

PAGE = 1000  # image rows read from SQL at a time


@dataclass
class Verification:
    """What :func:`verify_outputs` found; ``missing`` and ``changed`` list (input, output) URIs."""

    checked: int = 0
    intact: int = 0
    unrecorded: int = 0  # outputs present but written before checksums were recorded: existence only
    by_store_checksum: int = 0  # judged by the SHA-256 the store keeps (quick), without reading the output
    missing: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    # --records: images under the location with no record beside them (written without --sidecar, or the record
    # was lost), so nothing there says what they should be: named, not counted as problems
    without_record: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.changed)

    def add(self, verdict: str, by_store: bool, pair: tuple[str, str]) -> None:
        """Count one output: ``verdict`` is 'intact', 'unrecorded', 'missing' or 'changed'; ``pair`` its
        (input, output)."""
        self.checked += 1
        self.by_store_checksum += by_store
        if verdict == "intact":
            self.intact += 1
        elif verdict == "unrecorded":
            self.unrecorded += 1
        else:
            (self.missing if verdict == "missing" else self.changed).append(pair)


def _done_pages(settings: Settings, job_id: str) -> Iterator[list[dict[str, Any]]]:
    """The job's done images that have an output, a page of rows at a time (memory stays flat), without their
    metrics.

    Pages follow image ids (each starts after the last id of the one before), so while images of the job change
    status (it is still running, or being retried) none is skipped or checked twice, as offsets over the done
    ones would.
    """
    url = settings.resolved_database_url()
    last_id: int | None = None
    while True:
        with session_scope(url) as session:
            rows = queries.image_rows(session, job_id, status="done", limit=PAGE, after_id=last_id,
                                      with_metrics=False)
        yield [row for row in rows if row["output"]]
        if len(rows) < PAGE:
            return
        last_id = rows[-1]["id"]


def _check(client: Any, row: dict[str, Any], quick: bool) -> tuple[str, bool]:
    """'intact', 'unrecorded', 'missing' or 'changed' for one done image's output, and whether the store's
    checksum decided it (``quick`` and the store keeps one) rather than the bytes read back."""
    uri = parse_s3_uri(row["output"], want_prefix=False, exact=True)
    try:
        if not row["output_sha256"]:
            stored_sha256(client, uri)  # a HEAD request: present, but nothing to compare with
            return "unrecorded", False
        actual, by_store = _output_digest(client, uri, quick)
    except StorageNotFoundError:
        return "missing", False
    return ("intact" if actual == row["output_sha256"] else "changed"), by_store


def _output_digest(client: Any, output: S3URI, quick: bool) -> tuple[str, bool]:
    """An output's SHA-256, and whether it is the store's own (``quick`` and the store keeps one) rather than
    the bytes read back and hashed."""
    if quick:
        kept = stored_sha256(client, output)
        if kept is not None:
            return kept, True
    return hashlib.sha256(get_bytes(client, output)).hexdigest(), False


def verify_outputs(settings: Settings, job_id: str, mark_failed: bool = False,
                   progress: Callable[[int], None] | None = None, quick: bool = False) -> Verification:
    """Read back and hash the output of every done image of ``job_id``.

    With ``quick``, an output whose store keeps its SHA-256 is compared by
    that instead of being read (see the module's docstring).
    ``progress`` is told the running count of images checked. With
    ``mark_failed``, missing and changed outputs are recorded as failed images
    (their error says which), ready for ``deblur retry --failed``.

    Raises:
        UnknownJobError: no such job.
        TransientError: storage could not be reached.
    """
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        queries.get_job(session, job_id)
    client = s3_client(settings)
    found = Verification()
    with ThreadPoolExecutor(max_workers=settings.io_threads) as pool:
        for page in _done_pages(settings, job_id):
            for row, (verdict, by_store) in zip(page, pool.map(lambda r: _check(client, r, quick), page),
                                                strict=True):
                found.add(verdict, by_store, (row["input"], row["output"]))
                if progress is not None:
                    progress(found.checked)
    if mark_failed and found.problems:
        with session_scope(url) as session:
            for (input_uri, output), error in [
                *((m, "verify: the output is missing from storage") for m in found.missing),
                *((c, "verify: the output changed since it was written (SHA-256 differs)") for c in found.changed),
            ]:
                queries.mark_image_failed(session, job_id, input_uri, f"{error}: {output}")
    return found


def verify_records(settings: Settings, location: str, quick: bool = False,
                   progress: Callable[[int], None] | None = None) -> Verification:
    """Check every output under ``location`` (an S3 prefix or a local folder) against the provenance record
    next to it (``OUTPUT.deblur.json``).

    The output is looked for beside its record, not where the record says it was written, so a copied tree is
    checked where it is now. ``quick`` works as for :func:`verify_outputs` (S3 only). A record that cannot be
    read counts as changed. ``progress`` is told the running count of records checked.

    Raises:
        InputError: ``location`` is neither an S3 prefix nor a folder, or holds no records.
        TransientError: storage could not be reached.
    """
    records: Iterator[Any]
    found = Verification()
    if location.startswith("s3://"):
        prefix = parse_s3_uri(location, want_prefix=True)
        client = s3_client(settings)
        records = _records_noting_the_rest(iter_objects(client, prefix), prefix, found.without_record)

        def check(record: Any) -> tuple[str, bool, tuple[str, str]]:
            output = S3URI(record.bucket, record.key[: -len(SIDECAR_SUFFIX)])
            return _check_record(get_bytes(client, record), str(output), lambda: _output_digest(client, output, quick))
    else:
        folder = Path(location)
        if not folder.is_dir():
            raise InputError(f"{location} is neither an S3 prefix (s3://bucket/prefix/) nor a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        names = {str(p) for p in files}
        found.without_record.extend(str(p) for p in files if _an_output(p.relative_to(folder).as_posix())
                                    and str(p) + SIDECAR_SUFFIX not in names)
        records = iter([p for p in files if is_sidecar(p.name)])

        def check(record: Any) -> tuple[str, bool, tuple[str, str]]:
            return _check_record(record.read_bytes(), str(record)[: -len(SIDECAR_SUFFIX)],
                                 lambda: _local_digest(record))
    with ThreadPoolExecutor(max_workers=settings.io_threads) as pool:
        while page := list(itertools.islice(records, PAGE)):  # a page at a time: memory stays flat
            for verdict, by_store, pair in pool.map(check, page):
                found.add(verdict, by_store, pair)
                if progress is not None:
                    progress(found.checked)
    if not found.checked:
        raise InputError(f"no provenance records (*{SIDECAR_SUFFIX}) under {location}; they are written by jobs "
                         "submitted with --sidecar")
    return found


def _an_output(relative: str) -> bool:
    """Whether a file (its path relative to the location) is an output a record could stand beside: an image
    deblur reads, not a kernel PNG, and not an evaluation member's output (under ``_members/``, never recorded)."""
    return is_photograph(relative) and "/_members/" not in "/" + relative


def _records_noting_the_rest(listed: Iterator[tuple[S3URI, int]], prefix: S3URI,
                             without_record: list[str]) -> Iterator[S3URI]:
    """The provenance records of a listing, in order; outputs with no record beside them are added to
    ``without_record`` as the listing passes them. A key's record (``KEY.deblur.json``) sorts after the key, and
    only keys that start with the key come between, so an output still waiting when the listing passes the name
    its record would have has none: the memory held is the few outputs waiting, not the listing."""
    waiting: dict[str, S3URI] = {}  # outputs whose record may still come, in listing order
    for uri, _size in listed:
        while waiting and next(iter(waiting)) + SIDECAR_SUFFIX < uri.key:
            without_record.append(str(waiting.pop(next(iter(waiting)))))
        if is_sidecar(uri.key):
            waiting.pop(uri.key[: -len(SIDECAR_SUFFIX)], None)
            yield uri
        elif _an_output(uri.relative_to(prefix)):
            waiting[uri.key] = uri
    without_record.extend(str(uri) for uri in waiting.values())


def _check_record(record: bytes, output: str, digest: Callable[[], tuple[str, bool]]
                  ) -> tuple[str, bool, tuple[str, str]]:
    """(verdict, judged by the store's checksum, (input, output)) for one record and the output beside it."""
    try:
        written = json.loads(record)
        source, expected = str(written["input"]["uri"]), written["output"]["sha256"]
    except (ValueError, KeyError, TypeError):
        return "changed", False, ("(the provenance record cannot be read)", output)
    try:
        actual, by_store = digest()
    except StorageNotFoundError:
        return "missing", False, (source, output)
    if not expected:  # present (just found), but the record holds no checksum to compare with
        return "unrecorded", False, (source, output)
    return ("intact" if actual == expected else "changed"), by_store, (source, output)


def _local_digest(record: Path) -> tuple[str, bool]:
    output = Path(str(record)[: -len(SIDECAR_SUFFIX)])
    if not output.is_file():
        raise StorageNotFoundError(f"{output} does not exist")
    return hashlib.sha256(output.read_bytes()).hexdigest(), False
