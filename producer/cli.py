"""The ``deblur`` command line.

Subcommands that need torch (worker, restore, train, models) are imported only
when run, so ``deblur submit`` works on a producer install without torch.
Every option also reads an environment variable: ``DEBLUR_<COMMAND>_<OPTION>``
(e.g. ``DEBLUR_SUBMIT_OUTPUT``), shown in each ``--help``; connection settings
use the variables listed by ``deblur config``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from jobs.errors import ConfigurationError, DeblurError, InputError, OutputsBusyError
from jobs.layout import parse_output_format
from jobs.settings import HELP, Settings, load_settings
from jobs.statuses import JOB_STATUSES
from models.tone import LIGHT_CHOICES, LIGHT_HELP  # not models.catalog: every command would import it

console = Console(stderr=True)
out = Console()


def checked_output_format(_ctx: object, _param: object, value: str | None) -> str | None:
    """A click callback: ``--output-format`` checked as it is typed (:func:`jobs.layout.parse_output_format`)."""
    if value is not None:
        try:
            parse_output_format(value)
        except InputError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def checked_output_file(_ctx: object, _param: object, value: Any) -> Any:
    """A click callback: a file to write (``metrics -o``, ``report --html``) refused at once when its folder is
    missing or not writable, before the command does its work and then fails to write it."""
    import os
    from pathlib import Path

    if value is None:
        return value
    folder = Path(os.path.abspath(os.fspath(value))).parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist: create it first"
        raise click.BadParameter(f"{os.fspath(value)!r}: the folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{os.fspath(value)!r}: no permission to write in the folder {folder}")
    return value


def checked_retention(_ctx: object, _param: object, value: float) -> float:
    """A click callback: ``db prune --older-than`` refused at once when it is 0 or less
    (:func:`producer.prune.cutoff_for`): every finished job would go, even one cancelled a second ago."""
    from producer.prune import cutoff_for

    try:
        cutoff_for(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


# name → (module:attribute, one-line help); imported on first use.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("worker.cli:worker_command", "Run a worker that pulls batches from Redis and restores them."),
    "flower": ("worker.cli:flower_command", "Run Flower, the web monitor for workers and tasks."),
    "stack": ("deploy.cli:stack_group", "Start, stop or inspect the embedded local stack."),
    "models": ("models.cli:models_group", "List registered models or download official weights."),
    "train": ("models.train_cli:train_command", "Train a registered architecture on image pairs or synthetic blur."),
    "restore": ("worker.local_restore:restore_command", "Restore local files in this process (no queue)."),
    "demo": ("deploy.demo:demo_command", "Bring the local stack up and run a real ensemble deblur job."),
    "report": ("producer.report_cli:report_command", "Print a job's paper-style table and write an HTML report."),
    "ensemble": ("producer.ensemble_cli:ensemble_group", "Fit and save ensemble weights from an evaluation job."),
    "api": ("producer.api_cli:api_command", "Serve the HTTP API for backend teams."),
    "api-client": ("producer.api_cli:api_client_group", "Give each backend its own API token, list or revoke them."),
    "usage": ("producer.usage_cli:usage_command", "What the workers spent: images, megapixels and time, by team."),
}


def name_env_vars_after_flags(command: click.Command, prefix: str) -> None:
    """Make every option of ``command`` (and of its subcommands, for a group) read ``<prefix>_<FLAG>``, the name
    its long flag gives (``deblur results --format``: ``DEBLUR_RESULTS_FORMAT``), as the README promises.

    Click names automatic variables after the Python parameter (``fmt``: ``DEBLUR_RESULTS_FMT``), which a user
    cannot guess from ``--help``'s flags. That name is still read after the flag's, so a setting that relied on
    it keeps working; an option that reads a setting's variable (``worker --queue``: ``DEBLUR_QUEUE``) reads the
    flag's name first too. ``prefix`` is the command's own (``DEBLUR_RESULTS``)."""
    if getattr(command, "_env_named_after_flags", False):
        return
    command._env_named_after_flags = True  # type: ignore[attr-defined]
    for param in command.params:
        flags = [name for name in getattr(param, "opts", ()) if name.startswith("--")]
        if not isinstance(param, click.Option) or not flags or not param.allow_from_autoenv:
            continue
        wanted = f"{prefix}_{flags[0][2:].upper().replace('-', '_')}"
        if param.envvar is None:
            automatic = f"{prefix}_{(param.name or '').upper()}"
            param.envvar = wanted if automatic == wanted else [wanted, automatic]
        else:
            given = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            if wanted not in given:
                param.envvar = [wanted, *given]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            name_env_vars_after_flags(sub, f"{prefix}_{name.upper().replace('-', '_')}")


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            target, _ = LAZY_COMMANDS[name]
            module, _, attr = target.partition(":")
            try:
                command = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise click.ClickException(
                    f"'deblur {name}' needs packages that are not installed ({exc.name or exc}); "
                    "install the worker extra: pip install 'deblur[worker]'"
                ) from None
        else:
            command = super().get_command(ctx, name)
        if command is not None:
            name_env_vars_after_flags(command, f"{ctx.auto_envvar_prefix or 'DEBLUR'}_{name.upper().replace('-', '_')}")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                command = super().get_command(ctx, name)
                if command is not None and not command.hidden:
                    rows.append((name, command.get_short_help_str(80)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeblurError as exc:
            # the message quotes user text (paths, labels, keys, job ids): escaped, so '[draft]' stays as typed
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False, markup=True)
            sys.exit(2 if isinstance(exc, InputError) else 1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints its own usage errors (a bad option, or its environment variable), one line each
        except Exception as exc:
            message = unreachable_service(exc)
            if message is None:
                raise
            console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False, markup=True)
            sys.exit(1)


def unreachable_service(exc: BaseException) -> str | None:
    """What to tell the user when the broker or the database failed ``exc``'s command, or None for other errors.

    A command that cannot reach Redis or SQL should say which one, where it looked and what to do, not print
    the driver's traceback. The database's own reason is kept (this is the user's own terminal; the HTTP API
    keeps it in its log).
    """
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import InterfaceError
    from sqlalchemy.exc import OperationalError as DatabaseError

    if not isinstance(exc, (BrokerError, DatabaseError, InterfaceError)):
        return None
    settings = _settings()  # only now: settings that cannot be read are not what went wrong with other errors
    if isinstance(exc, BrokerError):
        return (f"the broker at {_safe_url(settings.broker_url)} does not answer ({exc}). Start Redis there or point "
                "DEBLUR_BROKER_URL at a running one; 'deblur stack up' starts a local stack, 'deblur config' shows "
                "the settings in use")
    if isinstance(exc, (DatabaseError, InterfaceError)):
        cause = exc.orig if exc.orig is not None else exc  # the driver's exception, when SQLAlchemy wrapped one
        reason = str(cause).strip().splitlines()[0]
        return (f"the database at {_safe_url(settings.resolved_database_url())} failed: "
                f"{type(cause).__name__}: {reason}. Check that it runs and that "
                "DEBLUR_DATABASE_URL points at it; 'deblur stack up' starts a local stack, 'deblur config' shows "
                "the settings in use")
    return None


def option(*names: str, **kwargs: Any) -> Callable[[Any], Any]:
    """``click.option`` that shows its environment variable in ``--help``."""
    kwargs.setdefault("show_envvar", True)
    return click.option(*names, **kwargs)


@click.group(cls=LazyGroup, context_settings={"auto_envvar_prefix": "DEBLUR", "help_option_names": ["-h", "--help"],
                                              "max_content_width": 100})
@click.version_option(package_name="deblur")
def main() -> None:
    """deblur: restore blurred photographs at archive scale.

    Producers submit jobs that point at images in S3-compatible storage; workers
    restore them with one model or an ensemble, write the results back to S3
    and record per-image metrics in SQL.

    \b
    Start here:
      deblur demo                      local stack + a real job, end to end
      deblur doctor                    is everything a job needs ready? what to fix
      deblur submit s3://archive/in/ --output s3://archive/out/ --wait
      deblur status JOB --watch        progress from the database
      deblur results JOB --format json one object per image

    JOB is a job's id, or its first few characters (4 or more) when no other
    job's id starts the same way, e.g. the 8 shown on a progress bar.
    """


def _settings() -> Settings:
    return load_settings()


NOTIFY_HELP = (
    "POST a JSON summary of the job to this http(s) URL each time it finishes (done, failed or cancelled); "
    "signed with DEBLUR_NOTIFY_SECRET when the workers have it, retried while the receiver is down."
)
LABEL_HELP = (
    "A label of your own for the job, KEY=VALUE (repeat for more), e.g. team=ingest: shown by 'deblur status', "
    "sent with notifications, and selects jobs in 'deblur status --label team=ingest'."
)


def checked_labels(_ctx: object, _param: object, value: tuple[str, ...]) -> dict[str, str]:
    """Click callback: ``--label KEY=VALUE`` texts as a checked dict (a usage error names the bad one)."""
    from jobs.labels import parse_labels

    try:
        return parse_labels(value)
    except InputError as exc:
        raise click.BadParameter(str(exc).removeprefix("--label: ").removeprefix("--label ")) from None


WINDOW_HELP = (
    "At most this many of the job's batches in the broker at once, the next sent as each finishes, so jobs "
    "submitted later at the same priority take turns with this one instead of waiting behind all of it; 0 sends "
    "every batch now (first come, first served). Default: DEBLUR_JOB_WINDOW (0)."
)
WAIT_HELP = (
    "Show a progress bar until the job finishes; then exit code 3 if any image failed or the job did not end "
    "done (failed, cancelled), 0 when every image is done."
)
MODEL_HELP = (
    "Model as NAME[:PARAMS][:WEIGHT], e.g. wiener, l0-blind:kernel=31, "
    "wiener:psf=motion:length=15,angle=30:0.5. Repeat for an ensemble (outputs averaged "
    "with the weights). Default: the default ensemble (see 'deblur models list')."
)


INTERRUPTED_EXIT = 130
"""Exit code when Ctrl-C stops 'submit --wait' or 'status --watch' (128 + SIGINT, as shells report it): the job
keeps running."""


def _watch_until_interrupted(settings: Settings, job_id: str) -> dict[str, Any]:
    """:func:`producer.tracking.watch`; on Ctrl-C, say that the job goes on and how to follow it, and exit
    :data:`INTERRUPTED_EXIT`."""
    from producer.tracking import watch

    try:
        return watch(settings, job_id, console)
    except KeyboardInterrupt:
        console.print(f"stopped watching; job {job_id} keeps running: follow it with 'deblur status {job_id[:8]} "
                      f"--watch', or stop it with 'deblur cancel {job_id[:8]}'", soft_wrap=True, highlight=False,
                      markup=False)
        sys.exit(INTERRUPTED_EXIT)


def _submit_and_report(request: Any, wait: bool, quiet: bool, dry_run: bool = False) -> None:
    from producer.inputs import describe_ignored
    from producer.submit import preview, submit
    from producer.tracking import failure_reasons, print_status

    settings = _settings()
    skipped_note = " whose outputs already exist (--skip-existing)"
    if dry_run:
        with console.status("listing inputs…"):
            seen = preview(request, settings)
        click.echo(f"would submit {seen.total} images" + (f", leaving out {seen.skipped}{skipped_note}"
                                                           if request.skip_existing else "")
                   + "; nothing was written or enqueued (--dry-run)")
        for item in seen.sample:
            click.echo(f"  {item.input} → {item.output or '(not written)'}"
                       + (f"  (sharp: {item.reference})" if item.reference else ""))
        if seen.total > len(seen.sample):
            click.echo(f"  … and {seen.total - len(seen.sample)} more")
        if seen.ignored:
            click.echo(f"left out {describe_ignored(seen.ignored)}")
        return
    with console.status("listing inputs and enqueueing batches…") as status:
        result = submit(request, settings, progress=lambda n: status.update(f"enqueued {n} images…"))
    if result.ignored:
        # even with -q: a scan the job leaves out must not go unnoticed
        console.print(f"[yellow]note:[/yellow] left out {escape(describe_ignored(result.ignored))}", soft_wrap=True)
    if not result.job_id:
        console.print(f"nothing to submit: all {result.skipped} images are left out{skipped_note}")
        return
    click.echo(result.job_id)
    if not quiet:
        verb = "submitted" if result.created else "already submitted (same --job-key)"
        so_far = ""
        if result.listing:  # the key's first submission is still listing it: a count so far, not the job's size
            verb, so_far = "already being submitted (same --job-key)", " listed so far"
        left_out = f", {result.skipped} left out{skipped_note}" if result.skipped else ""
        console.print(f"{verb}: job {result.job_id} with {result.total} images{so_far}{left_out}")
    if wait:
        info = _watch_until_interrupted(settings, result.job_id)
        if not quiet:
            print_status(info, console, failure_reasons(settings, result.job_id) if info["counts"]["failed"] else None)
        if info["status"] != "done" or info["counts"]["failed"]:
            sys.exit(3)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@option("--output", "-o", required=True, help="S3 prefix for the restored images, e.g. s3://bucket/restored/.")
@option("--model", "-m", "models", multiple=True, help=MODEL_HELP)
@option("--ensemble", default=None, help="A saved ensemble (see 'deblur ensemble list') instead of --model.")
@option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True,
        help="Blend of restored and input: 1 = fully restored, 0 = unchanged.")
@option("--batch-size", type=click.IntRange(1, 10_000), default=None, help="Images per task (default: DEBLUR_BATCH_SIZE or 8).")
@option("--priority", type=click.IntRange(0, 9), default=5, show_default=True, help="0 (lowest) … 9 (most urgent).")
@option("--window", type=click.IntRange(0), default=None, metavar="BATCHES", help=WINDOW_HELP)
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=checked_labels, help=LABEL_HELP)
@option("--strip-metadata", is_flag=True, help="Do not copy EXIF/ICC/XMP to the outputs.")
@option("--light", type=click.Choice(LIGHT_CHOICES), default=None, help=LIGHT_HELP)
@option("--job-key", default=None,
        help="Idempotency key: submitting the same request again with it returns the first job (another request "
             "with it is refused).")
@option("--notify", "notify_url", default=None, metavar="URL", help=NOTIFY_HELP)
@option("--skip-existing", is_flag=True,
        help="Leave out images whose output already exists under --output, e.g. to restore only the scans added "
             "to a prefix since the last run (the output prefix is listed once). With none left, nothing is "
             "submitted and the exit code is 0.")
@option("--output-format", default=None, metavar="FORMAT|FROM=TO,...", callback=checked_output_format,
        help="Write every output in this format (png, tiff, jp2, webp, jpeg, bmp), its key's extension changed to "
             "match (scan.jpg → scan.png), e.g. png to keep restorations of JPEGs lossless; or only some inputs: "
             "jpeg=png,webp=png leaves TIFF masters as they are. Depth, alpha and EXIF/ICC/XMP are kept where "
             "the format holds them; an image it cannot hold (alpha as jpeg, a multi-page TIFF as anything but "
             "tiff) fails alone. Default: each input's own format.")
@option("--quality", type=click.IntRange(1, 100), default=None,
        help="Quality of JPEG and lossy WebP outputs (default: a JPEG input's own, estimated; else 95).")
@option("--sidecar", is_flag=True,
        help="Write a provenance record next to each output (OUTPUT.deblur.json): input and output with their "
             "SHA-256, the models with their weights' digests, the settings, the metrics, the worker and the "
             "time. It outlives the database ('deblur db prune') and travels with the files.")
@option("--dry-run", is_flag=True,
        help="Validate everything and print how many images would be submitted and where the first ones would be "
             "written; write and enqueue nothing.")
@option("--wait", is_flag=True, help=WAIT_HELP)
@option("--quiet", "-q", is_flag=True, help="Print only the job id.")
def submit(inputs: tuple[str, ...], output: str, models: tuple[str, ...], ensemble: str | None, strength: float,
           batch_size: int | None, priority: int, window: int | None, labels: dict[str, str], strip_metadata: bool,
           light: str | None, job_key: str | None,
           notify_url: str | None, skip_existing: bool, output_format: str | None, quality: int | None,
           sidecar: bool, dry_run: bool, wait: bool, quiet: bool) -> None:
    """Submit a deblur job and print its id.

    INPUT is an S3 key (s3://bucket/scan.tif), a prefix (s3://bucket/scans/,
    recursive; outputs mirror the path relative to it) or a manifest file
    (one S3 URI per line, or CSV with the URI in the first column).
    Everything is validated before anything is enqueued.

    Exit codes: 0 submitted (with --wait: every image done); 2 invalid input
    or settings, nothing enqueued; 1 a service did not answer; 3 with --wait
    when an image failed or the job did not end done; 130 with --wait when
    interrupted (Ctrl-C): the job keeps running.
    """
    from producer.submit import JobRequest

    request = JobRequest(kind="deblur", inputs=list(inputs), output=output, models=list(models), strength=strength,
                         batch_size=batch_size, priority=priority, strip_metadata=strip_metadata, job_key=job_key,
                         ensemble=ensemble, light=light, skip_existing=skip_existing, notify_url=notify_url,
                         output_format=output_format, quality=quality, sidecar=sidecar, window=window,
                         labels=labels)
    _submit_and_report(request, wait, quiet, dry_run)


@main.command()
@option("--blurred", "blurred", multiple=True, required=True,
        help="S3 prefix of blurred images (or of a GoPro tree with --gopro), or a CSV manifest of blurred,sharp URIs.")
@option("--sharp", default=None, help="S3 prefix of the sharp images; paired with --blurred by relative path.")
@option("--gopro", is_flag=True, help="GoPro layout: pair */blur/* with */sharp/* under the --blurred prefix.")
@option("--model", "-m", "models", multiple=True, help=MODEL_HELP)
@option("--ensemble", default=None, help="A saved ensemble (see 'deblur ensemble list') instead of --model.")
@option("--output", "-o", default=None, help="Optional S3 prefix to write the restored images to.")
@option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Restoration strength.")
@option("--align", is_flag=True,
        help="RealBlur protocol: match intensities and align each result to its sharp image (ECC homography) "
             "before measuring, on the valid region only. Slower; for pairs that are not pixel-registered.")
@option("--crop-border", type=click.IntRange(0), default=0, show_default=True,
        help="Ignore this many pixels at each border when measuring.")
@option("--light", type=click.Choice(LIGHT_CHOICES), default=None, help=LIGHT_HELP)
@option("--batch-size", type=click.IntRange(1, 10_000), default=None, help="Images per task.")
@option("--priority", type=click.IntRange(0, 9), default=5, show_default=True, help="0 (lowest) … 9 (most urgent).")
@option("--window", type=click.IntRange(0), default=None, metavar="BATCHES", help=WINDOW_HELP)
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=checked_labels, help=LABEL_HELP)
@option("--job-key", default=None, help="Idempotency key.")
@option("--notify", "notify_url", default=None, metavar="URL", help=NOTIFY_HELP)
@option("--dry-run", is_flag=True,
        help="Validate everything and print how many pairs would be evaluated and the first ones; write and "
             "enqueue nothing.")
@option("--wait", is_flag=True, help=WAIT_HELP)
@option("--quiet", "-q", is_flag=True, help="Print only the job id.")
def evaluate(blurred: tuple[str, ...], sharp: str | None, gopro: bool, models: tuple[str, ...], ensemble: str | None,
             output: str | None, strength: float, align: bool, crop_border: int, light: str | None,
             batch_size: int | None, priority: int, window: int | None, labels: dict[str, str], job_key: str | None,
             notify_url: str | None, dry_run: bool,
             wait: bool, quiet: bool) -> None:
    """Submit an evaluation job: PSNR/SSIM of the input, every model and the ensemble per image.

    Exit codes: 0 submitted (with --wait: every image done); 2 invalid input
    or settings, nothing enqueued; 1 a service did not answer; 3 with --wait
    when an image failed or the job did not end done; 130 with --wait when
    interrupted (Ctrl-C): the job keeps running.
    """
    from producer.submit import JobRequest

    request = JobRequest(kind="evaluate", inputs=list(blurred), output=output, references=sharp, gopro=gopro,
                         models=list(models), strength=strength, batch_size=batch_size, priority=priority,
                         job_key=job_key, ensemble=ensemble, align=align, crop_border=crop_border, light=light,
                         notify_url=notify_url, window=window, labels=labels)
    _submit_and_report(request, wait, quiet, dry_run)


@main.command()
@click.argument("job", required=False)
@option("--watch", "-w", is_flag=True, help="Keep a live progress bar until the job finishes.")
@option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output format.")
@option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=checked_labels,
        help="Without JOB: only jobs with this label (repeat: with all of them).")
@option("--status", "state", type=click.Choice(JOB_STATUSES), default=None,
        help="Without JOB: only jobs in this state.")
@option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
        help="Without JOB: list at most this many jobs, newest first.")
def status(job: str | None, watch: bool, fmt: str, labels: dict[str, str], state: str | None, limit: int) -> None:
    """Show a job's progress (done, failed, pending, images/s, ETA); without JOB, list recent jobs and the queue.

    Without JOB the recent jobs are followed by the whole queue: images waiting
    and running, what finished in the last 15 minutes (images/min, MP/min),
    stalled images, images whose worker died, and the broker's waiting batches
    by priority (the figures of 'deblur metrics').

    --watch prints a line instead of a bar when the output is not a terminal
    (a file, a CI log), and says so when no image has started for a while
    (no worker on the job's queue, or busy ones).

    Exit codes: 0 shown; 2 invalid input (no such job); 1 a service did not
    answer; 130 with --watch when interrupted (Ctrl-C): the job keeps running.
    """
    import json

    from producer.tracking import failure_reasons, full_job_id, job_status, print_status

    settings = _settings()
    if job is None:
        _list_jobs(settings, fmt, labels, state, limit)
        return
    if labels or state:
        raise click.UsageError("--label and --status select jobs to list: give them without JOB")
    job = full_job_id(settings, job)
    info = _watch_until_interrupted(settings, job) if watch else job_status(settings, job)
    if fmt == "json":
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        print_status(info, out, failure_reasons(settings, job) if info["counts"]["failed"] else None)


def _list_jobs(settings: Settings, fmt: str, labels: dict[str, str], status: str | None, limit: int) -> None:
    import json

    from rich.table import Table
    from rich.text import Text

    from producer.tracking import list_jobs

    jobs = list_jobs(settings, labels, status, limit)
    if fmt == "json":
        click.echo(json.dumps(jobs, indent=2))
        return
    table = Table("id", "kind", "status", "images", "created", "labels")
    for j in jobs:  # Text cells: a label value such as '[draft]' is not rich markup
        table.add_row(j["id"], j["kind"], j["status"], str(j["total"]), j["created_at"][:19],
                      Text(" ".join(f"{k}={v}" for k, v in j["labels"].items())))
    out.print(table)
    if labels or status:
        return  # a selection: the whole queue's figures below would not be about it
    import logging

    from producer.metrics import describe_queue, read_queue_state

    logging.getLogger("producer.metrics").setLevel(logging.ERROR)  # a source that is down is said below
    for line in describe_queue(read_queue_state(settings)):
        out.print(line, soft_wrap=True, highlight=False, markup=False)


@main.command()
@click.argument("job")
@option("--format", "fmt", type=click.Choice(["table", "csv", "json", "uris"]), default="table", show_default=True,
        help="table for people, csv/json for scripts, uris: the inputs only, a manifest for another job.")
@option("--failed", is_flag=True, help="Only failed images (with their errors).")
@option("--status", "status_filter", type=click.Choice(["pending", "running", "done", "failed", "cancelled"]),
        default=None, help="Only images with this status.")
@option("--worst", type=click.IntRange(1), default=None, help="Only the N images with the lowest --metric (ensemble).")
@option("--metric", default=None,
        help="Metric --worst sorts by, lowest first (the ensemble's). Default: psnr for evaluation jobs, "
             "laplacian_variance (sharpness) for deblur jobs. A name the job's images do not have is refused "
             "(exit 2), with the names they have.")
@option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@option("--offset", type=click.IntRange(0), default=0, help="Skip this many rows (paging).")
@option("--review", is_flag=True,
        help="Only done images a person should look at: the blind model returned them as they came (blurred but "
             "no kernel estimate held, or judged sharp); the 'review' column says which.")
@option("--history", is_flag=True,
        help="Also each image's earlier attempts (a failure before a retry, an output verify found missing): when, "
             "how, why and where. json: an earlier_attempts list per image; csv: two more columns; table: an "
             "'earlier' column.")
def results(job: str, fmt: str, failed: bool, status_filter: str | None, worst: int | None, metric: str | None,
            limit: int | None, offset: int, review: bool, history: bool) -> None:
    """Per-image results of a job: input, output, status, error and metrics.

    --format uris prints only the inputs' URIs, one a line: a manifest for a
    new job, e.g. the images to try with another model:

    \b
      deblur results JOB --review --format uris > review.txt
      deblur submit review.txt -o s3://archive/second-pass/ --model nafnet-gopro
    """
    from producer.tracking import (fetch_results, full_job_id, metric_columns, ranking_metric, results_csv,
                                   results_json, results_table)

    settings = _settings()
    if review and failed:
        raise click.UsageError("--review lists done images and --failed failed ones: give one of them")
    job = full_job_id(settings, job)
    if worst is not None:
        metric = ranking_metric(settings, job, metric)  # by the job's kind; InputError for a name it lacks
    rows = fetch_results(settings, job, status="failed" if failed else status_filter,
                         worst=worst, metric=metric, limit=limit, offset=offset, review=review, history=history)
    if fmt == "json":
        click.echo(results_json(rows))
    elif fmt == "csv":
        click.echo(results_csv(rows, metric_columns(settings, job), history=history), nl=False)
    elif fmt == "uris":
        for row in rows:
            click.echo(row["input"])
    else:
        results_table(rows, out)


@main.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Cancel a job: pending images are skipped; images already running finish."""
    from producer.tracking import cancel_job, full_job_id

    settings = _settings()
    job = full_job_id(settings, job)
    n = cancel_job(settings, job)
    console.print(f"job {job} cancelled; {n} pending images will be skipped")


@main.command()
@click.argument("job", required=False)
@option("--records", metavar="PREFIX_OR_FOLDER", default=None,
        help="Instead of a job: check the outputs under an S3 prefix or a local folder against the provenance "
             "records beside them (OUTPUT.deblur.json, written by --sidecar). Needs no database, so it works for "
             "copied trees and pruned jobs.")
@option("--mark-failed", is_flag=True,
        help="Record the images whose output is missing or changed as failed, so 'deblur retry JOB --failed' "
             "restores them again.")
@option("--quick", is_flag=True,
        help="Ask the store for the SHA-256 it keeps with each output (one HEAD request) instead of reading the "
             "output back: no egress, and it still finds deleted, replaced or truncated outputs. Outputs whose "
             "store keeps no SHA-256 are read in full.")
def verify(job: str | None, records: str | None, mark_failed: bool, quick: bool) -> None:
    """Check that every done image's output of JOB is still in storage, byte for byte as written.

    Reads each output back and compares its SHA-256 with the one the worker recorded when it wrote it
    (with --quick, compares the SHA-256 the store kept from the upload instead). Exit code 1 if any output is
    missing or changed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from producer.inputs import plural
    from producer.tracking import full_job_id, job_status
    from producer.verify import verify_outputs, verify_records

    if (job is None) == (records is None):
        raise click.UsageError("name a JOB, or --records PREFIX_OR_FOLDER, but not both")
    if records is not None and mark_failed:
        raise click.UsageError("--mark-failed needs a JOB: records are checked without the database")
    settings = _settings()
    if records is not None:
        with Progress(TextColumn("verifying"), TextColumn("{task.completed} records"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("verify", total=None)
            found = verify_records(settings, records, quick, progress=lambda n: bar.update(task, completed=n))
        job = records
    else:
        job = full_job_id(settings, job)  # type: ignore[arg-type]
        total = job_status(settings, job)["counts"]["done"]
        with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("verify", total=total)
            found = verify_outputs(settings, job, mark_failed, progress=lambda n: bar.update(task, completed=n),
                                   quick=quick)
    console.print(f"{'records under ' if records else 'job '}{escape(job)}: {plural(found.checked, 'output')} checked, "
                  f"{found.intact} intact, {len(found.missing)} missing, "
                  f"{len(found.changed)} changed" + (f", {found.unrecorded} present but written before checksums "
                                                     "were recorded" if found.unrecorded else ""), soft_wrap=True)
    if quick:
        # outputs written before checksums were recorded were only found present (a HEAD request), not read
        read = found.checked - found.by_store_checksum - len(found.missing) - found.unrecorded
        console.print(f"  {found.by_store_checksum} compared by the checksum the store keeps, {read} read back in "
                      "full (no checksum kept)" + (f", {found.unrecorded} only found present (no checksum recorded "
                                                   "to compare with)" if found.unrecorded else ""), soft_wrap=True)
    if found.without_record:  # nothing beside them says what they should be: named, not a failure
        console.print(f"  {plural(len(found.without_record), 'image')} without a provenance record beside "
                      f"{'it' if len(found.without_record) == 1 else 'them'} (written without --sidecar, or the "
                      "record was lost), so not checked:", soft_wrap=True)
        for output in found.without_record[:20]:
            console.print(f"  no record: {escape(output)}", soft_wrap=True)
        if len(found.without_record) > 20:
            console.print(f"  … and {len(found.without_record) - 20} more")
    for label, pairs in (("missing", found.missing), ("changed", found.changed)):
        for input_uri, output in pairs[:20]:
            console.print(f"  {label}: {escape(output)} (from {escape(input_uri)})", soft_wrap=True)
        if len(pairs) > 20:
            console.print(f"  … and {len(pairs) - 20} more {label}")
    if found.problems:
        if mark_failed:
            console.print(f"marked {found.problems} images failed: 'deblur retry {job} --failed' restores them again")
        elif records:
            console.print(f"restore them again from their inputs (named above) with {_restore_command(found)}, "
                          "and --sidecar to write their records again", soft_wrap=True)
        else:
            console.print("run again with --mark-failed, then 'deblur retry JOB --failed', to restore them again")
        sys.exit(1)


def _restore_command(found: Any) -> str:
    """The command that restores records' missing or changed outputs again from their inputs: 'deblur submit'
    for inputs in S3, 'deblur restore' for local files (records written by 'deblur restore --sidecar')."""
    inputs = [source for source, _ in [*found.missing, *found.changed] if not source.startswith("(")]
    in_s3 = any(source.startswith("s3://") for source in inputs)
    local = any(not source.startswith("s3://") for source in inputs)
    if in_s3 and not local:
        return "'deblur submit'"
    if local and not in_s3:
        return "'deblur restore'"
    return "'deblur submit' (inputs in S3) or 'deblur restore' (local files)"


@main.command()
@click.argument("job")
def pause(job: str) -> None:
    """Hold a job back: no more of its batches go to the workers until 'deblur resume JOB'.

    Only a job submitted with a window (--window N or DEBLUR_JOB_WINDOW) keeps
    batches out of the broker, so only such a job can be paused; the batches it
    had sent (at most N) still run. Use it to let other work through, or to
    stop a job overnight without losing its place: resuming sends its next
    batches behind whatever was queued meanwhile.
    """
    from producer.tracking import full_job_id, pause_job

    settings = _settings()
    job = full_job_id(settings, job)
    if pause_job(settings, job):
        console.print(f"paused job {job}: the batches it had sent finish, no more are sent; "
                      f"'deblur resume {job[:8]}' sends the rest")
    else:
        console.print(f"job {job} was paused already")


@main.command()
@click.argument("job")
def resume(job: str) -> None:
    """Let a paused job send its batches again (see 'deblur pause')."""
    from producer.tracking import full_job_id, resume_job

    settings = _settings()
    job = full_job_id(settings, job)
    sent = resume_job(settings, job)
    if sent is None:
        console.print(f"job {job} is not paused; nothing to do")
    else:
        console.print(f"resumed job {job}: {sent} batches sent to fill its window")


@main.command()
@click.argument("job", required=False)
@option("--failed", is_flag=True, help="Re-enqueue the images that failed.")
@option("--stalled", is_flag=True, help="Re-enqueue images pending or running for longer than --stalled-after.")
@option("--stalled-after", type=click.IntRange(1), default=3600, show_default=True,
        help="Seconds after which a pending/running image counts as stalled (a running one only once its worker "
             "stopped renewing its lease: a slow image is left to its worker).")
@option("--all", "all_jobs", is_flag=True,
        help="Every queued, running or paused job instead of JOB, e.g. after the broker lost its queue (a Redis "
             "restarted without persistence): --all --stalled sends again what it held.")
def retry(job: str | None, failed: bool, stalled: bool, stalled_after: int, all_jobs: bool) -> None:
    """Re-enqueue a job's failed and/or stalled images (same outputs, overwritten).

    A job with a window also gets its chain of batches restarted by --stalled:
    the re-sent batches take its slots and the rest of the window is filled.
    Images of batches not sent yet are waiting their turn, not stalled.
    """
    from producer.retry import retry_images, retryable_job_ids
    from producer.tracking import full_job_id

    if not failed and not stalled:
        raise click.UsageError("say what to retry: --failed, --stalled or both")
    if (job is None) == (not all_jobs):
        raise click.UsageError("name one JOB, or pass --all for every unfinished job")
    settings = _settings()
    jobs = retryable_job_ids(settings) if all_jobs else [full_job_id(settings, job)]  # type: ignore[arg-type]
    refused = 0
    for job_id in jobs:
        try:
            n = retry_images(settings, job_id, failed=failed, stalled_after=stalled_after if stalled else None)
        except OutputsBusyError as exc:
            if not all_jobs:
                raise
            refused += 1  # the other jobs are still retried: one conflict must not strand them
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
            continue
        console.print(f"re-enqueued {n} images of job {job_id}")
    if all_jobs and not jobs:
        console.print("no queued, running or paused jobs")
    if refused:
        console.print(f"{refused} of {len(jobs)} jobs not retried: another job has still to write their outputs")
        sys.exit(2)


@main.command()
@option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, callback=checked_output_file,
        help="Write the metrics to this file instead of printing them; written beside it and renamed, so a "
             "reader never sees half a file (node_exporter's textfile collector wants NAME.prom).")
def metrics(output: str | None) -> None:
    """Print the queue's Prometheus metrics: backlog, recent throughput, stalls, waiting batches.

    The series the API serves at /metrics, read now from the database and the
    broker: deblur_backlog_images{status}, deblur_images_finished_recently,
    deblur_stalled_images, deblur_worker_lost_images,
    deblur_broker_waiting_batches{queue,priority}, deblur_up{source}, ... (see
    deploy/alerts.yml for alerts built on them).

    \b
    Without the API, from cron for node_exporter's textfile collector:
      * * * * * deblur metrics -o /var/lib/node_exporter/textfile/deblur.prom

    Exits 1 when the database or the broker did not answer; the output is still
    written and says which (deblur_up 0).
    """
    import logging
    import os
    import tempfile

    from producer.metrics import render_metrics

    logging.getLogger("producer.metrics").setLevel(logging.ERROR)  # the reasons are printed below, once
    exposition = render_metrics(_settings())
    if output is None:
        click.echo(exposition.text, nl=False)
    else:
        target = os.path.abspath(output)
        fd, temporary = tempfile.mkstemp(prefix=".deblur-metrics-", dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(exposition.text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
    if exposition.down:
        for source, reason in exposition.down.items():
            console.print(f"[red]error:[/red] the {source} did not answer ({escape(reason)}); check 'deblur config' "
                          "and that the service is up ('deblur stack status' for the local stack)",
                          soft_wrap=True, highlight=False)
        raise SystemExit(1)


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@option("--queue", default=None, metavar="QUEUE",
        help="Judge the nodes against this queue: one that does not consume it is of no use. Without it, each "
             "node is judged by the queues it consumes, so workers of several queues on one machine all pass, "
             "and only a node that consumes none (stopped after a GPU failure) fails.")
@option("--check", is_flag=True,
        help="Probe mode: exit 1 unless every NAME answers and consumes a queue (--queue: that one; without NAME: "
             "the nodes of this machine that answer, NAME@HOST, and at least one must) and none has run a batch "
             "longer than "
             "DEBLUR_VISIBILITY_TIMEOUT. For a container's liveness probe: a worker whose GPU failed stops "
             "consuming, and one hung in a batch keeps it for ever; either is then restarted instead of idling "
             "for good. A broker that cannot be reached is not the worker's fault: exit 0 with a warning.")
@option("--timeout", type=click.FloatRange(0.5, 120), default=5.0, show_default=True,
        help="Seconds to wait for the nodes' answers.")
@option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
        help="json: one object per node (name, state, queues, active, release, message_fields, "
             "models_unavailable: the models it cannot run, with why) for scripts.")
def workers(names: tuple[str, ...], queue: str | None, check: bool, timeout: float, fmt: str) -> None:
    """List the worker nodes that answer: the queues they consume and the batches they run.

    \b
      deblur workers                       every node that answers
      deblur workers --check               this machine's nodes, exit 1 if one is of no use
      deblur workers --check deblur-gpu0@$HOSTNAME   one named node (deblur worker --gpus: deblur-gpuN@HOST)

    A node answers from its main process even while it works on a batch (the
    default prefork pool; a solo pool cannot answer while busy). The listing
    also shows each node's release, and calls a node "outdated" when it would
    drop batches this release sends (a window's, for instance): upgrade it.
    """
    from kombu.exceptions import OperationalError as BrokerError
    from rich.table import Table

    from jobs.messages import OPTIONAL_FIELDS
    from producer.workers import this_host, worker_states

    settings = _settings()
    try:
        states = worker_states(settings, list(names) or None, timeout, with_release=not check)
    except BrokerError as exc:
        if not check:
            raise
        # restarting workers would not bring the broker back, and every one of them would be restarted
        console.print(f"[yellow]warning:[/yellow] the broker cannot be reached ({escape(str(exc))}); not the "
                      "workers' fault, so this check passes", soft_wrap=True)
        return
    if check and not names:
        states = [s for s in states if s.name.endswith("@" + this_host())]
        if not states:
            console.print(f"[red]unhealthy:[/red] no worker of this machine ({this_host()}) answered within "
                          f"{timeout:g} s", soft_wrap=True)
            raise SystemExit(1)
    # a batch running past the visibility timeout has been handed to another worker: its own is hung
    problems = {s.name: s.problem(queue, stuck_after=settings.visibility_timeout) for s in states}
    if check:
        bad = {name: why for name, why in problems.items() if why}
        for name, why in bad.items():
            console.print(f"[red]unhealthy:[/red] {escape(name)}: {escape(why)}", soft_wrap=True, highlight=False)
        if bad:
            raise SystemExit(1)
        consumed = {q for s in states for q in s.queues} if queue is None else {queue}
        out.print(f"healthy: {', '.join(problems)} consuming {', '.join(map(repr, sorted(consumed)))}",
                  highlight=False)
        return
    # listing, also say which nodes are too old for the batches this release sends
    states_text = {s.name: s.problem(queue, needed=OPTIONAL_FIELDS, stuck_after=settings.visibility_timeout)
                   or "ok" for s in states}
    if fmt == "json":
        import json

        click.echo(json.dumps([{"name": s.name, "state": states_text[s.name], "queues": list(s.queues),
                                "active": s.active, "release": s.release,
                                "message_fields": None if s.fields is None else list(s.fields),
                                "models_unavailable": s.models_unavailable}
                               for s in states], indent=2))
        return
    if not states:
        console.print(f"no worker answered within {timeout:g} s; start one with 'deblur worker'")
        return
    table = Table("worker", "state", "queues", "batches running", "release")
    for s in states:
        table.add_row(s.name, states_text[s.name], ", ".join(s.queues), str(s.active),
                      s.release or "older (does not say)")
    out.print(table)


@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
def db_upgrade(revision: str) -> None:
    """Apply migrations (creates the schema from nothing, and a SQLite database's folder)."""
    from db.engine import create_sqlite_folder, current_revision, upgrade

    url = _settings().resolved_database_url()
    create_sqlite_folder(url)  # asked for explicitly: other commands refuse a SQLite folder that is missing
    upgrade(url, revision)
    console.print(f"database at revision {current_revision(url)} ({_safe_url(url)})")


@db.command("prune")
@option("--older-than", type=float, callback=checked_retention, required=True, metavar="DAYS",
        help="Delete the jobs that finished (done, failed or cancelled) more than DAYS days ago (more than 0).")
@option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (scripts, cron).")
def db_prune(older_than: float, dry_run: bool, yes: bool) -> None:
    """Delete finished jobs older than DAYS, with their images' rows and metrics, to keep the database small.

    Storage is not touched: outputs, kernels and inputs stay in S3. Running and pending jobs are never pruned,
    nor a job retried since it finished, nor a finished one with images still pending or running (a cancelled
    job's running images; a failed submission's enqueued ones). Each job goes in its own transaction, so an
    interrupted prune can be run again.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from producer.inputs import plural
    from producer.prune import cutoff_for, prune_jobs

    settings = _settings()
    when = cutoff_for(older_than).strftime("%Y-%m-%d %H:%M UTC")
    if not dry_run:
        counted = prune_jobs(settings, older_than, dry_run=True)
        if not counted.jobs and not counted.held_back:
            console.print(f"no job finished before {when}; nothing to prune")
            return
        if not yes and counted.jobs:
            click.confirm(f"delete {plural(counted.jobs, 'job')} that finished before {when}, with the rows of "
                          f"{plural(counted.images, 'image')} (storage is not touched)?", abort=True)
    if dry_run:
        pruned = prune_jobs(settings, older_than, dry_run=True)
    else:
        with Progress(TextColumn("pruning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("prune", total=counted.jobs)
            pruned = prune_jobs(settings, older_than, progress=lambda n, total: bar.update(task, completed=n,
                                                                                         total=total))
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {plural(pruned.jobs, 'job')} that finished before {when}, with the rows of "
                  f"{plural(pruned.images, 'image')}; storage untouched"
                  + (f"; kept {pruned.kept} retried meanwhile" if pruned.kept else ""))
    if pruned.held_back:
        shown = ", ".join(pruned.held_back[:3]) + (", ..." if len(pruned.held_back) > 3 else "")
        console.print(f"kept {plural(len(pruned.held_back), 'finished job')} with images still pending or running "
                      f"({shown}): they go once those finish; if their workers are gone, 'deblur retry JOB "
                      "--stalled' sends them again")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@main.command()
@option("--bucket", "buckets", multiple=True, metavar="NAME",
        help="A bucket jobs will read or write: checked to exist and be readable (repeat for more). Without it, "
             "the credentials must be allowed to list buckets.")
@option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="json: {ok, checks: [{part, status, detail, hint}]} for scripts.")
def doctor(buckets: tuple[str, ...], fmt: str) -> None:
    """Check that jobs can run here, and say what to do about each part that is not ready.

    Asks, in the order a job needs them: the database (reachable, schema at this
    release's revision), the broker, the workers on DEBLUR_QUEUE (any, and none
    of an older release that would drop batches), the queues unfinished jobs
    wait on (each needs a worker; a broker's lost messages still being sent
    again), the S3 endpoint with these credentials, and the API's clients
    file when DEBLUR_API_CLIENTS is set.
    Each line is ok, warn (jobs can run) or fail (they cannot); exits 1 when any
    fails. Passwords in URLs are not printed.

    \b
      deblur doctor --bucket archive
    """
    import json

    from producer.doctor import as_json, diagnose

    try:
        settings = _settings()
    except ConfigurationError as exc:
        console.print(f"[red]fail[/red]  settings: {escape(str(exc))}", soft_wrap=True)
        raise SystemExit(1) from None
    findings = diagnose(settings, buckets)
    if fmt == "json":
        click.echo(json.dumps(as_json(findings), indent=2))
    else:
        marks = {"ok": "[green]ok[/green]  ", "warn": "[yellow]warn[/yellow]", "fail": "[red]fail[/red]"}
        for finding in findings:
            out.print(f"{marks[finding.status]}  {finding.part}: {escape(finding.detail)}", soft_wrap=True,
                      highlight=False)
            if finding.hint and finding.status != "ok":
                out.print(f"        → {escape(finding.hint)}", soft_wrap=True, highlight=False)
    if any(f.status == "fail" for f in findings):
        raise SystemExit(1)


# settings 'deblur config' shows as *** when set: its output is pasted into tickets and chats
SECRET_SETTINGS = frozenset({"api_token", "flower_basic_auth", "notify_secret"})


@main.command()
def config() -> None:
    """Show every setting, its environment variable and its current value."""
    settings = _settings()
    from rich.table import Table
    from rich.text import Text

    from deploy.stack import redact

    table = Table("environment variable", "value", "meaning")
    for name, info in HELP.items():
        value = getattr(settings, name)
        if name == "database_url":
            value = _safe_url(settings.resolved_database_url())
        elif name.endswith("_url") and value:
            value = redact(str(value))  # a broker password (redis://:pw@host) is pasted into tickets with the rest
        if name in SECRET_SETTINGS and value:
            value = "***"
        table.add_row(info.env, Text(str(value)), info.help)  # a value as set, brackets and all
    out.print(table)


def run() -> None:  # pragma: no cover - console entry
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
