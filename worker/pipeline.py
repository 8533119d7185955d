"""One batch of a job, start to finish, in a worker process.

download (threads, all started at once; each image waits only for its own)
→ decode → every member model → ensemble average and disagreement →
strength blend → encode in the input's format and bit depth → upload to the
mirrored key (threads, started as each image is encoded) → metrics → one SQL
transaction with every image row and metric of the batch.

One image failing (corrupt file, missing key, a model error) fails that image
alone; storage or database outages raise :class:`TransientError` so Celery
retries the whole batch, which is safe because outputs go to deterministic
keys and rows are updated in place.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db import queries
from db.engine import session_scope
from db.schema import ENSEMBLE_MODEL, INPUT_MODEL
from jobs.errors import DeviceFailure, InputError, TransientError
from jobs.messages import BatchMessage, ImageItem
from jobs.s3uri import S3URI, parse_s3_uri
from jobs.settings import Settings
from jobs.layout import format_of_name, kernel_labels, kernel_uri, member_output_uri, sidecar_uri
from jobs.notify import announce_if_wanted
from jobs.storage import get_bytes, put_bytes, s3_client
from models import shared_results
from models.catalog import REGISTRY
from worker import runtime
from worker.claims import holder_process_gone, new_claim

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Work:
    """One image travelling through the batch."""

    item: ImageItem
    outcome: queries.ImageOutcome
    data: bytes | None = None
    reference_data: bytes | None = None
    decoded: Any = None
    reference: Any = None
    restored: np.ndarray | None = None
    restored_pages: list[np.ndarray] = field(default_factory=list)  # a multi-page TIFF's further pages
    members: dict[str, np.ndarray] = field(default_factory=dict)
    kernels: dict[str, np.ndarray] = field(default_factory=dict)
    uploads: list[tuple[S3URI, bytes, str]] = field(default_factory=list)
    taken_over: bool = False  # another delivery of the batch took it after this run's lease ran out

    def fail(self, message: str) -> None:
        self.outcome.status = "failed"
        self.outcome.error = message


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _download(client, work: Work) -> None:  # type: ignore[no-untyped-def]
    def fetch() -> None:
        work.data = get_bytes(client, parse_s3_uri(work.item.input, want_prefix=False, exact=True))
        if work.item.reference:
            try:
                reference = parse_s3_uri(work.item.reference, want_prefix=False, exact=True)
                work.reference_data = get_bytes(client, reference)
            except InputError as exc:
                raise InputError(f"sharp reference {work.item.reference}: {exc}") from None

    try:
        _, seconds = _timed(fetch)
        work.outcome.download_s = seconds
        work.outcome.input_sha256 = hashlib.sha256(work.data or b"").hexdigest()
    except InputError as exc:
        work.fail(str(exc))


def decode_work(work: Work, settings: Settings, output_format: str | None = None) -> None:
    """Decode the downloaded input (and sharp reference); a bad file fails this image only.

    With ``output_format``, the image is set to be written in that format (:func:`worker.imageio.as_format`); one
    that cannot be (alpha to JPEG) fails here, before any model runs. The outcome records the input's format.
    The caller names the format its output's key says (:func:`output_format_of`).
    """
    from worker.imageio import as_format, decode_image

    try:
        work.decoded = decode_image(work.data or b"", work.item.input, max_pixels=settings.image_max_pixels)
        input_format, input_depth = work.decoded.format, work.decoded.bit_depth
        if output_format is not None:
            work.decoded = as_format(work.decoded, output_format)
        if work.reference_data is not None:
            work.reference = decode_image(work.reference_data, work.item.reference or "",
                                          max_pixels=settings.image_max_pixels)
            if work.reference.pixels.shape[:2] != work.decoded.pixels.shape[:2]:
                raise InputError(
                    f"sharp image {work.item.reference} is {work.reference.width}x{work.reference.height} "
                    f"but the blurred one is {work.decoded.width}x{work.decoded.height}"
                )
    except InputError as exc:
        work.fail(str(exc))
        return
    work.outcome.width, work.outcome.height = work.decoded.width, work.decoded.height
    work.outcome.pixels = sum(page.width * page.height for page in [work.decoded, *work.decoded.pages])
    work.outcome.format, work.outcome.bit_depth = input_format, input_depth
    work.data = work.reference_data = None  # free the compressed bytes early


def output_format_of(output: str | None, message: BatchMessage) -> str | None:
    """The format an output is written in when the job converts (``--output-format``): the one its key's
    suffix names, as the producer chose it (None: the input's own)."""
    return format_of_name(output) if message.output_format and output else None


def restore_work(work: Work, message: BatchMessage, on_model: Callable[[str], None] | None = None) -> None:
    """Run every member, average them, blend by strength and collect metrics.

    ``on_model`` is told each member's spec before it runs (progress display). The further pages of a
    multi-page TIFF go through the same members (``work.restored_pages``); the members' own metrics and the
    kernels are the first page's, with the page count as the input's metric ``pages`` (the sharpness figures
    of :func:`add_no_reference_metrics` cover every page).
    """
    from models.ensemble import apply_strength, average, disagreement

    pages = work.decoded.pages
    if pages and message.kind == "evaluate":
        raise InputError(f"a multi-page TIFF ({len(pages) + 1} pages) has no single sharp reference to be measured "
                         "against; split it into one file per page to evaluate it")
    x = _as_batch(work.decoded.pixels)
    specs = [REGISTRY.parse(text) for text in message.models]
    weights = [s.weight for s in specs]
    outputs = []
    versions: dict[str, Any] = {}
    metrics = work.outcome.metrics

    def run() -> None:
        for spec in specs:
            if on_model is not None:
                on_model(spec.to_text())
            model = runtime.get_model(spec)
            out = model(x)
            outputs.append(out.image.detach().float().cpu())
            versions[spec.key()] = model.version
            for name, value in out.metrics.items():
                metrics.append((spec.key(), name, float(value.reshape(-1)[0])))
            if out.kernels is not None:
                work.kernels[spec.key()] = out.kernels[0].detach().float().cpu().numpy()
        # every further page through the same members; metrics and kernels stay the first page's
        for page in pages:
            page_x = _as_batch(page.pixels)
            page_outputs = [runtime.get_model(spec)(page_x).image.detach().float().cpu() for spec in specs]
            work.restored_pages.append(_as_pixels(apply_strength(average(page_outputs, weights), page_x,
                                                                 message.strength)))

    _, seconds = _timed(run)
    if pages:
        metrics.append((INPUT_MODEL, "pages", float(len(pages) + 1)))
    ensemble = average(outputs, weights)
    if len(outputs) > 1:
        metrics.append((ENSEMBLE_MODEL, "disagreement", float(disagreement(outputs, ensemble)[0])))
    work.restored = _as_pixels(apply_strength(ensemble, x, message.strength))
    work.outcome.inference_s = seconds
    work.outcome.device = str(runtime.device())
    work.outcome.model_versions = versions
    if message.kind == "evaluate":
        _evaluate(work, specs, outputs, message)
        if len(specs) > 1 and message.write_outputs:
            # kept so reports and 'deblur ensemble fit' can use every member's output
            work.members = {s.key(): _as_pixels(o) for s, o in zip(specs, outputs, strict=True)}


def _as_batch(pixels: np.ndarray) -> Any:
    """H×W×C float pixels as a (1, C, H, W) tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def _as_pixels(batch: Any) -> np.ndarray:
    """The first image of a (N, C, H, W) CPU tensor as H×W×C pixels (the inverse of :func:`_as_batch`)."""
    return batch[0].numpy().transpose(1, 2, 0)


def _evaluate(work: Work, specs: list, outputs: list, message: BatchMessage) -> None:  # type: ignore[type-arg]
    """Full-reference metrics of the input, every member and the ensemble."""
    from models.metrics import full_reference_metrics

    sharp = _as_original_dtype(work.reference, work.reference.pixels)
    candidates: list[tuple[str, np.ndarray]] = [(INPUT_MODEL, work.decoded.pixels)]
    if len(specs) > 1:
        candidates += [(s.key(), _as_pixels(o)) for s, o in zip(specs, outputs, strict=True)]
    candidates.append((ENSEMBLE_MODEL, work.restored))
    for model, image in candidates:
        figures = full_reference_metrics(_as_original_dtype(work.reference, image), sharp,
                                         crop_border=message.crop_border, align=message.align)
        for name, value in figures.items():
            work.outcome.metrics.append((model, name, value))
    if len(specs) == 1:
        # A single model is its own ensemble: store its figures under its name too.
        key = specs[0].key()
        work.outcome.metrics += [(key, n, v) for m, n, v in list(work.outcome.metrics) if m == ENSEMBLE_MODEL]


def _as_original_dtype(decoded: Any, pixels: np.ndarray) -> np.ndarray:
    """Quantise float [0, 1] pixels exactly as the encoder will when writing the file,
    so stored metrics describe the file that lands in S3."""
    from worker.imageio import quantise

    return quantise(pixels, np.dtype(decoded.dtype))


def add_no_reference_metrics(work: Work) -> None:
    """Sharpness of the input and of the result, which need no ground truth.

    For a multi-page TIFF each figure is the mean over its pages (pages under 8 pixels a side left out), so a
    book's figures describe the book, not its cover.
    """
    from models.metrics import no_reference_metrics

    pairs = [(work.decoded.pixels, work.restored)]
    pairs += [(page.pixels, restored) for page, restored in zip(work.decoded.pages, work.restored_pages, strict=True)]
    pairs = [(before, after) for before, after in pairs if min(before.shape[:2]) >= 8]
    if not pairs:
        return
    for model, side in ((INPUT_MODEL, 0), (ENSEMBLE_MODEL, 1)):
        figures = [no_reference_metrics(pair[side]) for pair in pairs]
        for name in figures[0]:
            work.outcome.metrics.append((model, name, float(np.mean([f[name] for f in figures]))))


def _encode(work: Work, message: BatchMessage) -> None:
    from worker.imageio import content_type, encode_image

    if not message.write_outputs or not work.item.output:
        return
    out_uri = parse_s3_uri(work.item.output, want_prefix=False, exact=True)
    data = encode_image(work.decoded, work.restored, strip_metadata=message.strip_metadata,
                        quality=message.quality, pages=work.restored_pages)
    work.uploads.append((out_uri, data, content_type(work.decoded.format)))
    work.outcome.output_sha256 = hashlib.sha256(data).hexdigest()
    work.outcome.output_uri = str(out_uri)
    if work.members and message.output_root:
        root = parse_s3_uri(message.output_root, want_prefix=True)
        relative = out_uri.relative_to(root)
        for key, pixels in work.members.items():
            member_uri = member_output_uri(root, key, relative)
            work.uploads.append((member_uri, encode_image(work.decoded, pixels, strip_metadata=True),
                                 content_type(work.decoded.format)))
        work.members = {}
    kernels = []
    labels = kernel_labels(sorted(work.kernels)) if len(work.kernels) > 1 else {}
    for index, (model, kernel) in enumerate(sorted(work.kernels.items())):
        target = kernel_uri(out_uri, labels.get(model))
        work.uploads.append((target, kernel_png(kernel), "image/png"))
        kernels.append(str(target))
        if index == 0:
            work.outcome.kernel_uri = str(target)
    if message.sidecar:
        from worker.provenance import provenance_record

        record = provenance_record(message, work.outcome, work.decoded.format, kernels, len(work.decoded.pages) + 1)
        work.uploads.append((sidecar_uri(out_uri), record, "application/json"))


def kernel_png(kernel: np.ndarray) -> bytes:
    """A blur kernel as a 16-bit grey PNG scaled to its maximum (for inspection)."""
    import cv2

    k = np.asarray(kernel, dtype=np.float64)
    k = k / k.max() if k.max() > 0 else k
    ok, buf = cv2.imencode(".png", np.rint(k * 65535).astype(np.uint16))
    if not ok:  # pragma: no cover - OpenCV always encodes a 2-D uint16 array
        raise RuntimeError("could not encode the kernel PNG")
    return io.BytesIO(buf.tobytes()).getvalue()


def _upload(client, work: Work) -> None:  # type: ignore[no-untyped-def]
    """Store the image's output and its artefacts (members, kernels, record). A refusal no retry mends (a key
    the store will not take: its kernel's or record's key is longer than the output's) fails this image alone;
    a passing fault raises, and the batch is retried."""
    def send() -> None:
        for uri, data, kind in work.uploads:
            put_bytes(client, uri, data, kind)

    try:
        _, seconds = _timed(send)
    except InputError as exc:
        work.fail(f"the store refused what was to be written: {exc}")
        seconds = 0.0
    work.outcome.upload_s = seconds
    work.uploads = []


class LeaseKeeper:
    """Renews a batch run's lease on its running images (:func:`db.queries.renew_leases`) from a thread, every
    quarter of the lease, while the run makes progress; a renewal the database refuses is tried at the next tick
    (the lease outlives three misses).

    Progress is a step begun on an image (:meth:`image_started`): its download awaited, its restoration, its
    upload, each timed on its own. Once the current step has taken longer than
    ``image_limit_s`` seconds (``DEBLUR_IMAGE_TIME_LIMIT``) the run is taken for hung (a deadlocked library, a
    device that never answers). In a pool process, the process ends itself (:meth:`_end_hung_process`), as
    Celery's hard time limit would. Otherwise (``--pool solo``, whose process is the worker itself) renewal
    stops, so the lease runs out and the workers' sweep sends the images again, while this run, should it ever
    wake, writes nothing over them (its claim is gone); renewal resumes if the run starts another image. A
    renewal thread alone, ticking on a timer, would keep a hung run's images from every other worker for good.
    """

    def __init__(self, db_url: str, job_id: str, claim: str, lease_s: float, image_limit_s: float) -> None:
        self._db_url, self._job_id, self._claim, self._lease_s = db_url, job_id, claim, lease_s
        self._image_limit_s = image_limit_s
        self._current: tuple[str, float] | None = None  # the image in progress and when it started (monotonic)
        self._given_up: str | None = None  # the image whose current step this keeper gave up on, once said
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim[:8]}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def image_started(self, input_uri: str) -> None:
        """The run began a step on ``input_uri`` (awaiting its download, restoring it, uploading it): the time that
        step may take counts from now."""
        self._current = (input_uri, time.monotonic())
        self._given_up = None  # a later step of the same image that hangs is taken for hung again

    def hung_on(self) -> str | None:
        """The image the run has been on for longer than the image time limit, if it has."""
        current = self._current
        if current is None or time.monotonic() - current[1] <= self._image_limit_s:
            return None
        return current[0]

    def _end_hung_process(self, hung: str) -> None:
        """End this pool process, hung on ``hung``, as Celery's hard time limit would: its slot in the pool would
        otherwise stay taken for good. Its leases end first (best effort), Celery puts its batch back on the queue
        at once (late acknowledgement) and starts a fresh process, and whichever process takes the batch sees this
        one gone and restores its images at once; the hung start counts towards DEBLUR_IMAGE_MAX_ATTEMPTS."""
        log.error("image %s of job %s: one step (its download, restoration or upload) has taken more than %.0f s "
                  "(DEBLUR_IMAGE_TIME_LIMIT): this pool "
                  "process is taken for hung and ends itself; its batch goes back to the queue and the worker starts "
                  "a fresh process", hung, self._job_id, self._image_limit_s)
        def drop() -> None:
            try:
                with session_scope(self._db_url) as session:
                    queries.drop_leases(session, self._job_id, self._claim)
            except Exception:  # the database: the lease runs out by itself
                pass

        # at most a few seconds: the hung code may hold those rows itself, or the database may not answer, and
        # the process must end either way (its lease then runs out by itself)
        dropping = threading.Thread(target=drop, daemon=True)
        dropping.start()
        dropping.join(HUNG_DROP_WAIT_S)
        os.kill(os.getpid(), signal.SIGKILL)

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 4):
            hung = self.hung_on()
            if hung is not None:
                if hung != self._given_up:
                    self._given_up = hung
                    if runtime.in_pool_process():
                        self._end_hung_process(hung)
                    log.error("image %s of job %s: one step (its download, restoration or upload) has taken more "
                              "than %.0f s (DEBLUR_IMAGE_TIME_LIMIT):"
                              " this worker is taken for hung on it and stops renewing its lease, which runs out "
                              "within %.0f s; the workers' sweep then sends its images again (or Redis, after the "
                              "visibility timeout), and this run writes nothing for them", hung, self._job_id,
                              self._image_limit_s, self._lease_s)
                continue
            try:
                with session_scope(self._db_url) as session:
                    queries.renew_leases(session, self._job_id, self._claim, self._lease_s)
            except Exception as exc:  # the database is away: the lease holds a while yet
                log.warning("could not renew the lease on job %s's running images: %s", self._job_id, exc)


HELD_RECHECK_S = 5.0  # after a held lease runs out, before its images are looked at again
HUNG_DROP_WAIT_S = 5.0  # how long a hung pool process waits to end its leases before it ends itself


def run_batch(message: BatchMessage, settings: Settings,
              hand_over: Callable[..., None] | None = None,
              ask_holders: Callable[[dict[str, str]], Collection[str]] | None = None) -> dict[str, int]:
    """Process one batch; returns counts of done and failed images.

    The run claims the images it works on under a lease it renews while it works (:func:`db.queries.claim_images`).
    Another delivery of the same batch (Redis hands a batch to a second worker once it outlives the visibility
    timeout) leaves images that run holds alone: it passes them to ``hand_over`` with a delay (``hand_over(rest,
    seconds)``), so that if the run holding them is lost, its lease runs out and that later task restores them,
    and if not, the later task finds them finished. An image is never restored by two runs at once, and a
    windowed batch frees its slot once (:func:`db.queries.free_slots_of_finished_batches`). A holder whose
    process is gone (a pool process killed: Celery hands its batch on at once) need not be waited out: a sibling
    process of its worker sees that for itself, and ``ask_holders({claim: worker})``, when given, returns the
    claims another worker says are gone (:func:`worker.tasks.gone_claims`).

    With ``hand_over``, a batch still working after ``settings.batch_time_limit``
    seconds starts no further image: the ones done so far are uploaded and
    recorded, the rest are released (pending again, no attempt counted) and
    passed to ``hand_over`` as a new message (the Celery task sends it as a
    new task). A batch of large scans then never outlives the broker's
    visibility timeout, after which Redis would hand the same batch to a
    second worker while the first still works on it. The counts returned
    include a ``handed_over`` entry.

    Raises:
        DeviceFailure: the accelerator failed (:func:`worker.runtime.is_device_failure`). The images done
            before are recorded, the one it struck and the rest are released and handed over, unfailed.
    """
    started = time.monotonic()
    db_url = settings.resolved_database_url()
    worker_name = runtime.hostname()
    claim = new_claim()
    recorded: set[str] = set()

    def record(session: Session, finished: list[Work]) -> None:
        """Record images whose outputs are stored, so a worker lost later in the batch does not redo them."""
        finished = [w for w in finished if w.item.input not in recorded]
        for work in finished:
            if work.outcome.status != "done":
                work.outcome.output_uri = None
                work.outcome.kernel_uri = None
                work.outcome.output_sha256 = None
        written = queries.record_outcomes(session, message.job_id, [w.outcome for w in finished], claim=claim)
        if len(written) < len(finished):
            log.warning("job %s: %d image(s) were taken over by another delivery of their batch while this one "
                        "stalled; that one records them", message.job_id, len(finished) - len(written))
        recorded.update(w.item.input for w in finished)
        queries.free_slots_of_finished_batches(session, message.job_id, written)

    items = _distinct(message.images)
    inputs = [item.input for item in items]
    with session_scope(db_url) as session:
        claimed = queries.claim_images(session, message.job_id, inputs, worker_name, claim, settings.claim_lease)
    # a run that held them is gone (a pool process killed out of memory: Celery hands its batch on at once): its
    # leases end now instead of making the images wait for them to run out. A sibling process of this worker
    # looks for itself; another worker is asked (ask_holders), and one that does not answer is waited out
    orphaned = [holder for holder, worker in claimed.holders.items()
                if worker == worker_name and holder_process_gone(holder)]
    elsewhere = {holder: worker for holder, worker in claimed.holders.items()
                 if worker is not None and worker != worker_name}
    if elsewhere and ask_holders is not None:
        orphaned += [holder for holder in ask_holders(elsewhere) if holder in elsewhere]
    if orphaned:
        with session_scope(db_url) as session:
            for holder in orphaned:
                queries.drop_leases(session, message.job_id, holder)
            again = queries.claim_images(session, message.job_id, claimed.held, worker_name, claim,
                                         settings.claim_lease)
        log.warning("batch of job %s: took over %d image(s) from a lost process of worker(s) %s",
                    message.job_id, len(again.todo), ", ".join(sorted({claimed.holders[h] for h in orphaned})))
        claimed = queries.BatchClaim(claimed.todo + again.todo, again.held, again.held_until, again.holders,
                                     again.held_for)
    todo = set(claimed.todo)
    held_counts = 0
    if claimed.held and hand_over is not None:
        wait = HELD_RECHECK_S + claimed.held_for
        held = set(claimed.held)
        log.warning("batch of job %s: %d image(s) are being restored by another delivery of this batch; they are "
                    "looked at again in %.0f s, in case that one is lost", message.job_id, len(held), wait)
        try:
            hand_over(message.model_copy(update={"images": [i for i in items if i.input in held]}), wait)
        except Exception:  # the broker: the task is retried, and takes what this run claimed at once
            _end_run(db_url, message.job_id, claim, [])
            raise
        held_counts = len(held)
    works = [
        Work(item, queries.ImageOutcome(input_uri=item.input, status="done", worker=worker_name))
        for item in items
        if item.input in todo
    ]
    if not works:
        return batch_counts(0, 0, held_counts)
    client = s3_client(settings)
    started_inputs: list[str] = []  # images started (start_image) in this run, for a passing fault to take back
    try:
        with LeaseKeeper(db_url, message.job_id, claim, settings.claim_lease,
                         settings.resolved_image_time_limit()) as keeper:
            works, leftover, device_failure = _run_works(
                works, message, settings, client, db_url, started, hand_over, record, started_inputs, claim, keeper)
        with session_scope(db_url) as session:
            if leftover:
                queries.release_claims(session, message.job_id, [w.item.input for w in leftover], claim)
            record(session, works)
            spec = _finished_spec(session, message.job_id)
    except (TransientError, OperationalError):
        # storage or the database failed for a while: the batch is retried, and the images it had started were not
        # what took a worker down, so the cap on lost workers must not count these starts (best effort: the
        # database may be what failed); the retry takes the images at once instead of waiting for the lease
        unrecorded = [i for i in started_inputs if i not in recorded]
        _end_run(db_url, message.job_id, claim, unrecorded)
        raise
    except Exception:
        # a bug outside one image's restoration: the task fails the batch's images (worker.tasks), which it leaves
        # alone while they are under a live lease, as it would another delivery's
        _end_run(db_url, message.job_id, claim, [])
        raise
    finally:
        # the results models share within an image (an ensemble's l0-blind and the refiners' prior) go with the
        # batch: kept, every model setting a worker ever ran would hold one full image for the process's life
        shared_results.clear()
    _announce(settings, message.job_id, spec)
    if leftover and hand_over is not None:
        if device_failure is None:  # a warning so it shows in the worker's log (it keeps warnings and errors)
            log.warning("batch of job %s out of time after %d image(s) (%.0f s, limit %d s): handing %d over to a "
                        "new task", message.job_id, len(works), time.monotonic() - started, settings.batch_time_limit,
                        len(leftover))
        try:
            hand_over(message.model_copy(update={"images": [w.item for w in leftover]}))
        except Exception:
            _hold_unsent(db_url, message.job_id, [w.item.input for w in leftover], worker_name, claim)
            if device_failure is None:
                raise
            # the failed device matters more: the worker must stop taking batches, and the images held back are
            # the workers' sweep's to send again a lease later
            log.exception("batch of job %s: the hand-over after the device failure could not be sent",
                          message.job_id)
    done = sum(w.outcome.status == "done" for w in works)
    failed = sum(w.outcome.status != "done" and not w.taken_over for w in works)
    counts = batch_counts(done, failed, len(leftover) + held_counts)
    if device_failure is not None:
        # the image it struck keeps its start: if it is the cause after all (an input that trips a device-side
        # assert), the cap on starts without an outcome fails it after a few workers, as for any crash
        device_failure.counts = counts
        raise device_failure
    return counts


def _hold_unsent(db_url: str, job_id: str, inputs: list[str], worker: str, claim: str) -> None:
    """Images released for a hand-over whose message could not be sent: claimed back under an expired lease.

    Released, they were pending with no message to process them: if the task's own retry could not be sent
    either, nothing would ever look at them again. Claimed back with their lease run out, the task's retry takes
    them at once, and failing that the workers' sweep finds them a lease later (:mod:`worker.sweeper`). Best
    effort: the database may be what failed too.
    """
    try:
        with session_scope(db_url) as session:
            queries.claim_images(session, job_id, inputs, worker, claim, lease_s=0)  # a lease that runs out now
    except Exception:
        log.exception("could not hold %d image(s) of job %s whose hand-over was not sent; 'deblur retry %s "
                      "--stalled' sends them if the batch's retry does not come", len(inputs), job_id, job_id)


def _end_run(db_url: str, job_id: str, claim: str, to_unstart: list[str]) -> None:
    """A run stopped by an exception: take back the starts of ``to_unstart`` (:func:`db.queries.unstart_images`) and
    end the run's leases, so the task's retry, or the failing of its images, need not wait for them to run out
    (best effort: the database may be what failed, and then the leases run out by themselves)."""
    try:
        with session_scope(db_url) as session:
            queries.unstart_images(session, job_id, to_unstart)
            queries.drop_leases(session, job_id, claim)
    except Exception:
        log.warning("could not end the claims of job %s's batch (%d start(s) to take back); they run out in "
                    "DEBLUR_CLAIM_LEASE seconds", job_id, len(to_unstart))


def _run_works(works: list[Work], message: BatchMessage, settings: Settings, client: Any, db_url: str,
               started: float, hand_over: Callable[..., None] | None,
               record: Callable[[Session, list[Work]], None],
               started_inputs: list[str], claim: str,
               keeper: LeaseKeeper) -> tuple[list[Work], list[Work], DeviceFailure | None]:
    """Download, restore, encode and upload the batch's claimed images in turn (see :func:`run_batch`); returns
    the images worked on, those left over (out of time, or after a device failure) and the device failure."""
    leftover: list[Work] = []
    device_failure: DeviceFailure | None = None
    with ThreadPoolExecutor(max_workers=settings.io_threads) as pool:
        # every download starts at once (the pool bounds how many run) and each image waits only for its own,
        # so the first image is restored while the others arrive; each output is uploaded as soon as it is encoded
        downloads = [pool.submit(_download, client, w) for w in works]
        uploads: dict[str, Future[None]] = {}
        for index, work in enumerate(works):
            if index and works[index - 1].item.input in uploads:
                uploads[works[index - 1].item.input].result()  # a failed upload raises: the batch is retried
            if hand_over is not None and index > 0 and out_of_time(started, settings.batch_time_limit):
                leftover = works[index:]
                works = works[:index]
                for pending in downloads[index:]:
                    pending.cancel()
                break
            if index and not downloads[index].done():
                # this image's download is still coming: the time limit counts the wait as this image's, not as the
                # previous one's upload, and the images before it, stored, are recorded now rather than with this
                # one's start, so a store that stalls here holds no finished image back (and, should the process be
                # taken for hung, counts no start against the image before it)
                keeper.image_started(work.item.input)
                with session_scope(db_url) as session:
                    record(session, works[:index])
            try:
                downloads[index].result()  # a storage outage raises TransientError here: the batch is retried
            except TransientError:
                with session_scope(db_url) as session:  # ...and the images before this one, stored, are kept
                    record(session, works[:index])
                raise
            # one transaction: the images before this one, stored, are recorded (if this one takes the worker
            # down, a redelivery skips them instead of restoring and counting them again), and this one starts.
            # It starts first: its image row is locked before the recording locks the job's row (to free a
            # window slot), the order every path keeps, so a delivery claiming this image never deadlocks with it
            with session_scope(db_url) as session:
                starts = queries.start_image(session, message.job_id, work.item.input, claim)
                record(session, works[:index])
            if starts is None:  # another delivery took it over while this run stalled: it is that one's now
                work.fail("taken over by another delivery of its batch")
                work.taken_over = True
                work.data = work.reference_data = None
                continue
            started_inputs.append(work.item.input)
            keeper.image_started(work.item.input)
            if not _within_attempts(work, starts, settings.image_max_attempts) or work.outcome.status != "done":
                work.data = work.reference_data = None  # failed: its bytes are not kept to the batch's end
                continue
            decode_work(work, settings, output_format_of(work.item.output, message))
            if work.outcome.status != "done":
                work.data = work.reference_data = work.decoded = work.reference = None
                continue
            try:
                restore_work(work, message)
                add_no_reference_metrics(work)
                _encode(work, message)
            except InputError as exc:
                work.fail(str(exc))
                work.uploads = []  # a failed image writes nothing, not even the output encoded before the error
            except TransientError:
                raise
            except Exception as exc:  # a model or codec bug must fail this image only
                if runtime.is_device_failure(exc):  # ...but a failed GPU is nobody's image's fault
                    device_failure = DeviceFailure(f"the device failed on {work.item.input}: {type(exc).__name__}: "
                                                   f"{exc}")
                    leftover, works = works[index:], works[:index]
                    work.uploads = []
                    break
                log.exception("image %s failed", work.item.input)
                work.fail(f"{type(exc).__name__}: {exc}")
                work.uploads = []
            work.decoded = work.reference = work.restored = None  # keep memory per batch flat
            work.restored_pages = []
            if work.uploads and not _still_held(db_url, message.job_id, work, claim):
                work.uploads = []
            if work.uploads:
                keeper.image_started(work.item.input)  # its upload gets a time limit of its own
                uploads[work.item.input] = pool.submit(_upload, client, work)
        for upload in uploads.values():
            upload.result()
    return works, leftover, device_failure


def _still_held(db_url: str, job_id: str, work: Work, claim: str) -> bool:
    """Whether this run still holds ``work``'s image before it writes the output (:func:`db.queries.holds`).

    A run frozen past its lease (a paused machine, a database out of reach) may find that another delivery took
    the image over meanwhile: it then writes nothing, so the output in storage is the one whose checksum that
    delivery records. ``work`` is marked taken over. A database that does not answer raises, as any passing
    fault does.
    """
    with session_scope(db_url) as session:
        if queries.holds(session, job_id, work.item.input, claim):
            return True
    log.warning("image %s of job %s was taken over by another delivery of its batch while this one stalled; "
                "its output is left to that one", work.item.input, job_id)
    work.fail("taken over by another delivery of its batch")
    work.taken_over = True
    return False


def _within_attempts(work: Work, starts: int, max_attempts: int) -> bool:
    """False (and ``work`` failed) when its image has started ``starts`` times in a row without an outcome,
    more than ``max_attempts``.

    An image is counted when it starts, not when its batch is claimed, so the one a worker was restoring when it
    died (out of memory, a crash) is the one whose count grows with each redelivery; the images recorded before
    it are not redone and those after it were not started. Without this cap such an image would take every
    worker that picks up its batch down with it, and the rest of the batch would never finish.
    """
    if starts > max_attempts:
        work.fail(f"not tried again: restoring this image lost its worker {starts - 1} times in a row (out of memory, "
                  f"a crash, or a restoration slower than DEBLUR_IMAGE_TIME_LIMIT: see the worker logs); "
                  f"'deblur retry JOB --failed' tries it {max_attempts} times more")
        return False
    return True


def _distinct(images: Sequence[ImageItem]) -> list[ImageItem]:
    """The batch's images, each input once: a job that names an image twice (a manifest and an argument) holds one
    row for it, and recording it twice in one transaction would break the metrics' uniqueness."""
    seen: set[str] = set()
    return [item for item in images if not (item.input in seen or seen.add(item.input))]


def batch_counts(done: int, failed: int, handed_over: int = 0) -> dict[str, int]:
    """What a batch task returns (shown in Flower): images done, failed, and handed to a new task."""
    return {"done": done, "failed": failed, "handed_over": handed_over}


def out_of_time(started: float, limit_s: int) -> bool:
    """Whether a batch begun at ``started`` (``time.monotonic()``) has used its ``limit_s`` seconds (0: never)."""
    return limit_s > 0 and time.monotonic() - started >= limit_s


def fail_batch(message: BatchMessage, settings: Settings, error: str) -> int:
    """Mark every unfinished image of the batch failed (retries exhausted, or an error no retry would mend).

    Returns how many images that was.
    """
    with session_scope(settings.resolved_database_url()) as session:
        outcomes = [
            queries.ImageOutcome(input_uri=item.input, status="failed", error=error, worker=runtime.hostname())
            for item in _distinct(message.images)
        ]
        # what is done stays done, what failed keeps its own reason (and counts once in usage), and what was
        # cancelled meanwhile stays cancelled (a failed image would invite a 'retry --failed' that brings the
        # cancelled job back); an image a delivery of the batch holds under a live lease is that one's to record
        written = queries.record_outcomes(session, message.job_id, outcomes, unfinished_only=True)
        queries.free_slots_of_finished_batches(session, message.job_id, written)
        spec = _finished_spec(session, message.job_id)
    _announce(settings, message.job_id, spec)
    return len(written)


def _finished_spec(session: Session, job_id: str) -> dict[str, Any] | None:
    """Finish the job if its last image was just recorded; the spec of a job this call finished, to announce it."""
    return queries.job_spec(session, job_id) if queries.finish_if_complete(session, job_id) else None


def _announce(settings: Settings, job_id: str, spec: dict[str, Any] | None) -> None:
    """Enqueue the job-finished notification the spec asks for; the batch's results are recorded either way."""
    try:
        announce_if_wanted(settings, job_id, spec)
    except Exception:  # the broker hiccuped after the results were committed: say so, do not fail the batch
        log.exception("could not enqueue the notification of finished job %s", job_id)
