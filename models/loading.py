"""Turning a validated :class:`ModelSpec` into a ready :class:`RestorationModel`."""

from __future__ import annotations

import importlib

import torch

from jobs.errors import LicenseError
from models.base import RestorationModel
from models.catalog import REGISTRY
from models.registry import ModelSpec, common_param_names, noncommercial_allowed
from models.tiling import apply_inference_options


def check_license(name: str) -> None:
    """Refuse models under non-commercial licences unless the operator opted in."""
    info = REGISTRY.get(name)
    if info.noncommercial and not noncommercial_allowed():
        raise LicenseError(
            f"model {name!r} is licensed {info.license!r}, which forbids commercial use; "
            "set DEBLUR_ALLOW_NONCOMMERCIAL=1 to confirm your use is non-commercial"
        )


def load_model(spec: ModelSpec, device: torch.device) -> RestorationModel:
    """Build the model named by ``spec`` on ``device`` (weights loaded, eval mode).

    The common inference options (``tile``, ``tile_overlap``, ``self_ensemble``;
    :data:`models.registry.COMMON_PARAMS`) are not passed to the factory: the
    built model is wrapped to apply them, and the wrapper is itself a
    :class:`RestorationModel`.
    """
    info = REGISTRY.get(spec.name)
    check_license(info.name)
    module_name, _, function_name = info.factory.partition(":")
    factory = getattr(importlib.import_module(module_name), function_name)
    params = REGISTRY.resolved_params(spec)
    options = {name: params.pop(name) for name in common_param_names(info)}
    model: RestorationModel = factory(params, device)
    if hasattr(model, "apply_inference_options"):  # a model that wraps only a part of itself (a refiner)
        model = model.apply_inference_options(options)
    else:
        model = apply_inference_options(model, options)
    if info.shared_results:
        from models.shared_results import SharedResultModel

        model = SharedResultModel(model)
    return model
