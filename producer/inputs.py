"""Expanding what the user named (keys, prefixes, manifests) into a lazy stream
of work items, and validating it before anything is written.

Output keys mirror each input's path relative to the prefix it came from, so
the same job submitted twice writes the same keys (a redelivered task
overwrites instead of duplicating).
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import InputError, InvalidURIError, StorageNotFoundError
from jobs.layout import is_kernel_artefact, is_sidecar, parse_output_format, with_output_format
from jobs.messages import ImageItem
from jobs.s3uri import MAX_KEY_BYTES, S3URI, parse_s3_uri
from jobs.storage import READ_FORMATS, check_bucket, is_image_key, is_photograph, iter_objects, object_exists


@dataclass(frozen=True)
class Source:
    """One thing the user named: a single key, a prefix, or a manifest file."""

    kind: str  # "key" | "prefix" | "manifest"
    uri: S3URI | None = None
    path: Path | None = None
    text: str = ""


def classify(text: str) -> Source:
    """Decide what an INPUT argument is; raises InvalidURIError naming the argument."""
    if text.startswith(("s3:", "S3:")) or "://" in text:
        uri = parse_s3_uri(text)
        if uri.is_prefix or not is_image_key(uri.key):
            return Source("prefix", uri=uri.as_prefix(), text=text)
        return Source("key", uri=uri, text=text)
    path = Path(text).expanduser()
    if path.is_file():
        return Source("manifest", path=path, text=text)
    raise InvalidURIError(
        f"{text!r} is neither an S3 URI (s3://bucket/key or s3://bucket/prefix/) nor a manifest file"
    )


def _pairs_uris(head: str) -> bool:
    """Whether a manifest without a ``.csv`` name is CSV: its first URI line holds a second URI after a comma
    (``blurred,sharp``). A key with a comma in it (``IMG 0001, copy.png``) stays one URI a line."""
    for line in head.splitlines():
        line = line.strip()
        if line.startswith("s3://"):
            fields = next(csv.reader([line]), [])
            return len(fields) >= 2 and fields[1].strip().startswith("s3://")
    return False


def _manifest_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for every non-empty, non-comment row of a manifest."""
    # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark, which would otherwise hide the
    # first row's URI (and make it look like a header)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        head = handle.read(4096)
        handle.seek(0)
        is_csv = path.suffix.lower() == ".csv" or _pairs_uris(head)
        if is_csv:
            reader = csv.reader(handle)
            first = True
            for row in reader:
                fields = [f.strip() for f in row]
                if not fields or not fields[0] or fields[0].startswith("#"):
                    continue
                if first and "://" not in fields[0]:
                    first = False
                    continue  # a header row ("blurred,sharp"): the first row that names no URI
                first = False
                yield reader.line_num, fields
        else:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield number, [line]


def _manifest_uris(path: Path) -> Iterator[tuple[int, S3URI, S3URI | None]]:
    """(line number, input, sharp reference or None) for every row of a manifest; a malformed URI is refused
    with the file and line that hold it."""
    for number, fields in _manifest_rows(path):
        try:
            # keys as stored, '//', '.' and '..' segments included: a manifest is often what 'deblur results
            # --format uris' listed, and a prefix's listing restores such keys
            uri = parse_s3_uri(fields[0], want_prefix=False, exact=True)
            second = fields[1] if len(fields) > 1 else ""
            # a second column that names no URI (a note, an accession number) is a column of the user's own
            looks_like_uri = "://" in second or second.lower().startswith("s3:")
            reference = parse_s3_uri(second, want_prefix=False, exact=True) if looks_like_uri else None
        except InvalidURIError as exc:
            raise InvalidURIError(f"{path}:{number}: {exc}") from None
        yield number, uri, reference


def _manifest_buckets(path: Path) -> set[str]:
    """The buckets a manifest names, every row parsed: a bad row deep in a long manifest is refused before
    anything is written, not after its first thousands of images were enqueued."""
    buckets: set[str] = set()
    try:
        for _number, uri, reference in _manifest_uris(path):
            buckets.add(uri.bucket)
            if reference is not None:
                buckets.add(reference.bucket)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"manifest {path} cannot be read: {exc}") from None
    if not buckets:
        raise InputError(f"manifest {path} lists no URIs")
    return buckets


def _holds_an_image(client, prefix: S3URI) -> bool:  # type: ignore[no-untyped-def]
    """Whether a prefix holds at least one image deblur reads (listing stops at the first)."""
    return any(is_photograph(uri.key) for uri, _size in iter_objects(client, prefix))


