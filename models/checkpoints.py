"""Reading checkpoint files safely and normalising the official layouts.

Only two loaders are ever used: ``safetensors`` (no code at all) and
``torch.load(..., weights_only=True)`` (restricted unpickling: tensors,
containers and primitive values only). A checkpoint that needs arbitrary
unpickling (a pickled ``nn.Module``, an ``argparse.Namespace``, NumPy
scalars) is refused with a :class:`WeightsError` rather than executed;
convert it to safetensors on a machine you trust.

Official repositories wrap their weights in different ways:
``{'params': sd}`` and ``{'params_ema': sd}`` (BasicSR: NAFNet, Restormer,
FFTformer), ``{'state_dict': sd, 'optimizer': ...}`` (MPRNet, Uformer),
``{'model': sd}``, and keys prefixed with ``module.`` (saved from
``DataParallel``). :func:`normalise_state_dict` reduces all of them to a flat
``{name: tensor}`` dict.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from jobs.errors import WeightsError
from models.weights_store import check_readable

# Known wrapper keys, best first: an EMA copy of the weights is the one the
# papers report when both are present.
WRAPPER_KEYS: tuple[str, ...] = (
    "params_ema",
    "params-ema",
    "params",
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
)

# Prefixes added by DataParallel/DistributedDataParallel, torch.compile and
# some GAN training scripts; removed when every key carries them.
COMMON_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "netG.")

StateDict = dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> Mapping[str, object]:
    """Read ``path`` without executing code: safetensors, or restricted unpickling.

    Raises :class:`WeightsError` naming the file when it is missing, unreadable
    by this user, truncated, not a checkpoint, or needs unsafe unpickling.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist or is not a file")
    check_readable(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from None
    with path.open("rb") as handle:
        head = handle.read(64).lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"{")):
        raise WeightsError(
            f"checkpoint {str(path)!r} is a text/HTML document, not weights (a download "
            "page saved instead of the file?); download the checkpoint itself"
        )
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"checkpoint {str(path)!r} needs unrestricted unpickling, which could run code "
            f"from the file, so it is refused ({_unpickler_reason(exc)}). Convert it to a "
            "plain state dict or to .safetensors on a machine you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        if "TorchScript" in str(exc):
            raise WeightsError(
                f"checkpoint {str(path)!r} is a TorchScript archive, which carries code; "
                "export its state_dict() (or .safetensors) on a machine you trust"
            ) from None
        raise WeightsError(
            f"checkpoint {str(path)!r} could not be read (truncated download, TorchScript "
            f"archive or not a PyTorch file?): {_first_line(exc)}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a dict of weights"
        )
    return loaded


def normalise_state_dict(checkpoint: Mapping[str, object], source: str = "checkpoint") -> StateDict:
    """Unwrap the official layouts into a flat ``{name: tensor}`` state dict.

    Known wrapper keys (:data:`WRAPPER_KEYS`) are followed, as is a dict with a
    single nested dict; non-tensor entries (epoch counters, optimizer state
    next to the weights) are dropped; the prefixes of :data:`COMMON_PREFIXES`
    are removed when every key has them, again and again, so that stacked
    ones (``netG.module.``) go whatever their order.
    """
    current: Mapping[str, object] = checkpoint
    for _ in range(8):  # wrappers nest at most a couple of levels in practice
        inner = _unwrap_once(current)
        if inner is None:
            break
        current = inner
    tensors = {str(k): v for k, v in current.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(sorted(map(str, checkpoint))[:12]) or "none"
        raise WeightsError(
            f"{source} holds no weight tensors that could be found (top-level keys: {keys}); "
            f"expected a state dict, possibly under one of {', '.join(WRAPPER_KEYS)}"
        )
    stripped = True
    while stripped:  # in any order and nesting: 'netG.module.' as well as 'module.netG.'
        stripped = False
        for prefix in COMMON_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def load_state_dict(path: str | Path) -> StateDict:
    """Read ``path`` safely and return its normalised state dict."""
    return normalise_state_dict(read_checkpoint(path), source=f"checkpoint {str(path)!r}")


def _unwrap_once(mapping: Mapping[str, object]) -> Mapping[str, object] | None:
    if any(isinstance(v, torch.Tensor) for v in mapping.values()) and not any(
        isinstance(mapping.get(k), Mapping) for k in WRAPPER_KEYS
    ):
        return None
    for key in WRAPPER_KEYS:
        value = mapping.get(key)
        if isinstance(value, Mapping) and value:
            return value
    nested = [v for v in mapping.values() if isinstance(v, Mapping)]
    if len(mapping) == 1 and len(nested) == 1:
        return nested[0]
    return None


def _unpickler_reason(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
