"""Real services for the tests that prove the product.

Each session starts its own Redis server and S3 endpoint (``moto_server``) on
free loopback ports and creates a throw-away PostgreSQL database. A missing
service skips the tests that need it on a laptop and fails them in CI (when
the ``CI`` environment variable is set).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# Tests never talk to a developer's own stack or AWS account.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["DEBLUR_HOME"] = str(Path(os.environ.get("PYTEST_DEBLUR_HOME", f"/tmp/deblur-tests-{os.getpid()}")))


def missing_service(message: str) -> None:
    """Skip locally, fail in CI: a green CI run must not hide a missing service."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is an error, not a skip)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:  # type: ignore[type-arg]
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def venv_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed (apt-get install -y redis-server, or run 'make test')")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 15, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = venv_bin("moto_server")
    if binary is None:
        missing_service("moto_server is not installed (pip install 'moto[server]', or run 'make test')")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@contextmanager
def new_postgres_database() -> Iterator[str]:
    """A PostgreSQL database of its own on the test server, dropped afterwards (skips or fails when absent)."""
    base = os.environ.get("DEBLUR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError:
        missing_service("psycopg is not installed (pip install 'deblur[postgres]')")
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"deblur_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # connection refused, auth, …
        admin.dispose()
        missing_service(f"PostgreSQL at {base} is not usable ({type(exc).__name__}: {exc}); run 'make test'")
    url = base.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from db.engine import get_engine

        get_engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
                "AND pid <> pg_backend_pid()"
            ))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema yet, for migration tests: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with new_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'deblur.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def env(redis_url: str, s3_endpoint: str, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's settings pointed at the session's services (a queue of its own);
    returns the variables for child processes. Parametrised over SQLite and PostgreSQL."""
    from tests.e2e_helpers import use_services

    return use_services(monkeypatch, redis_url, s3_endpoint, database_url, tmp_path / "home")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def one_torch_thread() -> None:
    """Torch on one thread, so a model test's figures do not depend on the machine's core count.

    Modules that restore images opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``;
    torch is imported here, not at the top, so torch-free tests never load it.
    """
    import torch

    torch.set_num_threads(1)
