"""``deblur worker`` and ``deblur flower``: GPU detection, process plans, signals, options and their env vars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker import cli as wcli

NVIDIA_SMI_TWO_GPUS = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-3b1f0c2e-1111-2222-3333-444455556666)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9a8b7c6d-1111-2222-3333-444455556666)
"""


def fake_nvidia_smi(folder: Path, stdout: str, exit_code: int = 0) -> Path:
    """An ``nvidia-smi`` executable in ``folder`` that prints ``stdout`` for ``-L``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    # shell builtins only: the tests run it with PATH reduced to this folder
    lines = "".join(f"echo '{line}'\n" for line in stdout.splitlines())
    script.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 64\n{lines}exit {exit_code}\n')
    script.chmod(0o755)
    return folder


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("DEBLUR_WORKER_", "DEBLUR_FLOWER_", "FLOWER_")) or name in {
            "CUDA_VISIBLE_DEVICES", "DEBLUR_DEVICE", "DEBLUR_QUEUE", "DEBLUR_TORCH_THREADS",
        }:  # fmt: skip
            monkeypatch.delenv(name)
    for name in ("FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH"):
        # recorded by setenv, so what the flower command sets is undone after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


# -- GPU detection ----------------------------------------------------------------------------


def test_detect_gpus_reads_nvidia_smi_listing(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_TWO_GPUS)
    assert wcli.detect_gpus({"PATH": str(bin_dir)}) == ["0", "1"]


def test_detect_gpus_without_or_with_a_failing_nvidia_smi_is_cpu(tmp_path: Path) -> None:
    assert wcli.detect_gpus({"PATH": str(tmp_path / "empty")}) == []
    failing = fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate\n", 9)
    assert wcli.detect_gpus({"PATH": str(failing)}) == []


@pytest.mark.parametrize(
    ("visible", "expected"),
    [("2,3", ["2", "3"]), ("", []), ("-1", []), ("1,-1,2", ["1"]), ("GPU-abc", ["GPU-abc"])],
)
def test_cuda_visible_devices_wins_over_nvidia_smi(tmp_path: Path, visible: str, expected: list[str]) -> None:
    bin_dir = fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_TWO_GPUS)
    assert wcli.detect_gpus({"PATH": str(bin_dir), "CUDA_VISIBLE_DEVICES": visible}) == expected


def test_select_gpus_forms() -> None:
    available = ["0", "1", "2"]
    assert wcli.select_gpus("auto", available) == ["0", "1", "2"]
    assert wcli.select_gpus("2", available) == ["0", "1"]
    assert wcli.select_gpus("0", available) == []
    assert wcli.select_gpus("1,2", available) == ["1", "2"]
    assert wcli.select_gpus("2,", []) == ["2"]  # explicit ids are trusted even when undetected


@pytest.mark.parametrize(("spec", "fragment"), [("4", "asks for 4 GPU(s) but 3 detected"), ("many", "'many'"), (",", "no device")])
def test_select_gpus_errors_name_the_value(spec: str, fragment: str) -> None:
    with pytest.raises(wcli.GpuSelectionError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        wcli.select_gpus(spec, ["0", "1", "2"])


# -- process plans ----------------------------------------------------------------------------


def test_plan_one_process_per_gpu_with_distinct_names() -> None:
    plans = wcli.plan_workers(
        gpus=["0", "1"], concurrency=2, pool="solo", queue="q1", loglevel="info",
        hostname="deblur@%h", torch_threads=None,
    )  # fmt: skip
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1"]
    assert all(p.env["DEBLUR_DEVICE"] == "cuda" and p.env["DEBLUR_QUEUE"] == "q1" for p in plans)
    names = [next(a for a in p.argv if a.startswith("--hostname=")) for p in plans]
    assert names == ["--hostname=deblur-gpu0@%h", "--hostname=deblur-gpu1@%h"]
    assert all({"worker", "--task-events", "--concurrency=2", "--pool=solo", "--queues=q1"} <= set(p.argv) for p in plans)


def test_plan_single_gpu_keeps_the_hostname_and_uuid_ids_make_valid_names() -> None:
    (plan,) = wcli.plan_workers(
        gpus=["GPU-3b1f"], concurrency=1, pool="prefork", queue="deblur", loglevel="info",
        hostname="w@h", torch_threads=None,
    )  # fmt: skip
    assert "--hostname=w@h" in plan.argv and plan.env["CUDA_VISIBLE_DEVICES"] == "GPU-3b1f"
    assert wcli.gpu_hostname("w@h", "GPU-3b1f") == "w-gpuGPU-3b1f@h"


def test_cpu_plan_divides_the_cpus_between_pool_processes() -> None:
    (plan,) = wcli.plan_workers(
        gpus=[], concurrency=3, pool="prefork", queue="deblur", loglevel="warning",
        hostname="deblur@%h", torch_threads=None, cpu_count=8,
    )  # fmt: skip
    assert plan.env == {"DEBLUR_QUEUE": "deblur", "DEBLUR_TORCH_THREADS": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in plan.env and "--loglevel=WARNING" in plan.argv
    (explicit,) = wcli.plan_workers(
        gpus=[], concurrency=3, pool="prefork", queue="deblur", loglevel="info",
        hostname="deblur@%h", torch_threads=5, cpu_count=8,
    )  # fmt: skip
    assert explicit.env["DEBLUR_TORCH_THREADS"] == "5"
    assert wcli.torch_threads_for(4, 2) == 1


def test_usable_cpus_follow_the_containers_quota_and_the_affinity(tmp_path: Path) -> None:
    """os.cpu_count() counts the host's CPUs: a worker limited to 1.5 CPUs on a large node started one torch
    thread per host CPU in each pool process."""
    import os

    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two threads, rounded up
    assert wcli.usable_cpus(tmp_path) == min(2, affinity)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota
    assert wcli.usable_cpus(tmp_path) == affinity
    assert wcli.usable_cpus(tmp_path / "no-cgroup") == affinity


# -- the worker command -----------------------------------------------------------------------


def test_worker_help_lists_every_env_var() -> None:
    result = CliRunner().invoke(wcli.worker_command, ["--help"])
    assert result.exit_code == 0
    for env in ("DEBLUR_WORKER_CONCURRENCY", "DEBLUR_WORKER_POOL", "DEBLUR_QUEUE", "DEBLUR_WORKER_GPUS",
                "DEBLUR_TORCH_THREADS", "DEBLUR_WORKER_LOGLEVEL", "DEBLUR_WORKER_HOSTNAME"):
        assert env in result.output


def test_worker_options_come_from_env_vars(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runs: list[wcli.WorkerProcess] = []
    clean_env.setattr(wcli, "_run_in_process", runs.append)
    clean_env.setenv("PATH", str(tmp_path / "no-gpu-here"))
    env = {
        "DEBLUR_WORKER_CONCURRENCY": "3", "DEBLUR_WORKER_POOL": "threads", "DEBLUR_QUEUE": "urgent",
        "DEBLUR_WORKER_LOGLEVEL": "debug", "DEBLUR_WORKER_HOSTNAME": "w1@box", "DEBLUR_TORCH_THREADS": "2",
    }  # fmt: skip
    result = CliRunner().invoke(wcli.worker_command, [], env=env)
    assert result.exit_code == 0, result.output
    (plan,) = runs
    assert {"--concurrency=3", "--pool=threads", "--queues=urgent", "--loglevel=DEBUG", "--hostname=w1@box"} <= set(
        plan.argv
    )
    assert plan.env == {"DEBLUR_QUEUE": "urgent", "DEBLUR_TORCH_THREADS": "2"}
    runs.clear()  # a blank queue is unset, as producers read it: not a queue named '  ' nobody submits to
    assert CliRunner().invoke(wcli.worker_command, [], env={**env, "DEBLUR_QUEUE": "  "}).exit_code == 0
    assert "--queues=deblur" in runs[0].argv and runs[0].env["DEBLUR_QUEUE"] == "deblur"


def test_a_bad_setting_behind_an_option_is_one_usage_line_not_a_traceback(clean_env: pytest.MonkeyPatch) -> None:
    """DEBLUR_TORCH_THREADS=-2 gave a traceback: the error handler read the settings, which refused the value
    again while the option's own error was being handled."""
    from producer.cli import main

    result = CliRunner().invoke(main, ["worker", "--gpus", "0"], env={"DEBLUR_TORCH_THREADS": "-2"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--torch-threads'" in result.output
    assert isinstance(result.exception, SystemExit)  # click's usage exit, nothing raised past it


def test_worker_with_two_gpus_supervises_one_celery_process_each(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PATH", str(fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_TWO_GPUS)))
    launched: list[tuple[list[str], dict[str, str]]] = []

    def fake_supervise(commands: list[tuple[list[str], dict[str, str]]]) -> int:
        launched.extend(commands)
        return 0

    clean_env.setattr(wcli, "supervise", fake_supervise)
    clean_env.setattr(wcli, "_run_in_process", pytest.fail)  # never start a real worker here
    result = CliRunner().invoke(wcli.worker_command, ["--gpus", "auto"])
    assert result.exit_code == 0, result.output
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in launched] == ["0", "1"]
    for argv, _ in launched:
        assert argv[:5] == [sys.executable, "-m", "celery", "-A", "jobs.celery_app:app"]
        assert argv[5] == "worker"


def test_worker_device_cpu_ignores_detected_gpus(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PATH", str(fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_TWO_GPUS)))
    runs: list[wcli.WorkerProcess] = []
    clean_env.setattr(wcli, "_run_in_process", runs.append)
    result = CliRunner().invoke(wcli.worker_command, [], env={"DEBLUR_DEVICE": "cpu"})
    assert result.exit_code == 0, result.output
    assert len(runs) == 1 and "CUDA_VISIBLE_DEVICES" not in runs[0].env


def test_worker_rejects_more_gpus_than_present(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PATH", str(tmp_path / "none"))
    result = CliRunner().invoke(wcli.worker_command, ["--gpus", "2"])
    assert result.exit_code == 2
    assert "--gpus" in result.output and "asks for 2 GPU(s) but 0 detected" in result.output


def test_worker_module_does_not_import_torch() -> None:
    code = "import sys, worker.cli, jobs.celery_app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- supervision ------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import signal, sys, time, pathlib
    marker = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        # written aside and renamed, so a reader that sees the marker sees its content
        partial = pathlib.Path(str(marker) + ".partial")
        partial.write_text(str(signum))
        partial.rename(marker)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    pathlib.Path(str(marker) + ".ready").touch()
    time.sleep(60)
    """
)


def start_supervisor(tmp_path: Path, markers: list[Path]) -> subprocess.Popen[bytes]:
    """A process running :func:`worker.cli.supervise` over one CHILD per marker, once every child is ready."""
    script = tmp_path / "supervisor.py"
    script.write_text(
        "import sys\nfrom worker.cli import supervise\n"
        f"child = {CHILD!r}\n"
        f"sys.exit(supervise([([sys.executable, '-c', child, m], {{}}) for m in {[str(m) for m in markers]!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    while not all(Path(str(m) + ".ready").exists() for m in markers):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the supervised children did not start")
        time.sleep(0.05)
    return proc


def test_supervise_exits_with_a_failing_child_and_stops_the_others(tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    commands = [
        ([sys.executable, "-c", CHILD, str(marker)], {}),
        ([sys.executable, "-c", f"import time, pathlib, sys\n"
          f"while not pathlib.Path({str(marker) + '.ready'!r}).exists(): time.sleep(0.05)\nsys.exit(3)"], {}),
    ]  # fmt: skip
    started = time.monotonic()
    assert wcli.supervise(commands) == 3
    assert time.monotonic() - started < 30
    assert marker.read_text() == str(int(signal.SIGTERM))


def test_supervisor_forwards_sigterm_to_every_child(tmp_path: Path) -> None:
    markers = [tmp_path / "gpu0", tmp_path / "gpu1"]
    proc = start_supervisor(tmp_path, markers)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [m.read_text() for m in markers] == [str(int(signal.SIGTERM))] * 2


def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux only")
    markers = [tmp_path / "gpu0", tmp_path / "gpu1"]
    proc = start_supervisor(tmp_path, markers)
    try:
        proc.kill()  # SIGKILL: no chance to forward anything
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not all(m.exists() for m in markers) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [m.read_text() for m in markers] == [str(int(signal.SIGTERM))] * 2


# -- the flower command -----------------------------------------------------------------------


def test_flower_help_explains_the_unauthenticated_api() -> None:
    result = CliRunner().invoke(wcli.flower_command, ["--help"])
    assert result.exit_code == 0
    for text in ("FLOWER_UNAUTHENTICATED_API=1", "DEBLUR_FLOWER_ADDRESS", "DEBLUR_FLOWER_PORT", "DEBLUR_FLOWER_BASIC_AUTH"):
        assert text in result.output


def test_flower_on_loopback_opens_the_api(clean_env: pytest.MonkeyPatch) -> None:
    from jobs.celery_app import app

    calls: list[list[str]] = []
    clean_env.setattr(app, "start", calls.append)
    result = CliRunner().invoke(wcli.flower_command, [], env={"DEBLUR_FLOWER_PORT": "5999"})
    assert result.exit_code == 0, result.output
    assert calls == [["flower", "--address=127.0.0.1", "--port=5999", "--purge_offline_workers=300"]]
    assert os.environ["FLOWER_UNAUTHENTICATED_API"] == "1"


def test_flower_forgets_a_worker_that_died_without_a_goodbye(clean_env: pytest.MonkeyPatch) -> None:
    """Without --purge_offline_workers a SIGKILLed worker stays at flower_worker_online 1 and DeblurNoWorkers
    never fires. Every Flower the project starts (the stack, Compose, Kubernetes) goes through this command."""
    from tornado.options import options

    import flower.options  # noqa: F401  (defines Flower's options)
    from jobs.celery_app import app

    calls: list[list[str]] = []
    clean_env.setattr(app, "start", calls.append)
    result = CliRunner().invoke(wcli.flower_command, ["--address", "0.0.0.0", "--basic-auth", "ops:pw"])
    assert result.exit_code == 0, result.output
    (purge,) = [arg for arg in calls[0] if arg.startswith("--purge_offline_workers=")]
    name, _, seconds = purge[2:].partition("=")
    # the name Flower defines (tornado spells it with dashes inside), in seconds
    option = options._options[name.replace("_", "-")]
    assert option.type is int and "seconds" in option.help
    assert int(seconds) == wcli.FLOWER_PURGE_OFFLINE_WORKERS_S == 300


def test_flower_basic_auth_goes_through_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    from jobs.celery_app import app

    calls: list[list[str]] = []
    clean_env.setattr(app, "start", calls.append)
    result = CliRunner().invoke(
        wcli.flower_command, ["--address", "0.0.0.0"], env={"DEBLUR_FLOWER_BASIC_AUTH": "ops:s3cret"}
    )
    assert result.exit_code == 0, result.output
    assert os.environ["FLOWER_BASIC_AUTH"] == "ops:s3cret" and "FLOWER_UNAUTHENTICATED_API" not in os.environ
    assert not any("s3cret" in arg for arg in calls[0])


def test_flower_refuses_the_network_without_auth_and_hides_bad_passwords(clean_env: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(wcli.flower_command, [], env={"DEBLUR_FLOWER_ADDRESS": "0.0.0.0"})
    assert result.exit_code == 2 and "'0.0.0.0' without --basic-auth" in result.output
    result = CliRunner().invoke(wcli.flower_command, ["--basic-auth", "justapassword"])
    assert result.exit_code == 2 and "expected user:password" in result.output
    assert "justapassword" not in result.output


@pytest.mark.integration
def test_two_fake_gpus_run_two_real_workers_that_stop_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    """The GPU path end to end minus CUDA: two Celery workers register, one SIGTERM stops both."""
    from deploy.stack import answering_workers

    bin_dir = fake_nvidia_smi(tmp_path / "bin", NVIDIA_SMI_TWO_GPUS)
    name = f"gputest{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in {"CUDA_VISIBLE_DEVICES", "DEBLUR_DEVICE"}}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", DEBLUR_BROKER_URL=redis_url, DEBLUR_HOME=str(tmp_path),
        DEBLUR_QUEUE=f"q-{name}",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", "--pool", "solo", "--hostname", f"{name}@%h",
         "--loglevel", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        nodes: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            nodes = sorted(n.partition("@")[0] for n in answering_workers(redis_url) if n.startswith(name))
            if len(nodes) == 2:
                break
            time.sleep(0.5)
        assert nodes == [f"{name}-gpu0", f"{name}-gpu1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [n for n in answering_workers(redis_url) if n.startswith(name)]


def test_a_batch_time_limit_is_read_and_refused_when_negative_or_past_the_visibility_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.errors import ConfigurationError
    from jobs.settings import load_settings

    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "600")
    assert load_settings().batch_time_limit == 600
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "-5")
    with pytest.raises(ConfigurationError, match="DEBLUR_BATCH_TIME_LIMIT must be >= 0"):
        load_settings()
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "900")
    monkeypatch.setenv("DEBLUR_VISIBILITY_TIMEOUT", "600")
    with pytest.raises(ConfigurationError, match="not below DEBLUR_VISIBILITY_TIMEOUT=600"):
        load_settings()
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "0")  # never hand over: any visibility timeout will do
    assert load_settings().visibility_timeout == 600


def test_the_image_time_limit_defaults_to_the_room_the_other_limits_leave_for_one_image(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.errors import ConfigurationError
    from jobs.settings import load_settings

    assert load_settings().resolved_image_time_limit() == 3600 - 1200
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "0")  # no hand-over: a batch's one image may take it all
    assert load_settings().resolved_image_time_limit() == 3600
    monkeypatch.setenv("DEBLUR_IMAGE_TIME_LIMIT", "300")
    assert load_settings().resolved_image_time_limit() == 300
    monkeypatch.setenv("DEBLUR_IMAGE_TIME_LIMIT", "-1")
    with pytest.raises(ConfigurationError, match="DEBLUR_IMAGE_TIME_LIMIT must be >= 0"):
        load_settings()
    monkeypatch.setenv("DEBLUR_IMAGE_TIME_LIMIT", "30")  # shorter than the 90-s lease: images would go round
    with pytest.raises(ConfigurationError, match="DEBLUR_IMAGE_TIME_LIMIT is 30 s, shorter than DEBLUR_CLAIM_LEASE"):
        load_settings()
    monkeypatch.setenv("DEBLUR_IMAGE_TIME_LIMIT", "0")
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "3590")  # leaves 10 s for one image by default
    with pytest.raises(ConfigurationError, match=r"less DEBLUR_BATCH_TIME_LIMIT by default\) is 10 s"):
        load_settings()


def test_the_broker_sweeps_for_a_dead_workers_batches_at_a_tenth_of_the_visibility_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's own sweep runs about every 100 s; ours follows the timeout, between 1 s and a minute."""
    from jobs.celery_app import make_app, restore_sweep_seconds
    from jobs.settings import load_settings

    assert [restore_sweep_seconds(t) for t in (1, 8, 25, 300, 3600)] == [1, 1, 2, 30, 60]
    monkeypatch.setenv("DEBLUR_VISIBILITY_TIMEOUT", "8")
    monkeypatch.setenv("DEBLUR_BATCH_TIME_LIMIT", "0")
    monkeypatch.setenv("DEBLUR_CLAIM_LEASE", "4")
    options = make_app(load_settings(), set_as_current=False).conf.broker_transport_options
    assert options["visibility_timeout"] == 8
    assert options["unacked_restore_interval"] == 1 and options["unacked_restore_throttle"] == 1


@pytest.mark.timeout(60)  # without the socket timeout the publish waits for good
def test_a_broker_that_stops_answering_fails_a_publish_instead_of_holding_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a socket timeout a publish to a Redis that stopped answering (a failover, a firewall timeout) waited
    for good, and a worker's sweep publishes inside a database transaction. A loopback server that accepts and
    never answers stands for it, with the timeout shortened to 1 s."""
    import socket
    import threading

    from jobs import celery_app
    from jobs.messages import PROCESS_BATCH_TASK
    from jobs.settings import load_settings

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])  # accepted, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(celery_app, "BROKER_SOCKET_TIMEOUT_S", 1)
    monkeypatch.setenv("DEBLUR_BROKER_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    app = celery_app.make_app(load_settings(), set_as_current=False)
    assert app.conf.broker_transport_options["socket_connect_timeout"] == celery_app.BROKER_CONNECT_TIMEOUT_S
    try:
        with pytest.raises(Exception):  # raised once the 1-s timeout passes; without it, the test times out
            app.send_task(PROCESS_BATCH_TASK, args=[{}], queue="silent", retry=False)
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        silent.close()
