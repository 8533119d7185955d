"""Shape, size-rule and structure tests for the seeds' architectures (models/archs)."""

from __future__ import annotations

import json

import pytest
import torch

from models.archs import ARCHITECTURES, build_network, run_network
from models.archs.seed001 import PatchDiscriminator, Seed001Generator
from models.archs.seed002 import Seed002UNet
from models.archs.seed003 import ViTDeblur

torch.set_num_threads(1)


@pytest.mark.parametrize("scale", [1, 2])
def test_seed001_generator_keeps_shape_and_is_residual(scale: int) -> None:
    torch.manual_seed(0)
    net = Seed001Generator(width=8, scale=scale).eval()
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    y = net(x)
    assert y.shape == x.shape
    # tanh residual: the output never strays more than 1 from the input.
    assert (y - x).abs().max() <= 1.0
    # zeroing the last conv makes the network the identity (global residual connection).
    torch.nn.init.zeros_(net.final_conv.weight)
    torch.nn.init.zeros_(net.final_conv.bias)
    assert torch.allclose(net(x), x)


def test_seed001_listing_channel_counts() -> None:
    """At width 32 and scale 1 the layers have the seed listing's channel counts."""
    net = Seed001Generator(width=32, scale=1, reduce_activation=False)
    assert net.l1[0].in_channels == 3 and net.l1[0].out_channels == 32
    assert net.l2[0].out_channels == 64
    assert net.t3_reduce_l6.in_channels == 192
    assert net.t3_reduce_l8_l9.in_channels == 128
    assert net.t3_reduce_l11.in_channels == 96
    assert net.final_conv.out_channels == 3


def test_seed001_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="width"):
        Seed001Generator(width=7)


def test_seed001_leaky_reductions_keep_gradients_when_the_units_are_dead() -> None:
    """With a plain ReLU a reduction whose pre-activations are all negative passes no gradient."""
    grads = {}
    for slope in (0.0, 0.1):
        torch.manual_seed(0)
        net = Seed001Generator(width=8, reduce_slope=slope)
        with torch.no_grad():
            net.t3_reduce_l11.bias.fill_(-100.0)  # every l11 unit below zero: a dead layer
        net(torch.rand(1, 3, 32, 32) * 2 - 1).square().sum().backward()
        grads[slope] = float(net.l1[0].weight.grad.abs().sum())
    assert grads[0.0] == 0.0
    assert grads[0.1] > 0.0
    with pytest.raises(ValueError, match="reduce_slope"):
        Seed001Generator(reduce_slope=1.5)


def test_patch_discriminator_gives_a_patch_map() -> None:
    d = PatchDiscriminator(width=8)
    out = d(torch.rand(2, 3, 96, 96))
    assert out.shape == (2, 1, 3, 3)
    assert ((out > 0) & (out < 1)).all()
    with pytest.raises(ValueError, match="64"):
        d(torch.rand(1, 3, 32, 32))


def test_seed002_parameter_count_is_the_seeds() -> None:
    n = sum(p.numel() for p in Seed002UNet().parameters())
    assert abs(n - 972_739) / 972_739 < 0.03, n


def test_seed002_shapes_and_size_rule() -> None:
    net = Seed002UNet(width=4).eval()
    x = torch.rand(1, 3, 20, 36)
    assert net(x).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 3, 21, 36))


def test_seed003_shapes_with_interpolated_positions() -> None:
    net = ViTDeblur(hidden_dim=32, layers=1, heads=2).eval()
    for h, w in [(32, 48), (64, 16)]:
        assert net(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 3, 20, 32))


def test_seed003_loads_a_torchvision_vit_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from torchvision.models import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=1, hidden_dim=64, mlp_dim=96)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    net = ViTDeblur(vit_checkpoint=str(path))
    assert len(net.vit.encoder.layers) == 2 and net.vit.hidden_dim == 64
    assert torch.equal(net.vit.conv_proj.weight, vit.conv_proj.weight)
    # the encoder with the checkpoint's own grid gives the ViT's own token features
    x = torch.rand(1, 3, 32, 32)
    ours = net.encode(x)
    tokens = vit._process_input((x - net.mean) / net.std)
    theirs = vit.encoder(torch.cat([vit.class_token, tokens], dim=1))
    assert torch.allclose(ours.flatten(2).transpose(1, 2), theirs[:, 1:], atol=1e-5)


def test_seed003_weights_trained_from_a_vit_checkpoint_load_without_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Exported weights recorded the ViT file's path, so a worker without the training machine's file could not
    rebuild the network (and a different file there would have built another); the head count, which no
    checkpoint records, was guessed over the caller's."""
    from torchvision.models import VisionTransformer

    from models.training.loop import export_weights

    torch.manual_seed(1)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=96)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    net = ViTDeblur(vit_checkpoint=str(path), heads=4).eval()
    assert net.vit.encoder.layers[0].num_heads == 4  # the caller's, not hidden_dim // 64
    weights = tmp_path / "seed003.safetensors"
    export_weights(net, weights, "seed003", {"vit_checkpoint": str(path), "heads": 4}, {})
    path.unlink()
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        kwargs = json.loads(fh.metadata()["arch_kwargs"])
    assert "vit_checkpoint" not in kwargs and kwargs["heads"] == 4 and kwargs["layers"] == 2
    rebuilt = build_network("seed003", **kwargs).eval()
    from safetensors.torch import load_file

    rebuilt.load_state_dict(load_file(str(weights)))
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(rebuilt(x), net(x), atol=1e-6)


def test_seed003_rejects_a_non_vit_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision VisionTransformer"):
        ViTDeblur(vit_checkpoint=str(path))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_network_and_value_range(arch: str) -> None:
    small = {"seed001": {"width": 8}, "seed002": {"width": 4}, "seed003": {"hidden_dim": 32, "layers": 1, "heads": 1}}
    net = build_network(arch, **small[arch]).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert run_network(net, x).shape == x.shape


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="seed009"):
        build_network("seed009")
