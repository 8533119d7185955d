"""Per-process worker state: settings, device, and the lazily filled model cache.

Nothing here touches torch at import time. Celery's prefork parent imports
``worker.tasks`` (and so this module) before forking; torch is imported and
models are loaded only in the child, on the first task, so the fork never
inherits torch's thread pools or a CUDA context.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from jobs.settings import Settings, load_settings

if TYPE_CHECKING:
    import torch

    from models.base import RestorationModel
    from models.registry import ModelSpec

log = logging.getLogger(__name__)

_lock = threading.Lock()
_models: dict[str, "RestorationModel"] = {}
_state: dict[str, object] = {}


def settings() -> Settings:
    cached = _state.get("settings")
    if cached is None:
        cached = load_settings()
        _state["settings"] = cached
    return cached  # type: ignore[return-value]


def hostname() -> str:
    return str(_state.get("hostname") or os.environ.get("DEBLUR_WORKER_NAME") or socket.gethostname())


def set_hostname(name: str) -> None:
    _state["hostname"] = name


def in_pool_process() -> bool:
    """Whether this is a prefork pool process (billiard names them ``ForkPoolWorker-N``), not a worker's main
    process (``--pool solo`` runs batches in the main process)."""
    from billiard.process import current_process

    return "PoolWorker" in current_process().name


def init_process() -> None:
    """Prepare torch in this (child) process: threads and device. Cheap and idempotent."""
    import torch

    if _state.get("initialised"):
        return
    threads = settings().torch_threads
    if threads > 0:
        torch.set_num_threads(threads)
    _state["initialised"] = True
    log.info("worker process ready on %s with %d torch threads", device(), torch.get_num_threads())


def device() -> "torch.device":
    from models.base import pick_device

    cached = _state.get("device")
    if cached is None:
        cached = pick_device(settings().device)
        _state["device"] = cached
    return cached  # type: ignore[return-value]


# What the errors of a failed accelerator say (CUDA, cuBLAS, cuDNN, NCCL, ROCm): after one the process's device
# context is unusable, so every further image would fail too.
_DEVICE_FAILURE_MARKS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "device-side assert",
                         "NCCL error", "HIP error", "illegal memory access", "unspecified launch failure",
                         "uncorrectable ECC error")


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the accelerator failed, rather than the image or the model code.

    Running out of memory is not such a failure: a smaller image, or tiling, still works on the same device.
    """
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text:
        return False
    return any(mark in text for mark in _DEVICE_FAILURE_MARKS)


def get_model(spec: "ModelSpec") -> "RestorationModel":
    """The loaded model for ``spec``, built on first use and cached for the process: at most
    ``DEBLUR_MODEL_CACHE_SIZE`` models, the least recently used dropped first (a model still in use by a batch
    lives on until the batch lets it go)."""
    from models.loading import load_model

    key = spec.key()
    with _lock:
        model = _models.pop(key, None)
        if model is None:
            init_process()
            log.info("loading model %s on %s", key, device())
            model = load_model(spec, device())
            limit = settings().model_cache_size
            while len(_models) >= limit:  # the least recently used first (dicts keep insertion order)
                dropped = next(iter(_models))
                del _models[dropped]
                log.info("dropped model %s from this process (DEBLUR_MODEL_CACHE_SIZE=%d)", dropped, limit)
        _models[key] = model  # the most recently used last
        return model


def release() -> None:
    """Drop cached models (and CUDA memory) — called when the process shuts down."""
    from models import shared_results

    with _lock:
        _models.clear()
    shared_results.clear()
    if "device" in _state:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
