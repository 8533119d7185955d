"""Downloading registered checkpoints into the weights folder, verified.

``deblur models pull NAME`` streams the entry's URL into a hidden temporary
file inside the weights folder (same filesystem, so the final step is an
atomic rename), hashing as it goes, with a progress bar. Only a file whose
sha256 matches the registry (or the ``--sha256`` given) is renamed into
place, readable by everyone the umask allows (the temporary file is private
to its creator, and workers often run as another user than the operator who
pulled); on a mismatch, an HTML page instead of a checkpoint, or any error,
the temporary file is removed and nothing is left behind. When no sha256 is
known (the official checkpoints), the file must instead be a complete
checkpoint (:func:`checkpoint_problem`: a server that closes early without a
Content-Length otherwise leaves half a file) holding the network the entry
runs (:func:`architecture_problem`, where torch is installed). Importing this
module imports no torch.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from jobs.errors import DeblurError, TransientError, WeightsError
from models.registry import ModelInfo, weights_dir

CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: the stored file, its sha256 and whether it was fetched."""

    path: Path
    sha256: str
    size_bytes: int
    downloaded: bool
    verified: bool  # False when no expected sha256 was known (trust on first use)


class _Progress(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; :class:`WeightsError` when this user may not read it."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(chunk)
    except PermissionError as exc:
        raise unreadable_weights(path, exc) from None
    return digest.hexdigest()


def unreadable_weights(path: Path | str, exc: PermissionError) -> WeightsError:
    """The error for a weights file this process may not read, saying how to make it readable."""
    return WeightsError(
        f"weights file {str(path)!r} cannot be read by this user ({exc.strerror or 'permission denied'}; "
        "older versions of 'deblur models pull' left files readable by their owner only); make it readable, "
        f"e.g. 'chmod a+r {path}', or pull it again as the user the workers run as "
        "('deblur models pull NAME --force')"
    )


def check_readable(path: Path) -> None:
    """Raise :class:`WeightsError` (:func:`unreadable_weights`) if this process may not open ``path`` for reading."""
    try:
        with path.open("rb"):
            pass
    except PermissionError as exc:
        raise unreadable_weights(path, exc) from None


def _file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the process's umask (read by setting it and setting
    it straight back: the umask is process-wide, so this is for the single-threaded ``deblur models pull``)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def normalise_sha256(value: str | None) -> str | None:
    """Lower-case and validate a hex sha256; ``None``/empty stays ``None``."""
    if value is None or not value.strip():
        return None
    text = value.strip().lower()
    if not _SHA256.match(text):
        raise WeightsError(f"{value!r} is not a sha256 checksum (64 hexadecimal characters)")
    return text


