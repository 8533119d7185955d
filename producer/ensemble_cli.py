"""``deblur ensemble fit|list``: weights fitted on an evaluation job, saved by name."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from producer.ensembles import DEFAULT_MAX_IMAGES

console = Console(stderr=True)
out = Console()


@click.group("ensemble")
def ensemble_group() -> None:
    """Fit ensemble weights on an evaluation job and save them under a name.

    \b
      deblur evaluate --blurred s3://archive/blur/ --sharp s3://archive/sharp/ \\
          --model wiener --model richardson-lucy --output s3://archive/eval/ --wait
      deblur ensemble fit JOB --name my-archive
      deblur submit s3://archive/scans/ --output s3://archive/restored/ --ensemble my-archive
    """


@ensemble_group.command("fit")
@click.argument("job")
@click.option("--name", required=True, show_envvar=True, help="Name to save the fitted ensemble under.")
@click.option("--replace", is_flag=True, show_envvar=True, help="Overwrite an ensemble saved under the same name.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, show_envvar=True,
              help="Parallel S3 downloads (default: DEBLUR_IO_THREADS).")
@click.option("--max-images", type=click.IntRange(1), default=DEFAULT_MAX_IMAGES, show_default=True,
              show_envvar=True, help="Fit on at most this many images (a reproducible random subset).")
def fit_command(job: str, name: str, replace: bool, threads: int | None, max_images: int) -> None:
    """Fit non-negative member weights (summing to 1) that maximise PSNR on JOB.

    JOB must be an evaluation job with two or more --model and an --output:
    each member's output is read from <output>/_members/ with the sharp image.
    """
    from jobs.settings import load_settings
    from producer.ensembles import fit_ensemble
    from producer.tracking import full_job_id

    settings = load_settings()
    job = full_job_id(settings, job)
    columns = (TextColumn("reading outputs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("read", total=None)
        result = fit_ensemble(
            settings, job, name, replace=replace, threads=threads, max_images=max_images,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if result.job_status != "done":
        console.print(f"[yellow]note:[/yellow] job {job} is {result.job_status}; fitted on its done images only")
    if result.images_used < result.images_done:
        console.print(f"fitted on {result.images_used} of {result.images_done} images (--max-images)")
    table = Table("member", "weight")
    for text, weight in zip(result.members, result.weights, strict=True):
        table.add_row(Text(text.rsplit(":", 1)[0]), f"{weight:.4f}")  # a spec's brackets are not markup
    out.print(table)
    out.print(
        f"mean PSNR {result.psnr_fitted:.3f} dB with fitted weights, {result.psnr_equal:.3f} dB with equal "
        f"weights: gain {result.gain_db:+.3f} dB over {result.images_used} images"
    )
    out.print(f"saved as ensemble [bold]{escape(result.name)}[/bold]; use it with: deblur submit … --ensemble "
              f"{escape(result.name)}",
              highlight=False)


@ensemble_group.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              envvar="DEBLUR_ENSEMBLE_LIST_FORMAT", show_envvar=True, help="table for people, json for scripts.")
def list_command(fmt: str) -> None:
    """List saved ensembles with their members, weights and fitted PSNR."""
    from db.engine import ensure_schema, session_scope
    from db.ensembles import list_ensembles
    from jobs.settings import load_settings

    url = load_settings().resolved_database_url()
    ensure_schema(url)
    with session_scope(url) as session:
        rows = [e.to_dict() for e in list_ensembles(session)]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no saved ensembles yet; fit one with 'deblur ensemble fit JOB --name NAME'")
        return
    table = Table("name", "members (spec:weight)", "PSNR fitted", "gain vs equal", "images", "job", "created")
    for row in rows:
        table.add_row(
            Text(row["name"]), Text("\n".join(row["members"])),
            "" if row["psnr_fitted"] is None else f"{row['psnr_fitted']:.3f}",
            "" if row["gain_db"] is None else f"{row['gain_db']:+.3f} dB",
            str(row["images"] or ""), (row["source_job_id"] or "")[:8], (row["created_at"] or "")[:19],
        )
    out.print(table)
