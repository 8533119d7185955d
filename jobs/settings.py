"""Every setting in one place, read from the environment and validated once.

Precedence, highest first: an explicit value (a CLI option), the environment
variable, the running local stack's connection file (written by ``deblur stack
up`` in ``DEBLUR_HOME``), the default below. AWS credentials and region are
read by boto3 the standard way (environment, ``~/.aws``, instance roles);
``DEBLUR_S3_ENDPOINT_URL`` points at MinIO, moto or another S3-compatible
server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from jobs.errors import ConfigurationError


def deblur_home() -> Path:
    """Folder for the local stack's state, logs and SQLite database."""
    return Path(os.environ.get("DEBLUR_HOME", "~/.deblur")).expanduser()


def stack_file() -> Path:
    return deblur_home() / "stack" / "connection.json"


@dataclass(frozen=True)
class SettingInfo:
    env: str
    help: str


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :func:`load_settings`."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = ""  # default: SQLite file in DEBLUR_HOME
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    weights_dir: str = "~/.cache/deblur/weights"
    device: str = "auto"
    torch_threads: int = 0
    allow_noncommercial: bool = False
    batch_size: int = 8
    job_window: int = 0
    batch_time_limit: int = 1200
    visibility_timeout: int = 3600
    claim_lease: int = 90
    image_time_limit: int = 0
    io_threads: int = 8
    queue: str = "deblur"
    task_max_retries: int = 5
    image_max_pixels: int = 200_000_000
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    flower_basic_auth: str | None = None
    api_address: str = "127.0.0.1"
    api_port: int = 8000
    api_token: str | None = None
    api_clients: str | None = None
    strip_metadata: bool = False
    notify_secret: str | None = None
    notify_max_retries: int = 8
    notify_allow_networks: str = ""
    image_max_attempts: int = 3
    model_cache_size: int = 8

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{deblur_home() / 'deblur.db'}"

    def resolved_image_time_limit(self) -> int:
        """Seconds one image may take before its worker is taken for hung: ``image_time_limit``, or by default
        the room the other limits leave for one image (the visibility timeout less the batch time limit)."""
        if self.image_time_limit:
            return self.image_time_limit
        return self.visibility_timeout - self.batch_time_limit

    def notify_allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The networks of ``notify_allow_networks``: local addresses notifications may still go to."""
        return parse_networks(self.notify_allow_networks, HELP["notify_allow_networks"].env)


HELP: dict[str, SettingInfo] = {
    "broker_url": SettingInfo("DEBLUR_BROKER_URL", "Redis URL of the Celery broker"),
    "database_url": SettingInfo(
        "DEBLUR_DATABASE_URL",
        "SQLAlchemy URL: sqlite:///path.db (default: $DEBLUR_HOME/deblur.db) or "
        "postgresql+psycopg://user@host/db",
    ),
    "s3_endpoint_url": SettingInfo("DEBLUR_S3_ENDPOINT_URL", "S3-compatible endpoint (MinIO, moto); unset for AWS"),
    "s3_region": SettingInfo("DEBLUR_S3_REGION", "S3 region"),
    "weights_dir": SettingInfo("DEBLUR_WEIGHTS_DIR", "folder of downloaded model weights"),
    "device": SettingInfo("DEBLUR_DEVICE", "auto, cpu, cuda or cuda:N (auto picks CUDA when present)"),
    "torch_threads": SettingInfo("DEBLUR_TORCH_THREADS", "CPU threads per pool process (0: 'deblur worker' divides "
                                 "the CPUs it may use among them; other commands use torch's default)"),
    "allow_noncommercial": SettingInfo(
        "DEBLUR_ALLOW_NONCOMMERCIAL", "1 to allow models under non-commercial licences (MPRNet, Restormer)"
    ),
    "batch_size": SettingInfo("DEBLUR_BATCH_SIZE", "images per Celery task"),
    "job_window": SettingInfo(
        "DEBLUR_JOB_WINDOW",
        "batches of one job in the broker at once, the rest sent as those finish, so jobs submitted later at the "
        "same priority take turns with a large one instead of waiting behind all of it (0: every batch at "
        "submission, first come first served); read when a job is submitted",
    ),
    "batch_time_limit": SettingInfo(
        "DEBLUR_BATCH_TIME_LIMIT",
        "seconds a worker spends on one task before it hands the batch's remaining images to a new task "
        "(below DEBLUR_VISIBILITY_TIMEOUT, with room for one image; 0: never)",
    ),
    "visibility_timeout": SettingInfo(
        "DEBLUR_VISIBILITY_TIMEOUT",
        "seconds a batch may stay unacknowledged before Redis hands it to another worker (its own taken for dead)",
    ),
    "claim_lease": SettingInfo(
        "DEBLUR_CLAIM_LEASE",
        "seconds a worker's hold on the images it is restoring lasts unless renewed (it renews every quarter of "
        "it): a second delivery of the batch leaves them alone meanwhile. A pool process killed mid-batch has its "
        "images taken at once by the process its batch goes to (its worker, asked, says it is gone); a holder "
        "whose worker does not answer is waited out this long (below DEBLUR_VISIBILITY_TIMEOUT)",
    ),
    "image_time_limit": SettingInfo(
        "DEBLUR_IMAGE_TIME_LIMIT",
        "seconds one step of an image (awaiting its download, restoring it, uploading it) may take before its "
        "worker is taken for hung: a pool process ends itself and a fresh "
        "one restores the image (--pool solo: the lease is no longer renewed and the workers' sweep sends the "
        "image again); the hung run writes nothing (0: "
        "DEBLUR_VISIBILITY_TIMEOUT less DEBLUR_BATCH_TIME_LIMIT, the room those leave for one image)",
    ),
    "io_threads": SettingInfo("DEBLUR_IO_THREADS", "download/upload threads per worker process"),
    "queue": SettingInfo("DEBLUR_QUEUE", "Celery queue the jobs go to"),
    "task_max_retries": SettingInfo("DEBLUR_TASK_MAX_RETRIES", "retries of a batch after transient failures"),
    "image_max_pixels": SettingInfo("DEBLUR_IMAGE_MAX_PIXELS", "largest image accepted, in pixels"),
    "flower_address": SettingInfo("DEBLUR_FLOWER_ADDRESS", "address Flower listens on"),
    "flower_port": SettingInfo("DEBLUR_FLOWER_PORT", "port Flower listens on"),
    "flower_basic_auth": SettingInfo("DEBLUR_FLOWER_BASIC_AUTH", "user:password for Flower (unset: API open on loopback)"),
    "api_address": SettingInfo("DEBLUR_API_ADDRESS", "address the HTTP API listens on"),
    "api_port": SettingInfo("DEBLUR_API_PORT", "port the HTTP API listens on"),
    "api_token": SettingInfo("DEBLUR_API_TOKEN", "bearer token the HTTP API requires (unset: no auth)"),
    "api_clients": SettingInfo(
        "DEBLUR_API_CLIENTS",
        "file of the HTTP API's client tokens (NAME sha256:DIGEST submit|read a line; 'deblur api-client add'): each "
        "client's jobs are labelled api-client=NAME; re-read when it changes",
    ),
    "strip_metadata": SettingInfo("DEBLUR_STRIP_METADATA", "1 to drop EXIF/ICC/XMP from outputs"),
    "notify_secret": SettingInfo(
        "DEBLUR_NOTIFY_SECRET",
        "workers sign job-finished notifications with it: X-Deblur-Signature: sha256=HMAC of the body "
        "(unset: unsigned)",
    ),
    "image_max_attempts": SettingInfo(
        "DEBLUR_IMAGE_MAX_ATTEMPTS",
        "starts of one image in a row that lose their worker before it is failed instead of tried again: an image "
        "whose restoration kills its worker (out of memory) would otherwise take down every worker it reaches",
    ),
    "model_cache_size": SettingInfo(
        "DEBLUR_MODEL_CACHE_SIZE",
        "loaded models a worker process keeps (the least recently used goes first): jobs with varied models or "
        "parameters would otherwise pile up weights until memory runs out",
    ),
    "notify_max_retries": SettingInfo(
        "DEBLUR_NOTIFY_MAX_RETRIES",
        "attempts after the first to deliver a notification (back-off 5 s doubling to 10 min)",
    ),
    "notify_allow_networks": SettingInfo(
        "DEBLUR_NOTIFY_ALLOW_NETWORKS",
        "comma-separated CIDRs (e.g. 10.0.0.0/8,127.0.0.1/32) of the local network that job-finished notifications "
        "may be sent to. A notify URL whose host is or resolves to a loopback, private (RFC 1918, fc00::/7), "
        "link-local (169.254.0.0/16 with the cloud metadata service, fe80::/10), shared (100.64.0.0/10), "
        "unspecified, multicast or reserved address outside them is refused at submission, and again by the "
        "worker before each delivery, which connects only to the addresses it checked (unset: none, only public "
        "addresses); read by the producer, the HTTP API and the workers",
    ),
}


def _convert(name: str, kind: Any, text: str) -> Any:
    env = HELP[name].env
    try:
        if kind in (bool, "bool"):
            lowered = text.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError
        if kind in (int, "int"):
            return int(text)
        return text
    except ValueError:
        raise ConfigurationError(f"{env}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def _read_stack_file() -> dict[str, Any]:
    path = stack_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stack_values(data: dict[str, Any] | None = None) -> dict[str, str]:
    data = _read_stack_file() if data is None else data
    return {k: str(v) for k, v in data.items() if k in HELP and v is not None}


def _export_stack_credentials(data: dict[str, Any]) -> None:
    """Give boto3 the local stack's dummy credentials (moto accepts any) unless real ones are set."""
    key, secret = data.get("aws_access_key_id"), data.get("aws_secret_access_key")
    if key and secret and "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ:
        os.environ["AWS_ACCESS_KEY_ID"] = str(key)
        os.environ["AWS_SECRET_ACCESS_KEY"] = str(secret)


