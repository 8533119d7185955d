"""A job's results for people: the paper-style table and a self-contained HTML report.

The table comes from SQL alone (means of the stored per-image metrics and the
image rows' timings), so it scales to any job. The HTML page adds, per model,
a histogram of the per-image gain over the input (inline SVG), and the worst
and best images as side-by-side crops (blurred | each member | ensemble |
sharp) read back from S3, each labelled with its stored PSNR, plus the blur
kernels blind models estimated. Every picture is embedded as a ``data:`` URI:
the file can be mailed or archived and opened anywhere, offline.

Evaluation jobs rank images by the ensemble's PSNR gain over the blurred
input; deblur jobs (no reference) by the ratio of the restored image's
Laplacian variance to the input's.
"""

from __future__ import annotations

import base64
import heapq
import html
import itertools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import select

from db import queries
from db.engine import ensure_schema, session_scope
from db.schema import ENSEMBLE_MODEL, INPUT_MODEL, Image, Metric
from jobs.errors import InputError, StorageNotFoundError
from jobs.layout import kernel_labels, member_kernel_uri
from jobs.review import JUDGED_SHARP, NOT_RESTORED
from jobs.s3uri import parse_s3_uri
from jobs.settings import Settings
from jobs.storage import object_exists, s3_client
from producer.ensembles import Member, decode_from_s3, job_members, member_output_uris
from producer.tracking import default_metric

CROP_SIZE = 160
DEFAULT_CROPS = 3
PAGE = 1000
Metrics = dict[str, dict[str, float | None]]  # {model: {name: value}} of one image


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Column:
    """A table column: the key in :attr:`Row.values`, its title and number format."""

    key: str
    title: str
    digits: int
    signed: bool = False


@dataclass
class Row:
    """One row of the table: a model (``input``, a member's key or ``ensemble``)."""

    model: str
    values: dict[str, float | None]
    images: int
    seconds_per_image: float | None
    non_finite: dict[str, int] = field(default_factory=dict)  # stored metric → infinite values left out of its mean


