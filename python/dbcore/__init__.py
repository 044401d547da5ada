"""dbcore: DiffusionBlocks, training deep networks one block at a time."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dbcore")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
