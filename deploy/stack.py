"""The embedded local stack behind ``deblur stack up|down|status``.

Everything runs on loopback as background processes whose pids, ports and logs
live in one folder, ``$DEBLUR_HOME/stack/``:

- Redis (the system's ``redis-server``, no persistence) as the Celery broker,
- an S3 endpoint (``moto_server``, in memory),
- the SQLite database ``$DEBLUR_HOME/deblur.db`` (migrated when the ``db``
  package provides ``db.engine.upgrade``),
- Flower and one worker (``python -m worker.cli flower|worker``).

Ports are picked free, never assumed; a service gets the port it had last
time again while that one is free (``ports.json``). ``up`` writes ``connection.json``, which
:func:`jobs.settings.load_settings` reads, so every later ``deblur`` command
talks to this stack without exports. A service the environment already points
at (``DEBLUR_BROKER_URL``, ``DEBLUR_S3_ENDPOINT_URL``, ``DEBLUR_DATABASE_URL``)
is reused instead of started, when it answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from jobs.errors import DeblurError
from jobs.settings import Settings, deblur_home, load_settings

Echo = Callable[[str], None]

STACK_WORKER_NAME = "deblur-stack"
LOCAL_AWS_CREDENTIAL = "deblur-local"  # moto accepts any credentials; boto3 needs some
LOOPBACK = "127.0.0.1"
SERVICE_ORDER = ("redis", "s3", "database", "flower", "worker")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StackError(DeblurError):
    """The local stack cannot start or stop; the message names the service and its log."""


@dataclass
class ServiceRecord:
    """What the state file remembers about one service of the stack."""

    name: str
    url: str
    pid: int | None = None  # None: not a process of ours (external service, or the database file)
    started: int | None = None  # process start time in clock ticks since boot, to detect a reused pid
    port: int | None = None
    log: str | None = None
    external: bool = False


@dataclass(frozen=True)
class ServiceStatus:
    """A service as ``deblur stack status`` reports it."""

    name: str
    state: str  # running, stopped, external, present, missing
    pid: int | None
    url: str
    log: str | None

    @property
    def ok(self) -> bool:
        return self.state in {"running", "external", "present"}


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server may listen on ``port`` of the loopback address. Sockets of a server that just died
    (TIME_WAIT, FIN_WAIT_2) do not count: the servers set SO_REUSEADDR and start over them, as this probe does;
    without it a stack whose Redis died could not be brought up again for a minute or more."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) from /proc, or None where /proc is not available."""
    stat = _proc_stat_fields(pid)
    return (stat[0], int(stat[19])) if stat else None


def descendants(pid: int) -> list[tuple[int, int | None]]:
    """(pid, start time) of every process below ``pid``: children, grandchildren, ... (empty without /proc).

    A multi-GPU worker's per-GPU processes run in process groups of their own, out of
    reach of a signal to the group of ``pid``.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    starts: dict[int, int] = {}
    for child in entries:
        stat = _proc_stat_fields(child)
        if stat is None:
            continue
        children.setdefault(int(stat[1]), []).append(child)
        starts[child] = int(stat[19])
    found: list[tuple[int, int | None]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, starts.get(child)))
        todo += children.get(child, [])
    return found


def process_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int, started: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``started`` is known, is the same process."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state in {"Z", "X"}:
        return False
    return started is None or start == started


def _reap(pid: int) -> None:
    # A stack brought up from this very process leaves zombies until they are waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_group(pid: int, signum: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)  # the service and its children (Celery's pool, Flower's helpers)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def stop_process(pid: int, started: int | None, timeout: float) -> bool:
    """Stop ``pid`` and every process below it; True if any of them had to be killed.

    SIGTERM goes to the process group of ``pid`` (a multi-GPU worker's supervisor forwards
    it to its per-GPU processes, which have groups of their own); whatever of the family
    still runs after ``timeout`` s gets SIGKILL, group by group.
    """
    if not process_alive(pid, started):
        return False
    family = {pid: started, **dict(descendants(pid))}
    _signal_group(pid, signal.SIGTERM)

    def running() -> list[int]:
        return [p for p, start in family.items() if process_alive(p, start)]

    deadline = time.monotonic() + timeout
    rescan = time.monotonic() + 1
    while running() and time.monotonic() < deadline:
        if time.monotonic() > rescan:  # children started late (a supervisor still starting its workers)
            family.update(descendants(pid))
            rescan = time.monotonic() + 1
        time.sleep(0.1)
    family.update(descendants(pid))
    left = running()
    # The group of pid (also catches pool children that outlived their parent), and the groups
    # of its descendants that lead one of their own.
    groups = {pid}
    for member in left:
        stat = _proc_stat_fields(member)
        if stat is not None and int(stat[2]) in family:
            groups.add(int(stat[2]))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for member in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(left)


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail)


# -- probes ----------------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def http_answers(url: str) -> bool:
    """Any HTTP response (even 4xx/5xx) means the server is up."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def answering_workers(broker_url: str, timeout: float = 1.0) -> list[str]:
    """Node names of every Celery worker that answers a ping on ``broker_url``."""
    from celery import Celery

    probe = Celery("deblur-stack-probe", broker=broker_url, set_as_current=False)
    probe.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json")
    try:
        replies = probe.control.ping(timeout=timeout) or []
    except Exception:  # the broker is probed by its own check; here any failure means "not yet"
        return []
    finally:
        probe.close()
    return [name for reply in replies for name in reply]