@dataclass
class ReportTable:
    """The paper-style table of a job, with what a reader needs to trust it."""

    job_id: str
    kind: str
    status: str
    members: list[str]
    columns: list[Column]
    rows: list[Row]
    counts: dict[str, int]
    timing: dict[str, float | None]
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    review: dict[str, int] = field(default_factory=dict)  # done images left as they came, per reason (jobs.review)

    def header(self) -> list[str]:
        return ["model", *(c.title for c in self.columns), "images", "s/image"]

    def cells(self, row: Row) -> list[str]:
        values = [_number(row.values.get(c.key), c.digits, c.signed) for c in self.columns]
        return [row.model, *values, str(row.images), _number(row.seconds_per_image, 3)]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header()) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header()) - 1)) + "|"]
        lines += ["| " + " | ".join(self.cells(row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "kind": self.kind,
            "status": self.status,
            "members": self.members,
            "counts": self.counts,
            "timing": self.timing,
            "rows": [
                {"model": r.model, **r.values, "images": r.images, "seconds_per_image": r.seconds_per_image,
                 "non_finite": r.non_finite}
                for r in self.rows
            ],
            "diagnostics": self.diagnostics,
            "notes": self.notes,
            "review": self.review,
        }


def _number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


EVALUATION_COLUMNS = [
    Column("psnr", "PSNR (dB)", 2),
    Column("ssim", "SSIM", 4),
    Column("delta_psnr", "Δ PSNR (dB)", 2, signed=True),
]
DEBLUR_COLUMNS = [
    Column("laplacian_variance", "sharpness (Laplacian var.)", 6),
    Column("sharpness_ratio", "× input sharpness", 2),
    Column("blur_effect", "blur effect (lower is sharper)", 4),
    Column("disagreement", "member disagreement", 4),
]


def _row_models(kind: str, members: Sequence[Member]) -> list[str]:
    """Rows in paper order: input, each member, ensemble. A single model is its
    own ensemble, so it gets one row; deblur jobs record no per-member outputs."""
    if kind == "deblur":
        return [INPUT_MODEL, ENSEMBLE_MODEL]
    if len(members) == 1:
        return [INPUT_MODEL, members[0].key]
    return [INPUT_MODEL, *(m.key for m in members), ENSEMBLE_MODEL]


def build_table(session: Any, job_id: str) -> ReportTable:
    """The job's table from SQL: means over done images of every stored metric."""
    job = queries.get_job(session, job_id)
    members = job_members(job.spec)
    counts = queries.status_counts(session, job_id)
    timing = queries.job_timing(session, job_id)
    summary = queries.metric_summary(session, job_id)
    means: dict[tuple[str, str], tuple[float | None, int]] = {(s["model"], s["name"]): (s["mean"], s["count"])
                                                              for s in summary}
    left_out = {(s["model"], s["name"]): s["non_finite"] for s in summary if s["non_finite"]}
    models = _row_models(job.kind, members)
    restored = models[-1]
    rows: list[Row] = []
    for model in models:
        seconds = timing["inference_s"] if model == restored else None
        if job.kind == "evaluate":
            psnr, images = means.get((model, "psnr"), (None, 0))
            base = means.get((INPUT_MODEL, "psnr"), (None, 0))[0]
            values = {
                "psnr": psnr,
                "ssim": means.get((model, "ssim"), (None, 0))[0],
                "delta_psnr": None if model == INPUT_MODEL or psnr is None or base is None else psnr - base,
            }
        else:
            sharp, images = means.get((model, "laplacian_variance"), (None, 0))
            base = means.get((INPUT_MODEL, "laplacian_variance"), (None, 0))[0]
            values = {
                "laplacian_variance": sharp,
                "sharpness_ratio": None if model == INPUT_MODEL or not base or sharp is None else sharp / base,
                "blur_effect": means.get((model, "blur_effect"), (None, 0))[0],
                "disagreement": means.get((model, "disagreement"), (None, 0))[0],
            }
        rows.append(Row(model, values, images, seconds,
                        {name: n for (owner, name), n in sorted(left_out.items()) if owner == model}))
    shown = set(models)
    diagnostics: dict[str, dict[str, float]] = {}
    for (model, name), (mean, _) in sorted(means.items()):
        if model not in shown and mean is not None and model not in {INPUT_MODEL, ENSEMBLE_MODEL}:
            diagnostics.setdefault(model, {})[name] = mean
    table = ReportTable(job.id, job.kind, job.status, [m.text for m in members],
                        EVALUATION_COLUMNS if job.kind == "evaluate" else DEBLUR_COLUMNS,
                        rows, counts, timing, diagnostics)
    table.notes.append(
        "s/image is the mean model time per image (all members together, so members have no own figure)"
        + (f"; downloads took {timing['download_s']:.3f} s and uploads {timing['upload_s']:.3f} s per image"
           if timing["download_s"] is not None and timing["upload_s"] is not None else "")
    )
    if job.status != "done":
        table.notes.append(f"the job is {job.status}: figures cover the {counts['done']} images done so far")
    if counts["failed"]:
        table.notes.append(f"{counts['failed']} images failed and are not in the means ('deblur results JOB --failed')")
    if left_out:
        table.notes.append(
            "infinite values are not in the means (a PSNR is infinite where an image equals its reference): "
            + ", ".join(f"{n} of {model} {name}" for (model, name), n in sorted(left_out.items())))
    table.review = queries.review_counts(session, job_id)
    if any(table.review.values()):
        table.notes.append(
            f"{table.review[NOT_RESTORED]} images blurred but not restored (no kernel estimate held) and "
            f"{table.review[JUDGED_SHARP]} judged sharp were left as they came; they are in the means "
            f"('deblur results {job_id[:8]} --review' lists them)")
    if job.kind == "evaluate":
        table.notes.append("SSIM is the 3-D variant the GoPro tables report (ssim_3d in the per-image results)")
    else:
        table.notes.append("no reference: Laplacian variance also rises with noise and ringing, so check the crops")
    return table


# ------------------------------------------------------- per-image statistics


@dataclass
class ImageStats:
    """What one pass over the done images collects for the page."""

    score_name: str
    gains: dict[str, list[float]]  # model → per-image gain over the input
    worst: list[dict[str, Any]]
    best: list[dict[str, Any]]


def _done_metrics(session: Any, job_id: str, names: Sequence[str]) -> Iterator[tuple[int, Metrics]]:
    """``(image id, {model: {name: value}})`` for every done image, streamed in
    id order by one query (no offset paging, so millions of images stay linear)."""
    query = (
        select(Metric.image_id, Metric.model, Metric.name, Metric.value)
        .join(Image, Image.id == Metric.image_id)
        .where(Image.job_id == job_id, Image.status == "done", Metric.name.in_(list(names)))
        .order_by(Metric.image_id)
        .execution_options(yield_per=PAGE)
    )
    for image_id, group in itertools.groupby(session.execute(query), key=lambda r: r[0]):
        by_model: Metrics = {}
        for _, model, name, value in group:
            by_model.setdefault(model, {})[name] = value
        yield int(image_id), by_model


def _rows_by_id(session: Any, ids: Sequence[int]) -> list[dict[str, Any]]:
    images = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(list(ids))))}
    metrics = queries.metrics_for(session, list(ids))
    return [queries.image_dict(images[i], metrics.get(i, {})) for i in ids]


