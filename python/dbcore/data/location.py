"""Where a store or run lives: a local path, or an `s3://bucket/prefix` URL. The one place Python
tells them apart (the Rust store parses the same text, `rust/src/location.rs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"
S3_EXTRA = "pip install 'dbcore[s3]'"

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
    return s3fs.S3FileSystem(default_cache_type="none", use_listings_cache=False)
