"""Parsing and joining ``s3://bucket/key`` URIs (no network)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from posixpath import normpath

from jobs.errors import InvalidURIError

# S3 bucket naming rules: 3-63 chars, lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
MAX_KEY_BYTES = 1024  # S3's limit on a key's length, in UTF-8 bytes


def _quoted(text: str, limit: int = 120) -> str:
    """``text`` quoted for an error message, its middle left out when long."""
    return repr(text) if len(text) <= limit else repr(text[:limit // 2] + "…" + text[-limit // 2:])


@dataclass(frozen=True, order=True)
class S3URI:
    """A bucket and a key (or key prefix); ``key`` never starts with '/'."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        """True when the URI names a folder-like prefix (empty or ends with '/')."""
        return self.key == "" or self.key.endswith("/")

    def as_prefix(self) -> "S3URI":
        return self if self.is_prefix else S3URI(self.bucket, self.key + "/")

    def join(self, relative: str) -> "S3URI":
        """The URI of ``relative`` under this prefix."""
        return S3URI(self.bucket, self.as_prefix().key + relative.lstrip("/"))

    def mirror(self, relative: str) -> "S3URI":
        """The URI of a listed key's path ``relative`` to its prefix, under this prefix, kept exactly: a key
        listed as ``in//x.jpg`` (an uploader's doubled slash) is written to ``out//x.jpg``, not over the
        output of ``in/x.jpg``."""
        return S3URI(self.bucket, self.as_prefix().key + relative)

    def relative_to(self, prefix: "S3URI") -> str:
        """This key's path relative to ``prefix`` (which must contain it)."""
        p = prefix.as_prefix()
        if self.bucket != p.bucket or not self.key.startswith(p.key):
            raise InvalidURIError(f"{self} is not under {p}")
        return self.key[len(p.key):]

    def contains(self, other: "S3URI") -> bool:
        """True when ``other`` lies under this prefix (or is the same prefix)."""
        p = self.as_prefix()
        return other.bucket == p.bucket and (other.key.startswith(p.key) or other.as_prefix().key == p.key)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]


def parse_s3_uri(text: str, *, want_prefix: bool | None = None, exact: bool = False) -> S3URI:
    """Parse ``s3://bucket[/key]``; the error names what is wrong and shows the form.

    ``want_prefix=True`` turns a key into a prefix (adds '/'); ``False`` refuses
    prefixes (a single object is required). A URI a person typed is normalised
    and refused with empty, '.' or '..' segments; ``exact=True`` takes the key
    as it is, for URIs the project wrote itself from a listing (a stored key
    may hold ``//``, and it must be read and written as stored).
    """
    raw = text if exact else text.strip()
    if not raw.startswith("s3://"):
        raise InvalidURIError(f"{text!r} is not an S3 URI; expected s3://bucket/key or s3://bucket/prefix/")
    rest = raw[5:]
    bucket, _, key = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidURIError(
            f"{text!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')"
        )
    if key and not exact:
        trailing = key.endswith("/")
        parts = key.split("/")
        if any(part in {".", ".."} for part in parts) or "//" in key.rstrip("/"):
            raise InvalidURIError(f"{text!r}: the key has empty, '.' or '..' segments")
        key = normpath(key).lstrip("/") + ("/" if trailing else "")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidURIError(f"{_quoted(text)}: the key is {len(key.encode('utf-8'))} bytes long; S3 keys are at "
                              f"most {MAX_KEY_BYTES} bytes (UTF-8)")
    uri = S3URI(bucket, key)
    if want_prefix is True:
        return uri.as_prefix()
    if want_prefix is False and uri.is_prefix:
        raise InvalidURIError(f"{text!r} names a prefix; a single object key is required here")
    return uri
