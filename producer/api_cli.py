"""``deblur api``: serve the HTTP API (``producer.api``) with uvicorn.

Mounted lazily by the main CLI, so a producer install without the ``api``
extra still runs every other command.
"""

from __future__ import annotations

import ipaddress

import click
from rich.console import Console

from jobs.settings import HELP, Settings, load_settings

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
    commands (see 'deblur config').

    \b
    Example:
      DEBLUR_API_TOKEN=s3cret deblur api --port 8000
      curl -H 'Authorization: Bearer s3cret' http://127.0.0.1:8000/v1/jobs
    """
    import uvicorn

    from producer.api import create_app

    settings = load_settings(api_address=address, api_port=port, api_token=token or None)
    if not settings.api_token and not is_loopback(settings.api_address) and not allow_no_token:
        raise click.UsageError(
            f"refusing to serve on {settings.api_address} without a token: anyone who can reach it could "
            "submit and cancel jobs. Set DEBLUR_API_TOKEN (or --token), listen on 127.0.0.1, or pass "
            "--allow-no-token if a proxy in front authenticates requests."
        )
    host = f"[{settings.api_address}]" if ":" in settings.api_address else settings.api_address
    auth = "bearer token required" if settings.api_token else "no token (DEBLUR_API_TOKEN unset)"
    console.print(f"deblur API on http://{host}:{settings.api_port}  docs: /docs  auth: {auth}",
                  highlight=False, soft_wrap=True)
    uvicorn.run(create_app(settings), host=settings.api_address, port=settings.api_port, log_level=log_level)
