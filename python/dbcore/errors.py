"""The errors a user sees as one line (`dbcore` prints them without a traceback): each names what is
wrong (the file, the field, what was expected and found). The store's own errors are
`dbcore.data.store.StoreError` and its kinds."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file that cannot be used as it is."""


class SourceError(ValueError):
    """A data source that cannot be read as labelled images or text."""


class RunError(RuntimeError):
    """A run directory, store or config that do not fit together."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match its metadata."""