def _metric(by_model: Metrics, model: str, name: str) -> float | None:
    value = by_model.get(model, {}).get(name)
    return None if value is None or math.isnan(value) else float(value)


def image_score(kind: str, by_model: Metrics, model: str) -> float | None:
    """How much ``model`` improved an image, from its metrics by model: PSNR
    gain in dB (evaluation), or the ratio of Laplacian variances
    restored/input (deblur)."""
    name = default_metric(kind)
    out, base = _metric(by_model, model, name), _metric(by_model, INPUT_MODEL, name)
    if out is None or base is None or not (math.isfinite(out) and math.isfinite(base)):
        return None
    if kind == "evaluate":
        return out - base
    return out / base if base else None


def collect_stats(session: Any, table: ReportTable, n: int) -> ImageStats:
    """Per-model gains for the histograms and the ``n`` worst and best images,
    in one streamed pass (memory: one float per image and model, plus 2n ids)."""
    models = [r.model for r in table.rows if r.model != INPUT_MODEL]
    ranked = models[-1]
    gains: dict[str, list[float]] = {m: [] for m in models}
    worst: list[tuple[float, int]] = []  # min-heaps of (key, -id): the root is the first to drop
    best: list[tuple[float, int]] = []
    names = ["psnr"] if table.kind == "evaluate" else ["laplacian_variance"]
    for image_id, by_model in _done_metrics(session, table.job_id, names):
        for model in models:
            score = image_score(table.kind, by_model, model)
            if score is not None:
                gains[model].append(score)
        score = image_score(table.kind, by_model, ranked)
        if score is None or n <= 0:
            continue
        for heap, key in ((worst, -score), (best, score)):
            if len(heap) < n:
                heapq.heappush(heap, (key, -image_id))
            elif (key, -image_id) > heap[0]:
                heapq.heapreplace(heap, (key, -image_id))
    worst_ids = [-i for _, i in sorted(worst, reverse=True)]
    best_ids = [-i for _, i in sorted(best, reverse=True)]
    if set(worst_ids) & set(best_ids):
        # fewer than 2n images: both lists hold the same ones, so split them in halves instead
        ordered = worst_ids + [i for i in reversed(best_ids) if i not in worst_ids]
        half = math.ceil(len(ordered) / 2)
        worst_ids, best_ids = ordered[:half], ordered[half:][::-1]
    name = "PSNR gain over the input (dB)" if table.kind == "evaluate" else "sharpness × input (Laplacian var.)"
    return ImageStats(name, gains, _rows_by_id(session, worst_ids), _rows_by_id(session, best_ids))


# ---------------------------------------------------------------- the crops


@dataclass
class Panel:
    """One labelled picture in a row of crops (``png`` is None when it is missing)."""

    label: str
    caption: str
    png: bytes | None


@dataclass
class CropRow:
    input: str
    score: float | None
    panels: list[Panel]
    kernels: list[Panel]


def detail_window(pixels: np.ndarray, size: int = CROP_SIZE) -> tuple[int, int, int, int]:
    """The ``size``×``size`` window (clipped to the image) with the most gradient
    energy of the luminance, as ``(top, left, height, width)``: where detail,
    and so restoration quality, is visible."""
    from models.metrics import luminance

    luma = luminance(pixels)
    h, w = luma.shape
    wh, ww = min(size, h), min(size, w)
    energy = np.zeros((h + 1, w + 1))
    grad = np.zeros_like(luma)
    grad[:, :-1] += np.diff(luma, axis=1) ** 2
    grad[:-1, :] += np.diff(luma, axis=0) ** 2
    energy[1:, 1:] = grad.cumsum(0).cumsum(1)
    sums = energy[wh:, ww:] - energy[:-wh, ww:] - energy[wh:, :-ww] + energy[:-wh, :-ww]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), wh, ww


