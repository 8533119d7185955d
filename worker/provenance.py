"""Provenance records: a JSON file next to each output that says how it was made (``--sidecar``).

An archive ingesting restorations records, for each derived file, what it was
derived from and by what process (a PREMIS "event"). The database holds that
too, but it is pruned (``deblur db prune``) and stays behind when the files
are copied elsewhere. The record travels with the output as
``OUTPUT.deblur.json`` (:func:`jobs.layout.sidecar_uri`):

- the input and the output, each with its SHA-256, format, size and depth;
- the kernels' keys;
- the models as submitted, and their versions with the weights' digests;
- the settings that change the output (strength, metadata, format, quality);
- every metric, by model;
- the worker, the device, the seconds of restoration and the time.

The ``schema`` field names the layout, so a reader can tell later versions
apart.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from db.queries import ImageOutcome
from jobs.messages import BatchMessage

SCHEMA = "deblur-provenance/1"


def provenance_record(message: BatchMessage, outcome: ImageOutcome, output_format: str, kernels: list[str],
                      pages: int = 1) -> bytes:
    """The record of one restored image as UTF-8 JSON, once its output's digest and metrics are known."""
    metrics: dict[str, dict[str, float | None]] = {}
    for model, name, value in outcome.metrics:
        metrics.setdefault(model, {})[name] = value if value is not None and math.isfinite(value) else None
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "deblur": _package_version(),
        "job": message.job_id,
        "input": {"uri": outcome.input_uri, "sha256": outcome.input_sha256, "format": outcome.format,
                  "bit_depth": outcome.bit_depth, "width": outcome.width, "height": outcome.height, "pages": pages},
        "output": {"uri": outcome.output_uri, "sha256": outcome.output_sha256, "format": output_format},
        "kernels": kernels,
        "models": list(message.models),
        "model_versions": outcome.model_versions or {},
        "settings": {"strength": message.strength, "strip_metadata": message.strip_metadata,
                     "output_format": message.output_format, "quality": message.quality},
        "metrics": metrics,
        "worker": outcome.worker,
        "device": outcome.device,
        "inference_s": outcome.inference_s,
        "restored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return (json.dumps(record, indent=2, allow_nan=False) + "\n").encode()


def _package_version() -> str:
    try:
        return metadata.version("deblur")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"
