"""Downloading checkpoints: verified, atomic, nothing left behind (against a loopback HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobs.errors import TransientError, WeightsError
from models.registry import ModelInfo, WeightsFile
from models.weights_store import normalise_sha256, pull, sha256_of

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    base: str
    hits: list[str] = field(default_factory=list)
    # served without a Content-Length at /whole/NAME, and cut in half at /half/NAME
    files: dict[str, bytes] = field(default_factory=dict)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]
    files: dict[str, bytes]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.hits.append(self.path)
        part, _, name = self.path.strip("/").partition("/")
        if part in {"whole", "half"} and name in self.files:
            # no Content-Length: the client only learns where the body ends when the server closes
            body = self.files[name]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(body if part == "whole" else body[: len(body) // 2])
            self.close_connection = True
        elif self.path == "/model.pth":
            self._reply(200, "application/octet-stream", PAYLOAD)
        elif self.path == "/interstitial":
            self._reply(200, "text/html; charset=utf-8", b"<html>Virus scan warning</html>")
        elif self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.close_connection = True
        else:
            self._reply(404, "text/plain", b"not found")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return None


@pytest.fixture()
def server() -> Iterator[Server]:
    hits: list[str] = []
    files: dict[str, bytes] = {}
    handler = type("Handler", (_Handler,), {"hits": hits, "files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", hits, files)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def entry(url: str | None, sha256: str | None = PAYLOAD_SHA) -> ModelInfo:
    return ModelInfo(
        name="probe-net",
        family="learned-official",
        license="MIT",
        summary="test entry",
        factory="models.official:build_any",
        weights=WeightsFile("probe.pth", sha256=sha256, url=url),
    )


def test_a_good_download_is_stored_and_verified(server: Server, tmp_path: Path) -> None:
    result = pull(entry(f"{server.base}/model.pth"), dest_dir=tmp_path, progress=False)
    assert result.path == tmp_path / "probe.pth"
    assert result.path.read_bytes() == PAYLOAD
    assert (result.sha256, result.size_bytes, result.downloaded, result.verified) == (
        PAYLOAD_SHA,
        len(PAYLOAD),
        True,
        True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.pth"]


def test_a_wrong_checksum_is_rejected_and_nothing_is_left_behind(server: Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=f"expected sha256 {wrong}, got {PAYLOAD_SHA}"):
        pull(entry(f"{server.base}/model.pth", sha256=wrong), dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_good_file_is_not_downloaded_again_unless_forced(server: Server, tmp_path: Path) -> None:
    info = entry(f"{server.base}/model.pth")
    pull(info, dest_dir=tmp_path, progress=False)
    again = pull(info, dest_dir=tmp_path, progress=False)
    assert not again.downloaded and len(server.hits) == 1
    forced = pull(info, dest_dir=tmp_path, progress=False, force=True)
    assert forced.downloaded and len(server.hits) == 2


def test_an_existing_file_with_the_wrong_checksum_is_reported(server: Server, tmp_path: Path) -> None:
    (tmp_path / "probe.pth").write_bytes(b"something else")
    with pytest.raises(WeightsError, match="--force"):
        pull(entry(f"{server.base}/model.pth"), dest_dir=tmp_path, progress=False)
    assert server.hits == []


def test_an_explicit_url_and_checksum_override_the_registry(server: Server, tmp_path: Path) -> None:
    info = entry("https://example.invalid/never-used.pth", sha256=None)
    result = pull(info, url=f"{server.base}/model.pth", sha256=PAYLOAD_SHA.upper(), dest_dir=tmp_path, progress=False)
    assert result.verified and result.path.read_bytes() == PAYLOAD


def checkpoint(kind: str) -> bytes:
    """A small checkpoint in one of the formats workers read: safetensors, a PyTorch zip archive, or PyTorch's
    legacy (non-zip) pickle."""
    torch = pytest.importorskip("torch")
    tensors = {"head.weight": torch.arange(40_000, dtype=torch.float32).reshape(200, 200), "head.bias": torch.ones(7)}
    if kind == "safetensors":
        from safetensors.torch import save

        return save(tensors)
    buffer = io.BytesIO()
    torch.save({"params": tensors}, buffer, _use_new_zipfile_serialization=kind == "zip")
    return buffer.getvalue()


def test_without_a_known_checksum_the_file_is_kept_but_marked_unverified(server: Server, tmp_path: Path) -> None:
    body = server.files["probe.pth"] = checkpoint("zip")
    result = pull(entry(f"{server.base}/whole/probe.pth", sha256=None), dest_dir=tmp_path, progress=False)
    assert result.downloaded and not result.verified and result.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_a_checkpoint_cut_short_without_a_content_length_is_not_stored(
    server: Server, tmp_path: Path, kind: str
) -> None:
    """A server that closes early without saying how long the body was gave half a checkpoint, stored as whole,
    'present' to 'models list' and 'already present' to the next pull; the same file whole is stored."""
    body = server.files["probe.pth"] = checkpoint(kind)
    info = entry(f"{server.base}/half/probe.pth", sha256=None)
    refused = "(incomplete|could not be read).*was discarded; (retry|check)"
    with pytest.raises((TransientError, WeightsError), match=refused):
        pull(info, dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    result = pull(info, url=f"{server.base}/whole/probe.pth", dest_dir=tmp_path, progress=False)
    assert result.downloaded and result.path.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.pth"]


def test_a_file_that_is_no_checkpoint_is_not_stored_without_a_checksum(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is not a checkpoint"):
        pull(entry(f"{server.base}/model.pth", sha256=None), dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_incomplete_checkpoint_is_reported_not_kept(server: Server, tmp_path: Path) -> None:
    """A half file an older version stored is not 'already present': it is named, to be replaced with --force."""
    body = server.files["probe.pth"] = checkpoint("zip")
    (tmp_path / "probe.pth").write_bytes(body[: len(body) // 2])
    info = entry(f"{server.base}/whole/probe.pth", sha256=None)
    with pytest.raises(WeightsError, match="exists but is an incomplete PyTorch checkpoint.*--force"):
        pull(info, dest_dir=tmp_path, progress=False)
    assert server.hits == []
    assert pull(info, dest_dir=tmp_path, progress=False, force=True).path.read_bytes() == body


def test_an_html_page_is_rejected_and_nothing_is_left_behind(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="HTML page"):
        pull(entry(f"{server.base}/interstitial", sha256=None), dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_body_is_a_transient_error_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    with pytest.raises(TransientError):
        pull(entry(f"{server.base}/truncated"), dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_errors_name_the_status(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="HTTP 404"):
        pull(entry(f"{server.base}/missing.pth"), dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_is_transient(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientError, match="cannot reach") as caught:
        pull(entry(f"http://127.0.0.1:{port}/model.pth"), dest_dir=tmp_path, progress=False, timeout=5)
    # an archive without network access is told where to put a copy fetched elsewhere
    assert f"copy it to {tmp_path / 'probe.pth'}" in str(caught.value)


def test_entries_without_a_url_or_weights_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="--url"):
        pull(entry(None), dest_dir=tmp_path, progress=False)
    bare = ModelInfo(name="w", family="classic", license="MIT", summary="s", factory="m:f")
    with pytest.raises(WeightsError, match="needs no weights"):
        pull(bare, dest_dir=tmp_path, progress=False)


def test_only_http_urls_are_fetched(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="http"):
        pull(entry("file:///etc/passwd", sha256=None), dest_dir=tmp_path, progress=False)


def test_checksums_are_validated_and_normalised(tmp_path: Path) -> None:
    assert normalise_sha256(f"  {PAYLOAD_SHA.upper()} ") == PAYLOAD_SHA
    assert normalise_sha256("") is None
    with pytest.raises(WeightsError, match="'abc' is not a sha256"):
        normalise_sha256("abc")
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert sha256_of(path) == PAYLOAD_SHA


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_pulled_file_is_readable_as_the_umask_allows(server: Server, tmp_path: Path, umask: int, mode: int) -> None:
    """The temporary file is created owner-only (0600); a worker running as another user must still read the
    weights an operator pulled, as with any file the operator creates."""
    previous = os.umask(umask)
    try:
        result = pull(entry(f"{server.base}/model.pth"), dest_dir=tmp_path, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(result.path.stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.pth"]


def test_weights_this_user_may_not_read_say_which_file_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "probe.pth"
    private.write_bytes(PAYLOAD)
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self == private:  # what a 0600 file of another user gives (tests may run as root, who reads anything)
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", refuse)
    name = re.escape(str(private))
    with pytest.raises(WeightsError, match=rf"{name}.*Permission denied.*chmod a\+r {name}"):
        sha256_of(private)
    with pytest.raises(WeightsError, match="cannot be read by this user"):  # an existing file is checked first
        pull(entry("http://127.0.0.1:9/never-fetched"), dest_dir=tmp_path, progress=False)