@dataclass
class Plan:
    """A validated deblur or evaluation request, ready to stream items from."""

    sources: list[Source]
    output: S3URI | None
    references: S3URI | None = None  # sharp prefix for evaluation jobs
    gopro: bool = False
    output_format: str | None = None  # outputs converted to this format (jobs.layout.OUTPUT_FORMATS), keys renamed

    def items(self, client, ignored: Counter[str] | None = None,  # type: ignore[no-untyped-def]
              tick: Callable[[], None] | None = None) -> Iterator[ImageItem]:
        """Every image to process, lazily, with its output and reference URIs.

        ``ignored`` counts the files a prefix holds that are left out, by kind (:func:`ignored_kind`), so the
        user can be told that, say, 1,231 HEIC photographs were not restored. ``tick`` is called for every key
        listed and every manifest row read, images or not: a producer's heartbeat while it lists a long stretch
        that yields nothing (already restored, or not images).
        """
        for source in self.sources:
            if source.kind == "key" and source.uri is not None:
                yield self._item(source.uri, source.uri.name, client)
            elif source.kind == "prefix" and source.uri is not None:
                for uri, _size in iter_objects(client, source.uri):
                    if tick is not None:
                        tick()
                    if not is_photograph(uri.key):
                        if ignored is not None and not uri.key.endswith("/"):  # "/": a folder marker, no file
                            ignored[ignored_kind(uri.key)] += 1
                        continue
                    relative = uri.relative_to(source.uri)
                    if self.gopro:
                        if "/blur/" not in "/" + relative:
                            continue
                        reference = source.uri.join(_gopro_sharp(relative))
                        yield ImageItem(input=str(uri), output=self._output(relative), reference=str(reference))
                        continue
                    yield self._item(uri, relative, client)
            elif source.path is not None:
                for _number, uri, reference in _manifest_uris(source.path):
                    if tick is not None:
                        tick()
                    yield ImageItem(input=str(uri), output=self._output(uri.key),
                                    reference=str(reference) if reference else None)

    def _may_collide(self) -> bool:
        """Whether an output could land on an input, a reference or another output, so that
        :meth:`check_outputs` must list the job. A single prefix or key mirrored into an output prefix that does
        not hold the references cannot (its relative paths are distinct, and an output prefix inside the input
        prefix or above its folder is refused by :func:`build_plan`), unless outputs change format: ``a.jpg``
        and ``a.tif`` both become ``a.png``."""
        if self.output is None:
            return False
        if len(self.sources) != 1 or self.sources[0].kind == "manifest" or self.output_format is not None:
            return True
        return self.references is not None and self.output.contains(self.references)

    def check_outputs(self, client) -> None:  # type: ignore[no-untyped-def]
        """Refuse a plan in which an output would overwrite an input or a sharp reference, or two inputs share
        one output.

        Several sources or a manifest can collide: two folders each holding ``IMG_0001.jpg`` mirrored into one
        output prefix, a key listed from two buckets, or an output prefix over the manifest's own keys; so can
        one prefix whose output prefix lies above it or above the references (:meth:`_may_collide`). Their items
        are listed once here, before anything is written, keeping 8-byte digests (about 70 MB for a million
        images); an input named twice is one image.
        """
        if not self._may_collide():
            return
        inputs: set[bytes] = set()
        references: set[bytes] = set()
        outputs: dict[bytes, bytes] = {}  # output digest -> digest of the input written there
        for item in self.items(client):
            source = digest(item.input)
            inputs.add(source)
            if item.reference:
                references.add(digest(item.reference))
            target = digest(item.output or "")
            if outputs.setdefault(target, source) != source:
                first = next(i.input for i in self.items(client) if i.output == item.output)
                raise InputError(
                    f"{first} and {item.input} would both be written to {item.output}; submit them as separate "
                    "jobs with different outputs, or name a prefix that holds both so their paths are kept")
        for protected, what in ((inputs, "the input"), (references, "the sharp reference")):
            overwritten = protected.intersection(outputs)
            if overwritten:
                item = next(i for i in self.items(client) if digest(i.output or "") in overwritten)
                raise InputError(
                    f"the output of {item.input} would overwrite {what} {item.output}; choose an output prefix "
                    "that no input or reference lies under")

    def existing_outputs(self, client) -> set[bytes]:  # type: ignore[no-untyped-def]
        """Digests (:func:`digest`) of every object already under the output prefix, listed once."""
        if self.output is None:
            return set()
        return {digest(str(uri)) for uri, _size in iter_objects(client, self.output)}

    def _item(self, uri: S3URI, relative: str, client) -> ImageItem:  # type: ignore[no-untyped-def]
        ref = self.references.mirror(relative) if self.references else None
        return ImageItem(input=str(uri), output=self._output(relative), reference=str(ref) if ref else None)

    def _output(self, relative: str) -> str | None:
        """Where the image at ``relative`` (to its prefix, or a manifest key) is written, in the output format;
        the path is kept exactly (:meth:`S3URI.mirror`)."""
        return str(self.output.mirror(with_output_format(relative, self.output_format))) if self.output else None


