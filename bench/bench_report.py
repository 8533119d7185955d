"""How long `deblur report` takes to build its table and statistics from SQL
for a large evaluation job (no S3 reads: crops need a few images only).

Fills a fresh SQLite file with N done images of an evaluation job with two
members, each image holding the metrics a worker stores (psnr, ssim, ssim_3d,
ssim_channel_mean for input, both members and the ensemble), then times the
table (SQL means), the streamed per-image pass (histograms, worst/best) and the
HTML rendering.

    python bench/bench_report.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from db import queries
from db.engine import ensure_schema, session_scope
from producer.report import Report, build_table, collect_stats, render_html

MEMBERS = ["wiener:psf=gaussian:sigma=1.5", "richardson-lucy:iterations=10"]


def fill(url: str, n: int) -> str:
    rng = np.random.default_rng(0)
    ensure_schema(url)
    with session_scope(url) as session:
        job, _ = queries.create_job(session, "evaluate", {"models": MEMBERS, "output": None})
        job_id = job.id
    for start in range(0, n, 1000):
        inputs = [f"s3://b/blur/{i:07d}.png" for i in range(start, min(n, start + 1000))]
        with session_scope(url) as session:
            queries.insert_images(session, job_id, [{"input_uri": u} for u in inputs], batch=start // 1000)
            outcomes = []
            for u in inputs:
                base = float(rng.normal(27, 2))
                metrics = []
                for model, gain in (("input", 0.0), (MEMBERS[0], rng.normal(2.5, 1)), (MEMBERS[1], rng.normal(2, 1)),
                                    ("ensemble", rng.normal(2.6, 0.8))):
                    for name in ("psnr", "ssim", "ssim_3d", "ssim_channel_mean"):
                        metrics.append((model, name, base + gain if name == "psnr" else float(rng.uniform(0.8, 1))))
                outcomes.append(queries.ImageOutcome(u, "done", inference_s=0.1, download_s=0.01, upload_s=0.01,
                                                     metrics=metrics))
            queries.record_outcomes(session, job_id, outcomes)
    return job_id


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        start = time.perf_counter()
        job_id = fill(url, n)
        print(f"filled {n} images x 16 metrics in {time.perf_counter() - start:.1f} s")
        with session_scope(url) as session:
            t0 = time.perf_counter()
            table = build_table(session, job_id)
            t1 = time.perf_counter()
            stats = collect_stats(session, table, 3)
            t2 = time.perf_counter()
        page = render_html(Report(table, stats, [], [], [], "bench"))
        t3 = time.perf_counter()
        print(f"table (SQL means):            {t1 - t0:.3f} s")
        print(f"per-image pass (histograms):  {t2 - t1:.3f} s  ({n / (t2 - t1):,.0f} images/s)")
        print(f"HTML without crops:           {t3 - t2:.3f} s  ({len(page) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