def png_bytes(pixels: np.ndarray) -> bytes:
    """8-bit PNG of float [0, 1] pixels (HW, HW1 or HW3 RGB)."""
    import cv2

    arr = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - OpenCV encodes any 8-bit HW/HW3 array
        raise RuntimeError("could not encode a PNG crop")
    return buf.tobytes()


def kernel_png(pixels: np.ndarray, display: int = 96) -> bytes:
    """A kernel image scaled to its maximum and enlarged (nearest neighbour) for display."""
    k = np.asarray(pixels, dtype=np.float64)
    k = k[..., 0] if k.ndim == 3 else k
    k = k / k.max() if k.max() > 0 else k
    factor = max(1, display // max(k.shape))
    return png_bytes(np.kron(k, np.ones((factor, factor))))


def _fetch(client: Any, uri: str | None, max_pixels: int) -> np.ndarray | None:
    if not uri:
        return None
    try:
        return decode_from_s3(client, uri, max_pixels).pixels
    except (StorageNotFoundError, InputError):
        return None


def _kernel_uris(row: dict[str, Any], members: Sequence[Member], client: Any) -> dict[str, str]:
    """Every estimated kernel of an image: the row names the first; with several
    blind members the others sit next to it under the member's name."""
    if not row.get("kernel") or not row.get("output"):
        return {}
    first = row["kernel"]
    # with several blind members the first kernel is named after its member; the others sit next to it
    labels = kernel_labels([m.key for m in members])
    owner = next((m for m in members if first.endswith(f".kernel.{labels[m.key]}.png")), None)
    found: dict[str, str] = {}
    if owner is not None:
        for member in members:
            uri = member_kernel_uri(first, labels[owner.key], labels[member.key])
            if uri == first or (len(members) > 1 and object_exists(client, parse_s3_uri(uri, exact=True))):
                found[member.key] = uri
    if not found:
        label = members[0].key if len(members) == 1 else "estimated kernel"
        found[label] = row["kernel"]
    return found


def _psnr_caption(row: dict[str, Any], model: str) -> str:
    value = _metric(row["metrics_by_model"], model, "psnr")
    return "" if value is None else f"{_number(value, 2)} dB"


def _crop_row(client: Any, row: dict[str, Any], table: ReportTable, members: Sequence[Member],
              spec: dict[str, Any], score: float | None, size: int, max_pixels: int) -> CropRow:
    evaluate = table.kind == "evaluate"
    member_uris = member_output_uris(spec, row["output"]) if evaluate else {}
    # (label, uri, model whose metric is the caption, shown even when it cannot be read)
    sources: list[tuple[str, str | None, str, bool]] = [
        ("blurred" if evaluate else "input", row["input"], INPUT_MODEL, True)
    ]
    sources += [(key, str(uri), key, False) for key, uri in member_uris.items()]
    restored_model = table.rows[-1].model
    label = restored_model if restored_model != ENSEMBLE_MODEL else "ensemble" if evaluate else "restored"
    sources.append((label, row["output"], restored_model, True))
    if evaluate:
        sources.append(("sharp", row["reference"], "", True))
    # panels without a file (no --output) or with member outputs absent are left out
    # (the page's notes say so); a core image that fails to read shows as missing
    fetched = [(source, _fetch(client, source[1], max_pixels)) for source in sources if source[1]]
    fetched = [(source, img) for source, img in fetched if img is not None or source[3]]
    images = [img for _, img in fetched]
    anchor = next((img for img in reversed(images) if img is not None), None)
    panels: list[Panel] = []
    if anchor is not None:
        top, left, h, w = detail_window(anchor, size)
        for (label, _, model, _), img in fetched:
            if evaluate:
                caption = _psnr_caption(row, model) if model else "reference"
            else:
                value = _metric(row["metrics_by_model"], model, "laplacian_variance")
                caption = "" if value is None else f"Laplacian var. {value:.5f}"
            crop = None
            if img is not None and img.shape[:2] == anchor.shape[:2]:
                crop = png_bytes(img[top:top + h, left:left + w])
            panels.append(Panel(label, caption if img is not None else "not available", crop))
    kernels = []
    for label, uri in _kernel_uris(row, members, client).items():
        k = _fetch(client, uri, max_pixels)
        if k is not None:
            kernels.append(Panel(label, f"{k.shape[1]}×{k.shape[0]} px", kernel_png(k)))
    return CropRow(row["input"], score, panels, kernels)


# -------------------------------------------------------------- the report


@dataclass
class Report:
    table: ReportTable
    stats: ImageStats
    worst: list[CropRow]
    best: list[CropRow]
    crop_notes: list[str]
    created: str
    crop_size: int = CROP_SIZE


def build_report(settings: Settings, job_id: str, crops: int = DEFAULT_CROPS, crop_size: int = CROP_SIZE) -> Report:
    """Gather the table, the histograms' data and the crops of the ``crops``
    worst and best images (read from S3 in threads)."""
    if crops < 0:
        raise InputError(f"--crops must be 0 or more, got {crops}")
    url = settings.resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        table = build_table(session, job_id)
        stats = collect_stats(session, table, crops)
        spec = dict(queries.get_job(session, job_id).spec)
    members = job_members(spec)
    notes = []
    worst: list[CropRow] = []
    best: list[CropRow] = []
    if crops and (stats.worst or stats.best):
        client = s3_client(settings)
        if table.kind == "evaluate":
            notes += _member_notes(client, spec, members, (stats.worst + stats.best)[0])
        ranked = table.rows[-1].model
        with ThreadPoolExecutor(max_workers=settings.io_threads) as pool:
            def make(row: dict[str, Any]) -> CropRow:
                score = image_score(table.kind, row["metrics_by_model"], ranked)
                return _crop_row(client, row, table, members, spec, score, crop_size, settings.image_max_pixels)

            worst = list(pool.map(make, stats.worst))
            best = list(pool.map(make, stats.best))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Report(table, stats, worst, best, notes, created, crop_size)


def _member_notes(client: Any, spec: dict[str, Any], members: Sequence[Member], row: dict[str, Any]) -> list[str]:
    """Say why member crops are missing, when they are."""
    if not spec.get("output"):
        return ["the job ran without --output, so no restored images were kept: crops show blurred | sharp only"]
    if len(members) < 2:
        return [f"a single model ({members[0].key if members else '?'}) is its own ensemble: "
                "crops show blurred | restored | sharp"]
    uris = member_output_uris(spec, row["output"])
    if uris and not all(object_exists(client, uri) for uri in uris.values()):
        return ["the members' own outputs (<output>/_members/) are not in storage: "
                "crops show blurred | ensemble | sharp"]
    return []


# ------------------------------------------------------------------- HTML


def histogram_svg(values: Sequence[float], title: str, *, zero: float = 0.0, width: int = 380,
                  height: int = 200) -> str:
    """An inline SVG histogram of ``values``; bars left of ``zero`` (a loss)
    are red, the others green. Returns a note instead when there are none."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return f'<p class="empty">{html.escape(title)}: no finite values</p>'
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = int(min(30, max(5, math.ceil(math.sqrt(finite.size)) + 1)))
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    left, right, top, bottom = 36, 10, 24, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / bins
    parts = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
        f'<text x="{width / 2:.1f}" y="15" text-anchor="middle" class="t">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="ax"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="ax"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="l">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="l">0</text>',
    ]
    for i, count in enumerate(counts):
        h = plot_h * int(count) / peak
        centre = (edges[i] + edges[i + 1]) / 2
        colour = "#c0392b" if centre < zero else "#27ae60"
        parts.append(
            f'<rect x="{left + i * bar_w + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{edges[i]:.3g} … {edges[i + 1]:.3g}: {count}</title></rect>'
        )
    if lo < zero < hi:
        x = left + plot_w * (zero - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" class="zero"/>')
    parts += [
        f'<text x="{left}" y="{height - 18}" class="l">{lo:.3g}</text>',
        f'<text x="{left + plot_w}" y="{height - 18}" text-anchor="end" class="l">{hi:.3g}</text>',
        f'<text x="{width / 2:.1f}" y="{height - 4}" text-anchor="middle" class="l">'
        f'n = {finite.size}, median {float(np.median(finite)):.3g}</text>',
        "</svg>",
    ]
    return "".join(parts)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table.t{border-collapse:collapse}table.t td,table.t th{border-bottom:1px solid #ddd;padding:4px 10px}
table.t td.n{text-align:right;font-variant-numeric:tabular-nums}table.t tr.ens td{font-weight:600}
.meta{color:#555}.note{color:#8a5a00}.hists{display:flex;flex-wrap:wrap;gap:16px}
.hists figcaption{max-width:380px;font-weight:600;font-size:13px}
svg .t{font-size:12px;font-weight:600}svg .l{font-size:10px;fill:#444}svg .ax{stroke:#444}
svg .zero{stroke:#222;stroke-dasharray:3 3}
.crops{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin-bottom:18px}
figure{margin:0;text-align:center}figure img{width:200px;image-rendering:pixelated;border:1px solid #ccc}
figure.k img{width:96px}figcaption{font-size:12px;max-width:200px;overflow-wrap:anywhere}
.missing{width:200px;height:120px;border:1px dashed #bbb;display:flex;align-items:center;justify-content:center;
color:#999}
"""


def _figure(panel: Panel, kernel: bool = False) -> str:
    body = (f'<img alt="{html.escape(panel.label)}" src="{data_uri(panel.png)}">' if panel.png
            else '<div class="missing">not available</div>')
    caption = html.escape(panel.label) + (f"<br>{html.escape(panel.caption)}" if panel.caption else "")
    return f'<figure{" class=k" if kernel else ""}>{body}<figcaption>{caption}</figcaption></figure>'


def _crop_section(title: str, rows: Sequence[CropRow], table: ReportTable) -> str:
    if not rows:
        return ""
    unit = " dB" if table.kind == "evaluate" else "×"
    parts = [f"<h2>{html.escape(title)}</h2>"]
    for row in rows:
        score = "" if row.score is None else f" — {_number(row.score, 2, table.kind == 'evaluate')}{unit}"
        parts.append(f"<h3>{html.escape(row.input)}{html.escape(score)}</h3><div class=crops>")
        parts += [_figure(p) for p in row.panels]
        parts += [_figure(k, kernel=True) for k in row.kernels]
        parts.append("</div>")
    return "".join(parts)


def render_html(report: Report) -> str:
    """The whole page as one string: no external stylesheet, script or image."""
    t = report.table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header())
    body = []
    for row in t.rows:
        cells = t.cells(row)
        tds = [f"<td>{html.escape(cells[0])}</td>"] + [f'<td class=n>{html.escape(c)}</td>' for c in cells[1:]]
        css = ' class=ens' if row is t.rows[-1] else ""
        body.append(f"<tr{css}>{''.join(tds)}</tr>")
    diagnostics = "".join(
        f"<li>{html.escape(model)}: "
        + ", ".join(f"{html.escape(name)} {value:.4g}" for name, value in values.items()) + "</li>"
        for model, values in t.diagnostics.items()
    )
    zero = 0.0 if t.kind == "evaluate" else 1.0
    hists = "".join(
        f"<figure><figcaption>{html.escape(model)}</figcaption>"
        f"{histogram_svg(values, report.stats.score_name, zero=zero)}</figure>"
        for model, values in report.stats.gains.items()
    )
    notes = "".join(f'<li class=note>{html.escape(n)}</li>' for n in [*t.notes, *report.crop_notes])
    c = t.counts
    ranked = "ensemble" if t.rows[-1].model == ENSEMBLE_MODEL else t.rows[-1].model
    ranking = (f"{html.escape(ranked)} PSNR gain over the blurred input" if t.kind == "evaluate"
               else "ratio of the restored image's Laplacian variance to the input's")
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>deblur report {html.escape(t.job_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{'evaluation' if t.kind == 'evaluate' else 'deblur'} job {html.escape(t.job_id)}</h1>",
        f"<p class=meta>status {html.escape(t.status)} · {c['done']} done, {c['failed']} failed, "
        f"{sum(c.values())} images · members: {html.escape(', '.join(t.members))} · generated {report.created}</p>",
        f"<table class=t><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        f"<ul>{notes}</ul>",
        f"<h2>Diagnostics</h2><ul>{diagnostics}</ul>" if diagnostics else "",
        f"<h2>Per-image {html.escape(report.stats.score_name)}</h2><div class=hists>{hists}</div>",
        f"<p class=meta>Crops: the most detailed {report.crop_size}×{report.crop_size} window of each image, ranked by the "
        f"{ranking}; captions give the whole image's stored metric.</p>" if report.worst or report.best else "",
        _crop_section("Worst images", report.worst, t),
        _crop_section("Best images", report.best, t),
        "</body></html>\n",
    ])