KERNEL_KIND = "kernel PNG"
SIDECAR_KIND = "provenance record"
_EARLIER_RUN_KINDS = (KERNEL_KIND, SIDECAR_KIND)  # what deblur itself writes next to an output


def ignored_kind(key: str) -> str:
    """How a left-out file is counted: its extension in lower case, ``KERNEL_KIND`` for a kernel PNG or
    ``SIDECAR_KIND`` for a provenance record deblur wrote next to an earlier output, or 'no extension'."""
    if is_kernel_artefact(key):
        return KERNEL_KIND
    if is_sidecar(key):
        return SIDECAR_KIND
    name = key.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else "no extension"


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, with an s unless there is one: '1,231 files', '1 file'."""
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


def describe_ignored(ignored: Mapping[str, int]) -> str:
    """What a listing left out, for people, e.g. '3 files that are not images deblur reads (PNG, JPEG, TIFF,
    WebP, JPEG 2000, BMP): .heic ×2, .gif ×1; and 1 kernel PNG of an earlier run'; '' when nothing was."""

    others = {kind: count for kind, count in ignored.items() if kind not in _EARLIER_RUN_KINDS}
    parts = []
    if others:
        total = sum(others.values())
        by_count = sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))
        kinds = ", ".join(f"{kind} ×{count:,}" for kind, count in by_count)
        parts.append(f"{plural(total, 'file')} that {'is' if total == 1 else 'are'} not "
                     f"{'an image' if total == 1 else 'images'} deblur reads ({READ_FORMATS}): {kinds}")
    earlier = [plural(ignored[kind], kind) for kind in _EARLIER_RUN_KINDS if ignored.get(kind)]
    if earlier:
        parts.append(f"{' and '.join(earlier)} of an earlier run")
    return "; and ".join(parts)


def digest(uri: str) -> bytes:
    """An 8-byte digest of a URI: sets of a million of them fit in about 70 MB."""
    return hashlib.blake2b(uri.encode(), digest_size=8).digest()


def _gopro_sharp(relative: str) -> str:
    """GoPro layout: ``SCENE/blur/000001.png`` ↔ ``SCENE/sharp/000001.png``."""
    padded = "/" + relative
    index = padded.rfind("/blur/")
    return (padded[:index] + "/sharp/" + padded[index + len("/blur/"):]).lstrip("/")


KEY_CHECK_THREADS = 8  # HEAD requests in flight while the single keys a job names are checked (the client pools 10+)


def _first_missing(client, keys: Sequence[S3URI]) -> S3URI | None:  # type: ignore[no-untyped-def]
    """The first of ``keys`` (in their order) that does not exist, or None; checked ``KEY_CHECK_THREADS`` at a
    time (one after the other, 100,000 keys took 13 minutes against a local endpoint)."""
    if len(keys) <= 1:
        return next((key for key in keys if not object_exists(client, key)), None)
    with ThreadPoolExecutor(max_workers=KEY_CHECK_THREADS) as pool:
        for key, exists in zip(keys, pool.map(lambda key: object_exists(client, key), keys)):
            if not exists:
                return key
    return None


def _output_above(output: S3URI, source: S3URI) -> str:
    """The refusal of an output prefix that holds the input's folder: the outputs would land among files that
    are not this job's (``s3://b/scans/`` for ``s3://b/scans/sub/``: ``sub/a.png`` is written to ``a.png``,
    replacing an original there), which no check of the job's own inputs can see."""
    return (f"output prefix {output} holds the input {source}: the outputs would be written among the files "
            "already there, replacing any of the same name (originals too); choose an output prefix outside the "
            f"input's folder and its parents (such as {output}restored/)")


