"""``deblur models``: list the registered models and download official checkpoints.

Mounted by the main CLI as ``deblur models``. Importing this module imports no
torch, so it works on a producer-only install.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from jobs.errors import DeblurError
from models.catalog import REGISTRY
from models.registry import FAMILIES, ModelInfo, describe, weights_dir


@click.group(name="models")
def models_group() -> None:
    """List the restoration models and fetch the weights they need.

    Every model has a name you pass to --model (e.g. nafnet-gopro). Models of
    the learned-official family need a checkpoint file in the weights folder
    (DEBLUR_WEIGHTS_DIR); 'deblur models pull NAME' downloads it.
    """


@models_group.command(name="list", short_help="Show the models: family, licence, weights, size rules.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    envvar="DEBLUR_MODELS_FORMAT",
    show_envvar=True,
    help="'table' for people, 'json' (a list of objects) for scripts.",
)
@click.option(
    "--family",
    type=click.Choice(FAMILIES),
    default=None,
    envvar="DEBLUR_MODELS_FAMILY",
    show_envvar=True,
    help="Only show models of this family.",
)
def list_models(output_format: str, family: str | None) -> None:
    """Show every model: family, licence, whether its weights are here, size rules.

    Use a NAME from this list with --model NAME. Models marked non-commercial
    only run when DEBLUR_ALLOW_NONCOMMERCIAL=1.
    """
    entries = [info for info in REGISTRY if family is None or info.family == family]
    if output_format == "json":
        click.echo(json.dumps([describe(info) for info in entries], indent=2))
        return
    _print_table(entries)


@models_group.command(name="pull", short_help="Download a model's official checkpoint (sha256 checked when known).")
@click.argument("name")
@click.option(
    "--url",
    default=None,
    envvar="DEBLUR_PULL_URL",
    show_envvar=True,
    help="Download from this address instead of the registered one (a mirror).",
)
@click.option(
    "--sha256",
    "sha256",
    default=None,
    envvar="DEBLUR_PULL_SHA256",
    show_envvar=True,
    help="Expected sha256 of the file: a download that does not match is discarded. Overrides the registered "
    "checksum; the official checkpoints have none registered, so without it their sha256 is only printed.",
)
@click.option(
    "--force",
    is_flag=True,
    default=False,
    envvar="DEBLUR_PULL_FORCE",
    show_envvar=True,
    help="Download again even if the file is already in the weights folder.",
)
@click.option(
    "--weights-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="DEBLUR_WEIGHTS_DIR",
    show_envvar=True,
    help="Folder to store the checkpoint in  [default: ~/.cache/deblur/weights].",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    envvar="DEBLUR_PROGRESS",
    show_envvar=True,
    help="Show a download progress bar on stderr.",
)
def pull_model(
    name: str,
    url: str | None,
    sha256: str | None,
    force: bool,
    weights_dir: Path | None,
    progress: bool,
) -> None:
    """Download the official checkpoint of model NAME into the weights folder.

    When the sha256 is known (--sha256, or registered for the model) the file
    is checked against it before it is stored; a file that does not match is
    discarded and nothing is left behind. The official checkpoints have no
    registered sha256 (their authors publish none): such a file is only stored
    if it is a complete checkpoint of the model's network, and its sha256 is
    printed with a warning, to record and pass as --sha256 on the next
    machine. Example:

        deblur models pull fftformer-gopro
    """
    from models.weights_store import pull

    try:
        info = REGISTRY.get(name)
        result = pull(info, url=url, sha256=sha256, force=force, dest_dir=weights_dir, progress=progress)
    except DeblurError as exc:
        raise click.ClickException(str(exc)) from None
    if not result.downloaded:
        click.echo(f"{info.name}: {result.path} is already present (sha256 {result.sha256}); use --force to download again")
        return
    click.echo(f"{info.name}: stored {result.path} ({result.size_bytes} bytes, sha256 {result.sha256})")
    if not result.verified:
        click.echo(
            f"warning: no checksum is registered for {info.name}; check the sha256 above "
            "against a trusted source, and pass --sha256 next time",
            err=True,
        )


def _print_table(entries: list[ModelInfo]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Models (weights folder: {weights_dir()})")
    table.add_column("name", no_wrap=True)
    for column in ("family", "licence", "weights", "size rules"):
        table.add_column(column, overflow="fold")
    for info in entries:
        row = describe(info)
        if info.weights is not None:
            weights = "present" if row["weights_present"] else "missing"
        elif info.param("path") is not None:
            weights = "path= parameter"
        elif info.param("weights") is not None:
            weights = "none ship: deblur train, then weights="
        else:
            weights = "not needed"
        licence = info.license
        if info.noncommercial and "non-commercial" not in licence:
            licence += " (non-commercial)"
        table.add_row(info.name, info.family, licence, weights, str(row["size_rules"]))
    console = Console()
    console.print(table)
    console.print("Details (summary, parameters): deblur models list --format json")
