"""``deblur demo``: the whole product on this machine in one command.

Brings the local stack up (Redis, S3 endpoint, SQLite, a worker, Flower),
uploads a handful of photographs that ship inside installed packages, blurred
with a known camera-shake kernel, submits a real ensemble deblur job, shows
its progress, prints the per-image table from SQL and leaves the outputs in S3.
"""

from __future__ import annotations

import sys

import click
import numpy as np
from rich.console import Console

console = Console(stderr=True)
out = Console()

DEMO_BUCKET = "deblur-demo"
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "china")


def demo_images(max_side: int, seed: int = 7) -> list[tuple[str, bytes, bytes]]:
    """(relative key, blurred file bytes, sharp file bytes) for the demo photographs.

    Mixed formats on purpose: PNG, JPEG, a 16-bit TIFF, a lossless JPEG 2000, WebP and a 16-bit PNG.
    """
    import cv2
    import imagecodecs

    from models.synthetic_blur import blur_image, random_motion_kernel, sample_photographs

    rng = np.random.default_rng(seed)
    photos = sample_photographs()
    kernel = random_motion_kernel(15, rng, intensity=0.6)
    items: list[tuple[str, bytes, bytes]] = []
    for index, name in enumerate(n for n in DEMO_PHOTOS if n in photos):
        image = photos[name].astype(np.float64) / 255.0
        scale = max_side / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        blurred = blur_image(image, kernel, noise_sigma=0.005, rng=rng)
        ext, depth = [(".png", 8), (".jpg", 8), (".tif", 16), (".jp2", 8), (".webp", 8), (".png", 16)][index % 6]
        top = 65535 if depth == 16 else 255
        dtype = np.uint16 if depth == 16 else np.uint8

        def encode(pixels: np.ndarray) -> bytes:
            arr = np.clip(np.rint(pixels * top), 0, top).astype(dtype)
            if ext == ".jp2":  # OpenCV writes JPEG 2000 lossy by default; an archive master is lossless
                return bytes(imagecodecs.jpeg2k_encode(arr, codecformat="JP2"))
            if arr.ndim == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
            ok, buf = cv2.imencode(ext, arr, params)
            if not ok:
                raise RuntimeError(f"could not encode {name}{ext}")
            return buf.tobytes()

        folder = "portraits" if name in {"astronaut", "camera"} else "objects"
        items.append((f"{folder}/{name}{ext}", encode(blurred), encode(image)))
    return items


@click.command("demo")
@click.option("--max-side", type=click.IntRange(64, 4096), default=384, show_default=True, show_envvar=True,
              help="Resize the sample photographs so their longer side is at most this many pixels.")
@click.option("--model", "-m", "models", multiple=True, show_envvar=True,
              help="Models to use (NAME[:PARAMS][:WEIGHT], repeatable). Default: the default ensemble.")
@click.option("--timeout", type=click.IntRange(10), default=1800, show_default=True, show_envvar=True,
              help="Give up waiting for the job after this many seconds.")
def demo_command(max_side: int, models: tuple[str, ...], timeout: int) -> None:
    """Start the local stack and run a real deblur job end to end.

    \b
    1. 'deblur stack up': Redis, an S3 endpoint, SQLite, a worker and Flower on loopback
    2. uploads sample photographs blurred with a known camera-shake kernel to s3://deblur-demo/blurred/
    3. submits an ensemble deblur job to s3://deblur-demo/restored/ and shows its progress
    4. prints the per-image results from SQL and where to look next
    The stack keeps running afterwards; stop it with 'deblur stack down'.
    """
    from deploy.stack import LocalStack, stack_settings
    from jobs.storage import s3_client
    from producer.submit import JobRequest, submit
    from producer.tracking import fetch_results, print_status, results_table, watch

    console.rule("[bold]1. local stack")
    connection = LocalStack().up(echo=lambda msg: console.print(f"  {msg}"))
    # the services up answered with, even where DEBLUR_BROKER_URL or DEBLUR_S3_ENDPOINT_URL name dead ones
    settings = stack_settings(connection)
    client = s3_client(settings)

    console.rule("[bold]2. sample photographs")
    try:
        client.create_bucket(Bucket=DEMO_BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    images = demo_images(max_side)
    for key, blurred, sharp in images:
        client.put_object(Bucket=DEMO_BUCKET, Key=f"blurred/{key}", Body=blurred)
        client.put_object(Bucket=DEMO_BUCKET, Key=f"sharp/{key}", Body=sharp)
        console.print(f"  uploaded s3://{DEMO_BUCKET}/blurred/{key}")

    console.rule("[bold]3. deblur job")
    request = JobRequest(kind="deblur", inputs=[f"s3://{DEMO_BUCKET}/blurred/"],
                         output=f"s3://{DEMO_BUCKET}/restored/", models=list(models), batch_size=2)
    result = submit(request, settings)
    console.print(f"  job {result.job_id}: {result.total} images, models: "
                  f"{', '.join(request.validated_models())}")
    info = watch(settings, result.job_id, console, timeout=timeout)
    print_status(info, console)

    console.rule("[bold]4. results (from SQL)")
    results_table(fetch_results(settings, result.job_id), out)
    flower = f"http://{connection.get('flower_address', '127.0.0.1')}:{connection.get('flower_port')}"
    console.print(
        f"\nrestored images: s3://{DEMO_BUCKET}/restored/ on {settings.s3_endpoint_url}\n"
        f"Flower:          {flower}\n"
        f"database:        {settings.resolved_database_url()}\n"
        f"results as JSON: deblur results {result.job_id} --format json\n"
        f"measure PSNR:    deblur evaluate --blurred s3://{DEMO_BUCKET}/blurred/ "
        f"--sharp s3://{DEMO_BUCKET}/sharp/ --wait\n"
        "stop the stack:  deblur stack down"
    )
    if info["status"] != "done" or info["counts"]["failed"]:
        sys.exit(1)
