"""``deblur worker`` and ``deblur flower``: run the Celery worker and its monitor.

This module never imports torch, and neither does the process it runs in before
Celery forks its pool: torch work in a parent that forks hangs the children.
GPUs are discovered with ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``. With
several GPUs the command becomes a small supervisor: one Celery worker process
per GPU (``CUDA_VISIBLE_DEVICES`` set to that GPU), signals forwarded, and the
supervisor exits when its workers do.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from jobs.listening import LISTEN_FAILURE_EXIT, listen_failure

CELERY_APP = "jobs.celery_app:app"
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1"})
POOLS = ("prefork", "solo", "threads")
LOGLEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_HOSTNAME = "deblur@%h"
# Signals the supervisor hands on to its workers (Celery: TERM/INT warm shutdown, QUIT cold).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Flower forgets a worker this many seconds after its last heartbeat (its /metrics, flower_worker_online
# included): without it a SIGKILLed worker stays "online" there for good and DeblurNoWorkers never fires.
FLOWER_PURGE_OFFLINE_WORKERS_S = 300


class GpuSelectionError(click.BadParameter):
    """``--gpus`` names more GPUs than the machine has, or is malformed."""


def detect_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """Identifiers of the GPUs this process may use, without importing torch.

    ``CUDA_VISIBLE_DEVICES`` wins when set (its entries, which may be indices or
    ``GPU-…`` UUIDs; empty or ``-1`` means none). Otherwise ``nvidia-smi -L`` is
    asked and its ``GPU N:`` lines give the indices. No ``nvidia-smi``, or one that
    fails, means no GPU.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        # CUDA stops at the first invalid entry; -1 is the conventional "hide all GPUs".
        kept: list[str] = []
        for gpu in ids:
            if gpu.startswith("-"):
                break
            kept.append(gpu)
        return kept
    binary = shutil.which("nvidia-smi", path=env.get("PATH"))
    if binary is None:
        return []
    try:
        listing = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return re.findall(r"^GPU (\d+):", listing.stdout, flags=re.MULTILINE)


def select_gpus(spec: str, available: Sequence[str]) -> list[str]:
    """Resolve a ``--gpus`` value against the detected GPUs.

    ``auto`` takes every detected GPU; an integer ``N`` the first N (``0``: CPU
    only); a comma-separated list (``0,1``, or ``2,`` for a single id) names the
    devices to use, trusted as given, since a container may hide ``nvidia-smi``.
    """
    text = spec.strip().lower()
    if text == "auto":
        return list(available)
    if "," in text:
        chosen = [part.strip() for part in spec.split(",") if part.strip()]
        if not chosen:
            raise GpuSelectionError(f"--gpus {spec!r} names no device; use auto, a count, or ids such as 0,1")
        return chosen
    if not text.isdigit():
        raise GpuSelectionError(f"--gpus {spec!r} is not auto, a count (0 for CPU) or a list of ids such as 0,1")
    count = int(text)
    if count > len(available):
        raise GpuSelectionError(
            f"--gpus {count} asks for {count} GPU(s) but {len(available)} detected "
            f"({', '.join(available) or 'none'}); use --gpus auto or list the ids"
        )
    return list(available[:count])


def gpu_hostname(hostname: str, gpu: str) -> str:
    """The Celery node name of the worker bound to ``gpu``: ``name@host`` → ``name-gpuID@host``."""
    name, at, host = hostname.partition("@")
    safe = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    return f"{name}-gpu{safe}{at}{host}"


def celery_worker_args(*, concurrency: int, pool: str, queue: str, loglevel: str, hostname: str) -> list[str]:
    """Arguments of ``celery worker`` (task events on, one queue, explicit node name)."""
    return [
        "worker",
        "--task-events",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={queue}",
        f"--loglevel={loglevel.upper()}",
        f"--hostname={hostname}",
    ]


