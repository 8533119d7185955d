"""The typed descriptor every restoration model is wrapped in.

Workers never touch a raw ``nn.Module``: they call a :class:`RestorationModel`
with a batch in float [0, 1], NCHW, and get a :class:`Restored` back with the
same shape. The wrapper handles the channel count the network needs (grey is
replicated to RGB and averaged back; a grey-only network restores each
colour channel on its own), reflect-padding to the model's size multiple,
``inference_mode``, mixed precision on CUDA where the model allows it, and
clamping. A grey photograph stored as RGB (every pixel's channels within
``GREY_TOLERANCE`` of each other) comes back grey: a network trained mostly
on colour leaves faint colour fringes on it (up to 14 levels of 255 on a
black-and-white scan), which no archivist wants. Wrappers that call a model
on parts of an image (tiling) pass ``keep_grey_inputs=False`` and make the
whole image grey once, since a part may look grey when the image is not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.registry import ModelInfo


GREY_TOLERANCE = 1.0 / 255.0  # one 8-bit level: what rounding a grey image through YCbCr can leave
# an image whose values are not 8-bit levels (12- or 16-bit, float) was stored finer: a spread of one 12-bit
# level (16 of 65,535) is still rounding (a colour transform, a colour-managed export), one of a few hundred
# 16-bit levels is colour (a faint tone of a scan), not rounding
FINE_GREY_TOLERANCE = 1.0 / 4095.0
EIGHT_BIT_SAMPLE = 65536  # values looked at to tell 8-bit levels: any of them off a level says it (and is cheap)


@dataclass
class Restored:
    """A model's output for a batch.

    ``image``: (N, C, H, W) float32 in [0, 1], same shape as the input.
    ``kernels``: (N, kh, kw) estimated blur kernels summing to 1, for blind
    methods; ``None`` otherwise.
    ``metrics``: per-image scalar diagnostics, each a tensor of shape (N,)
    (e.g. ``kernel_size``), stored by the worker as metrics of this model.
    """

    image: torch.Tensor
    kernels: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RestorationModel(ABC):
    """Base class for every model the worker can run.

    Subclasses implement :meth:`restore_batch` on a tensor that already has
    ``self.channels`` channels (3 unless a subclass says 1 or ``None`` for
    "any") and sides that are multiples of ``info.size_multiple``.
    """

    channels: int | None = 3
    weights_sha256: str | None = None  # the loaded weights file's digest, for provenance (None: no weights)

    def __init__(self, info: ModelInfo, params: Mapping[str, object], device: torch.device) -> None:
        self.info = info
        self.params = dict(params)
        self.device = device

    @property
    def version(self) -> str:
        """Identifies the exact computation: name, code version, parameters and, for a model with weights, the
        first 12 hex digits of the weights file's SHA-256 (recorded per image, so an archive can tell which
        weights restored it)."""
        from models.registry import common_param_names

        # tiling/self-ensemble options appear only when they change something
        defaults = {p.name: p.default for p in self.info.params if p.name in common_param_names(self.info)}
        shown = ",".join(
            f"{k}={v}" for k, v in sorted(self.params.items()) if k not in defaults or defaults[k] != v
        )
        weights = f"#{self.weights_sha256[:12]}" if self.weights_sha256 else ""
        return f"{self.info.name}@{self.info.version}" + (f"[{shown}]" if shown else "") + weights

    @abstractmethod
    def restore_batch(self, x: torch.Tensor) -> Restored:
        """Restore ``x`` (N, C, H, W) float in [0, 1] on ``self.device``."""

    def autocast_dtype(self) -> torch.dtype | None:
        """Reduced precision to run in on CUDA, if the model supports one.

        bfloat16 only where the model's own GPU computes it natively (compute capability 8.0, Ampere, or later;
        ROCm): torch's default check also accepts the emulation on older GPUs, which is slower than float32,
        and looks at the current device, not necessarily the one this model runs on.
        """
        if self.device.type != "cuda":
            return None
        if "bfloat16" in self.info.dtypes and bf16_native(self.device):
            return torch.bfloat16
        if "float16" in self.info.dtypes:
            return torch.float16
        return None

    def __call__(self, x: torch.Tensor, *, keep_grey_inputs: bool = True) -> Restored:
        """Restore ``x`` (N, C, H, W) float in [0, 1]: same shape, clamped to [0, 1].

        ``keep_grey_inputs=False`` leaves out the step that makes the output of a grey RGB input grey
        (:func:`keep_grey`), for a caller that applies it to a whole image it passes in parts.
        """
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        x = x.to(self.device, torch.float32)
        per_channel = self.channels == 1 and c == 3
        # a grey-only network sees each colour channel as an image of its own: (N, 3, H, W) -> (3N, 1, H, W)
        work = x.reshape(n * c, 1, h, w) if per_channel else _adapt_channels(x, self.channels)
        multiple = max(1, self.info.size_multiple)
        min_side = max(1, self.info.min_size)
        target_h = max(min_side, -(-h // multiple) * multiple)
        target_w = max(min_side, -(-w // multiple) * multiple)
        target_h = -(-target_h // multiple) * multiple
        target_w = -(-target_w // multiple) * multiple
        if (target_h, target_w) != (h, w):
            work = _pad(work, target_h - h, target_w - w)
        amp = self.autocast_dtype()
        with torch.inference_mode():
            if amp is not None:
                with torch.autocast(device_type="cuda", dtype=amp):
                    out = self.restore_batch(work)
            else:
                out = self.restore_batch(work)
        image = out.image.float()[..., :h, :w]
        if per_channel:
            image, out = _merge_channels(image, out, n, c)
        elif image.shape[1] != c and self.channels is not None:
            # the input was adapted to the model's channel count; a model taking any count
            # (channels None) returns what it returns (a refiner: 6 channels in, 3 out)
            image = _restore_channels(image, c)
        if keep_grey_inputs and c == 3 and image.shape[1] == 3:
            image = keep_grey(x, image)
        out.image = image.clamp(0.0, 1.0)  # not in place: the tensor was made under inference_mode
        return out


def bf16_native(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes bfloat16 natively (not emulated); ``True`` on ROCm, as in torch."""
    with torch.cuda.device(device):  # torch's check looks at the current device
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def grey_images(x: torch.Tensor) -> torch.Tensor:
    """Which images of an RGB batch (N, 3, H, W) are grey -> (N,) bool: all channels within ``GREY_TOLERANCE``
    (one 8-bit level) of an image whose values are 8-bit levels, within ``FINE_GREY_TOLERANCE`` (one 12-bit
    level) of any other (a 16-bit scan whose tone differs by a hundred of its 65,535 levels is colour: it was
    flattened to grey). Whether values are 8-bit levels is asked only of images whose spread lies between the
    two, and of a sample of their values: no full-size copies of a large scan."""
    spread = (x.amax(dim=1) - x.amin(dim=1)).flatten(1).amax(dim=1)
    grey = spread <= FINE_GREY_TOLERANCE + 1e-6
    between = (~grey) & (spread <= GREY_TOLERANCE + 1e-6)
    for index in torch.nonzero(between).flatten().tolist():
        levels = x[index].flatten()[:EIGHT_BIT_SAMPLE].float() * 255.0
        grey[index] = bool((levels - levels.round()).abs().amax() < 1e-3)
    return grey


