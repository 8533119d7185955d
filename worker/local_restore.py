"""``deblur restore``: the same models and ensemble on local files, no queue.

It runs exactly the worker's per-image path (decode, models, ensemble,
strength, encode with metadata) so what you try locally is what the workers
will produce.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from jobs.errors import DeblurError, InputError
from jobs.layout import SIDECAR_SUFFIX, kernel_labels, kernel_name, with_output_format
from jobs.messages import BatchMessage, ImageItem
from jobs.review import REVIEW_REASONS, review_reason
from jobs.settings import load_settings
from jobs.storage import READ_FORMATS, is_photograph
from models.catalog import parse_ensemble
from models.tone import LIGHT_CHOICES, LIGHT_HELP
from producer.cli import checked_output_format
from producer.inputs import describe_ignored, ignored_kind

console = Console(stderr=True)


def _folder_files(folder: Path, output: Path, notes: list[str] | None) -> list[Path]:
    """Every file under ``folder``, symlinked folders followed (each real folder read once, so a link loop
    ends); what was skipped (folders reached a second time, links to nothing) is described in ``notes``.

    Raises:
        InputError: a folder reached through a link is the output folder or lies inside it.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    again: list[str] = []
    broken: list[str] = []
    top = Path(os.path.realpath(folder))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # a folder reached twice is kept under the path found first in sorted order
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            again.append(dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        real = Path(os.path.realpath(dirpath))
        through_link = real != top and top not in real.parents
        if through_link and (real == output or output in real.parents):
            raise InputError(f"{dirpath} in input folder {folder} is a link into output folder {output}: the "
                             "outputs would be read back as inputs; choose an output folder outside it")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                broken.append(str(path))
    if notes is not None:
        if again:
            notes.append(f"skipped {len(again)} linked folder{'s' if len(again) != 1 else ''} already read "
                         f"under another path (a link loop or a second link): {', '.join(again[:3])}"
                         f"{' ...' if len(again) > 3 else ''}")
        if broken:
            notes.append(f"skipped {len(broken)} link{'s' if len(broken) != 1 else ''} to nothing: "
                         f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}")
    return files


def plan_outputs(inputs: Sequence[Path], output: Path, ignored: Counter[str] | None = None,
                 output_format: str | None = None, notes: list[str] | None = None) -> list[tuple[Path, Path]]:
    """Each image to restore with the file its restoration goes to.

    A file goes to ``output/<its name>``; a folder's images (``jobs.storage.IMAGE_SUFFIXES``,
    found at any depth, through symlinked folders too, in sorted order; kernel PNGs written by an earlier run
    left out) go to ``output/<their path inside the folder>``, as a prefix's
    outputs mirror it in S3. With ``output_format``, each name takes that
    format's extension. The other files a folder holds are counted in
    ``ignored`` by kind (:func:`producer.inputs.ignored_kind`); folders skipped
    because they were already read (link loops) and links to nothing are described in ``notes``.

    Raises:
        InputError: a folder without images, an output folder inside an input
            folder (a second run would restore the outputs) or above it (the
            outputs would land among other files), an input that would
            be overwritten by its own restoration, or two inputs that would be
            written to the same file (one would overwrite the other).
    """
    planned: list[tuple[Path, Path]] = []
    out = output.resolve()
    for path in inputs:
        if not path.is_dir():
            target = output / with_output_format(path.name, output_format)
            parent = path.resolve().parent
            if out in parent.parents or (out == parent and target.name != path.name):
                # scans/sub/a.png into scans/, or scan.jpg as scan.png beside it: a file of that name is replaced
                raise InputError(_output_holds(output, path))
            planned.append((path, target))
            continue
        folder = path.resolve()
        if out == folder or folder in out.parents:
            raise InputError(f"output folder {output} lies inside input folder {path}: the outputs would be read "
                             "back as inputs next time; choose an output folder outside it")
        if out in folder.parents:
            # scans/sub/a.png would be written to scans/a.png, replacing whatever file of that name is there
            raise InputError(_output_holds(output, path))
        files = _folder_files(path, out, notes)
        images = sorted(p for p in files if is_photograph(p.name))
        others = Counter(ignored_kind(p.name) for p in files if not is_photograph(p.name))
        if not images:
            found = f"; found only {describe_ignored(others)}" if others else ""
            raise InputError(f"no images ({READ_FORMATS}) found in folder {path}{found}")
        if ignored is not None:
            ignored.update(others)
        planned.extend((image, output / with_output_format(image.relative_to(path).as_posix(), output_format))
                       for image in images)
    targets: dict[Path, Path] = {}
    for source, target in planned:
        if target.resolve() == source.resolve():
            raise InputError(f"{source} would be overwritten by its own restoration; choose another output folder")
        earlier = targets.setdefault(target.resolve(), source)
        if earlier != source:
            raise InputError(f"{earlier} and {source} would both be written to {target}; restore them in separate "
                             "runs, or pass the folders that hold them so that their paths inside are kept")
    return planned


def _write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``target``, then rename it: an interrupted run leaves the old
    file or none, never a truncated one that looks finished."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_models(message: BatchMessage) -> None:
    """Load every member of the ensemble once, before any file, so that a model that cannot be loaded
    (missing weights, say) stops the run with one message instead of failing every file.

    Raises:
        DeblurError: a member cannot be loaded (an InputError such as WeightsError when it is the user's to fix).
    """
    from models.catalog import REGISTRY
    from worker import runtime

    for text in message.models:
        try:
            runtime.get_model(REGISTRY.parse(text))
        except DeblurError:
            raise
        except Exception as exc:  # a loader's own error: name the model, not only the exception
            raise DeblurError(f"cannot load model {text}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class FileResult:
    """What :func:`restore_file` did: the metrics (``model.name`` keys, and ``seconds``), and why the image
    should be looked at when the blind model left it as it came (:func:`jobs.review.review_reason`), or None."""

    metrics: dict[str, float | None]
    review: str | None = None


def _output_holds(output: Path, source: Path) -> str:
    """The refusal of an output folder that holds ``source``'s folder (or is it, for a renamed file)."""
    return (f"output folder {output} holds the input {source}: the outputs would be written among the files "
            "already there, replacing any of the same name (originals too); choose an output folder outside the "
            "input's folder and its parents")


def restore_file(path: Path, target: Path, message: BatchMessage,
                 on_model: Callable[[str], None] | None = None) -> FileResult:
    """Restore one file into ``target`` (its folder is made); returns its metrics and review reason.

    The kernels of blind models go next to it as ``<stem>.kernel.<model>.png``.
    ``on_model`` is told each ensemble member before it runs (a large scan takes minutes per model).
    """
    from db.queries import ImageOutcome
    from worker.imageio import encode_image
    from worker.pipeline import Work, add_no_reference_metrics, decode_work, kernel_png, output_format_of, restore_work

    work = Work(ImageItem(input=str(path)), ImageOutcome(input_uri=str(path), status="done"))
    work.data = path.read_bytes()
    work.outcome.input_sha256 = hashlib.sha256(work.data).hexdigest()
    decode_work(work, load_settings(), output_format_of(target.name, message))
    if work.outcome.status != "done":
        raise DeblurError(work.outcome.error or f"{path}: cannot decode")
    restore_work(work, message, on_model)
    add_no_reference_metrics(work)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = encode_image(work.decoded, work.restored, strip_metadata=message.strip_metadata,
                        quality=message.quality, pages=work.restored_pages)
    _write_atomically(target, data)
    kernels = []
    labels = kernel_labels(list(work.kernels))  # named after the model even alone, as this command always did
    for model, kernel in work.kernels.items():
        kernels.append(target.parent / kernel_name(target.name, labels[model]))
        _write_atomically(kernels[-1], kernel_png(kernel))
    if message.sidecar:
        from worker.provenance import provenance_record

        work.outcome.output_uri, work.outcome.output_sha256 = str(target), hashlib.sha256(data).hexdigest()
        record = provenance_record(message, work.outcome, work.decoded.format, [str(k) for k in kernels],
                                   len(work.decoded.pages) + 1)
        _write_atomically(Path(str(target) + SIDECAR_SUFFIX), record)
    return FileResult({f"{m}.{n}": v for m, n, v in work.outcome.metrics} | {"seconds": work.outcome.inference_s},
                      review_reason(work.outcome.metrics))


@click.command("restore")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), show_envvar=True,
              help="Folder to write the restored files to: a file under its own name, a folder's images under "
                   "their paths inside it.")