@dataclass(frozen=True)
class WorkerProcess:
    """One Celery worker process to run: its command line and what to add to its environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: those its affinity allows, and no more than its container's CPU quota
    (cgroup v2 ``cpu.max``, rounded up). ``os.cpu_count()`` counts the host's: a worker limited to 2 CPUs on a
    64-core node would start 64 torch threads per process and spend its quota switching between them."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read: the affinity is the limit
    return max(1, count)


def torch_threads_for(concurrency: int, cpu_count: int | None) -> int:
    """Torch threads per pool process so that ``concurrency`` processes share the CPUs without oversubscription."""
    return max(1, (cpu_count or 1) // max(1, concurrency))


def plan_workers(
    *,
    gpus: Sequence[str],
    concurrency: int,
    pool: str,
    queue: str,
    loglevel: str,
    hostname: str,
    torch_threads: int | None,
    cpu_count: int | None = None,
) -> list[WorkerProcess]:
    """Decide the worker processes: one per GPU, or a single CPU worker.

    Every process gets ``DEBLUR_QUEUE``; GPU workers get ``CUDA_VISIBLE_DEVICES``
    and ``DEBLUR_DEVICE=cuda``; a CPU worker gets ``DEBLUR_TORCH_THREADS`` (given,
    or the CPUs divided among its pool processes).
    """
    base_env = {"DEBLUR_QUEUE": queue}
    if not gpus:
        threads = torch_threads if torch_threads else torch_threads_for(concurrency, cpu_count or usable_cpus())
        args = celery_worker_args(
            concurrency=concurrency, pool=pool, queue=queue, loglevel=loglevel, hostname=hostname
        )
        return [WorkerProcess(args, {**base_env, "DEBLUR_TORCH_THREADS": str(threads)})]
    plans = []
    for gpu in gpus:
        env = {**base_env, "CUDA_VISIBLE_DEVICES": gpu, "DEBLUR_DEVICE": "cuda"}
        if torch_threads:
            env["DEBLUR_TORCH_THREADS"] = str(torch_threads)
        name = hostname if len(gpus) == 1 else gpu_hostname(hostname, gpu)
        args = celery_worker_args(concurrency=concurrency, pool=pool, queue=queue, loglevel=loglevel, hostname=name)
        plans.append(WorkerProcess(args, env))
    return plans


def _die_with_parent() -> None:
    """In a child: have Linux send it SIGTERM when the supervisor dies, even by SIGKILL (no orphaned GPU workers)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def supervise(commands: Sequence[tuple[list[str], Mapping[str, str]]]) -> int:
    """Run ``commands`` as child processes until all have exited, forwarding signals.

    Each child gets its own process group, so a terminal's Ctrl-C reaches it once
    (through the forwarded signal), not twice (which Celery reads as a cold
    shutdown). When one child exits, the others are asked to stop (SIGTERM). The
    exit code is the first non-zero child code (a signal N counts as 128+N), else 0.
    """
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid, proc in children.items():
            if proc.returncode is None:
                _signal_quietly(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        for argv, env in commands:
            proc = subprocess.Popen(
                argv, env={**os.environ, **env}, process_group=0, preexec_fn=_die_with_parent
            )
            children[proc.pid] = proc
        if stopping:  # a signal came while spawning: the children started after it never got it
            for pid in children:
                _signal_quietly(pid, signal.SIGTERM)
        exit_code = 0
        # os.wait, not Popen.poll/send_signal: those reap children behind the loop's back.
        while any(proc.returncode is None for proc in children.values()):
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            proc = children.get(pid)
            if proc is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code
            if code != 0 and exit_code == 0:
                exit_code = 128 - code if code < 0 else code
            if not stopping:
                stopping = True
                for other_pid, other in children.items():
                    if other.returncode is None:
                        _signal_quietly(other_pid, signal.SIGTERM)
        return exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_in_process(plan: WorkerProcess) -> None:
    os.environ.update(plan.env)
    # Imported here, after the environment is final: the app reads its queue and broker at import.
    from jobs.celery_app import app

    app.worker_main(plan.argv)


@click.command("worker")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="DEBLUR_WORKER_CONCURRENCY",
    show_envvar=True,
    help="Pool processes (or threads) per worker process. On GPUs this is per GPU.",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="prefork",
    show_default=True,
    envvar="DEBLUR_WORKER_POOL",
    show_envvar=True,
    help="Celery execution pool. prefork (one process per batch slot) is the one to use: a process hung on an "
    "image past DEBLUR_IMAGE_TIME_LIMIT ends itself and is replaced. solo runs tasks in the worker process "
    "itself (a hang then only gives the images up); threads cannot end a hung thread, which keeps its slot.",
)
@click.option(
    "--queue",
    default="deblur",
    show_default=True,
    envvar="DEBLUR_QUEUE",
    show_envvar=True,
    callback=lambda _ctx, _param, value: value.strip() or "deblur",  # blank: unset, as producers read it
    help="Queue to consume.",
)
@click.option(
    "--gpus",
    default="auto",
    show_default=True,
    envvar="DEBLUR_WORKER_GPUS",
    show_envvar=True,
    help="auto (every GPU nvidia-smi or CUDA_VISIBLE_DEVICES shows), a count N (0: CPU only), "
    "or ids such as 0,1 (2, for one id). Two or more GPUs start one worker process per GPU.",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=0),
    default=0,
    envvar="DEBLUR_TORCH_THREADS",
    show_envvar=True,
    help="CPU threads per pool process for torch (0: the CPUs this process may use, its container's quota "
    "included, divided by --concurrency).",
)
@click.option(
    "--loglevel",
    type=click.Choice(LOGLEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    envvar="DEBLUR_WORKER_LOGLEVEL",
    show_envvar=True,
    help="Log level of the worker and Celery (debug: the most detail, critical: the least).",
)
@click.option(
    "--hostname",
    default=DEFAULT_HOSTNAME,
    show_default=True,
    envvar="DEBLUR_WORKER_HOSTNAME",
    show_envvar=True,
    help="Celery node name (%h: this machine). Per-GPU workers get -gpuN inserted before the @.",
)
def worker_command(
    concurrency: int, pool: str, queue: str, gpus: str, torch_threads: int, loglevel: str, hostname: str
) -> None:
    """Run a Celery worker that processes deblur batches from Redis.

    Task events are on for Flower, messages are JSON only, and models load
    lazily inside the pool processes. With several GPUs, one worker process per
    GPU is started and supervised; signals are forwarded to them.
    """
    # DEBLUR_DEVICE=cpu forces the CPU even on a GPU machine.
    forced_cpu = os.environ.get("DEBLUR_DEVICE", "").strip().lower() == "cpu"
    available = [] if forced_cpu and gpus.strip().lower() == "auto" else detect_gpus()
    try:
        chosen = select_gpus(gpus, available)
    except GpuSelectionError as exc:
        exc.param_hint = "--gpus"
        raise
    plans = plan_workers(
        gpus=chosen,
        concurrency=concurrency,
        pool=pool,
        queue=queue,
        loglevel=loglevel,
        hostname=hostname,
        torch_threads=torch_threads or None,
    )
    if len(plans) == 1:
        _run_in_process(plans[0])
        return
    click.echo(f"deblur worker: {len(plans)} GPUs ({', '.join(chosen)}), one worker process each", err=True)
    prefix = [sys.executable, "-m", "celery", "-A", CELERY_APP]
    code = supervise([(prefix + plan.argv, plan.env) for plan in plans])
    sys.exit(code)


def _check_basic_auth(value: str) -> str:
    for entry in value.split(","):
        user, sep, password = entry.partition(":")
        if not (sep and user and password):
            # never echo the value: it holds a password
            raise click.BadParameter("expected user:password (several separated by commas)", param_hint="--basic-auth")
    return value


@click.command("flower")
@click.option(
    "--address",
    default=None,
    envvar="DEBLUR_FLOWER_ADDRESS",
    show_envvar=True,
    help="Address to listen on (default 127.0.0.1). Anything but loopback requires --basic-auth.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    envvar="DEBLUR_FLOWER_PORT",
    show_envvar=True,
    help="Port to listen on (default 5555, or the running local stack's port).",
)
@click.option(
    "--basic-auth",
    default=None,
    envvar="DEBLUR_FLOWER_BASIC_AUTH",
    show_envvar=True,
    help="user:password protecting the UI and /api. Without it Flower listens on loopback only and "
    "its /api is opened without authentication (FLOWER_UNAUTHENTICATED_API=1).",
)
def flower_command(address: str | None, port: int | None, basic_auth: str | None) -> None:
    """Run Flower, the Celery monitor, for the configured broker.

    The web UI and /api/workers, /api/tasks show workers and tasks; /metrics
    serves Prometheus text (always without authentication, for scrapers). A
    worker silent for 5 minutes (killed without a goodbye) drops off the UI's
    worker list and out of /metrics.

    Exit codes: 0 stopped; 2 an invalid option, or the port is taken (the
    local stack runs a Flower of its own: 'deblur stack status') or may not
    be used.
    """
    from jobs.settings import load_settings

    settings = load_settings(flower_address=address, flower_port=port, flower_basic_auth=basic_auth)
    address, port, basic_auth = settings.flower_address, settings.flower_port, settings.flower_basic_auth
    if basic_auth:
        # through the environment, so the password does not show in `ps`
        os.environ["FLOWER_BASIC_AUTH"] = _check_basic_auth(basic_auth)
        os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    elif address in LOOPBACK_ADDRESSES:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "1"
    else:
        raise click.UsageError(
            f"Flower on --address {address!r} without --basic-auth would expose the cluster to the network; "
            "pass --basic-auth user:password (or DEBLUR_FLOWER_BASIC_AUTH), or listen on 127.0.0.1"
        )
    from jobs.celery_app import app

    try:
        app.start([
            "flower", f"--address={address}", f"--port={port}",
            f"--purge_offline_workers={FLOWER_PURGE_OFFLINE_WORKERS_S}",
        ])  # fmt: skip
    except OSError as exc:
        reason = listen_failure(exc, address, port, "--port", "DEBLUR_FLOWER_PORT")
        if reason is None:
            raise
        click.echo(f"error: {reason}", err=True)
        sys.exit(LISTEN_FAILURE_EXIT)


def _main() -> None:
    group = click.Group("deblur", commands=[worker_command, flower_command], help="Worker and Flower commands.")
    group()


if __name__ == "__main__":
    _main()
