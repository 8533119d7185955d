"""The seeds' own network architectures, written afresh from their descriptions.

* :mod:`models.archs.seed001` — the two-stage CNN generator (t1/t2/t4 blocks,
  skip concatenations, tanh residual output) and its PatchGAN discriminator.
* :mod:`models.archs.seed002` — the U-Net/ResNet hybrid (955,715 parameters; the seed's 972,739).
* :mod:`models.archs.seed003` — ViTDeblur: a ViT encoder with a CNN decoder.

Every network here maps an (N, 3, H, W) batch in its ``value_range`` to a
restored batch of the same shape, with sides a multiple of its
``size_multiple``; :mod:`models.learned` wraps them for the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ARCHITECTURES: tuple[str, ...] = ("seed001", "seed002", "seed003")


def build_network(arch: str, **kwargs: object) -> torch.nn.Module:
    """A fresh (randomly initialised) network of architecture ``arch`` with keyword options."""
    if arch == "seed001":
        from models.archs.seed001 import Seed001Generator

        return Seed001Generator(**kwargs)  # type: ignore[arg-type]
    if arch == "seed002":
        from models.archs.seed002 import Seed002UNet

        return Seed002UNet(**kwargs)  # type: ignore[arg-type]
    if arch == "seed003":
        from models.archs.seed003 import ViTDeblur

        return ViTDeblur(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def value_range(net: object) -> tuple[float, float]:
    """The value range a network works in: (0, 1) unless it declares ``value_range``."""
    lo, hi = getattr(net, "value_range", (0.0, 1.0))
    return float(lo), float(hi)


def run_network(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``net`` to ``x`` in [0, 1], mapping to and from the net's value range; output not clamped."""
    lo, hi = value_range(net)
    if (lo, hi) == (0.0, 1.0):
        return net(x)
    return (net(x * (hi - lo) + lo) - lo) / (hi - lo)
