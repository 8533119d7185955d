"""``deblur api``: serve the HTTP API (``producer.api``) with uvicorn.

Mounted lazily by the main CLI, so a producer install without the ``api``
extra still runs every other command.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click
from rich.console import Console

from jobs.errors import ConfigurationError, InputError
from jobs.listening import LISTEN_FAILURE_EXIT, listen_failure, probe_listen
from jobs.settings import HELP, Settings, load_settings
from producer.api_clients import ClientRegistry, add_client, parse_clients, remove_client

console = Console(stderr=True)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses only this machine can reach."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@click.command(name="api")
@click.option("--address", default=Settings.api_address, show_default=True, envvar=HELP["api_address"].env,
              show_envvar=True,
              help="Address to listen on. The default only accepts connections from this machine; "
                   "0.0.0.0 listens on every interface (then set a token).")
@click.option("--port", type=click.IntRange(1, 65535), default=Settings.api_port, show_default=True,
              envvar=HELP["api_port"].env, show_envvar=True, help="TCP port to listen on.")
@click.option("--token", default=None, envvar=HELP["api_token"].env, show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on every /v1 route. Prefer the environment "
                   "variable: a command-line token is visible to other users in the process list.")
@click.option("--allow-no-token", is_flag=True, envvar="DEBLUR_API_ALLOW_NO_TOKEN", show_envvar=True,
              help="Serve on a non-loopback address without a token (e.g. behind an authenticating proxy).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, envvar="DEBLUR_API_LOG_LEVEL", show_envvar=True,
              help="uvicorn's log level.")
def api_command(address: str, port: int, token: str | None, allow_no_token: bool, log_level: str) -> None:
    """Serve the HTTP API for backend teams until interrupted (Ctrl-C).

    Other services submit deblur and evaluation jobs with POST /v1/jobs, follow
    them with GET /v1/jobs/ID, page through per-image results and metrics with
    GET /v1/jobs/ID/images, and cancel or retry them. Interactive
    documentation is served at /docs, the OpenAPI schema at /openapi.json and
    a health check (database and broker) at /healthz.

    The API uses the same database, broker and S3 settings as the other
    commands (see 'deblur config'). Give each backend its own token with
    'deblur api-client add NAME' (DEBLUR_API_CLIENTS): its jobs are then
    labelled api-client=NAME, and a client can be revoked alone.

    \b
    Example:
      DEBLUR_API_TOKEN=s3cret deblur api --port 8000
      curl -H 'Authorization: Bearer s3cret' http://127.0.0.1:8000/v1/jobs
    """
    import uvicorn

    from producer.api import create_app

    settings = load_settings(api_address=address, api_port=port, api_token=token or None)
    try:
        registry = ClientRegistry(settings.api_clients, settings.api_token)
    except ConfigurationError as exc:
        raise click.UsageError(f"{exc}. Mend the file (or unset DEBLUR_API_CLIENTS) and start again.") from None
    if not registry.required and not is_loopback(settings.api_address) and not allow_no_token:
        raise click.UsageError(
            f"refusing to serve on {settings.api_address} without a token: anyone who can reach it could "
            "submit and cancel jobs. Give each client a token ('deblur api-client add NAME', DEBLUR_API_CLIENTS) "
            "or set DEBLUR_API_TOKEN (or --token), listen on 127.0.0.1, or pass --allow-no-token if a proxy in "
            "front authenticates requests."
        )
    try:  # uvicorn would log its own error and the command exit 3, which means failed images
        probe_listen(settings.api_address, settings.api_port)
    except OSError as exc:
        reason = listen_failure(exc, settings.api_address, settings.api_port, "--port", "DEBLUR_API_PORT")
        if reason is None:
            raise
        click.echo(f"error: {reason}", err=True)
        sys.exit(LISTEN_FAILURE_EXIT)
    host = f"[{settings.api_address}]" if ":" in settings.api_address else settings.api_address
    console.print(f"deblur API on http://{host}:{settings.api_port}  docs: /docs  auth: {registry.describe()}",
                  highlight=False, soft_wrap=True)
    uvicorn.run(create_app(settings), host=settings.api_address, port=settings.api_port, log_level=log_level)


def _clients_file(path: str | None) -> Path:
    chosen = path or load_settings().api_clients
    if not chosen:
        raise click.UsageError("no clients file: set DEBLUR_API_CLIENTS (the file the API reads) or pass --file")
    return Path(chosen)


def _existing_clients_file(path: str | None) -> Path:
    """The clients file to read or change, which must exist: a mistyped --file is not a file without clients."""
    target = _clients_file(path)
    if not target.is_file():
        what = "is not a file" if target.exists() else "does not exist"
        raise InputError(f"the clients file {target} {what}; check --file or DEBLUR_API_CLIENTS "
                         "('deblur api-client add NAME' creates it)")
    return target


FILE_OPTION = click.option("--file", "path", default=None, metavar="PATH",
                           help="The clients file (default: DEBLUR_API_CLIENTS, the file the API reads).")


@click.group(name="api-client")
def api_client_group() -> None:
    """Give each backend its own API token, list them, revoke one.

    The API reads the clients file named by DEBLUR_API_CLIENTS and notices
    changes within a second, so no restart is needed. The file keeps only
    the tokens' SHA-256 digests: a token is printed once, when it is made.
    Jobs a client submits are labelled api-client=NAME, so
    'deblur usage --by label:api-client' charges each client for its own.

    \b
    Example:
      export DEBLUR_API_CLIENTS=/etc/deblur/api-clients
      deblur api-client add ingest-backend          # prints its token
      deblur api-client add grafana --read-only     # GET routes only
      deblur api-client add web --max-priority 5 --window 4   # limits
      deblur api-client remove ingest-backend       # revoked at once
    """


@api_client_group.command("add")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="The client may only read (the GET routes; no submissions, previews or changes).")
@click.option("--max-priority", type=click.IntRange(0, 9), default=None,
              help="Refuse (403) the client's jobs above this priority.")
@click.option("--window", type=click.IntRange(1), default=None, metavar="BATCHES",
              help="At most this many batches of each of the client's jobs in the broker at once (a job asking "
                   "for none, 0 or more gets this many), so its jobs take turns with everyone else's.")
@click.option("--own-jobs-only", is_flag=True,
              help="The client reads only the jobs it submitted (listings, status, results, usage); others' jobs "
                   "answer 404 as if they did not exist.")
@FILE_OPTION
def add_command(name: str, read_only: bool, max_priority: int | None, window: int | None, own_jobs_only: bool,
                path: str | None) -> None:
    """Make a token for client NAME and add it to the clients file; prints the token (only now)."""
    target = _clients_file(path)
    token = add_client(target, name, scope="read" if read_only else "submit",
                       limits={"max_priority": max_priority, "window": window,
                               "see": "own" if own_jobs_only else None})
    click.echo(token)
    console.print(f"client {name!r} added to {target} ({'read' if read_only else 'submit'}); the token above is "
                  "not stored anywhere: hand it to the client now", highlight=False, soft_wrap=True, markup=False)


@api_client_group.command("list")
@FILE_OPTION
def list_command(path: str | None) -> None:
    """The clients file's clients: name, scope, limits and the start of the token's digest."""
    target = _existing_clients_file(path)
    clients = parse_clients(target.read_text(), source=str(target))
    if not clients:
        console.print(f"no clients in {target}", highlight=False, markup=False)
    for digest, client in sorted(clients.items(), key=lambda item: item[1].name or ""):
        limits = " ".join(f"{k}={v}" for k, v in (("max_priority", client.max_priority), ("window", client.window),
                                                   ("see", None if client.sees_all else "own"))
                          if v is not None)
        click.echo(f"{client.name}\t{client.scope}\t{limits or '-'}\t{digest[:19]}…")


@api_client_group.command("remove")
@click.argument("name")
@FILE_OPTION
def remove_command(name: str, path: str | None) -> None:
    """Revoke client NAME: its token stops working within a second."""
    target = _existing_clients_file(path)
    if not remove_client(target, name):  # the user's input, like any other: exit 2 with 'error:'
        raise InputError(f"{target} has no client {name!r} (see 'deblur api-client list')")
    console.print(f"client {name!r} removed from {target}", highlight=False, markup=False)