def is_node_of(node: str, worker_name: str) -> bool:
    """True for ``worker_name@host`` and its per-GPU children ``worker_name-gpuN@host``."""
    name = node.partition("@")[0]
    return name == worker_name or name.startswith(worker_name + "-gpu")


# -- the stack -------------------------------------------------------------------------------


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "redis-server is not installed; install it with `apt-get install -y redis-server` "
            "(make demo and make test do this), or point DEBLUR_BROKER_URL at a running Redis"
        )
    return binary


def _moto_binary() -> str:
    local = Path(sys.executable).parent / "moto_server"
    if local.exists():
        return str(local)
    found = shutil.which("moto_server")
    if found is None:
        raise StackError(
            "moto_server is not installed next to this Python; install the stack extra: pip install 'deblur[stack]'"
        )
    return found


def _check_flower_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("flower") is None:
        raise StackError("Flower is not installed; install the stack extra: pip install 'deblur[stack]'")


class LocalStack:
    """The local stack living in ``home/stack/`` (``home`` defaults to ``$DEBLUR_HOME``)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or deblur_home()).expanduser().resolve()
        self.dir = self.home / "stack"
        self.state_path = self.dir / "state.json"
        self.connection_path = self.dir / "connection.json"
        # each service's last port, kept after 'down': the next 'up' takes it again while it is free, so Flower's
        # address and the connection URLs a user noted (or set in DEBLUR_BROKER_URL) stay the same
        self.ports_path = self.dir / "ports.json"
        # unique per state folder: two stacks may share one Redis (DEBLUR_BROKER_URL)
        self.worker_name = f"{STACK_WORKER_NAME}-{hashlib.sha1(str(self.home).encode()).hexdigest()[:8]}"

    # state ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load_state(self) -> dict[str, ServiceRecord]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StackError(f"the stack state file {self.state_path} is unreadable ({exc}); delete it") from None
        return {name: ServiceRecord(**record) for name, record in data.get("services", {}).items()}

    def _save_state(self, records: dict[str, ServiceRecord]) -> None:
        ordered = {name: asdict(records[name]) for name in SERVICE_ORDER if name in records}
        _write_json(self.state_path, {"services": ordered})
        ports = {**self._last_ports(), **{name: r.port for name, r in records.items() if r.port and not r.external}}
        _write_json(self.ports_path, ports)

    def _last_ports(self) -> dict[str, int]:
        """The port each service had when the stack last ran (empty when none was recorded or the file is bad)."""
        try:
            data = json.loads(self.ports_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {name: port for name, port in data.items() if isinstance(port, int) and 0 < port < 65536}

    def is_alive(self, record: ServiceRecord) -> bool:
        return record.pid is not None and process_alive(record.pid, record.started)

    # up ------------------------------------------------------------------------------------

    def up(self, *, worker: bool = True, timeout: float = 180.0, echo: Echo = print) -> dict[str, object]:
        """Start whatever is not running yet, wait until each service answers, write connection.json.

        Idempotent: running services are kept and reported. On failure the
        services this call started are stopped again and the error names the log.
        Returns the connection values written.
        """
        with self._locked():
            records = self.load_state()
            started: list[ServiceRecord] = []
            try:
                connection = self._bring_up(records, started, worker=worker, timeout=timeout, echo=echo)
            except BaseException:
                for record in reversed(started):
                    if record.pid is not None:
                        stop_process(record.pid, record.started, timeout=10)
                    records.pop(record.name, None)
                if any(record.pid is not None for record in records.values()):
                    self._save_state(records)
                else:
                    self.state_path.unlink(missing_ok=True)
                raise
            _write_json(self.connection_path, connection)
            return connection

    def _bring_up(
        self,
        records: dict[str, ServiceRecord],
        started: list[ServiceRecord],
        *,
        worker: bool,
        timeout: float,
        echo: Echo,
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        # The schema first: the worker may find queued batches as soon as it connects.
        db_rec = self._ensure_database(records, echo)
        # Then everything at once: Flower and the worker retry the broker until Redis answers,
        # so their (slow) Python start-up overlaps with Redis's and moto's.
        redis_rec = self._ensure_redis(records, started, echo)
        s3_rec = self._ensure_s3(records, started, echo)
        env = self._child_env(redis_rec.url, s3_rec, db_rec.url)
        flower_rec = self._ensure_flower(records, started, env, echo)
        worker_rec = self._ensure_worker(records, started, env, echo) if worker else None
        if not worker and "worker" in records:
            self._stop_record(records.pop("worker"), 20, echo)
        self._save_state(records)
        checks = [
            (redis_rec, lambda: redis_answers(redis_rec.url)),
            (s3_rec, lambda: http_answers(s3_rec.url)),
            (flower_rec, lambda: http_answers(flower_rec.url + "healthcheck")),
        ]
        if worker_rec is not None:
            checks.append(
                (worker_rec, lambda: any(is_node_of(n, self.worker_name) for n in answering_workers(redis_rec.url)))
            )
        self._wait(checks, deadline)

        connection: dict[str, object] = {
            "broker_url": redis_rec.url,
            "database_url": db_rec.url,
            "s3_endpoint_url": s3_rec.url,
            "flower_address": LOOPBACK,
            "flower_port": flower_rec.port,
        }
        if not s3_rec.external:
            connection["aws_access_key_id"] = LOCAL_AWS_CREDENTIAL
            connection["aws_secret_access_key"] = LOCAL_AWS_CREDENTIAL
        echo(f"stack up: Flower at {flower_rec.url}; connection file {self.connection_path}")
        echo("every deblur command now uses this stack (environment variables still take precedence)")
        return connection

    def _kept(self, records: dict[str, ServiceRecord], name: str, echo: Echo) -> ServiceRecord | None:
        record = records.get(name)
        if record is None:
            return None
        if record.external or self.is_alive(record):
            echo(f"{name}: already running ({redact(record.url)}{_pid_text(record)})")
            return record
        return None

    def _port_for(self, records: dict[str, ServiceRecord], name: str, fixed: int | None = None) -> int:
        previous = records.get(name)
        port = fixed or (previous.port if previous and previous.port else None)
        if port is None:
            # services bind seconds after they start: never hand out a port another one is about to take
            taken = {r.port for r in records.values() if r.port}
            last = self._last_ports().get(name)
            if last is not None and last not in taken and port_is_free(last):
                return last
            port = free_port()
            while port in taken:
                port = free_port()
            return port
        if not port_is_free(port):
            raise StackError(
                f"{name}: port {port} on {LOOPBACK} is taken by another program; "
                "free it, or run `deblur stack down` and `deblur stack up` to pick new ports"
            )
        return port

    def _spawn(
        self, name: str, argv: list[str], port: int | None, url: str, env: dict[str, str] | None = None
    ) -> ServiceRecord:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as handle:
            handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            handle.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env if env is not None else dict(os.environ),
                cwd=self.dir,
                start_new_session=True,  # survives the CLI, and `down` can signal its whole group
            )
        return ServiceRecord(
            name=name, url=url, pid=proc.pid, started=process_start_time(proc.pid), port=port, log=str(log)
        )

    def _started(
        self, records: dict[str, ServiceRecord], started: list[ServiceRecord], record: ServiceRecord, echo: Echo
    ) -> ServiceRecord:
        records[record.name] = record
        started.append(record)
        echo(f"{record.name}: started {record.url} (pid {record.pid}, log {record.log})")
        return record

    def _reuse(
        self,
        records: dict[str, ServiceRecord],
        name: str,
        env_var: str,
        answers: Callable[[str], bool],
        echo: Echo,
    ) -> ServiceRecord | None:
        """The running service of this stack, or the one ``env_var`` points at if it answers; else None."""
        kept = self._kept(records, name, echo)
        if kept:
            return kept
        external = os.environ.get(env_var)
        if not external:
            return None
        if answers(external):
            echo(f"{name}: using {env_var}={redact(external)}")
            records[name] = ServiceRecord(name=name, url=external, external=True)
            return records[name]
        echo(
            f"{name}: {env_var}={redact(external)} does not answer; starting a local one. "
            f"Unset {env_var} so that other commands use it too."
        )
        return None

    def _ensure_redis(
        self, records: dict[str, ServiceRecord], started: list[ServiceRecord], echo: Echo
    ) -> ServiceRecord:
        reused = self._reuse(records, "redis", "DEBLUR_BROKER_URL", redis_answers, echo)
        if reused:
            return reused
        binary = _redis_binary()
        port = self._port_for(records, "redis")
        argv = [
            binary, "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--protected-mode", "yes", "--daemonize", "no",
        ]  # fmt: skip
        record = self._spawn("redis", argv, port, f"redis://{LOOPBACK}:{port}/0")
        return self._started(records, started, record, echo)

    def _ensure_s3(
        self, records: dict[str, ServiceRecord], started: list[ServiceRecord], echo: Echo
    ) -> ServiceRecord:
        reused = self._reuse(records, "s3", "DEBLUR_S3_ENDPOINT_URL", http_answers, echo)
        if reused:
            return reused
        binary = _moto_binary()
        port = self._port_for(records, "s3")
        record = self._spawn("s3", [binary, "-H", LOOPBACK, "-p", str(port)], port, f"http://{LOOPBACK}:{port}")
        return self._started(records, started, record, echo)

    def _ensure_database(self, records: dict[str, ServiceRecord], echo: Echo) -> ServiceRecord:
        external = os.environ.get("DEBLUR_DATABASE_URL")
        url = external or f"sqlite:///{self.home / 'deblur.db'}"
        record = ServiceRecord(name="database", url=url, external=bool(external))
        records["database"] = record
        migrate = _find_upgrade()
        if migrate is None:
            echo(f"database: {redact(url)} (schema not created: this installation has no db package)")
            return record
        try:
            migrate(url)
        except Exception as exc:
            raise StackError(f"database: migrating {redact(url)} failed: {exc}") from exc
        echo(f"database: {redact(url)} (migrated)")
        return record

    def _child_env(self, broker_url: str, s3: ServiceRecord, database_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DEBLUR_HOME=str(self.home),
            DEBLUR_BROKER_URL=broker_url,
            DEBLUR_S3_ENDPOINT_URL=s3.url,
            DEBLUR_DATABASE_URL=database_url,
            PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p),
        )
        if not s3.external and "AWS_ACCESS_KEY_ID" not in env:
            env["AWS_ACCESS_KEY_ID"] = LOCAL_AWS_CREDENTIAL
            env["AWS_SECRET_ACCESS_KEY"] = LOCAL_AWS_CREDENTIAL
        return env

    def _ensure_flower(
        self, records: dict[str, ServiceRecord], started: list[ServiceRecord], env: dict[str, str], echo: Echo
    ) -> ServiceRecord:
        kept = self._kept(records, "flower", echo)
        if kept:
            return kept
        _check_flower_installed()
        fixed = os.environ.get("DEBLUR_FLOWER_PORT")
        port = self._port_for(records, "flower", int(fixed) if fixed and fixed.isdigit() else None)
        argv = [sys.executable, "-m", "worker.cli", "flower", "--address", LOOPBACK, "--port", str(port)]
        flower_env = {**env, "DEBLUR_FLOWER_ADDRESS": LOOPBACK, "DEBLUR_FLOWER_PORT": str(port)}
        record = self._spawn("flower", argv, port, f"http://{LOOPBACK}:{port}/", flower_env)
        return self._started(records, started, record, echo)

    def _ensure_worker(
        self, records: dict[str, ServiceRecord], started: list[ServiceRecord], env: dict[str, str], echo: Echo
    ) -> ServiceRecord:
        kept = self._kept(records, "worker", echo)
        if kept:
            return kept
        # With 2+ GPUs this is a supervisor of one process per GPU, each in a process group of its
        # own: stop_process stops the supervisor's descendants too.
        argv = [
            sys.executable, "-m", "worker.cli", "worker",
            "--hostname", f"{self.worker_name}@%h", "--concurrency", "1",
        ]  # fmt: skip
        record = self._spawn("worker", argv, None, f"celery node {self.worker_name}@{socket.gethostname()}", env)
        return self._started(records, started, record, echo)

    def _wait(self, checks: list[tuple[ServiceRecord, Callable[[], bool]]], deadline: float) -> None:
        """Wait until every service answers; fail as soon as one of them exits, or at the deadline.

        A process of ours counts as up only if it still runs after its address answered:
        another program may have taken its port meanwhile (it then exits: address in use).
        """
        pending = list(checks)
        while pending:
            for record, answers in list(pending):
                ours = record.pid is not None
                if ours and not self.is_alive(record):
                    raise self._exited(record)
                if answers():
                    if ours and not self.is_alive(record):
                        raise self._exited(record, answered=True)
                    pending.remove((record, answers))
            if pending and time.monotonic() > deadline:
                record = pending[0][0]
                where = f"; see {record.log}:\n{log_tail(record.log)}" if record.log else ""
                raise StackError(f"{record.name} ({redact(record.url)}) did not answer in time{where}")
            if pending:
                time.sleep(0.25)

    @staticmethod
    def _exited(record: ServiceRecord, *, answered: bool = False) -> StackError:
        other = f", and another program now answers at {redact(record.url)}" if answered else ""
        return StackError(
            f"{record.name} exited while starting{other}; see {record.log}:\n{log_tail(record.log)}"
        )

    # down / status -------------------------------------------------------------------------

    def _stop_record(self, record: ServiceRecord, timeout: float, echo: Echo) -> None:
        if record.pid is None:
            if record.external:
                echo(f"{record.name}: external ({redact(record.url)}), left running")
            return
        if not self.is_alive(record):
            echo(f"{record.name}: was not running (pid {record.pid})")
            return
        killed = stop_process(record.pid, record.started, timeout)
        how = f"killed after {timeout:.0f} s" if killed else "stopped"
        echo(f"{record.name}: {how} (pid {record.pid})")

    def down(self, *, timeout: float = 20.0, echo: Echo = print) -> None:
        """Stop every process the stack started (SIGTERM, SIGKILL after ``timeout`` s) and remove connection.json.

        Logs and the SQLite database stay; S3 objects in moto are gone with it.
        """
        with self._locked():
            records = self.load_state()
            if not records:
                echo(f"no stack is running in {self.dir}")
            for name in reversed(SERVICE_ORDER):
                if name in records:
                    self._stop_record(records[name], timeout, echo)
            self.connection_path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)

    def status(self) -> list[ServiceStatus]:
        """Each recorded service with whether its process is alive (empty when no stack is recorded)."""
        result = []
        records = self.load_state()
        for name in SERVICE_ORDER:
            record = records.get(name)
            if record is None:
                continue
            if record.name == "database" and not record.external:
                path = Path(record.url.removeprefix("sqlite:///"))
                state = "present" if path.exists() else "missing"
            elif record.external:
                state = "external"
            else:
                state = "running" if self.is_alive(record) else "stopped"
            result.append(ServiceStatus(name, state, record.pid, redact(record.url), record.log))
        return result


def stack_settings(connection: Mapping[str, object]) -> Settings:
    """Settings for the stack :meth:`LocalStack.up` returned ``connection`` for, whatever the environment says.

    :func:`jobs.settings.load_settings` lets DEBLUR_BROKER_URL and DEBLUR_S3_ENDPOINT_URL win
    over connection.json, but ``up`` starts its own services when those do not answer.
    """
    names = {f.name for f in fields(Settings)}
    return load_settings(**{name: value for name, value in connection.items() if name in names})


def _pid_text(record: ServiceRecord) -> str:
    return f", pid {record.pid}" if record.pid else ""


def _find_upgrade() -> Callable[[str], object] | None:
    """``db.engine.upgrade`` when this installation has it."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec("db.engine") is None:
            return None
    except ModuleNotFoundError:
        return None
    module = importlib.import_module("db.engine")
    return getattr(module, "upgrade", None)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and status output."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _write_json(path: Path, data: object) -> None:
    """Write atomically, readable by the owner only: URLs from the environment may hold passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