@click.option("--model", "-m", "models", multiple=True, show_envvar=True,
              help="Model as NAME[:PARAMS][:WEIGHT]; repeat for an ensemble. Default: the default ensemble.")
@click.option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True, show_envvar=True,
              help="1 = fully restored, 0 = unchanged.")
@click.option("--strip-metadata", is_flag=True, show_envvar=True, help="Do not copy EXIF/ICC/XMP.")
@click.option("--light", type=click.Choice(LIGHT_CHOICES), default=None, show_envvar=True, help=LIGHT_HELP)
@click.option("--output-format", default=None, show_envvar=True, callback=checked_output_format,
              metavar="FORMAT|FROM=TO,...",
              help="Write every file in this format (png, tiff, jp2, webp, jpeg, bmp), its extension changed to "
                   "match (scan.jpg → scan.png), or only some: jpeg=png,webp=png keeps TIFFs as they are. "
                   "Default: each file's own format.")
@click.option("--quality", type=click.IntRange(1, 100), default=None, show_envvar=True,
              help="Quality of JPEG and lossy WebP outputs (default: a JPEG input's own, estimated; else 95).")
@click.option("--sidecar", is_flag=True, show_envvar=True,
              help="Write a provenance record next to each file (FILE.deblur.json): input and output SHA-256, "
                   "models and weights' digests, settings, metrics and time.")
