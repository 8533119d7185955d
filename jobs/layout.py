"""Where things are written in S3, known to producer, worker and reports alike."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from jobs.errors import InputError
from jobs.s3uri import S3URI

_KERNEL_ARTEFACT = re.compile(r"\.kernel(\.[A-Za-z0-9._=-]+)?\.png$", re.IGNORECASE)


def member_folder(model_key: str) -> str:
    """Folder name for one member's outputs: the model key with unsafe characters replaced."""
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in model_key)


def member_output_uri(output_root: S3URI, model_key: str, relative: str) -> S3URI:
    """Where an evaluation job stores one member's output: ``<output>/_members/<model>/<relative>``."""
    return output_root.join(f"_members/{member_folder(model_key)}/{relative}")


def kernel_labels(model_keys: Sequence[str]) -> dict[str, str]:
    """The part of each of several blind members' kernel file names that names it: its model's name, or its whole
    key when another member is the same model with other parameters (two settings of ``l0-blind`` would otherwise
    write one file, and the second overwrite the first)."""
    names = [key.split(":")[0] for key in model_keys]
    return {key: member_folder(key if names.count(name) > 1 else name) for key, name in zip(model_keys, names)}


def kernel_name(output_name: str, label: str | None = None) -> str:
    """A blind model's estimated kernel's file name next to the output named ``output_name``: the whole name and
    ``.kernel.png``, or ``.kernel.<label>.png`` with several blind members (:func:`kernel_labels`), as a provenance
    record keeps the whole name, so that ``scan.tif`` and its access copy ``scan.jpg`` in one folder keep a kernel
    each."""
    return output_name + (f".kernel.{label}.png" if label else ".kernel.png")


def kernel_uri(output: S3URI, label: str | None = None) -> S3URI:
    """Where a blind model's estimated kernel is stored: next to the output, as PNG (:func:`kernel_name`)."""
    return S3URI(output.bucket, kernel_name(output.key, label))


def member_kernel_uri(first_kernel: str, first_label: str, label: str) -> str:
    """Where a job with several blind members stored the kernel labelled ``label`` (:func:`kernel_labels`), given
    the URI recorded for the first (labelled ``first_label``): the same name with the member's label in place of
    the first's, whichever naming the release that ran the job used (before this one, the output's extension was
    left out)."""
    first = f".kernel.{first_label}.png"
    if not first_kernel.endswith(first):
        return first_kernel
    return first_kernel[: -len(first)] + f".kernel.{label}.png"


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

SUFFIX_FORMATS: dict[str, str] = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".jfif": "jpeg", ".tif": "tiff", ".tiff": "tiff",
    ".webp": "webp", ".jp2": "jp2", ".j2k": "jp2", ".j2c": "jp2", ".jpc": "jp2", ".bmp": "bmp", ".dib": "bmp",
}
"""The format each image suffix names (as ``worker.imageio`` reads them)."""

_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff", "jpeg2000": "jp2"}


@functools.lru_cache(maxsize=64)
def parse_output_format(text: str) -> Mapping[str | None, str]:
    """``--output-format``'s value as {input format or None (every input): output format}, read-only (parsed
    once per text: listing a prefix renames every key by it).

    ``png`` writes every output as PNG; ``jpeg=png,webp=png`` converts only those inputs (a TIFF master
    stays a TIFF). Names: png, jpeg (jpg), tiff (tif), webp, jp2, bmp.

    Raises:
        InputError: an unknown format name or a malformed pair; the message lists the names.
    """
    def name(word: str) -> str:
        word = _FORMAT_ALIASES.get(word.strip().lower(), word.strip().lower())
        if word not in OUTPUT_FORMATS:
            raise InputError(f"unknown image format {word!r} in --output-format {text!r}; known: "
                             f"{', '.join(OUTPUT_FORMATS)} (e.g. png, or jpeg=png,webp=png)")
        return word

    if "=" not in text:
        return MappingProxyType({None: name(text)})
    mapping: dict[str | None, str] = {}
    for pair in text.split(","):
        source, equals, target = pair.partition("=")
        if not equals:
            raise InputError(f"--output-format {text!r}: {pair!r} is not FROM=TO; write e.g. jpeg=png,webp=png")
        source_format, target_format = name(source), name(target)
        if mapping.get(source_format, target_format) != target_format:
            raise InputError(f"--output-format {text!r} maps {source_format} twice, to {mapping[source_format]} "
                             f"and to {target_format}; keep one")
        mapping[source_format] = target_format
    return MappingProxyType(mapping)


def format_of_name(name: str) -> str | None:
    """The image format a file name's suffix names ("png", …), or None."""
    dot = name.rfind(".")
    return SUFFIX_FORMATS.get(name[dot:].lower()) if dot >= 0 and "/" not in name[dot:] else None


def output_format_for(name: str, output_format: str | None) -> str | None:
    """The format the output of the input called ``name`` is written in under ``output_format`` (None: its own,
    unchanged); judged by the name's suffix, as its key is."""
    if output_format is None:
        return None
    mapping = parse_output_format(output_format)
    own = format_of_name(name)
    target = mapping.get(own, mapping.get(None)) if own is not None else mapping.get(None)
    return None if target is None or target == own else target


def with_output_format(relative: str, output_format: str | None) -> str:
    """An output's relative path, its extension swapped for the format ``output_format`` gives it (unchanged
    when none, or its own): ``1931/reel.jpg`` under ``png`` is ``1931/reel.png``; under ``jpeg=png`` a
    ``scan.tif`` stays ``scan.tif``; a key without an extension gains one."""
    target = output_format_for(relative.rpartition("/")[2], output_format)
    if target is None:
        return relative
    head, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}{OUTPUT_FORMATS[target]}" if head else stem + OUTPUT_FORMATS[target]


def describe_output_format(output_format: str) -> str:
    """``--output-format``'s value for people: 'PNG', or 'JPEG as PNG, WEBP as PNG'."""
    mapping = parse_output_format(output_format)
    return ", ".join(target.upper() if source is None else f"{source.upper()} as {target.upper()}"
                     for source, target in mapping.items())


SIDECAR_SUFFIX = ".deblur.json"
"""Appended to an output's key for its provenance record (``--sidecar``): ``scan.png.deblur.json``."""


def sidecar_uri(output: S3URI) -> S3URI:
    """Where an output's provenance record goes: next to it, its whole name kept (``a.jpg`` and ``a.png`` of one
    prefix get two)."""
    return S3URI(output.bucket, output.key + SIDECAR_SUFFIX)


def is_sidecar(key: str) -> bool:
    """Whether a key (or a file name) is a provenance record deblur wrote next to an output."""
    return key.lower().endswith(SIDECAR_SUFFIX)
