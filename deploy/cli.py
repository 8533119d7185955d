"""``deblur stack up|down|status``: the embedded local stack from the command line."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict

import click

from deploy.stack import LocalStack, StackError

# `deblur stack status` exit codes, like service managers: all up, something down, nothing recorded.
STATUS_OK, STATUS_DEGRADED, STATUS_NOT_RUNNING = 0, 1, 3


@contextlib.contextmanager
def _stack_errors() -> Iterator[None]:
    """Report a StackError as a one-line CLI error (exit code 1) instead of a traceback."""
    try:
        yield
    except StackError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("stack")
def stack_group() -> None:
    """Start, stop and inspect the local stack on loopback.

    Redis, an S3 endpoint (moto), the SQLite database, Flower and one worker,
    with pids, logs and connection.json in $DEBLUR_HOME/stack/. While it runs,
    every deblur command uses it without any exports.
    """


@stack_group.command("up")
@click.option(
    "--worker/--no-worker",
    default=True,
    show_default=True,
    envvar="DEBLUR_STACK_UP_WORKER",
    show_envvar=True,
    help="Start a worker too; --no-worker to run `deblur worker` yourself in the foreground.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    envvar="DEBLUR_STACK_UP_TIMEOUT",
    show_envvar=True,
    help="Seconds to wait for all services to answer.",
)
def up_command(worker: bool, timeout: float) -> None:
    """Start the services that are not running and wait until each answers."""
    with _stack_errors():
        LocalStack().up(worker=worker, timeout=timeout, echo=click.echo)


@stack_group.command("down")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    envvar="DEBLUR_STACK_DOWN_TIMEOUT",
    show_envvar=True,
    help="Seconds between SIGTERM and SIGKILL (a worker finishes its current batch first).",
)
def down_command(timeout: float) -> None:
    """Stop everything the stack started and remove its connection file (logs and database stay)."""
    with _stack_errors():
        LocalStack().down(timeout=timeout, echo=click.echo)


@stack_group.command("status")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    envvar="DEBLUR_STACK_STATUS_FORMAT",
    show_envvar=True,
    help="table for people, json (one object per service: name, state, pid, url, log) for scripts.",
)
def status_command(fmt: str) -> None:
    """Show each service, its pid, address, state and log.

    Exit code 0 when everything runs, 1 when a service is down, 3 when no stack is recorded.
    """
    stack = LocalStack()
    with _stack_errors():
        services = stack.status()
    if fmt == "json":
        click.echo(json.dumps([asdict(s) for s in services], indent=2))
    elif not services:
        click.echo(f"no stack is running in {stack.dir}; start one with 'deblur stack up' (or 'deblur demo')")
    else:
        rows = [("SERVICE", "STATE", "PID", "ADDRESS", "LOG")]
        rows += [(s.name, s.state, str(s.pid or "-"), s.url, s.log or "-") for s in services]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    if not services:
        sys.exit(STATUS_NOT_RUNNING)
    sys.exit(STATUS_OK if all(s.ok for s in services) else STATUS_DEGRADED)


if __name__ == "__main__":
    stack_group()