def pull(
    info: ModelInfo,
    *,
    url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    dest_dir: Path | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> PullResult:
    """Download ``info``'s checkpoint into ``dest_dir`` (default: the weights folder).

    ``url`` and ``sha256`` override the registry's. An existing file is kept
    (and checked against the expected sha256, or without one to be a complete
    checkpoint) unless ``force`` is set. Raises :class:`WeightsError` when the
    entry has no weights or no URL, the checksum does not match, the server
    answers with an error or an HTML page, or, without a checksum, the file is
    not a checkpoint of the entry's network; :class:`TransientError` when the
    server cannot be reached or the file arrived incomplete.
    """
    if info.weights is None:
        raise WeightsError(_nothing_to_pull(info))
    source = url or info.weights.url
    if not source:
        raise WeightsError(
            f"model {info.name!r} has no registered download URL; pass --url URL, or copy "
            f"the checkpoint to {weights_dir() / info.weights.filename}"
        )
    expected = normalise_sha256(sha256) or normalise_sha256(info.weights.sha256)
    folder = (dest_dir or weights_dir()).expanduser()
    target = folder / info.weights.filename
    if target.is_file() and not force:
        actual = sha256_of(target)
        if expected is not None and actual != expected:
            raise WeightsError(
                f"{target} exists but its sha256 is {actual}, not the expected {expected}; "
                "run again with --force to replace it"
            )
        problem = None if expected is not None else checkpoint_problem(target)
        if problem is not None:  # stored unchecked by an older version, or copied in by hand
            raise WeightsError(f"{target} exists but {problem[1]}; run again with --force to replace it")
        return PullResult(target, actual, target.stat().st_size, False, expected is not None)
    folder.mkdir(parents=True, exist_ok=True)
    actual, size = download(
        source, target, expected, progress=progress, timeout=timeout,
        check=lambda path: checkpoint_problem(path) or architecture_problem(info, path),
    )
    return PullResult(target, actual, size, True, expected is not None)


# What is wrong with a downloaded file: the error to raise (TransientError when it looks cut short, so a retry
# may help; WeightsError when it is not what was asked for) and why, worded to follow "the file ..." or a path.
Problem = tuple[type[DeblurError], str]

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def checkpoint_problem(path: Path) -> Problem | None:
    """What keeps ``path`` from being a complete checkpoint (None: nothing found).

    A download that lost its end (a server that closes early without sending a Content-Length) is otherwise
    stored as if whole, and only fails when a worker loads it. Recognised: safetensors (the header must parse
    and the data must end where its offsets say), PyTorch zip archives (the central directory at the end must
    read and every member's CRC match) and PyTorch's legacy pickle format (read with
    :func:`models.checkpoints.read_checkpoint`, as workers read it, which needs torch installed).
    """
    with path.open("rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
        if head.startswith(b"PK\x03\x04"):
            return _zip_problem(path)
        header_length = int.from_bytes(head[:8], "little")
        if len(head) == 9 and head[8:] == b"{" and header_length <= _SAFETENSORS_MAX_HEADER:
            return _safetensors_problem(handle, header_length, size)
    if head.startswith(b"\x80"):  # pickle protocol 2 or later: torch.save(..., _use_new_zipfile_serialization=False)
        return _legacy_torch_problem(path)
    return WeightsError, "is not a checkpoint (neither a PyTorch file nor safetensors)"


def _zip_problem(path: Path) -> Problem | None:
    """A PyTorch zip archive is complete when its central directory (written last) reads and its members'
    checksums match; a zip without a ``data.pkl`` is some other archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return TransientError, f"is an incomplete PyTorch checkpoint (its zip directory does not read: {exc})"
    if damaged is not None:
        return TransientError, f"is a damaged PyTorch checkpoint (member {damaged!r} fails its checksum)"
    if not any(name.endswith("data.pkl") for name in names):
        return WeightsError, "is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)"
    return None


def _safetensors_problem(handle: BinaryIO, header_length: int, size: int) -> Problem | None:
    """A safetensors file is complete when its JSON header parses and its tensor data ends where the largest
    offset in the header says (the file is exactly 8 + header + data bytes)."""
    if 8 + header_length > size:
        return TransientError, f"is an incomplete safetensors file ({size} bytes, shorter than its own header)"
    try:
        handle.seek(8)
        header = json.loads(handle.read(header_length))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return WeightsError, f"is not a safetensors file (its header does not parse: {exc})"
    data = size - 8 - header_length
    needed = max(ends, default=0)
    if data < needed:
        return TransientError, f"is an incomplete safetensors file ({data} of {needed} bytes of tensor data)"
    if data > needed:
        return WeightsError, f"is not a valid safetensors file ({data - needed} bytes after its last tensor)"
    return None


def _legacy_torch_problem(path: Path) -> Problem | None:
    """The legacy format can only be told whole by reading it, so it is read as workers read it."""
    try:
        from models.checkpoints import read_checkpoint
    except ImportError:  # a producer-only install
        return WeightsError, ("is in PyTorch's legacy (non-zip) format, which can only be checked where torch is "
                              "installed: pull it on a worker")
    try:
        read_checkpoint(path)
    except WeightsError as exc:
        return WeightsError, str(exc).replace(f"checkpoint {str(path)!r} ", "")
    return None


def architecture_problem(info: ModelInfo, path: Path) -> Problem | None:
    """Whether ``path`` holds the network ``info`` runs (:attr:`ModelInfo.architecture`), detected by the code
    workers load it with, so that a checkpoint of another network does not replace a working file.

    Not checked (None) without torch and spandrel (a producer-only install): the worker checks it on loading.
    """
    if info.architecture is None:
        return None
    try:
        from models.checkpoints import load_state_dict
        from models.official import describe_checkpoint
    except ImportError:
        return None
    try:
        found = str(describe_checkpoint(load_state_dict(path), "it").architecture.id)
    except WeightsError as exc:
        detail = str(exc).replace(f"checkpoint {str(path)!r}", "it")
        return WeightsError, f"holds no {info.architecture} network that deblur can load ({detail})"
    if found != info.architecture:
        return WeightsError, (f"holds a {found} network, not the {info.architecture} network model {info.name!r} "
                              f"runs (use spandrel:path=FILE to run another network)")
    return None


def _nothing_to_pull(info: ModelInfo) -> str:
    """Why ``info`` has no registered file to download, and what it needs instead: a model without a weights
    entry may still need weights (a checkpoint named by ``path=``, or trained weights named by ``weights=``),
    and saying it needs none sent operators off to run it without."""
    if info.param("path") is not None:
        return (f"model {info.name!r} has no registered checkpoint to pull: it loads the file its path= parameter "
                f"names ({info.name}:path=/path/to/model.pth, a file the workers can read)")
    if info.param("weights") is not None:
        return (f"model {info.name!r} ships no weights and has none to download: train them with "
                f"'deblur train {info.name} -o RUN_DIR' and pass {info.name}:weights=PATH (a .safetensors file "
                "the workers can read)")
    return f"model {info.name!r} needs no weights file; nothing to pull"


def download(
    url: str,
    target: Path,
    expected_sha256: str | None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    check: Callable[[Path], Problem | None] | None = None,
) -> tuple[str, int]:
    """Stream ``url`` to ``target`` atomically; return (sha256, size in bytes).

    Nothing is written at ``target`` unless the whole body arrived and, when
    ``expected_sha256`` is given, matched it; without one, ``check`` (if
    given) must find nothing wrong with the downloaded file.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise WeightsError(f"download URL {url!r} must start with http:// or https://")
    request = urllib.request.Request(url, headers={"User-Agent": "deblur-models-pull"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(
            f"cannot reach {url}: {reason}; check the network and retry, or, on a machine without access, "
            f"download the file elsewhere and copy it to {target} (a recorded sha256 is checked when the model loads)"
        ) from None
    with response, _temporary_beside(target) as (handle, temp_path):
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in {"text/html", "application/xhtml+xml"}:
            raise WeightsError(
                f"{url} answered with an HTML page, not a checkpoint (a sign-in or "
                "'virus scan' interstitial of a file host?). Download the file in a browser "
                f"and copy it to {target}, or pass --url with a direct link."
            )
        total = _content_length(response.headers.get("Content-Length"))
        digest = hashlib.sha256()
        size = 0
        bar = _progress_bar(total, target.name, enabled=progress)
        try:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"download of {url} was interrupted after {size} bytes: {exc}") from None
        finally:
            bar.close()
        if total is not None and size != total:
            raise TransientError(f"download of {url} ended after {size} of {total} bytes; retry")
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            raise WeightsError(
                f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {actual}; "
                "the file was discarded (corrupt download, or the URL serves a different file)"
            )
        if expected_sha256 is None and check is not None:
            # nothing vouches for the bytes (a server may close early without saying how long the body was)
            handle.flush()
            problem = check(temp_path)
            if problem is not None:
                kind, reason = problem
                advice = (f"retry, or download it elsewhere and copy it to {target}" if kind is TransientError
                          else f"check that the address serves {target.name} itself")
                raise kind(f"the file downloaded from {url} {reason}, so it was discarded; {advice}")
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.chmod(temp_path, _file_mode())  # mkstemp made it owner-only (0600)
        os.replace(temp_path, target)
    return actual, size


@contextmanager
def _temporary_beside(target: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A hidden temporary file next to ``target``, removed unless it was renamed away."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    temp_path = Path(name)
    handle = os.fdopen(fd, "wb")
    try:
        yield handle, temp_path
    finally:
        if not handle.closed:
            handle.close()
        temp_path.unlink(missing_ok=True)


def _content_length(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _NoProgress:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress_bar(total: int | None, label: str, *, enabled: bool) -> _Progress:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:  # producer-only installs may lack tqdm; the download still works
        return _NoProgress()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=True)
