"""Where things are written in S3, known to producer, worker and reports alike."""

from __future__ import annotations

import re

from jobs.s3uri import S3URI

_KERNEL_ARTEFACT = re.compile(r"\.kernel(\.[A-Za-z0-9._=-]+)?\.png$", re.IGNORECASE)


def member_folder(model_key: str) -> str:
    """Folder name for one member's outputs: the model key with unsafe characters replaced."""
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in model_key)


def member_output_uri(output_root: S3URI, model_key: str, relative: str) -> S3URI:
    """Where an evaluation job stores one member's output: ``<output>/_members/<model>/<relative>``."""
    return output_root.join(f"_members/{member_folder(model_key)}/{relative}")


def kernel_uri(output: S3URI, model_key: str, several: bool) -> S3URI:
    """Where a blind model's estimated kernel is stored: next to the output, as PNG."""
    stem = output.key.rsplit(".", 1)[0]
    suffix = f".kernel.{member_folder(model_key.split(':')[0])}.png" if several else ".kernel.png"
    return S3URI(output.bucket, stem + suffix)


def is_kernel_artefact(key: str) -> bool:
    """Whether a key (or a file name) is a kernel PNG written next to an output: ``<stem>.kernel.png`` or
    ``<stem>.kernel.<model>.png`` (:func:`kernel_uri`, and ``deblur restore``'s files).

    A prefix or folder listed as input skips them: submitting an earlier job's output prefix again must not
    restore its kernels as photographs.
    """
    return bool(_KERNEL_ARTEFACT.search(key.rsplit("/", 1)[-1]))


OUTPUT_FORMATS: dict[str, str] = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "webp": ".webp", "jp2": ".jp2",
                                  "bmp": ".bmp"}
"""Formats an output can be converted to (``--output-format``), and the extension its key then takes."""


def with_output_format(relative: str, output_format: str | None) -> str:
    """An output's relative path, its extension swapped for ``output_format``'s (unchanged when it is None):
    ``1931/reel.jpg`` as ``png`` is ``1931/reel.png``; a key without an extension gains one."""
    if output_format is None:
        return relative
    head, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}{OUTPUT_FORMATS[output_format]}" if head else stem + OUTPUT_FORMATS[output_format]


SIDECAR_SUFFIX = ".deblur.json"
"""Appended to an output's key for its provenance record (``--sidecar``): ``scan.png.deblur.json``."""


def sidecar_uri(output: S3URI) -> S3URI:
    """Where an output's provenance record goes: next to it, its whole name kept (``a.jpg`` and ``a.png`` of one
    prefix get two)."""
    return S3URI(output.bucket, output.key + SIDECAR_SUFFIX)


def is_sidecar(key: str) -> bool:
    """Whether a key (or a file name) is a provenance record deblur wrote next to an output."""
    return key.lower().endswith(SIDECAR_SUFFIX)
