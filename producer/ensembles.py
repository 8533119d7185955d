"""Ensemble weights fitted from an evaluation job, and their use at submission.

An evaluation job run with several ``--model`` and an ``--output`` keeps each
member's restoration at ``<output>/_members/<model>/<relative path>``.
:func:`fit_ensemble` reads those outputs and the sharp images back from S3
(in threads), fits non-negative weights that sum to one and maximise PSNR
(:func:`models.ensemble.fit_weights`) and saves them as a named ensemble;
:func:`expand_request` turns ``--ensemble NAME`` back into member specs.

Importing this module needs no torch or OpenCV (``deblur submit --ensemble``
runs on producer installs); fitting imports them when called.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from db import queries
from db.engine import ensure_schema, session_scope
from db.ensembles import get_ensemble, save_ensemble
from jobs.errors import InputError, StorageNotFoundError
from jobs.layout import member_output_uri
from jobs.s3uri import S3URI, parse_s3_uri
from jobs.settings import Settings
from jobs.storage import get_bytes, object_exists, s3_client
from models.catalog import REGISTRY

if TYPE_CHECKING:
    from producer.submit import JobRequest
    from worker.imageio import DecodedImage

Progress = Callable[[int, int], None]
DEFAULT_MAX_IMAGES = 200
# Each image is fitted on at most this square of its centre: 200 scans of 12 megapixels with three members would
# otherwise be held in memory whole (about 29 GB) for a fit that samples 200,000 pixels of them.
FIT_SIDE = 1024
# Weights below this are stored as 0 and their member is not run.
WEIGHT_EPSILON = 1e-6


class EnsembleFitError(InputError):
    """The job cannot be used to fit ensemble weights; the message says why and what to do."""


@dataclass(frozen=True)
class Member:
    """One member of a job: its spec text as submitted and its key (metrics, output folder)."""

    text: str
    key: str


def job_members(spec: dict[str, Any]) -> list[Member]:
    """The members recorded in a job's spec, in submission order. A model no
    longer in the registry keeps its text as key, so old jobs stay readable."""
    members = []
    for text in spec.get("models", []):
        try:
            key = REGISTRY.parse(text).key()
        except InputError:
            key = text
        members.append(Member(text, key))
    return members


def member_output_uris(spec: dict[str, Any], output_uri: str | None) -> dict[str, S3URI]:
    """Where an evaluation job wrote each member's output for the image whose
    ensemble output is ``output_uri`` (empty when the job kept none: no
    ``--output`` or a single member)."""
    members = job_members(spec)
    if output_uri is None or not spec.get("output") or len(members) < 2:
        return {}
    root = parse_s3_uri(spec["output"], want_prefix=True)
    relative = parse_s3_uri(output_uri, want_prefix=False, exact=True).relative_to(root)
    return {m.key: member_output_uri(root, m.key, relative) for m in members}


def decode_from_s3(client: Any, uri: S3URI | str, max_pixels: int | None = None) -> DecodedImage:
    """Download and decode one image (PNG, JPEG, TIFF, WebP) from S3."""
    from worker.imageio import decode_image

    parsed = parse_s3_uri(str(uri), want_prefix=False, exact=True)
    return decode_image(get_bytes(client, parsed), str(parsed), max_pixels=max_pixels)


def stored_samples(image: DecodedImage) -> np.ndarray:
    """The decoded pixels (H×W×C) back in the file's own sample type, as the
    metrics see them: uint8/uint16 take a quarter/half the memory of float32."""
    from worker.imageio import quantise

    return quantise(image.pixels, np.dtype(image.dtype))


@dataclass(frozen=True)
class FitResult:
    """What ``deblur ensemble fit`` found and saved."""

    name: str
    job_id: str
    members: list[str]  # "NAME[:PARAMS]:WEIGHT" as saved
    weights: list[float]
    psnr_fitted: float
    psnr_equal: float
    images_used: int
    images_done: int
    job_status: str

    @property
    def gain_db(self) -> float:
        return self.psnr_fitted - self.psnr_equal


def weighted_texts(members: Sequence[Member], weights: Sequence[float]) -> list[str]:
    """Member specs with their fitted weight spelled out: ``key:weight``."""
    texts = []
    for member, weight in zip(members, weights, strict=True):
        w = 0.0 if weight < WEIGHT_EPSILON else round(float(weight), 6)
        texts.append(f"{member.key}:{w:.6g}")
    return texts


def _check_job(job_id: str, kind: str, spec: dict[str, Any], done: int, status: str) -> list[Member]:
    members = job_members(spec)
    if kind != "evaluate":
        raise EnsembleFitError(
            f"job {job_id} is a {kind} job; fitting weights needs an evaluation job with sharp references: "
            "deblur evaluate --blurred … --sharp … --model A --model B --output s3://…/"
        )
    if len(members) < 2:
        names = ", ".join(m.text for m in members) or "none"
        raise EnsembleFitError(
            f"job {job_id} evaluated a single model ({names}); there are no weights to fit. "
            "Run an evaluation with two or more --model"
        )
    if spec.get("align"):
        raise EnsembleFitError(
            f"job {job_id} was evaluated with --align (RealBlur's protocol), which the fit cannot apply to the "
            "members' outputs: its weights would be fitted on misregistered pairs. Fit on an evaluation without "
            "--align (pairs in register, such as synthetic blur)"
        )
    if not spec.get("output"):
        raise EnsembleFitError(
            f"job {job_id} ran without --output, so its members' outputs were not kept; "
            "rerun the evaluation with --output s3://bucket/prefix/"
        )
    if done == 0:
        raise EnsembleFitError(f"job {job_id} has no finished images yet (status {status}); wait for it to finish")
    return members


def _choose(rows: list[dict[str, Any]], max_images: int) -> list[dict[str, Any]]:
    if len(rows) <= max_images:
        return rows
    picked = sorted(random.Random(0).sample(range(len(rows)), max_images))
    return [rows[i] for i in picked]


def _load_pair(client: Any, row: dict[str, Any], spec: dict[str, Any], members: Sequence[Member],
               max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    uris = member_output_uris(spec, row["output"])
    outputs = [stored_samples(decode_from_s3(client, uris[m.key], max_pixels)) for m in members]
    sharp = stored_samples(decode_from_s3(client, row["reference"], max_pixels))
    for member, out in zip(members, outputs, strict=True):
        if out.shape != sharp.shape:
            raise EnsembleFitError(
                f"{uris[member.key]} is {out.shape} but its sharp image {row['reference']} is {sharp.shape}; "
                "the member outputs do not match the references"
            )
    # measured as the job measured it (its border crop, no alpha), on at most FIT_SIDE² of the centre
    border = int(spec.get("crop_border") or 0)
    return np.stack([_fit_region(out, border) for out in outputs]), _fit_region(sharp, border)


def _fit_region(image: np.ndarray, border: int) -> np.ndarray:
    """The pixels of ``image`` (H×W[×C]) a fit measures: without the job's ``border`` and any alpha channel, and at
    most :data:`FIT_SIDE` square from the centre of what remains."""
    if image.ndim == 3 and image.shape[2] in (2, 4):
        image = image[..., :-1]
    if border and min(image.shape[:2]) > 2 * border:
        image = image[border:-border, border:-border]
    h, w = image.shape[:2]
    top, left = max(0, (h - FIT_SIDE) // 2), max(0, (w - FIT_SIDE) // 2)
    return np.ascontiguousarray(image[top:top + FIT_SIDE, left:left + FIT_SIDE])


def fit_ensemble(
    settings: Settings,
    job_id: str,
    name: str,
    *,
    replace: bool = False,
    threads: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    progress: Progress | None = None,
) -> FitResult:
    """Fit member weights on evaluation job ``job_id`` and save them as ``name``.

    Reads every member's output and the sharp image of (at most
    ``max_images``, a reproducible random subset of) the job's done images,
    fits with :func:`models.ensemble.fit_weights` and saves the weights as
    ``key:weight`` specs. Raises :class:`EnsembleFitError` naming the problem
    when the job is not a finished multi-member evaluation with ``--output``.
    """
    from db.ensembles import check_name
    from models.ensemble import fit_weights

    check_name(name)
    if max_images < 1:
        raise InputError(f"--max-images must be at least 1, got {max_images}")
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        job = queries.get_job(session, job_id)
        kind, spec, status = job.kind, dict(job.spec), job.status
        rows = queries.image_rows(session, job_id, status="done")
    members = _check_job(job_id, kind, spec, len(rows), status)
    client = s3_client(settings)
    first = member_output_uris(spec, rows[0]["output"])
    missing = [str(uri) for uri in first.values() if not object_exists(client, uri)]
    if missing:
        raise EnsembleFitError(
            f"job {job_id} has no member outputs under {spec['output']}_members/ (missing: {', '.join(missing)}); "
            "they are written by workers of this version for evaluation jobs with several --model and --output"
        )
    chosen = _choose(rows, max_images)
    stacks: list[np.ndarray | None] = [None] * len(chosen)
    targets: list[np.ndarray | None] = [None] * len(chosen)
    with ThreadPoolExecutor(max_workers=threads or settings.io_threads) as pool:
        futures = {
            pool.submit(_load_pair, client, row, spec, members, settings.image_max_pixels): i
            for i, row in enumerate(chosen)
        }
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                stacks[i], targets[i] = future.result()
            except StorageNotFoundError as exc:
                raise EnsembleFitError(f"image {chosen[i]['input']}: {exc}") from None
            if progress:
                progress(done, len(chosen))
    weights, report = fit_weights([s for s in stacks if s is not None], [t for t in targets if t is not None])
    texts = weighted_texts(members, [float(w) for w in weights])
    with session_scope(url) as session:
        save_ensemble(session, name, texts, source_job_id=job_id, psnr_fitted=report.psnr_fitted,
                      psnr_equal=report.psnr_equal, images=report.images, replace=replace)
    return FitResult(name=name, job_id=job_id, members=texts, weights=[float(w) for w in weights],
                     psnr_fitted=report.psnr_fitted, psnr_equal=report.psnr_equal, images_used=len(chosen),
                     images_done=len(rows), job_status=status)


def ensemble_members(settings: Settings, name: str) -> list[str]:
    """The member specs to run for the saved ensemble ``name`` (members whose
    fitted weight is zero are left out: they would cost a model run and add nothing)."""
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        saved = list(get_ensemble(session, name).members)
    kept = [text for text in saved if REGISTRY.parse(text).weight > 0]
    if not kept:
        raise InputError(f"ensemble {name!r} has no member with a positive weight ({', '.join(saved)}); refit it")
    return kept


def expand_request(request: JobRequest, settings: Settings) -> JobRequest:
    """Replace ``request.ensemble`` by its saved members (``--ensemble`` and
    ``--model`` together are refused: a named ensemble fixes its members)."""
    if request.ensemble is None:
        return request
    if request.models:
        raise InputError(
            f"--ensemble {request.ensemble!r} and --model {' '.join(request.models)} conflict: a named ensemble "
            "fixes its members and weights; give one or the other"
        )
    return dataclasses.replace(request, models=ensemble_members(settings, request.ensemble))
