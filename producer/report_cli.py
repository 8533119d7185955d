"""``deblur report JOB``: print the paper-style table and write the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from producer.cli import checked_output_file
from producer.report import DEFAULT_CROPS, ReportTable

console = Console(stderr=True)
out = Console()


def print_table(table: ReportTable, console: Console) -> None:
    """The table for a terminal, with the notes under it.

    Model specs, diagnostic names and notes are user text (a spec's path= may hold brackets): Text cells and
    escaped or unstyled lines, so rich markup in them neither crashes the command nor changes what it shows.
    """
    view = Table(title=Text(f"{table.kind} job {table.job_id} ({table.status})"))
    for i, title in enumerate(table.header()):
        view.add_column(Text(title), justify="left" if i == 0 else "right")
    for row in table.rows:
        view.add_row(*(Text(cell) for cell in table.cells(row)))
    console.print(view)
    for model, values in table.diagnostics.items():
        console.print(f"{model}: " + ", ".join(f"{name} {value:.4g}" for name, value in values.items()),
                      highlight=False, markup=False)
    for note in table.notes:
        console.print(f"[dim]note: {escape(note)}[/dim]", highlight=False)


@click.command("report")
@click.argument("job")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="DEBLUR_REPORT_HTML", show_envvar=True, callback=checked_output_file,
              help="Where to write the HTML report (default: report-<job>.html).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True, envvar="DEBLUR_REPORT_FORMAT", show_envvar=True, help="How to print the table.")
@click.option("--crops", type=click.IntRange(0, 50), default=DEFAULT_CROPS, show_default=True, show_envvar=True,
              help="Worst and best images to show as crops in the HTML (0: none, no S3 reads).")
def report_command(job: str, html_path: Path | None, fmt: str, crops: int) -> None:
    """Print JOB's paper-style table and write a self-contained HTML report.

    Rows: the input, each model and the ensemble; columns: mean PSNR and SSIM,
    gain over the input, images and seconds per image (evaluation jobs), or
    no-reference sharpness (deblur jobs). The HTML page adds per-image gain
    histograms, crops of the worst and best images and estimated kernels, with
    every picture embedded, so the file opens anywhere offline.
    """
    from jobs.settings import load_settings
    from producer.report import build_report, render_html
    from producer.tracking import _json_safe, full_job_id

    settings = load_settings()
    with console.status("reading metrics and images…"):
        report = build_report(settings, full_job_id(settings, job), crops=crops)
    path = html_path or Path(f"report-{report.table.job_id}.html")
    try:
        path.write_text(render_html(report), encoding="utf-8")
    except OSError as exc:  # the default report-<job>.html in a folder not writable, a full disk…
        raise click.ClickException(f"could not write the HTML report to {path}: {exc.strerror or exc}") from None
    if fmt == "json":
        click.echo(json.dumps(_json_safe({**report.table.to_dict(), "html": str(path)}), indent=2))
    elif fmt == "markdown":
        click.echo(report.table.markdown(), nl=False)
    else:
        print_table(report.table, out)
    console.print(f"HTML report written to {path}", highlight=False, markup=False)