def load_settings(**overrides: Any) -> Settings:
    """Read settings: overrides (non-None) > environment > local stack > defaults."""
    base = Settings()
    values: dict[str, Any] = {}
    raw_stack = _read_stack_file()
    stack = _stack_values(raw_stack)
    for f in fields(Settings):
        env = HELP[f.name].env
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
        elif os.environ.get(env, "").strip():  # set and not empty: 'DEBLUR_DATABASE_URL=' means unset
            values[f.name] = _convert(f.name, f.type, os.environ[env])
        elif f.name in stack:
            values[f.name] = _convert(f.name, f.type, stack[f.name])
    settings = replace(base, **values)
    _validate(settings)
    if "s3_endpoint_url" in stack and settings.s3_endpoint_url == stack["s3_endpoint_url"]:
        _export_stack_credentials(raw_stack)
    return settings


def parse_networks(text: str, env: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of a comma-separated list of CIDRs (a bare address is one host); raises ConfigurationError
    quoting the entry that is none, such as ``10.0.0.1/8`` (host bits set: ``10.0.0.0/8`` was meant?)."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            try:
                hint = f": did you mean {ipaddress.ip_network(entry, strict=False)}?"
            except ValueError:
                hint = f" ({exc})"
            raise ConfigurationError(f"{env}={text!r}: {entry!r} is not a network in CIDR notation such as "
                                     f"10.0.0.0/8, 127.0.0.1/32 or fd00::/8{hint}") from None
    return tuple(networks)


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _validate(s: Settings) -> None:
    if not s.broker_url.startswith(("redis://", "rediss://", "unix://", "memory://")):
        raise ConfigurationError(
            f"DEBLUR_BROKER_URL={s.broker_url!r}: expected a Redis URL such as redis://127.0.0.1:6379/0"
        )
    url = s.resolved_database_url()
    if not url.startswith(("sqlite", "postgresql")):
        raise ConfigurationError(
            f"DEBLUR_DATABASE_URL={url!r}: expected sqlite:///file.db or postgresql+psycopg://user@host/db"
        )
    if s.s3_endpoint_url and not s.s3_endpoint_url.startswith(("http://", "https://")):
        raise ConfigurationError(f"DEBLUR_S3_ENDPOINT_URL={s.s3_endpoint_url!r}: expected http(s)://host:port")
    for name in ("batch_size", "io_threads", "flower_port", "api_port", "model_cache_size", "image_max_attempts",
                 "image_max_pixels"):
        if getattr(s, name) < 1:
            raise ConfigurationError(f"{HELP[name].env} must be >= 1, got {getattr(s, name)}")
    for name in ("flower_port", "api_port"):
        if getattr(s, name) > 65535:
            raise ConfigurationError(f"{HELP[name].env} must be a port (1..65535), got {getattr(s, name)}")
    for name in ("task_max_retries", "notify_max_retries"):
        if getattr(s, name) < 0:
            raise ConfigurationError(f"{HELP[name].env} must be >= 0, got {getattr(s, name)}")
    s.notify_allowed_networks()
    if not s.queue.strip():
        raise ConfigurationError("DEBLUR_QUEUE is empty: name the queue the workers consume, e.g. deblur")
    if not _DEVICE.fullmatch(s.device.strip().lower()):
        raise ConfigurationError(f"DEBLUR_DEVICE={s.device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if s.job_window < 0:
        raise ConfigurationError(f"DEBLUR_JOB_WINDOW must be >= 0 batches (0: no window), got {s.job_window}")
    if s.torch_threads < 0:
        raise ConfigurationError(f"DEBLUR_TORCH_THREADS must be >= 0, got {s.torch_threads}")
    if s.batch_time_limit < 0:
        raise ConfigurationError(f"DEBLUR_BATCH_TIME_LIMIT must be >= 0 seconds (0: never), got {s.batch_time_limit}")
    if s.visibility_timeout < 1:
        raise ConfigurationError(f"DEBLUR_VISIBILITY_TIMEOUT must be >= 1 second, got {s.visibility_timeout}")
    if not 4 <= s.claim_lease < s.visibility_timeout:
        raise ConfigurationError(
            f"DEBLUR_CLAIM_LEASE={s.claim_lease} s must be at least 4 s and below DEBLUR_VISIBILITY_TIMEOUT="
            f"{s.visibility_timeout} s: a lost worker's images must be free again by the time Redis redelivers its "
            f"batch. Set DEBLUR_CLAIM_LEASE to about a tenth of the visibility timeout (the default, 90 s, suits a "
            f"visibility timeout of fifteen minutes or more)")
    if s.image_time_limit < 0:
        raise ConfigurationError(f"DEBLUR_IMAGE_TIME_LIMIT must be >= 0 seconds (0: the visibility timeout less the "
                                 f"batch time limit), got {s.image_time_limit}")
    if s.batch_time_limit >= s.visibility_timeout:
        raise ConfigurationError(
            f"DEBLUR_BATCH_TIME_LIMIT={s.batch_time_limit} s is not below DEBLUR_VISIBILITY_TIMEOUT="
            f"{s.visibility_timeout} s: Redis would hand a batch still being worked on to a second worker. "
            f"Lower the limit (leave room for one image), or set it to 0 to never hand a batch over"
        )
    if s.resolved_image_time_limit() < s.claim_lease:
        source = ("DEBLUR_IMAGE_TIME_LIMIT" if s.image_time_limit else
                  "DEBLUR_IMAGE_TIME_LIMIT (DEBLUR_VISIBILITY_TIMEOUT less DEBLUR_BATCH_TIME_LIMIT by default)")
        remedy = ("raise it to the longest one image may take (at least the lease)" if s.image_time_limit else
                  "set DEBLUR_IMAGE_TIME_LIMIT to the longest one image may take (at least the lease), or lower "
                  "DEBLUR_BATCH_TIME_LIMIT")
        raise ConfigurationError(
            f"{source} is {s.resolved_image_time_limit()} s, shorter than DEBLUR_CLAIM_LEASE={s.claim_lease} s: "
            f"every image slower than that would be taken from its worker and sent round again; {remedy}")