def keep_grey(x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``image`` (N, 3, H, W), with the images whose input ``x`` was grey set to their channels' mean."""
    grey = grey_images(x)
    if not bool(grey.any()):
        return image
    return torch.where(grey.view(-1, 1, 1, 1), image.mean(dim=1, keepdim=True).expand_as(image), image)


def _adapt_channels(x: torch.Tensor, wanted: int | None) -> torch.Tensor:
    c = x.shape[1]
    if wanted is None or c == wanted:
        return x
    if wanted == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if wanted == 1 and c == 3:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot feed {c} channels to a model that needs {wanted}")


def _restore_channels(image: torch.Tensor, c: int) -> torch.Tensor:
    if c == 1:
        return image.mean(dim=1, keepdim=True)
    if c == 3 and image.shape[1] == 1:
        return image.expand(-1, 3, -1, -1)
    raise ValueError(f"model returned {image.shape[1]} channels for a {c}-channel input")


def _merge_channels(image: torch.Tensor, out: Restored, n: int, c: int) -> tuple[torch.Tensor, Restored]:
    """Undo the (N, C, H, W) -> (NC, 1, H, W) split of a grey-only network's input on its output.

    Returns the (N, C, H, W) image and ``out`` with its per-image kernels and metrics averaged over the
    channels, so that they have one entry per image again.
    """
    if image.shape[:2] != (n * c, 1):
        raise ValueError(f"a 1-channel model returned shape {tuple(image.shape)} for {n * c} 1-channel images")
    merged = image.reshape(n, c, *image.shape[-2:])
    kernels = None if out.kernels is None else out.kernels.reshape(n, c, *out.kernels.shape[1:]).mean(dim=1)
    metrics = {k: v.reshape(n, c, *v.shape[1:]).float().mean(dim=1) for k, v in out.metrics.items()}
    return merged, Restored(image=merged, kernels=kernels, metrics=metrics)


def concat_restored(parts: Sequence[Restored]) -> Restored:
    """One :class:`Restored` of the batches ``parts`` in order: images and the metrics every part has concatenated,
    kernels of different sizes zero-padded to the largest, centred (an odd-sided kernel stays centred on its
    middle pixel)."""
    if len(parts) == 1:
        return parts[0]
    image = torch.cat([p.image for p in parts])
    kernels = None
    if all(p.kernels is not None for p in parts):
        kh = max(p.kernels.shape[-2] for p in parts)  # type: ignore[union-attr]
        kw = max(p.kernels.shape[-1] for p in parts)  # type: ignore[union-attr]
        padded = []
        for p in parts:
            k = p.kernels
            assert k is not None
            dh, dw = kh - k.shape[-2], kw - k.shape[-1]
            padded.append(F.pad(k, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)))
        kernels = torch.cat(padded)
    names = [name for name in parts[0].metrics if all(name in p.metrics for p in parts)]
    metrics = {name: torch.cat([p.metrics[name] for p in parts]) for name in names}
    return Restored(image=image, kernels=kernels, metrics=metrics)


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad bottom/right; falls back to replicate where reflect cannot reach."""
    h, w = x.shape[-2:]
    if pad_h < h and pad_w < w:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def pick_device(setting: str = "auto") -> torch.device:
    """The device named by ``setting`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    ``auto`` takes CUDA when present, else the CPU; nothing is hard-coded.
    """
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but CUDA is not available; use DEBLUR_DEVICE=cpu")
    return device
