"""Seed 003: ViTDeblur, a Vision Transformer encoder with a CNN decoder (ViTDecoder).

Encoder: a torchvision ``VisionTransformer`` (patch embedding, class token,
position embeddings, transformer blocks, final layer norm). Its position
embeddings are interpolated to the input's patch grid, so any size that is a
multiple of the patch size works. A torchvision ViT state dict (e.g. the
ImageNet ``vit_b_16`` weights) is loaded when ``vit_checkpoint`` is given;
the encoder's shape is then read from the checkpoint itself.

ViTDecoder, as the seed describes it: the ViT features are added to the
"patched" blurred image (pixel-unshuffled to the patch grid and projected by a
1×1 conv); five upsampling blocks (bilinear ×2, except the last at ×1,
each followed by a 1×1 conv) bring them to full resolution; the result is
added to the full-scale blurred image (projected by a 1×1 conv); decoding
blocks (1×1 conv + GELU) produce the output. Unlike the seed, the output is a
residual added to the input (values in [0, 1]).

The default encoder is small (192-dim, 4 blocks, 3 heads) so it can be
trained on a CPU; ``vit_b_16`` sizes are ``hidden_dim=768, layers=12,
heads=12, mlp_dim=3072``.
"""

from __future__ import annotations

import logging
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)


def read_vit_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A torchvision ViT state dict from ``.safetensors`` or a ``.pth`` (tensors only, no pickled code)."""
    p = os.fspath(path)
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(p)
    else:
        loaded = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"ViT checkpoint {p!r} does not hold a state dict (got {type(loaded).__name__})")
        state = loaded.get("model", loaded.get("state_dict", loaded))  # type: ignore[assignment]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "conv_proj.weight" not in state or "encoder.pos_embedding" not in state:
        raise ValueError(
            f"{p!r} is not a torchvision VisionTransformer state dict (no conv_proj.weight / encoder.pos_embedding)"
        )
    return state


def _vit_shape(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encoder sizes implied by a torchvision ViT state dict."""
    hidden, _, patch, _ = state["conv_proj.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k)))
    mlp = state["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]
    tokens = state["encoder.pos_embedding"].shape[1] - 1
    grid = round(tokens**0.5)
    return {"hidden_dim": hidden, "layers": layers, "mlp_dim": mlp, "patch_size": patch, "image_size": grid * patch}


class ViTDeblur(nn.Module):
    """ViT encoder + ViTDecoder. Input and output (N, 3, H, W) in [0, 1], sides multiples of ``patch_size``."""

    value_range: tuple[float, float] = (0.0, 1.0)

    def __init__(
        self,
        hidden_dim: int = 192,
        layers: int = 4,
        heads: int | None = None,
        mlp_dim: int | None = None,
        patch_size: int = 16,
        image_size: int = 224,
        decoder_width: int = 16,
        decoder_blocks: int = 3,
        vit_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        state = None
        if vit_checkpoint:
            state = read_vit_state_dict(vit_checkpoint)
            shape = _vit_shape(state)
            hidden_dim, layers, mlp_dim = shape["hidden_dim"], shape["layers"], shape["mlp_dim"]
            patch_size, image_size = shape["patch_size"], shape["image_size"]
            if heads is None:  # a checkpoint does not record it: torchvision's ViTs use heads of 64 dimensions
                heads = max(1, hidden_dim // 64)
                log.info("ViT checkpoint %s: assuming %d attention heads (64 dimensions each); pass heads=N if it "
                         "was trained with others", vit_checkpoint, heads)
        heads = 3 if heads is None else heads
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by heads {heads}")
        self.patch_size = patch_size
        self.vit = VisionTransformer(
            image_size=image_size, patch_size=patch_size, num_layers=layers, num_heads=heads,
            hidden_dim=hidden_dim, mlp_dim=mlp_dim or 4 * hidden_dim,
        )
        self.vit.heads = nn.Identity()  # classification head unused
        if state is not None:
            encoder_state = {k: v for k, v in state.items() if not k.startswith("heads.")}
            self.vit.load_state_dict(encoder_state, strict=True)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_image = nn.Conv2d(3 * patch_size * patch_size, hidden_dim, 1)
        widths = [hidden_dim, 128, 64, 32, decoder_width, decoder_width]
        self.up_factors = (2, 2, 2, 2, 1)
        if 2 ** sum(f == 2 for f in self.up_factors) != patch_size:
            raise ValueError(f"the decoder upsamples by 16; patch_size must be 16, got {patch_size}")
        self.up = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 1) for i in range(5))
        self.full_image = nn.Conv2d(3, decoder_width, 1)
        self.decode = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(decoder_width, decoder_width, 1), nn.GELU()) for _ in range(decoder_blocks)]
        )
        self.out = nn.Conv2d(decoder_width, 3, 1)

    @property
    def size_multiple(self) -> int:
        return self.patch_size

    def rebuild_kwargs(self) -> dict[str, object]:
        """The encoder's shape as constructor arguments, in place of a ``vit_checkpoint`` (exported weights hold
        every tensor, so a worker must be able to rebuild the network without the file it was initialised from)."""
        vit = self.vit
        return {"hidden_dim": vit.hidden_dim, "layers": len(vit.encoder.layers),
                "heads": vit.encoder.layers[0].num_heads, "mlp_dim": vit.mlp_dim, "patch_size": vit.patch_size,
                "image_size": vit.image_size}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """ViT features on the patch grid, (N, hidden_dim, H/patch, W/patch)."""
        vit = self.vit
        feats = vit.conv_proj((x - self.mean) / self.std)
        n, d, gh, gw = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)
        cls = vit.class_token.expand(n, -1, -1)
        pos = vit.encoder.pos_embedding
        cls_pos, grid_pos = pos[:, :1], pos[:, 1:]
        g0 = round(grid_pos.shape[1] ** 0.5)
        if (gh, gw) != (g0, g0):
            grid_pos = grid_pos.reshape(1, g0, g0, d).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
            grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
        tokens = torch.cat([cls, tokens], dim=1) + torch.cat([cls_pos, grid_pos], dim=1)
        tokens = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(tokens)))
        return tokens[:, 1:].transpose(1, 2).reshape(n, d, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"ViTDeblur needs sides that are multiples of {p}, got {tuple(x.shape[-2:])}")
        y = self.encode(x) + self.patch_image(F.pixel_unshuffle(x, p))
        for conv, factor in zip(self.up, self.up_factors, strict=True):
            if factor > 1:
                y = F.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)
            y = conv(y)
        y = self.decode(y + self.full_image(x))
        return x + self.out(y)
