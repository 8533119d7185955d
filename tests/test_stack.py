"""``deblur stack``: a real local stack in a temporary DEBLUR_HOME, checked with independent clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deploy.stack import LOCAL_AWS_CREDENTIAL, LocalStack, process_alive, process_start_time, redact
from tests.conftest import missing_service

# What the developer's shell may point at must not leak into the stack under test.
SERVICE_ENV = ("DEBLUR_BROKER_URL", "DEBLUR_S3_ENDPOINT_URL", "DEBLUR_DATABASE_URL", "DEBLUR_FLOWER_PORT",
               "DEBLUR_FLOWER_BASIC_AUTH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CUDA_VISIBLE_DEVICES")  # fmt: skip


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env.update(DEBLUR_HOME=str(home), DEBLUR_TORCH_THREADS="1", **extra)
    return env


def stack_cli(home: Path, *args: str, timeout: float = 150, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        env=stack_env(home, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def require_services() -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (apt-get install -y redis-server, or run 'make test')")
    if not (Path(sys.executable).parent / "moto_server").exists() and shutil.which("moto_server") is None:
        missing_service("moto_server is not installed (pip install 'deblur[stack]')")


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object], str]]:
    """A full stack (with its worker) brought up through the CLI; always brought down again."""
    require_services()
    home = tmp_path_factory.mktemp("deblur-home")
    up = stack_cli(home, "up", "--timeout", "120")
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        connection = json.loads((home / "stack" / "connection.json").read_text())
        yield home, connection, up.stdout
    finally:
        stack_cli(home, "down", "--timeout", "20")


@pytest.mark.integration
def test_services_answer_independent_clients(running_stack: tuple[Path, dict[str, object], str]) -> None:
    import boto3
    import redis

    home, connection, _ = running_stack
    assert str(connection["broker_url"]).startswith("redis://127.0.0.1:")
    assert redis.Redis.from_url(str(connection["broker_url"])).ping() is True

    s3 = boto3.client(
        "s3",
        endpoint_url=str(connection["s3_endpoint_url"]),
        region_name="us-east-1",
        aws_access_key_id=str(connection["aws_access_key_id"]),
        aws_secret_access_key=str(connection["aws_secret_access_key"]),
    )
    s3.create_bucket(Bucket="stack-check")
    s3.put_object(Bucket="stack-check", Key="a/b.txt", Body=b"hello")
    assert "stack-check" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.get_object(Bucket="stack-check", Key="a/b.txt")["Body"].read() == b"hello"

    assert connection["database_url"] == f"sqlite:///{home.resolve() / 'deblur.db'}"
    assert (home / "deblur.db").exists()


@pytest.mark.integration
def test_flower_lists_the_worker_with_the_batch_task(running_stack: tuple[Path, dict[str, object], str]) -> None:
    home, connection, _ = running_stack
    base = f"http://{connection['flower_address']}:{connection['flower_port']}"
    workers = get_json(base + "/api/workers?refresh=1")
    assert isinstance(workers, dict)
    (name,) = [n for n in workers if n.startswith(LocalStack(home).worker_name + "@")]
    assert "deblur.process_batch" in workers[name]["registered"]
    assert workers[name]["stats"]["pool"]["max-concurrency"] == 1
    # the worker's events (-E) reach Flower, which exports them as Prometheus text
    online = f'flower_worker_online{{worker="{name}"}} 1.0'
    deadline = time.monotonic() + 20
    while online not in (metrics := get_text(base + "/metrics")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert online in metrics


@pytest.mark.integration
def test_a_job_submitted_with_no_exports_runs_on_the_stack_worker(
    running_stack: tuple[Path, dict[str, object], str],
) -> None:
    """The CLI finds the stack through connection.json alone; the stack's worker restores the image."""
    import boto3
    import cv2
    from skimage import data

    home, connection, _ = running_stack
    s3 = boto3.client(
        "s3", endpoint_url=str(connection["s3_endpoint_url"]), region_name="us-east-1",
        aws_access_key_id=LOCAL_AWS_CREDENTIAL, aws_secret_access_key=LOCAL_AWS_CREDENTIAL,
    )  # fmt: skip
    s3.create_bucket(Bucket="stack-job")
    image = cv2.resize(data.camera(), (96, 96), interpolation=cv2.INTER_AREA)
    s3.put_object(Bucket="stack-job", Key="in/camera.png", Body=cv2.imencode(".png", image)[1].tobytes())

    submit = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", "s3://stack-job/in/", "--output", "s3://stack-job/out/",
         "--model", "wiener", "--wait"],
        env=stack_env(home), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = submit.stdout.split()[0]
    # read by an independent client, straight from the stack's SQLite file
    with contextlib.closing(sqlite3.connect(home / "deblur.db")) as db:
        rows = db.execute("SELECT status, output_uri FROM images WHERE job_id = ?", (job_id,)).fetchall()
    assert rows == [("done", "s3://stack-job/out/camera.png")]
    restored = s3.get_object(Bucket="stack-job", Key="out/camera.png")["Body"].read()
    decoded = cv2.imdecode(np.frombuffer(restored, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == image.shape and decoded.dtype == image.dtype


@pytest.mark.integration
def test_settings_follow_the_connection_file(
    running_stack: tuple[Path, dict[str, object], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.settings import load_settings

    home, connection, _ = running_stack
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEBLUR_HOME", str(home))
    settings = load_settings()
    assert settings.broker_url == connection["broker_url"]
    assert settings.s3_endpoint_url == connection["s3_endpoint_url"]
    assert settings.flower_port == connection["flower_port"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == LOCAL_AWS_CREDENTIAL  # boto3 needs some credentials; moto takes any
    monkeypatch.setenv("DEBLUR_BROKER_URL", "redis://elsewhere:6379/0")
    assert load_settings().broker_url == "redis://elsewhere:6379/0"  # the environment still wins


@pytest.mark.integration
def test_status_and_idempotent_up(running_stack: tuple[Path, dict[str, object], str]) -> None:
    home, _, _ = running_stack
    status = stack_cli(home, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for service in ("redis", "s3", "flower", "worker"):
        (line,) = [row for row in status.stdout.splitlines() if row.startswith(service + " ")]
        assert " running " in line and str(home / "stack" / f"{service}.log") in line

    listed = json.loads(stack_cli(home, "status", "--format", "json").stdout)
    before = {service["name"]: service["pid"] for service in listed}
    assert {s["name"]: s["state"] for s in listed}["database"] == "present"
    again = stack_cli(home, "up", "--timeout", "60")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 4
    assert {name: record.pid for name, record in LocalStack(home).load_state().items()} == before


@pytest.mark.integration
def test_failed_start_names_the_log_and_stops_only_what_it_started(
    running_stack: tuple[Path, dict[str, object], str], tmp_path: Path
) -> None:
    """A second stack reuses the first one's Redis (DEBLUR_BROKER_URL answers) and fails on its worker."""
    import redis

    _, connection, _ = running_stack
    broker = str(connection["broker_url"])
    # a worker option the worker refuses makes its process exit during start-up
    up = stack_cli(tmp_path, "up", "--timeout", "90", DEBLUR_WORKER_POOL="gevent-nope", DEBLUR_BROKER_URL=broker)
    assert up.returncode == 1
    assert f"redis: using DEBLUR_BROKER_URL={broker}" in up.stdout
    assert "worker exited while starting" in up.stderr and str(tmp_path / "stack" / "worker.log") in up.stderr
    assert "gevent-nope" in up.stderr  # the log's tail is quoted
    assert not (tmp_path / "stack" / "state.json").exists()
    started = [int(line.split("pid ")[1].split(",")[0]) for line in up.stdout.splitlines() if "started" in line]
    assert len(started) == 3  # s3, flower, worker: not the reused Redis
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in started)
    assert redis.Redis.from_url(broker).ping() is True  # someone else's Redis is left alone


def test_missing_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    up = stack_cli(tmp_path, "up", PATH=str(empty))
    assert up.returncode == 1
    assert "apt-get install -y redis-server" in up.stderr


def test_stack_credentials_are_exported_only_for_the_stack_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.settings import load_settings

    connection = {
        "broker_url": "redis://127.0.0.1:1/0", "s3_endpoint_url": "http://127.0.0.1:2",
        "aws_access_key_id": LOCAL_AWS_CREDENTIAL, "aws_secret_access_key": LOCAL_AWS_CREDENTIAL,
    }  # fmt: skip
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "connection.json").write_text(json.dumps(connection))
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path))
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEBLUR_S3_ENDPOINT_URL", "https://s3.example.org")
    assert load_settings().s3_endpoint_url == "https://s3.example.org"
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # real S3: boto3 finds the real credentials itself
    monkeypatch.delenv("DEBLUR_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mine")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "my-secret")
    assert load_settings().s3_endpoint_url == "http://127.0.0.1:2"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "mine"  # credentials already set are kept
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    load_settings()
    assert os.environ["AWS_ACCESS_KEY_ID"] == os.environ["AWS_SECRET_ACCESS_KEY"] == LOCAL_AWS_CREDENTIAL


def test_passwords_in_service_urls_never_reach_the_output() -> None:
    assert redact("postgresql+psycopg://deblur:s3cret@db:5432/deblur") == "postgresql+psycopg://deblur:***@db:5432/deblur"
    assert redact("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("sqlite:////var/lib/deblur/deblur.db") == "sqlite:////var/lib/deblur/deblur.db"


def test_a_reused_pid_is_not_mistaken_for_the_service() -> None:
    me = os.getpid()
    started = process_start_time(me)
    assert process_alive(me, started)
    if started is not None:  # Linux: the start time tells a recycled pid apart
        assert not process_alive(me, started + 1)


def test_the_demo_talks_to_the_services_stack_up_started_not_to_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DEBLUR_BROKER_URL and DEBLUR_S3_ENDPOINT_URL pointing at dead servers make `up` start local ones; the
    environment still wins in load_settings, so the demo builds its settings from what `up` returned."""
    from deploy.stack import stack_settings

    connection = {
        "broker_url": "redis://127.0.0.1:7001/0", "database_url": f"sqlite:///{tmp_path / 'deblur.db'}",
        "s3_endpoint_url": "http://127.0.0.1:7002", "flower_address": "127.0.0.1", "flower_port": 7003,
        "aws_access_key_id": LOCAL_AWS_CREDENTIAL, "aws_secret_access_key": LOCAL_AWS_CREDENTIAL,
    }  # fmt: skip
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "connection.json").write_text(json.dumps(connection))
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEBLUR_HOME", str(tmp_path))
    monkeypatch.setenv("DEBLUR_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DEBLUR_S3_ENDPOINT_URL", "http://127.0.0.1:2")
    settings = stack_settings(connection)
    assert (settings.broker_url, settings.s3_endpoint_url, settings.flower_port) == (
        connection["broker_url"], connection["s3_endpoint_url"], connection["flower_port"],
    )  # fmt: skip
    assert settings.resolved_database_url() == connection["database_url"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == LOCAL_AWS_CREDENTIAL  # moto's dummy credentials come along


def exited_process() -> tuple[int, int | None]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(proc.pid)
    proc.wait()
    return proc.pid, started


def test_start_up_fails_when_our_process_died_even_if_its_port_answers(tmp_path: Path) -> None:
    """Another program may take the port of a service that died while starting: its answer is not ours."""
    from deploy.stack import ServiceRecord, StackError

    stack = LocalStack(tmp_path)
    log = tmp_path / "redis.log"
    log.write_text("Address already in use\n")
    pid, started = exited_process()
    dead = ServiceRecord(name="redis", url="redis://127.0.0.1:7001/0", pid=pid, started=started, log=str(log))
    with pytest.raises(StackError, match="redis exited while starting") as raised:
        stack._wait([(dead, lambda: True)], time.monotonic() + 5)
    assert "Address already in use" in str(raised.value)

    # alive when the probe starts, gone when it answers
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = ServiceRecord(name="s3", url="http://127.0.0.1:7002", pid=proc.pid,
                               started=process_start_time(proc.pid), log=str(log))  # fmt: skip

        def answers_after_it_died() -> bool:
            proc.kill()
            proc.wait()
            return True

        with pytest.raises(StackError, match="s3 exited while starting, and another program now answers"):
            stack._wait([(record, answers_after_it_died)], time.monotonic() + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = ServiceRecord(name="s3", url="http://x", pid=alive.pid, started=process_start_time(alive.pid))
        stack._wait([(ours, lambda: True)], time.monotonic() + 5)  # a live process that answers is up
    finally:
        alive.kill()
        alive.wait()


SUPERVISED_CHILD = """
import os, signal, sys, time, pathlib
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a worker finishing a long batch
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.parametrize("children", ["gentle", "stubborn"])
def test_stopping_a_multi_gpu_worker_stops_its_per_gpu_processes(tmp_path: Path, children: str) -> None:
    """With 2+ GPUs `deblur worker` supervises one process per GPU, each in a process group of its own; stopping
    the stack's worker must stop them too, even when SIGTERM is not enough."""
    from deploy.stack import stop_process

    if not sys.platform.startswith("linux"):
        pytest.skip("process trees are read from /proc")
    markers = [tmp_path / "gpu0.pid", tmp_path / "gpu1.pid"]
    script = tmp_path / "supervisor.py"
    script.write_text(
        "import sys\nfrom worker.cli import supervise\n"
        f"child = {SUPERVISED_CHILD!r}\n"
        f"sys.exit(supervise([([sys.executable, '-c', child, m, {children!r}], {{}}) "
        f"for m in {[str(m) for m in markers]!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    supervisor = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not all(m.exists() and m.read_text() for m in markers):
            assert time.monotonic() < deadline, "the supervised children did not start"
            time.sleep(0.05)
        pids = [int(m.read_text()) for m in markers]
        assert all(os.getpgid(pid) == pid for pid in pids)  # out of reach of a signal to the supervisor's group
        killed = stop_process(supervisor.pid, process_start_time(supervisor.pid), timeout=2)
        assert killed is (children == "stubborn")
        assert not process_alive(supervisor.pid)
        assert not any(process_alive(pid) for pid in pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if supervisor.poll() is None:
            supervisor.kill()
        supervisor.wait()


@pytest.mark.integration
def test_down_leaves_no_process_behind(tmp_path: Path) -> None:
    """A stack of its own: pytest-xdist's work stealing may run the module's other tests after this one."""
    require_services()
    home = tmp_path
    up = stack_cli(home, "up", "--timeout", "120")
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        first = json.loads((home / "stack" / "connection.json").read_text())
        check_down(home, first)
        # the next 'up' takes the same ports again: Flower's address and the URLs a user noted stay valid
        again = stack_cli(home, "up", "--timeout", "120", "--no-worker")
        assert again.returncode == 0, f"stack up failed:\n{again.stdout}\n{again.stderr}"
        second = json.loads((home / "stack" / "connection.json").read_text())
        assert {key: second[key] for key in ("broker_url", "s3_endpoint_url", "flower_port")} == \
            {key: first[key] for key in ("broker_url", "s3_endpoint_url", "flower_port")}
    finally:
        stack_cli(home, "down", "--timeout", "20")


def check_down(home: Path, connection: dict[str, object]) -> None:
    state = LocalStack(home).load_state()
    pids = {name: (r.pid, r.started) for name, r in state.items() if r.pid is not None}
    assert set(pids) == {"redis", "s3", "flower", "worker"}
    workers = get_json(f"http://127.0.0.1:{connection['flower_port']}/api/workers?refresh=1")
    assert isinstance(workers, dict)
    pool = [pid for info in workers.values() for pid in info["stats"]["pool"]["processes"]]
    assert pool and all(process_alive(pid) for pid in pool)

    down = stack_cli(home, "down")
    assert down.returncode == 0, down.stderr
    for name in ("worker", "flower", "s3", "redis"):
        assert f"{name}: stopped (pid {pids[name][0]})" in down.stdout
    assert not any(process_alive(pid, started) for pid, started in pids.values())
    assert not any(process_alive(pid) for pid in pool)  # Celery's pool children went with their parent
    assert not (home / "stack" / "connection.json").exists()
    assert (home / "stack" / "redis.log").exists()  # logs stay for post-mortems
    status = stack_cli(home, "status")
    assert status.returncode == 3 and "no stack is running" in status.stdout



def test_a_port_left_in_time_wait_by_a_dead_server_counts_as_free_and_a_listened_one_does_not() -> None:
    """After the stack's Redis died, 'deblur stack up' refused to start it again for over a minute: its port held
    only the dead server's closing connections, which the servers (setting SO_REUSEADDR) start over, but the
    stack's probe bound without it."""
    import socket

    from deploy.stack import port_is_free

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert not port_is_free(port)  # listened on
    accepted.close()  # the server side closes first, as a dying server's does: its end waits in TIME_WAIT
    server.close()
    client.recv(1)
    client.close()
    assert port_is_free(port)