def restore_command(files: tuple[Path, ...], output: Path, models: tuple[str, ...], strength: float,
                    strip_metadata: bool, light: str | None, output_format: str | None, quality: int | None,
                    sidecar: bool) -> None:
    """Restore local image FILES (or every image in a folder, at any depth) in this process.

    A file is written to OUTPUT/<its name>, a folder's images to OUTPUT/<their path inside the folder>.
    Useful for trying models and for scripts; bulk work belongs in 'deblur submit'.
    Symlinked folders are followed (each folder once). Every output is written under a temporary name and
    renamed when complete. A model that cannot be loaded stops the run before the first file; a file that
    cannot be read or restored fails alone, and the exit code is 1 if any failed.
    """
    ensemble = parse_ensemble(list(models), strength=strength, light=light)
    ignored: Counter[str] = Counter()
    notes: list[str] = []
    planned = plan_outputs(files, output, ignored, output_format, notes)
    if ignored:
        console.print(f"[yellow]note:[/yellow] left out {escape(describe_ignored(ignored))}", soft_wrap=True)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    message = BatchMessage(job_id="local", kind="deblur", models=[m.to_text() for m in ensemble.members],
                           strength=strength, strip_metadata=strip_metadata, output_format=output_format,
                           quality=quality, sidecar=sidecar, images=[ImageItem(input=str(f)) for f, _ in planned])
    with console.status("loading models"):
        load_models(message)
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    unchanged: Counter[str] = Counter()  # files written as they came, by review reason
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("restoring", total=len(planned))
        for path, target in planned:
            progress.update(task, description=path.name)
            try:
                result = restore_file(
                    path, target, message,
                    lambda model, name=path.name: progress.update(task, description=f"{name}: {model}"))
                shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()
                                  if v is not None and "laplacian" in k)
                # one unbroken line per file, whatever the width, so a log of the run can be searched by path
                if result.review is None:
                    console.print(f"[green]ok[/green] {path} → {target}  {shown}", soft_wrap=True)
                else:  # written, but as it came: the queue flags these for review (deblur results --review)
                    unchanged[result.review] += 1
                    console.print(f"[yellow]as it came[/yellow] {path} → {target}  {REVIEW_REASONS[result.review]}",
                                  soft_wrap=True)
            except DeblurError as exc:
                failures += 1
                console.print(f"[red]failed[/red] {path}: {exc}", soft_wrap=True)
            except Exception as exc:  # a model or codec bug fails this file only, as on the workers
                failures += 1
                console.print(f"[red]failed[/red] {path}: {type(exc).__name__}: {exc}", soft_wrap=True)
            progress.advance(task)
    if failures:
        console.print(f"[red]{failures} of {len(planned)} failed[/red]", soft_wrap=True)
        sys.exit(1)
    console.print(f"{len(planned)} of {len(planned)} {'written' if unchanged else 'restored'}"
                  + _unchanged_note(unchanged), soft_wrap=True)


def _unchanged_note(unchanged: Counter[str]) -> str:
    """The closing line's note of the files written as they came (:data:`jobs.review.REVIEW_REASONS`), if any."""
    if not unchanged:
        return ""
    parts = [f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(unchanged.items())]  # 1 judged sharp
    return f"; {sum(unchanged.values())} of them as they came ({', '.join(parts)}): look at them"
