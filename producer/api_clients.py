"""Per-client bearer tokens for the HTTP API: who submitted a job, and who may only read.

One shared ``DEBLUR_API_TOKEN`` cannot say which backend submitted a job, nor be
revoked for one team without breaking the others. ``DEBLUR_API_CLIENTS`` names a
file with one client per line::

    # name            token digest                                                             scope
    ingest-backend    sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  submit
    grafana           sha256:a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3  read

The file holds SHA-256 digests, never the tokens, so reading it does not let
anyone in. ``deblur api-client add NAME`` makes a token, appends its line and
prints the token once. The API re-reads the file when it changes (within a
second), so adding or revoking a client needs no restart; a file it cannot
parse refuses every request (503) until it is mended rather than keep a revoked
client in.

Scopes: ``submit`` may submit and preview jobs and change (cancel, pause,
resume, retry, verify) the jobs it submitted; ``read`` may only read (the GET
routes; every client reads every job). The shared token may change any job.
Limits may follow the scope, so one team cannot crowd the others out of a
shared queue::

    ingest-backend    sha256:...  submit  max_priority=5 window=4

``see=own`` keeps a client to its own jobs: listings, usage and a job's
status, images and summary answer as if the others did not exist (404).
``max_priority=P`` refuses (403) a job that asks for a priority above P (one
that asks for none gets the default, 5, or P if lower); ``window=N`` gives the
client's jobs at most N batches in the broker at once (a job asking for none,
for 0 or for more gets N), so they take turns with everyone else's. Every job a client submits carries the label
``api-client=<name>`` (see :data:`jobs.labels.API_CLIENT_LABEL`), so ``deblur
usage --by label:api-client`` charges each client for its jobs and ``GET
/v1/jobs?mine=true`` lists a client's own.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import ConfigurationError, InputError

log = logging.getLogger(__name__)

SCOPES = ("submit", "read")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
TOKEN_PREFIX = "dbl_"
RECHECK_S = 1.0


@dataclass(frozen=True)
class ApiClient:
    """A caller the API knows: ``name`` (None for the shared DEBLUR_API_TOKEN) and its scope."""

    name: str | None
    scope: str = "submit"
    max_priority: int | None = None  # jobs above it are refused
    window: int | None = None  # the most batches of one of its jobs in the broker at once
    see: str = "all"  # "own": it reads only the jobs it submitted (others' are answered as unknown)

    @property
    def sees_all(self) -> bool:
        """Whether it may read every job (the shared token always does)."""
        return self.name is None or self.see == "all"

    def limited_window(self, requested: int | None) -> int | None:
        """The window a job of this client gets when it asks for ``requested`` (None: the server's default)."""
        if self.window is None:
            return requested
        return self.window if not requested else min(requested, self.window)

    @property
    def may_submit(self) -> bool:
        return self.scope == "submit"


SHARED_TOKEN_CLIENT = ApiClient(name=None, scope="submit")


def token_digest(token: str) -> str:
    """``sha256:<hex>`` of a token, as the clients file stores it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh token: ``dbl_`` and 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_client_name(name: str) -> str:
    """``name`` if it can name a client (1-63 letters, digits, ``_ . -``), else :class:`InputError`."""
    if not NAME.fullmatch(name):
        raise InputError(f"{name!r} cannot name an API client: use 1-63 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit, e.g. ingest-backend")
    return name


LIMITS = {"max_priority": (0, 9), "window": (1, 1_000_000)}
SEE = ("all", "own")  # see=own: the client reads only its own jobs


def parse_limits(fields: list[str]) -> dict[str, int | str]:
    """``key=value`` limits (:data:`LIMITS`, and ``see=own|all``) as a dict; :class:`InputError` names one that
    is not allowed."""
    limits: dict[str, int | str] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or (key not in LIMITS and key != "see"):
            raise InputError(f"{field!r} is not a limit: use " + " or ".join(f"{k}=N" for k in LIMITS)
                             + " or see=own")
        if key in limits:
            raise InputError(f"{key} is given twice")
        if key == "see":
            if value not in SEE:
                raise InputError(f"see={value}: expected see=own (only its own jobs) or see=all")
            limits[key] = value
            continue
        low, high = LIMITS[key]
        if not value.isdigit() or not low <= int(value) <= high:
            raise InputError(f"{key}={value}: expected a whole number from {low} to {high}")
        limits[key] = int(value)
    return limits


def client_line(name: str, digest: str, scope: str, limits: dict[str, int | str] | None = None) -> str:
    """One line of the clients file."""
    return " ".join([name, digest, scope, *(f"{k}={v}" for k, v in (limits or {}).items())]) + "\n"


def parse_clients(text: str, source: str = "DEBLUR_API_CLIENTS") -> dict[str, ApiClient]:
    """The clients a file's text declares, keyed by token digest.

    Raises :class:`ConfigurationError` naming ``source``, the line and what is wrong with it: fewer than three
    fields, a bad name, a digest that is not ``sha256:`` and 64 lowercase hex digits, an unknown scope or limit,
    or a name or digest declared twice.
    """
    clients: dict[str, ApiClient] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        fields = line.split()
        if len(fields) < 3:
            raise ConfigurationError(f"{where}: expected 'NAME sha256:DIGEST SCOPE [LIMIT=N ...]', got "
                                     f"{len(fields)} fields")
        name, digest, scope = fields[:3]
        # no field is quoted back in these errors: a token pasted into the wrong one must not reach a log
        try:
            check_client_name(name)
        except InputError:
            raise ConfigurationError(f"{where}: the first field is not a client name (1-63 letters, digits, '_', '.' "
                                     "or '-')") from None
        if any(field.partition("=")[0] not in (*LIMITS, "see") for field in fields[3:]):
            raise ConfigurationError(f"{where}: a field after the scope is not a limit: use "
                                     + ", ".join(f"{key}=N" for key in LIMITS) + " or see=own|all")
        try:
            limits = parse_limits(fields[3:])  # its errors quote only a known limit and its value
        except InputError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        if not DIGEST.fullmatch(digest):  # not quoted: a token pasted there by mistake must not reach a log
            raise ConfigurationError(f"{where}: the second field is not a token digest (sha256: and 64 lowercase "
                                     "hex digits); 'deblur api-client add' writes the line for you")
        if scope not in SCOPES:
            raise ConfigurationError(f"{where}: the third field is not a scope: use one of {', '.join(SCOPES)}")
        if name in names:
            raise ConfigurationError(f"{where}: client {name!r} is declared twice")
        if digest in clients:
            raise ConfigurationError(f"{where}: the same token is declared for {clients[digest].name!r} already")
        names.add(name)
        clients[digest] = ApiClient(name=name, scope=scope, **limits)
    return clients


class ClientRegistry:
    """The callers an API accepts: the clients file's (re-read when it changes) and the shared token, if any."""

    def __init__(self, path: str | os.PathLike[str] | None, shared_token: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._shared = shared_token.encode() if shared_token else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._clients: dict[str, ApiClient] = {}
        self._error: str | None = None
        self._started = False
        if self.path is not None:
            self._reload()
            if self._error is not None:
                raise ConfigurationError(self._error)
        self._started = True

    @property
    def required(self) -> bool:
        """Whether requests must carry a token at all."""
        return self._shared is not None or self.path is not None

    def describe(self) -> str:
        """What authenticates requests, for the server's start-up line."""
        parts = []
        if self.path is not None:
            parts.append(f"{len(self.clients())} client tokens from {self.path}")
        if self._shared is not None:
            parts.append("the shared DEBLUR_API_TOKEN")
        return " and ".join(parts) or "no token (DEBLUR_API_TOKEN and DEBLUR_API_CLIENTS unset)"

    def clients(self) -> dict[str, ApiClient]:
        """The clients file's clients now, keyed by token digest (re-read at most once a second).

        Raises :class:`ConfigurationError` while the file cannot be read or parsed.
        """
        if self.path is None:
            return {}
        with self._lock:
            if time.monotonic() - self._checked >= RECHECK_S:
                self._reload()
            if self._error is not None:
                raise ConfigurationError(self._error)
            return self._clients

    def authenticate(self, token: str) -> ApiClient | None:
        """The caller ``token`` belongs to, or None for an unknown token."""
        given = token.encode()
        if self._shared is not None and secrets.compare_digest(given, self._shared):
            return SHARED_TOKEN_CLIENT
        digest = token_digest(token)
        found = None
        for known, client in self.clients().items():  # every entry compared, in constant time each
            if secrets.compare_digest(known.encode(), digest.encode()):
                found = client
        return found

    def _reload(self) -> None:
        assert self.path is not None
        self._checked = time.monotonic()
        try:
            status = self.path.stat()
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
            if stamp == self._stamp and self._error is None:
                return
            # utf-8-sig: an editor on Windows may start the file with a byte-order mark
            self._clients = parse_clients(self.path.read_text(encoding="utf-8-sig"), source=str(self.path))
            self._stamp, self._error = stamp, None
        except (OSError, UnicodeDecodeError, ConfigurationError) as exc:
            reason = str(exc) if isinstance(exc, ConfigurationError) else f"cannot read {self.path}: {exc}"
            if reason != self._error and self._started:  # at start-up the caller reports it
                log.error("API clients file refused, every request is refused until it is mended: %s", reason)
            self._stamp, self._error, self._clients = None, reason, {}


@contextmanager
def _editing(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (a ``.lock`` file beside the clients file) while one command edits it, so two
    edits at once cannot lose one of them."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_client(path: Path, name: str, scope: str = "submit", limits: dict[str, int | str] | None = None) -> str:
    """Make a token for a new client, append its line (with its ``limits``, see :data:`LIMITS`) to the clients
    file (created readable by its owner only) and return the token, which is not stored anywhere.

    Raises :class:`InputError` for a bad name, scope or limit, or a name the file has already.
    """
    check_client_name(name)
    if scope not in SCOPES:
        raise InputError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    limits = {k: v for k, v in (limits or {}).items() if v is not None}
    parse_limits([f"{k}={v}" for k, v in limits.items()])
    if not path.parent.is_dir():
        raise InputError(f"{path.parent} does not exist: create it first (mkdir -p {path.parent}), readable by the "
                         "user the API runs as")
    with _editing(path):
        return _append_client(path, name, scope, limits)


def _append_client(path: Path, name: str, scope: str, limits: dict[str, int | str]) -> str:
    existing = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    declared = parse_clients(existing, source=str(path))
    if any(client.name == name for client in declared.values()):
        raise InputError(f"{path} has a client {name!r} already: remove it first ('deblur api-client remove "
                         f"{name}') to give it a new token")
    token = new_token()
    line = client_line(name, token_digest(token), scope, limits)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as handle:
        if existing and not existing.endswith("\n"):
            handle.write("\n")
        handle.write(line)
    return token


def remove_client(path: Path, name: str) -> bool:
    """Delete a client's line from the clients file; False when it had no such client.

    The file is rewritten beside itself with its mode and (where this user may set it) its owner, and renamed
    over it, so the API never reads half a file nor loses the right to read it.
    """
    if not path.exists():
        return False
    with _editing(path):
        lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
        kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [name]]
        if len(kept) == len(lines):
            return False
        status = path.stat()
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), stat.S_IMODE(status.st_mode))
            with suppress(PermissionError):  # only root may give a file away
                os.fchown(handle.fileno(), status.st_uid, status.st_gid)
            handle.writelines(kept)
        os.replace(temporary, path)
        return True
