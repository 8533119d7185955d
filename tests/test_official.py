"""Official architectures through spandrel: parity, checkpoint layouts, licences, registry.

Random-weight checkpoints of each architecture are built with spandrel's own
classes (small configs of the official topologies, so the tests stay fast),
saved in the official layouts, loaded through the project, and compared with
spandrel's own model call on a crop of a real photograph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
from skimage import data
from spandrel.architectures.Compact import Compact
from spandrel.architectures.FFTformer import FFTformer
from spandrel.architectures.NAFNet import NAFNet
from spandrel.architectures.Uformer import Uformer
from spandrel_extra_arches.architectures.MPRNet import MPRNet
from spandrel_extra_arches.architectures.Restormer import Restormer

from jobs.errors import InvalidModelSpecError, LicenseError, WeightsError
from models.base import Restored, RestorationModel
from models.catalog import LEARNED_OFFICIAL, REGISTRY
from models.loading import load_model
from models.official import OfficialModel, is_noncommercial_architecture
from models.tiling import TiledModel
from models.weights_store import sha256_of

CPU = torch.device("cpu")

# entry name -> (small config of the official topology, input height, width)
ARCHITECTURES: dict[str, tuple[Callable[[], torch.nn.Module], int, int]] = {
    # sizes that are not multiples of the architecture's, so padding is compared too
    "nafnet-gopro": (
        lambda: NAFNet(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 2], dec_blk_nums=[1, 1, 1, 1]),
        45,
        61,
    ),
    "restormer-gopro": (
        lambda: Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2]),
        42,
        53,
    ),
    "mprnet-gopro": (lambda: MPRNet(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1), 42, 53),
    "fftformer-gopro": (lambda: FFTformer(dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1), 40, 70),
    "uformer-gopro": (
        lambda: Uformer(embed_dim=4, depths=[1, 1, 1, 1, 1, 1, 1, 1, 1], win_size=8, modulator=True),
        100,
        120,
    ),
}
ARCH_ID = {
    "nafnet-gopro": "NAFNet",
    "restormer-gopro": "Restormer",
    "mprnet-gopro": "MPRNet",
    "fftformer-gopro": "FFTformer",
    "uformer-gopro": "Uformer",
}
LAYOUTS: dict[str, Callable[[dict], dict]] = {
    "raw": lambda sd: sd,
    "params": lambda sd: {"params": sd},
    "params_ema": lambda sd: {"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}},
    "state_dict": lambda sd: {"epoch": 7, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
    "module.": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


def photo(h: int, w: int, channels: int = 3) -> torch.Tensor:
    image = np.asarray(data.astronaut(), dtype=np.float32)[60 : 60 + h, 150 : 150 + w] / 255.0
    x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    return x[:, :1] if channels == 1 else x


def random_network(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(sum(map(ord, name)))
    net = ARCHITECTURES[name][0]().eval()
    return net, {k: v.clone() for k, v in net.state_dict().items()}


def spandrel_reference(state_dict: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict).eval()
    with torch.inference_mode():
        return descriptor(x)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("DEBLUR_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("DEBLUR_ALLOW_NONCOMMERCIAL", "1")


@pytest.fixture(scope="module", autouse=True)
def _spandrel_knows_the_extra_architectures() -> None:
    import spandrel_extra_arches

    spandrel_extra_arches.install(ignore_duplicates=True)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_output_matches_spandrels_own_call(tmp_path: Path, name: str) -> None:
    _, sd = random_network(name)
    h, w = ARCHITECTURES[name][1:]
    path = tmp_path / "ckpt.pth"
    torch.save({"params": sd}, path)
    model = load_model(REGISTRY.parse(f"{name}:path={path},tile=-1"), CPU)
    assert isinstance(model, OfficialModel) and model.architecture == ARCH_ID[name]
    x = photo(h, w)
    out = model(x).image
    assert out.shape == x.shape
    assert (out - spandrel_reference(sd, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_layout_loads_the_exact_weights(tmp_path: Path, name: str, layout: str) -> None:
    _, sd = random_network(name)
    folder = tmp_path / "weights"
    folder.mkdir()
    info = REGISTRY.get(name)
    assert info.weights is not None
    torch.save(LAYOUTS[layout](sd), folder / info.weights.filename)  # found through DEBLUR_WEIGHTS_DIR
    model = load_model(REGISTRY.parse(f"{name}:tile=-1"), CPU)
    assert isinstance(model, OfficialModel)
    loaded = model.descriptor.model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_a_safetensors_checkpoint_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    _, sd = random_network("nafnet-gopro")
    path = tmp_path / "nafnet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_model(REGISTRY.parse(f"nafnet-gopro:path={path}"), CPU)
    x = photo(32, 48)
    assert (model(x).image - spandrel_reference(sd, x)).abs().max().item() < 1e-5
    assert model.version.endswith("#" + sha256_of(path)[:12])  # recorded per image: which weights restored it


def test_grey_images_are_restored_through_an_rgb_network(tmp_path: Path) -> None:
    _, sd = random_network("nafnet-gopro")
    path = tmp_path / "n.pth"
    torch.save(sd, path)
    model = load_model(REGISTRY.parse(f"nafnet-gopro:path={path}"), CPU)
    grey = photo(32, 32, channels=1)
    expected = spandrel_reference(sd, grey.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
    out = model(grey).image
    assert out.shape == grey.shape
    assert (out - expected).abs().max().item() < 1e-5


def test_a_one_channel_network_restores_each_colour_channel_of_a_colour_photograph(tmp_path: Path) -> None:
    """A grey-only checkpoint used to see the channels' mean and return a grey photograph; each channel is now an
    image of its own, as the network was trained on, and a grey input goes in as it is."""
    torch.manual_seed(1)
    net = NAFNet(img_channel=1, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]).eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "grey-only.pth"
    torch.save(sd, path)
    model = load_model(REGISTRY.parse(f"spandrel:path={path}"), CPU)
    assert isinstance(model, TiledModel) and model.inner.channels == 1  # default tile size 512: one tile here
    x = torch.cat([photo(30, 46), photo(30, 46).flip(-1)])  # two colour photographs in one batch, sides padded
    out = model(x).image
    assert out.shape == x.shape
    expected = spandrel_reference(sd, x.reshape(6, 1, 30, 46)).reshape(2, 3, 30, 46)
    assert (out - expected).abs().max().item() < 1e-5
    assert (out[:, 0] - out[:, 2]).abs().mean().item() > 0.05  # still in colour
    grey = photo(30, 46, channels=1)
    assert (model(grey).image - spandrel_reference(sd, grey)).abs().max().item() < 1e-5


def test_a_one_channel_models_kernels_and_metrics_are_per_image() -> None:
    """Per-channel results of a grey-only model are averaged back to one per image."""

    class GreyOnly(RestorationModel):
        channels = 1

        def restore_batch(self, x: torch.Tensor) -> Restored:
            assert x.shape[1] == 1
            kernels = x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 3, 3)
            return Restored(1 - x, kernels=kernels, metrics={"mean": x.mean(dim=(1, 2, 3))})

    info = REGISTRY.get("spandrel")
    x = torch.rand(2, 3, 8, 10)
    out = GreyOnly(info, {}, CPU)(x)
    assert torch.allclose(out.image, 1 - x)
    assert torch.allclose(out.metrics["mean"], x.mean(dim=(1, 2, 3)))
    assert out.kernels is not None and out.kernels.shape == (2, 3, 3)
    assert torch.allclose(out.kernels[:, 0, 0], x.mean(dim=(1, 2, 3)))


def test_tiled_output_stays_within_the_overlap_tolerance_of_the_whole_image(tmp_path: Path) -> None:
    _, sd = random_network("nafnet-gopro")
    path = tmp_path / "n.pth"
    torch.save(sd, path)
    x = photo(96, 128)
    whole = load_model(REGISTRY.parse(f"nafnet-gopro:path={path},tile=-1"), CPU)(x).image
    tiled_model = load_model(REGISTRY.parse(f"nafnet-gopro:path={path},tile=64,tile_overlap=16"), CPU)
    assert isinstance(tiled_model, TiledModel)
    tiled = tiled_model(x).image
    # A random NAFNet has image-wide channel attention, so tiles cannot be exact;
    # the blended result must still stay close everywhere.
    diff = (tiled - whole).abs()
    assert diff.mean().item() < 5e-3
    assert diff.max().item() < 5e-2


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    _, restormer = random_network("restormer-gopro")
    path = tmp_path / "not-nafnet.pth"
    torch.save(restormer, path)
    with pytest.raises(WeightsError, match="expects a NAFNet checkpoint.*holds a Restormer"):
        load_model(REGISTRY.parse(f"nafnet-gopro:path={path}"), CPU)


def test_missing_weights_say_how_to_get_them() -> None:
    with pytest.raises(WeightsError, match="deblur models pull fftformer-gopro"):
        load_model(REGISTRY.parse("fftformer-gopro"), CPU)


@pytest.mark.parametrize("name", ["mprnet-gopro", "restormer-gopro"])
def test_noncommercial_models_need_the_operator_to_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _, sd = random_network(name)
    path = tmp_path / "nc.pth"
    torch.save({"params": sd}, path)
    spec = REGISTRY.parse(f"{name}:path={path}")
    monkeypatch.delenv("DEBLUR_ALLOW_NONCOMMERCIAL")
    with pytest.raises(LicenseError, match="DEBLUR_ALLOW_NONCOMMERCIAL=1"):
        load_model(spec, CPU)
    monkeypatch.setenv("DEBLUR_ALLOW_NONCOMMERCIAL", "1")
    assert load_model(spec, CPU).info.name == name


def test_registry_records_licences_and_size_rules() -> None:
    by_name = {info.name: info for info in LEARNED_OFFICIAL}
    assert {n for n, i in by_name.items() if i.noncommercial} == {"mprnet-gopro", "restormer-gopro"}
    assert by_name["nafnet-gopro"].license == "MIT"
    for name, arch in ARCH_ID.items():
        info = by_name[name]
        assert info.family == "learned-official"
        assert info.weights is not None and info.weights.url
        assert info.tile_size and info.tile_size % info.size_multiple == 0
        assert is_noncommercial_architecture(arch) == info.noncommercial
    assert by_name["uformer-gopro"].size_multiple == 128
    assert by_name["fftformer-gopro"].size_multiple == 32


def test_generic_entry_runs_whatever_spandrel_detects(tmp_path: Path) -> None:
    _, sd = random_network("fftformer-gopro")
    path = tmp_path / "any.pth"
    torch.save({"params": sd}, path)
    model = load_model(REGISTRY.parse(f"spandrel:path={path}"), CPU)
    assert isinstance(model, TiledModel)  # default tile size 512; this image fits in one tile
    x = photo(40, 70)
    assert (model(x).image - spandrel_reference(sd, x)).abs().max().item() < 1e-5
    assert model.inner.info.size_multiple == 32  # taken from the detected network


def test_generic_entry_applies_the_licence_of_the_detected_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sd = random_network("mprnet-gopro")
    path = tmp_path / "mprnet.pth"
    torch.save(sd, path)
    monkeypatch.delenv("DEBLUR_ALLOW_NONCOMMERCIAL")
    with pytest.raises(LicenseError, match="MPRNet"):
        load_model(REGISTRY.parse(f"spandrel:path={path}"), CPU)


def test_generic_entry_refuses_networks_that_change_the_image_size(tmp_path: Path) -> None:
    path = tmp_path / "sr.pth"
    torch.save(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(), path)
    with pytest.raises(WeightsError, match="scale 2"):
        load_model(REGISTRY.parse(f"spandrel:path={path}"), CPU)


def test_generic_entry_reports_unknown_networks(tmp_path: Path) -> None:
    path = tmp_path / "mystery.pth"
    torch.save(torch.nn.Linear(4, 4).state_dict(), path)
    with pytest.raises(WeightsError, match="does not recognise"):
        load_model(REGISTRY.parse(f"spandrel:path={path}"), CPU)


def test_generic_entry_needs_a_path() -> None:
    with pytest.raises(InvalidModelSpecError, match="spandrel:path="):
        load_model(REGISTRY.parse("spandrel"), CPU)


def test_path_parameter_must_name_a_checkpoint_file() -> None:
    with pytest.raises(InvalidModelSpecError, match="checkpoint file"):
        REGISTRY.parse("nafnet-gopro:path=/models/readme.txt")


def test_official_checkpoints_are_never_unpickled_unsafely(tmp_path: Path) -> None:
    import pathlib

    sentinel = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (pathlib.Path.touch, (sentinel,))

    _, sd = random_network("nafnet-gopro")
    path = tmp_path / "evil.pth"
    torch.save({"params": sd, "hook": Payload()}, path)
    with pytest.raises(WeightsError, match="unrestricted unpickling"):
        load_model(REGISTRY.parse(f"nafnet-gopro:path={path}"), CPU)
    assert not sentinel.exists()


PUBLISHED: dict[str, Callable[[], torch.nn.Module]] = {
    "nafnet-gopro": lambda: NAFNet(width=64, enc_blk_nums=[1, 1, 1, 28], middle_blk_num=1, dec_blk_nums=[1, 1, 1, 1]),
    "restormer-gopro": lambda: Restormer(),
    "mprnet-gopro": lambda: MPRNet(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32, num_cab=8),
    "fftformer-gopro": lambda: FFTformer(),
    "uformer-gopro": lambda: Uformer(embed_dim=32, depths=[1, 2, 8, 8, 2, 8, 8, 2, 1], win_size=8, modulator=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_published_configuration_loads_and_matches_spandrel(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    sd = PUBLISHED[name]().state_dict()
    path = tmp_path / "published.pth"
    torch.save({"params": sd}, path)
    model = load_model(REGISTRY.parse(f"{name}:path={path},tile=-1"), CPU)
    x = photo(128, 128) if name == "uformer-gopro" else photo(45, 61)
    assert (model(x).image - spandrel_reference(sd, x)).abs().max().item() < 1e-5


def test_importing_the_official_models_warns_nothing() -> None:
    """'deblur restore --model spandrel:...' printed torch's FutureWarning about torch.jit.script, which one of
    spandrel_extra_arches' architectures applies as it is imported: noise a user cannot act on."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import models.official"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
