"""``deblur models list|pull`` through click, with a loopback HTTP server for downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from spandrel.architectures.FFTformer import FFTformer
from spandrel.architectures.NAFNet import NAFNet

from models.catalog import REGISTRY
from models.cli import models_group



def nafnet_checkpoint(seed: int = 0) -> bytes:
    """A small NAFNet (the official GoPro topology, narrower) saved as its official layout: what nafnet-gopro
    must find in a file pulled without a checksum."""
    torch.manual_seed(seed)
    net = NAFNet(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 2], dec_blk_nums=[1, 1, 1, 1])
    buffer = io.BytesIO()
    torch.save({"params": net.state_dict()}, buffer)
    return buffer.getvalue()


BODY = nafnet_checkpoint()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[str]:
    """Serve a folder holding ``model.pth`` on 127.0.0.1 at a free port."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "model.pth").write_bytes(BODY)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/model.pth"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    monkeypatch.setenv("DEBLUR_WEIGHTS_DIR", str(folder))
    for name in ("DEBLUR_MODELS_FORMAT", "DEBLUR_PULL_URL", "DEBLUR_PULL_SHA256", "DEBLUR_PULL_FORCE"):
        monkeypatch.delenv(name, raising=False)
    return folder


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(models_group, list(args), env=env, catch_exceptions=False)


def test_list_json_describes_every_model(weights: Path) -> None:
    result = run("list", "--format", "json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(rows) == set(REGISTRY.names())
    for row in rows.values():
        assert {"name", "family", "license", "weights_present", "size_rules"} <= row.keys()
    assert rows["restormer-gopro"]["noncommercial"] is True
    assert rows["nafnet-gopro"]["family"] == "learned-official"
    assert rows["nafnet-gopro"]["weights_present"] is False
    weights.mkdir()
    (weights / "NAFNet-GoPro-width64.pth").write_bytes(b"x")
    rows = {row["name"]: row for row in json.loads(run("list", "--format", "json").output)}
    assert rows["nafnet-gopro"]["weights_present"] is True


def test_list_reads_its_format_from_the_environment(weights: Path) -> None:
    result = run("list", env={"DEBLUR_MODELS_FORMAT": "json"})
    assert isinstance(json.loads(result.output), list)


def test_list_table_shows_licence_weights_and_size_rules(weights: Path) -> None:
    result = run("list", "--family", "learned-official", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for expected in ("nafnet-gopro", "fftformer-gopro", "Academic", "missing", "multiple of 128"):
        assert expected in result.output
    assert "wiener" not in result.output


def test_list_table_says_how_to_get_weights_for_learned_models_that_ship_none(weights: Path) -> None:
    result = run("list", "--family", "learned-seed", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ seed")}
    assert "present" in lines["seed002-refine"]
    for name in ("seed001-gan", "seed003-vit"):
        assert "deblur train" in lines[name] and "not needed" not in lines[name]


def test_pull_stores_a_verified_checkpoint_with_a_progress_bar(served: str, weights: Path) -> None:
    digest = hashlib.sha256(BODY).hexdigest()
    result = run("pull", "fftformer-gopro", "--url", served, "--sha256", digest)
    assert result.exit_code == 0, result.output
    stored = weights / "fftformer_GoPro.pth"
    assert stored.read_bytes() == BODY
    assert digest in result.stdout
    assert "fftformer_GoPro.pth" in result.stderr and "100%" in result.stderr  # tqdm's bar
    assert sorted(p.name for p in weights.iterdir()) == ["fftformer_GoPro.pth"]


def test_pull_rejects_a_wrong_checksum_and_leaves_nothing(served: str, weights: Path) -> None:
    result = run("pull", "fftformer-gopro", "--url", served, "--sha256", "ab" * 32, "--no-progress")
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output
    assert not weights.exists() or list(weights.iterdir()) == []


def test_pull_without_a_registered_checksum_warns_and_prints_the_digest(served: str, weights: Path) -> None:
    result = run("pull", "nafnet-gopro", env={"DEBLUR_PULL_URL": served, "DEBLUR_PROGRESS": "0"})
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(BODY).hexdigest() in result.stdout
    assert "no checksum is registered" in result.stderr
    again = run("pull", "nafnet-gopro", "--url", served)
    assert "already present" in again.output


def test_pull_of_an_unknown_model_suggests_the_right_name(weights: Path) -> None:
    result = run("pull", "nafnet-gorpo")
    assert result.exit_code == 1
    assert "Did you mean nafnet-gopro" in result.output


def test_help_texts_explain_the_commands_and_their_environment_variables() -> None:
    top = run("--help").output
    assert "pull" in top and "list" in top and "DEBLUR_WEIGHTS_DIR" in top
    pull_help = run("pull", "--help").output
    for text in ("sha256", "DEBLUR_PULL_URL", "DEBLUR_WEIGHTS_DIR", "--force", "nothing is left behind"):
        assert text in pull_help
    assert "DEBLUR_MODELS_FORMAT" in run("list", "--help").output


def test_pull_force_keeps_a_working_file_when_the_download_holds_another_network(served: str, weights: Path) -> None:
    """--force with a mirror serving another network's checkpoint (a Restormer one, in the review) replaced a
    working NAFNet file and said 'stored'."""
    assert run("pull", "nafnet-gopro", "--url", served, "--no-progress").exit_code == 0
    torch.manual_seed(1)
    fftformer = FFTformer(dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1)
    torch.save({"params": fftformer.state_dict()}, weights.parent / "served" / "fftformer.pth")
    other = served.rsplit("/", 1)[0] + "/fftformer.pth"
    result = run("pull", "nafnet-gopro", "--url", other, "--force", "--no-progress")
    assert result.exit_code == 1
    assert "holds a FFTformer network, not the NAFNet network model 'nafnet-gopro' runs" in result.output
    assert "stored" not in result.output
    assert sorted(p.name for p in weights.iterdir()) == ["NAFNet-GoPro-width64.pth"]
    assert (weights / "NAFNet-GoPro-width64.pth").read_bytes() == BODY
