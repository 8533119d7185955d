"""``deblur usage``: the workers' time and the megapixels restored, per team, model, device, worker or period."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobs.errors import InputError
from jobs.settings import load_settings
from producer.cli import checked_labels, option
from producer.usage import (
    DEFAULT_PERIOD,
    GROUPING_HELP,
    TABLE_HEADERS,
    UsageReport,
    check_groupings,
    parse_moment,
    period_text,
    table_cells,
    usage_csv,
    usage_report,
)

out = Console()


def _checked_groupings(_ctx: object, _param: object, value: tuple[str, ...]) -> list[str]:
    try:
        return check_groupings(value)
    except InputError as exc:
        raise click.BadParameter(str(exc).removeprefix("--by ")) from None


def print_usage_table(report: UsageReport, console: Console) -> None:
    """The report as a terminal table, one row per group and the total under them."""
    view = Table(title=f"usage {period_text(report.since, report.until)}", title_justify="left")
    for key in report.by:
        view.add_column(key)
    for header in TABLE_HEADERS:
        view.add_column(header, justify="right")
    if report.by:
        for line in report.lines:  # Text: a label value such as '[draft]' or '[/x]' is not rich markup
            view.add_row(*(Text(value) for value in line.group.values()), *table_cells(line))
        view.add_section()
        view.add_row("total", *([""] * (len(report.by) - 1)), *table_cells(report.total), style="bold")
    else:  # without --by the only group is the total: one row
        view.add_row(*table_cells(report.total))
    console.print(view)
    if report.rolled_up_days:
        console.print("[dim]note: pruned jobs count by whole UTC days[/dim]", highlight=False)


@click.command("usage")
@option("--since", default=DEFAULT_PERIOD, show_default=True, metavar="WHEN",
        help="Start of the period: a time ago (30d, 12h, 2w, 90m) or a UTC date or date-time (2026-11-01, "
             "2026-11-01T08:00).")
@option("--until", default=None, metavar="WHEN", help="End of the period (not included), as --since. Default: now.")
@option("--by", "by", multiple=True, callback=_checked_groupings, metavar="KEY",
        help=f"Group by this (repeat to nest): {GROUPING_HELP}. Without it, one total.")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=checked_labels,
        help="Only jobs carrying this label (repeat: all of them), e.g. team=ingest.")
@option("--kind", type=click.Choice(["deblur", "evaluate"]), default=None, help="Only jobs of this kind.")
@option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
        help="table for people; csv and json for spreadsheets and scripts. csv: one row per group and no total "
             "row, so that columns sum to the total (only the header when nothing was used; without --by, the "
             "one total row); a cell starting with = + - or @ gets a leading ' so spreadsheets show it as text.")
def usage_command(since: str, until: str | None, by: list[str], labels: dict[str, str], kind: str | None,
                  fmt: str) -> None:
    """What the workers spent: images, megapixels and time, by team, model, device, worker or period.

    Counts every attempt that finished (done or failed) in the period, in the
    period it finished (an image failed, then retried, counts both), from the
    database the workers write to, including jobs that 'deblur db prune' has
    deleted since (it keeps their totals per day). "model time" is the models'
    seconds, "worker time" adds reading the input and writing the output. A
    failed attempt counts its seconds but no megapixels.

    \b
    Examples:
      deblur usage --by label:team                  the last 30 days, per team
      deblur usage --since 2026-11-01 --until 2026-12-01 --by label:team --format csv
      deblur usage --since 7d --by model --by device    what each model costs on each device
      deblur usage --since 24h --by worker --by day     each node's throughput
    """
    report = usage_report(load_settings(), since=parse_moment(since),
                          until=None if until is None else parse_moment(until, option="--until"),
                          by=by, labels=labels, kind=kind)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif fmt == "csv":
        click.echo(usage_csv(report), nl=False)
    else:
        print_usage_table(report, out)
