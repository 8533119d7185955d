"""Safe checkpoint reading and normalisation of the official layouts."""

from __future__ import annotations

import argparse
import pathlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs.errors import WeightsError
from models.checkpoints import load_state_dict, normalise_state_dict, read_checkpoint


@pytest.fixture()
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LAYOUTS = {
    "raw": lambda sd: sd,
    "params": lambda sd: {"params": sd},
    "params_ema": lambda sd: {"params_ema": sd},
    "state_dict+optimizer": lambda sd: {"epoch": 3, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
    "model": lambda sd: {"model": sd, "iter": 10},
    "module.": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict of module.": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "single nested key": lambda sd: {"generator_weights": sd},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_official_layout_loads_from_a_pth_file(tmp_path: Path, weights, layout: str) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](weights), path)
    assert _same(load_state_dict(path), weights)


def test_ema_weights_are_preferred_when_both_are_saved(weights) -> None:
    plain = {k: torch.zeros_like(v) for k, v in weights.items()}
    assert _same(normalise_state_dict({"params": plain, "params_ema": weights}), weights)


def test_safetensors_files_load(tmp_path: Path, weights) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in weights.items()}, str(path))
    assert _same(load_state_dict(path), weights)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path, weights) -> None:
    sentinel = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (pathlib.Path.touch, (sentinel,))

    path = tmp_path / "evil.pth"
    torch.save({"params": weights, "extra": Payload()}, path)
    with pytest.raises(WeightsError, match="unrestricted unpickling"):
        load_state_dict(path)
    assert not sentinel.exists()


def test_a_checkpoint_with_foreign_objects_names_the_offending_global(tmp_path: Path, weights) -> None:
    path = tmp_path / "args.pth"
    torch.save({"params": weights, "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(WeightsError, match="argparse.Namespace"):
        read_checkpoint(path)


def test_an_html_page_saved_as_a_checkpoint_is_named_for_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>")
    with pytest.raises(WeightsError, match="HTML"):
        read_checkpoint(path)


def test_a_truncated_download_is_reported(tmp_path: Path, weights) -> None:
    full = tmp_path / "full.pth"
    torch.save(weights, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.pth"):
        read_checkpoint(cut)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nothing-here.pth"):
        read_checkpoint(tmp_path / "nothing-here.pth")


def test_a_checkpoint_without_tensors_lists_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 4, "best_psnr": 31.5}, path)
    with pytest.raises(WeightsError, match="best_psnr, epoch"):
        load_state_dict(path)


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="list"):
        read_checkpoint(path)


def test_a_corrupt_safetensors_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(WeightsError, match="safetensors"):
        read_checkpoint(path)


def test_a_torchscript_archive_is_refused_because_it_carries_code(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), str(path))
    with pytest.raises(WeightsError, match="TorchScript archive"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "prefix", ["netG.module.", "module.netG.", "module._orig_mod.", "_orig_mod.module.netG.", "module.module."]
)
def test_stacked_prefixes_are_all_removed_whatever_their_order(weights, prefix: str) -> None:
    """A GAN generator saved from DataParallel ('netG.module.') used to come back as 'module.…', which no
    architecture matches."""
    assert _same(normalise_state_dict({f"{prefix}{k}": v for k, v in weights.items()}), weights)
    assert _same(normalise_state_dict({"state_dict": {f"{prefix}{k}": v for k, v in weights.items()}}), weights)


def test_a_prefix_only_some_keys_have_is_kept(weights) -> None:
    mixed = {**{f"module.{k}": v for k, v in weights.items()}, "head.weight": torch.zeros(1)}
    assert set(normalise_state_dict(mixed)) == set(mixed)


def test_a_checkpoint_this_user_may_not_read_says_what_to_do(tmp_path: Path, weights, monkeypatch) -> None:
    path = tmp_path / "private.pth"
    torch.save(weights, path)
    real_open = pathlib.Path.open

    def refuse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self == path:  # what a 0600 file of another user gives (tests may run as root, who reads anything)
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))}.*cannot be read by this user.*chmod a\+r"):
        load_state_dict(path)
