"""Where a store, run or source file lives: a local path, or an `s3://bucket/prefix` URL. The one
place Python tells them apart (the Rust store parses the same text, `rust/src/location.rs`), and
where source files are globbed and opened."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import IO, Any

from dbcore.errors import SourceError

S3_SCHEME = "s3://"
S3_EXTRA = "pip install 'dbcore[s3]'"
S3_READ_BYTES = 8 << 20  # bytes per request when reading an s3:// source file (its read-ahead block)

Location = str | Path  # a store or run: an s3:// URL (a str) or a local path


def is_url(where: Any) -> bool:
    """True for an `s3://` URL."""
    return isinstance(where, str) and where.startswith(S3_SCHEME)


def parse_location(where: str | os.PathLike[str]) -> Location:
    """A store or run argument: an `s3://` URL stays a string, anything else is a Path."""
    return where if is_url(where) else Path(where)


def s3_filesystem(error: type[Exception], what: str) -> Any:
    """An s3fs filesystem (credentials, region and endpoint from the AWS environment variables);
    without s3fs, `error` says which extra to install for `what`."""
    try:
        import s3fs
    except ImportError:
        raise error(f"s3:// {what} need s3fs, an optional extra: {S3_EXTRA}") from None
    # The endpoint as an argument: s3fs keeps one instance per arguments, so a changed endpoint
    # gets its own.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    extra = {"endpoint_url": endpoint} if endpoint else {}
    return s3fs.S3FileSystem(default_cache_type="none", use_listings_cache=False, **extra)


def s3_reason(exc: BaseException) -> str:
    """Why a request to a bucket failed, in one line that says what to set (the wording of the Rust
    store's errors, `rust/src/remote/client.rs`)."""
    text = f"{type(exc).__name__}: {exc}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    at = f"endpoint {endpoint}" if endpoint else "AWS"
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                "AWS_ENDPOINT_URL for a server other than AWS)")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"the bucket does not exist at {at}"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (f"access denied by {at}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their "
                "permissions on the bucket")
    if any(s in text for s in ("EndpointConnectionError", "Could not connect", "ConnectTimeout",
                               "Connection refused")):
        return f"{at} does not answer: check AWS_ENDPOINT_URL and the network"
    return str(getattr(exc, "strerror", None) or exc).splitlines()[0]


def glob_files(pattern: str) -> list[str]:
    """The files (not folders) a glob matches, local or at an `s3://` URL, sorted; a listing that
    fails is a SourceError."""
    if not is_url(pattern):
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    fs = s3_filesystem(SourceError, "sources")
    try:
        return sorted(f"s3://{p}" for p in fs.glob(pattern) if not fs.isdir(p))
    except Exception as exc:  # botocore and s3fs raise many types; the message says which
        raise SourceError(f"{pattern}: cannot list ({s3_reason(exc)})") from None


def open_file(path: str) -> IO[bytes]:
    """A source file opened for reading, local or at an `s3://` URL; failing is a SourceError."""
    try:
        if is_url(path):
            return s3_filesystem(SourceError, "sources").open(path, "rb", block_size=S3_READ_BYTES)
        return open(path, "rb")
    except Exception as exc:  # OSError, or s3fs/botocore's own types
        raise SourceError(f"{path}: cannot read ({s3_reason(exc)})") from None
