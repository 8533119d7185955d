"""Queue overhead: the same restoration through the job queue and as a plain script loop.

Both sides run in one invocation on the same images and model, so their ratio
is meaningful on a noisy machine:

* **script loop**: for each key, download from S3, decode, restore, encode,
  upload — sequentially in this process (what a team would write by hand);
* **deblur**: ``submit`` a job to the local stack (Redis, S3 endpoint, SQLite,
  one worker with ``--concurrency`` processes) and wait until SQL says done.

It prints images/s for each and the queue's overhead per image. The stack is
started in a temporary ``DEBLUR_HOME`` and stopped afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=48, help="images (default 48)")
    parser.add_argument("--size", type=int, default=256, help="side of the square test images in px (default 256)")
    parser.add_argument("--model", default="wiener", help="model spec (default wiener)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per task (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="deblur-bench-"))
    os.environ["DEBLUR_HOME"] = str(home)
    os.environ["DEBLUR_TORCH_THREADS"] = str(args.threads)
    for name in ("DEBLUR_BROKER_URL", "DEBLUR_S3_ENDPOINT_URL", "DEBLUR_DATABASE_URL"):
        os.environ.pop(name, None)

    import torch

    from deploy.stack import LocalStack
    from jobs.messages import BatchMessage, ImageItem
    from bench.synthetic_uploads import upload_blurred_crops
    from jobs.settings import load_settings
    from jobs.storage import get_bytes, put_bytes, s3_client
    from jobs.s3uri import parse_s3_uri
    from producer.submit import JobRequest, submit
    from producer.tracking import job_status
    from worker.imageio import content_type, decode_image, encode_image

    torch.set_num_threads(args.threads)
    stack = LocalStack(home)
    stack.up(echo=lambda _msg: None)
    try:
        settings = load_settings()
        client = s3_client(settings)
        client.create_bucket(Bucket="bench")
        keys = upload_blurred_crops(client, "bench", "in/", args.count, args.size)

        # side 1: a plain script loop in this process
        from worker.pipeline import Work, decode_work, restore_work  # the same per-image code the worker runs
        from db.queries import ImageOutcome

        message = BatchMessage(job_id="bench", kind="deblur", models=[args.model],
                               images=[ImageItem(input=f"s3://bench/{k}") for k in keys[:1]])
        warm = Work(message.images[0], ImageOutcome(input_uri="", status="done"))
        warm.data = get_bytes(client, parse_s3_uri(f"s3://bench/{keys[0]}"))
        decode_work(warm, settings)
        restore_work(warm, message)  # loads the model once, outside the timing
        start = time.perf_counter()
        for key in keys:
            data = get_bytes(client, parse_s3_uri(f"s3://bench/{key}"))
            decoded = decode_image(data, key)
            work = Work(ImageItem(input=f"s3://bench/{key}"), ImageOutcome(input_uri=key, status="done"))
            work.decoded = decoded
            restore_work(work, message)
            put_bytes(client, parse_s3_uri(f"s3://bench/loop/{key}"), encode_image(decoded, work.restored),
                      content_type(decoded.format))
        loop_s = time.perf_counter() - start

        # side 2: the same images through the queue
        start = time.perf_counter()
        result = submit(JobRequest(kind="deblur", inputs=["s3://bench/in/"], output="s3://bench/queue/",
                                   models=[args.model], batch_size=args.batch_size), settings)
        while True:
            info = job_status(settings, result.job_id)
            if info["status"] in {"done", "failed", "cancelled"}:
                break
            time.sleep(0.2)
        queue_s = time.perf_counter() - start
        done = info["counts"]["done"]
    finally:
        stack.down(echo=lambda _msg: None)

    print(f"images: {args.count} of {args.size}x{args.size} px, model {args.model}, "
          f"{args.threads} torch thread(s), batch size {args.batch_size}")
    print(f"script loop : {loop_s:7.2f} s  {args.count / loop_s:6.2f} images/s")
    print(f"deblur queue: {queue_s:7.2f} s  {done / queue_s:6.2f} images/s  (done {done}/{args.count}, "
          "includes listing, SQL rows, metrics and the first model load in the worker)")
    print(f"ratio queue/loop time: {queue_s / loop_s:.2f}; overhead per image: "
          f"{(queue_s - loop_s) / args.count * 1000:.0f} ms")


if __name__ == "__main__":
    main()
