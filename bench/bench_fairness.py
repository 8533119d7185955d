"""How long a small job waits behind a large one at the same priority, with and without a per-job window.

On the local stack (Redis, S3 endpoint, SQLite, one worker), a LARGE job is
submitted, then a SMALL one at the same priority; both restore the same kind of
images with the same model. For each window (0: every batch at submission,
first come first served; N: at most N of a job's batches in the broker) it
prints the small job's latency (its submission to its last image), the large
job's time, and the time until both are done. The windows alternate for
``--rounds`` rounds in one invocation, so their ratio is meaningful on a noisy
machine.

    python bench/bench_fairness.py [--large 48] [--small 4] [--window 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=48, help="images of the large job (default 48)")
    parser.add_argument("--small", type=int, default=4, help="images of the small job (default 4)")
    parser.add_argument("--size", type=int, default=256, help="side of the square images in px (default 256)")
    parser.add_argument("--model", default="wiener", help="model spec (default wiener)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per task (default 2)")
    parser.add_argument("--window", type=int, default=2, help="the window compared with none (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both settings, alternated (default 2)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="deblur-bench-"))
    os.environ["DEBLUR_HOME"] = str(home)
    os.environ.setdefault("DEBLUR_TORCH_THREADS", "1")
    for name in ("DEBLUR_BROKER_URL", "DEBLUR_S3_ENDPOINT_URL", "DEBLUR_DATABASE_URL"):
        os.environ.pop(name, None)

    from bench.synthetic_uploads import upload_blurred_crops
    from deploy.stack import LocalStack
    from jobs.settings import load_settings
    from jobs.storage import s3_client
    from producer.submit import JobRequest, submit
    from producer.tracking import job_status

    stack = LocalStack(home)
    stack.up(echo=lambda _msg: None)
    results: dict[int, list[tuple[float, float, float]]] = {0: [], args.window: []}
    try:
        settings = load_settings()
        client = s3_client(settings)
        client.create_bucket(Bucket="bench")
        for prefix, count in (("large", args.large), ("small", args.small)):
            upload_blurred_crops(client, "bench", f"{prefix}/", count, args.size)

        def run(window: int, round_: int) -> tuple[float, float, float]:
            def job(prefix: str) -> str:
                return submit(JobRequest(kind="deblur", inputs=[f"s3://bench/{prefix}/"],
                                         output=f"s3://bench/out-{window}-{round_}/{prefix}/", models=[args.model],
                                         batch_size=args.batch_size, window=window), settings).job_id

            start = time.perf_counter()
            large = job("large")
            small_start = time.perf_counter()
            small = job("small")
            finished: dict[str, float] = {}
            while len(finished) < 2:
                for name, job_id in (("large", large), ("small", small)):
                    if name not in finished and job_status(settings, job_id)["status"] in {"done", "failed"}:
                        finished[name] = time.perf_counter()
                time.sleep(0.1)
            return finished["small"] - small_start, finished["large"] - start, max(finished.values()) - start

        run(0, -1)  # the worker loads the model once, outside the figures
        for round_ in range(args.rounds):
            for window in (0, args.window):
                results[window].append(run(window, round_))
                small_s, large_s, both_s = results[window][-1]
                print(f"round {round_ + 1}, window {window}: small job {small_s:6.2f} s, large job {large_s:6.2f} s, "
                      f"both {both_s:6.2f} s", flush=True)
    finally:
        stack.down(echo=lambda _msg: None)

    print(f"\n{args.large} + {args.small} images of {args.size} px, {args.model}, batches of {args.batch_size}, "
          f"one worker; medians of {args.rounds} rounds")
    print(f"{'window':>8} {'small job':>10} {'large job':>10} {'both':>8}")
    for window, runs in results.items():
        small_s, large_s, both_s = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{window:>8} {small_s:9.2f}s {large_s:9.2f}s {both_s:7.2f}s")
    base, windowed = (statistics.median(r[0] for r in results[w]) for w in (0, args.window))
    print(f"the small job's latency with a window of {args.window}: {windowed / base:.2f} of first come, first "
          "served")


if __name__ == "__main__":
    main()
