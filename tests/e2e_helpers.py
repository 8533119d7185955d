"""Building blocks for end-to-end tests: sample images, a worker process, Flower."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import cv2
import numpy as np

from tests.conftest import free_port, stop, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    relative: str
    data: bytes
    fmt: str
    dtype: str
    channels: int
    shape: tuple[int, int]


def _photo(h: int, w: int, offset: int = 0) -> np.ndarray:
    from skimage import data

    img = data.astronaut()[100 + offset:100 + offset + h, 150:150 + w]
    return np.ascontiguousarray(img)


def _blurred(rgb: np.ndarray) -> np.ndarray:
    from models.synthetic_blur import blur_image, linear_motion_kernel

    out = blur_image(rgb.astype(np.float64) / 255.0, linear_motion_kernel(7, 30))
    return out


def _encode(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, arr, params or [])
    if not ok:
        raise RuntimeError(f"could not encode {ext}")
    return buf.tobytes()


def mixed_samples() -> list[Sample]:
    """Twelve small images of mixed formats (JPEG 2000 and BMP among them), depths and layouts, in nested folders."""
    samples: list[Sample] = []

    def add(relative: str, ext: str, arr: np.ndarray, fmt: str, params: list[int] | None = None) -> None:
        channels = 1 if arr.ndim == 2 else arr.shape[2]
        samples.append(Sample(relative, _encode(ext, arr, params), fmt, str(arr.dtype), channels, arr.shape[:2]))

    for i in range(12):
        rgb = _blurred(_photo(72, 96, offset=i * 7))
        bgr8 = cv2.cvtColor(np.rint(rgb * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        bgr16 = cv2.cvtColor(np.rint(rgb * 65535).astype(np.uint16), cv2.COLOR_RGB2BGR)
        grey8 = cv2.cvtColor(bgr8, cv2.COLOR_BGR2GRAY)
        kind = i % 10
        if kind == 0:
            add(f"a/rgb8_{i}.png", ".png", bgr8, "png")
        elif kind == 1:
            add(f"a/rgb16_{i}.png", ".png", bgr16, "png")
        elif kind == 2:
            alpha = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (72, 1))
            add(f"b/rgba_{i}.png", ".png", np.dstack([bgr8, alpha]), "png")
        elif kind == 3:
            add(f"b/c/photo_{i}.jpg", ".jpg", bgr8, "jpeg", [cv2.IMWRITE_JPEG_QUALITY, 92])
        elif kind == 4:
            add(f"tiff/scan16_{i}.tif", ".tif", bgr16, "tiff")
        elif kind == 5:
            add(f"grey_{i}.png", ".png", grey8, "png")
        elif kind == 6:
            add(f"web/p_{i}.webp", ".webp", bgr8, "webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
        elif kind == 7:
            add(f"tiff/scan8_{i}.tiff", ".tiff", bgr8, "tiff")
        elif kind == 8:
            add(f"masters/reel_{i}.jp2", ".jp2", bgr16, "jp2")
        else:
            add(f"masters/sheet_{i}.bmp", ".bmp", bgr8, "bmp")
    return samples


def upload(client, bucket: str, prefix: str, samples: list[Sample]) -> None:  # type: ignore[no-untyped-def]
    for s in samples:
        client.put_object(Bucket=bucket, Key=prefix + s.relative, Body=s.data)


def decode(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise AssertionError("output is not a decodable image")
    return arr


def use_services(monkeypatch, redis_url: str, s3_endpoint: str, database_url: str, home: Path,  # type: ignore[no-untyped-def]
                 **extra: str) -> dict[str, str]:
    """Point this process's settings at the session's services, with a queue of its own
    (isolates tests sharing one Redis) and ``extra`` variables; returns them for child processes."""
    values = {
        "DEBLUR_BROKER_URL": redis_url,
        "DEBLUR_S3_ENDPOINT_URL": s3_endpoint,
        "DEBLUR_DATABASE_URL": database_url,
        "DEBLUR_QUEUE": f"q-{uuid.uuid4().hex[:8]}",
        "DEBLUR_HOME": str(home),
        **extra,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def service_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings_env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DEBLUR_TORCH_THREADS", "1")
    return env


class WorkerProcess:
    """A real Celery worker process for the configured broker, queue and database."""

    def __init__(self, env: dict[str, str], log: Path, pool: str = "solo", concurrency: int = 1,
                 app: str = "jobs.celery_app") -> None:
        self.name = f"test-{uuid.uuid4().hex[:6]}@localhost"
        self.log = log
        self._log_handle = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool,
             "--concurrency", str(concurrency), "-Q", env.get("DEBLUR_QUEUE", "deblur"), "-E",
             "--loglevel", "INFO", "-n", self.name, "--without-gossip", "--without-mingle"],
            env=env, cwd=ROOT, stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, app, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            # a solo-pool worker busy with a task cannot answer pings: its log says it is ready
            if f"{self.name} ready." in self.log.read_text(errors="replace"):
                return
            try:
                replies = app.control.ping(destination=[self.name], timeout=1.0) or []
            except Exception:  # a broker restarted under the client: its first call fails, the next reconnects
                replies = []
            if any(self.name in r for r in replies):
                return
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        stop(self.proc, timeout=20)
        self._log_handle.close()


def kill_mid_image_then_finish(  # type: ignore[no-untyped-def]
        env: dict[str, str], tmp_path: Path, app, first: WorkerProcess, job_id: str, after_kill=None,
        timeout: float = 300) -> tuple[dict[str, Any], WorkerProcess]:
    """Kill ``first`` once it has started one of ``job_id``'s images, run ``after_kill``, let a second worker
    finish the job; returns the finished job's status and the second worker (stopped)."""
    from jobs.settings import load_settings
    from producer.tracking import fetch_results, job_status

    def started() -> int:
        return max(r["attempts"] for r in fetch_results(load_settings(), job_id))

    deadline = time.monotonic() + 60
    while started() == 0:  # an image counts as started when its restoration begins, not when its batch is claimed
        assert time.monotonic() < deadline, "the first worker never started an image"
        time.sleep(0.1)
    first.kill()
    if after_kill is not None:
        after_kill()
    second = WorkerProcess(service_env(env), tmp_path / "second.log")
    try:
        second.wait_ready(app)
        deadline = time.monotonic() + timeout
        while (info := job_status(load_settings(), job_id))["status"] not in {"done", "failed", "cancelled"}:
            assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout} s: {info}"
            time.sleep(0.5)
    finally:
        second.stop()
    return info, second


class FlowerProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        env = dict(env, FLOWER_UNAUTHENTICATED_API="1")
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "jobs.celery_app", "flower", "--address=127.0.0.1",
             f"--port={self.port}"],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 60, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


def reply(handler: Any, code: int, kind: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    """Answer a ``http.server`` request with ``body`` of content type ``kind`` and ``headers``."""
    handler.send_response(code)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


class LoopbackHttpServer:
    """Serves a ``http.server`` handler on a free loopback port from a daemon thread: ``url`` is its address,
    :meth:`close` stops it. Subclasses define their handler (quiet: no request log) and call :meth:`_serve`."""

    def _serve(self, handler: type) -> None:
        import http.server
        import threading

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HookReceiver:
    """An HTTP server on a loopback port that records the POSTs it gets (job-finished notifications).

    ``answers`` are the status codes of the first requests, in order (then 204), to play a receiver that is
    down or broken for a while; a 3xx answer names ``redirect_to``. Use as a context manager; ``url`` is where
    to send.
    """

    def __init__(self, answers: tuple[int, ...] = (), redirect_to: str | None = None) -> None:
        import http.server
        import threading

        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = receiver.answers.pop(0) if receiver.answers else 204
                receiver.requests.append((dict(self.headers), data))
                self.send_response(code)
                if redirect_to and 300 <= code < 400:
                    self.send_header("Location", redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/deblur"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.requests)


def queued_tasks(env: dict[str, str]) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting in the test's job queue in Redis, oldest first per list."""
    import base64
    import json

    import redis

    queue = redis.Redis.from_url(env["DEBLUR_BROKER_URL"])
    tasks = []
    for key in queue.keys(env["DEBLUR_QUEUE"] + "*"):
        if queue.type(key) != b"list":
            continue
        for raw in queue.lrange(key, 0, -1):
            message = json.loads(raw)
            payload = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                payload = base64.b64decode(payload)
            tasks.append((message["headers"]["task"], json.loads(payload)[0]))
    return tasks


@contextmanager
def serving_api(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``deblur api`` in a subprocess on a free loopback port with ``env`` (settings as ``use_services`` returns
    them); yields its base URL."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                                env=service_env(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_port(port, 60, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{log_path.read_text()[-3000:]}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
