"""The `dbcore` command line: cache -> train -> eval, and store inspection."""

from __future__ import annotations

import click

from dbcore import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dbcore")
def main() -> None:
    """Train deep networks one block at a time with DiffusionBlocks."""


if __name__ == "__main__":
    main()
