"""Where things are written in S3, known to producer, worker and reports alike."""

from __future__ import annotations

from jobs.s3uri import S3URI


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