def build_plan(
    client,  # type: ignore[no-untyped-def]
    inputs: Sequence[str],
    output: str | None,
    references: str | None = None,
    gopro: bool = False,
    require_output: bool = True,
    output_format: str | None = None,
) -> Plan:
    """Parse and check every argument against storage; raise before anything is written.

    Checks: URIs well formed, buckets exist (the manifests' too, every row
    read), single keys exist, each of several prefixes holds an image (a
    mistyped one is not passed over in silence), and the output prefix is not
    inside (or equal to) an input prefix or the references' prefix.
    """
    if not inputs:
        raise InputError("no input given; name S3 keys, prefixes (s3://bucket/prefix/) or a manifest file")
    if output_format is not None:
        parse_output_format(output_format)  # refused here, with the names, rather than by every worker
    # a source named twice is listed (and checked) once: its images would be one image each anyway
    sources = list({(s.kind, s.uri, s.path): s for s in map(classify, inputs)}.values())
    out_uri: S3URI | None = None
    if output:
        out_uri = parse_s3_uri(output, want_prefix=True)
    elif require_output:
        raise InputError("--output is required: an S3 prefix such as s3://bucket/restored/")
    ref_uri = parse_s3_uri(references, want_prefix=True) if references else None
    if out_uri is not None and ref_uri is not None and ref_uri.contains(out_uri):
        raise InvalidURIError(
            f"output prefix {out_uri} lies inside the sharp references' prefix {ref_uri}: restorations would be "
            "written over the references; choose an output prefix outside it")
    buckets = {s.uri.bucket for s in sources if s.uri is not None}
    for source in sources:
        if source.kind == "manifest" and source.path is not None:
            buckets |= _manifest_buckets(source.path)
    if out_uri:
        buckets.add(out_uri.bucket)
    if ref_uri:
        buckets.add(ref_uri.bucket)
    for bucket in sorted(buckets):
        check_bucket(client, bucket)
    if ref_uri is not None and not _holds_an_image(client, ref_uri):
        raise StorageNotFoundError(
            f"sharp prefix {ref_uri} holds no images ({READ_FORMATS}); check its spelling: every image would fail "
            "for want of its reference")
    keys = [source.uri for source in sources if source.kind == "key" and source.uri is not None]
    missing = _first_missing(client, keys)
    if missing is not None:
        raise StorageNotFoundError(f"input {missing} does not exist")
    for source in sources:
        if out_uri is not None and source.kind == "key" and source.uri is not None:
            written = out_uri.join(with_output_format(source.uri.name, output_format))
            if len(written.key.encode("utf-8")) > MAX_KEY_BYTES:
                raise InvalidURIError(f"the output of {source.uri} would be {written.key[:60]}…, "
                                      f"{len(written.key.encode('utf-8'))} bytes long; S3 keys are at most "
                                      f"{MAX_KEY_BYTES} bytes: choose a shorter output prefix")
        if out_uri is not None and source.kind == "prefix" and source.uri is not None and source.uri.contains(out_uri):
            raise InvalidURIError(
                f"output prefix {out_uri} lies inside input prefix {source.uri}: the outputs would be "
                "read back as inputs next time; choose an output prefix outside the input"
            )
        if out_uri is not None and source.kind == "key" and source.uri is not None \
                and out_uri.join(with_output_format(source.uri.name, output_format)) == source.uri:
            raise InvalidURIError(f"output {out_uri} would overwrite the input {source.uri}")
        if out_uri is not None and source.kind == "key" and source.uri is not None:
            folder = S3URI(source.uri.bucket, source.uri.key[:len(source.uri.key) - len(source.uri.name)])
            if out_uri == folder:
                # renamed by --output-format, scan.jpg's output would replace a scan.png beside it (an original)
                raise InvalidURIError(
                    f"output prefix {out_uri} is the folder of the input {source.uri}: its output would be written "
                    "among the originals there; choose an output prefix outside it")
            if out_uri.contains(folder):
                raise InvalidURIError(_output_above(out_uri, source.uri))
        if out_uri is not None and source.kind == "prefix" and source.uri is not None \
                and out_uri.contains(source.uri) and not source.uri.contains(out_uri):
            raise InvalidURIError(_output_above(out_uri, source.uri))
        if len(sources) > 1 and source.kind == "prefix" and source.uri is not None \
                and not _holds_an_image(client, source.uri):
            raise StorageNotFoundError(
                f"input prefix {source.uri} holds no images ({READ_FORMATS}); check its spelling, or leave it out")
    return Plan(sources, out_uri, ref_uri, gopro, output_format)
