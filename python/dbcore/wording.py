"""How an error message names a parameter: as the Python API spells it (`overwrite=True`) or,
inside a command-line call, as the CLI does (`--overwrite`). The library writes `arg("overwrite",
True)`; `dbcore.cli` runs every command under `cli_wording()`."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_CLI = contextvars.ContextVar("dbcore_cli_wording", default=False)
FLAGS = {  # API parameter -> CLI option, where the names differ
    "label": "--class",
    "out": "--out",
    "frozen_prelude": "--freeze-prelude",
    "target_embedding": "--target-embedding",
    "eval_chains": "--chains",
}


def arg(name: str, value: Any = None) -> str:
    """`name=value` (API) or `--name value` (CLI); a flag (value True) is `--name` alone."""
    if _CLI.get():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is None or value is True else f"{flag} {value}"
    return name if value is None else f"{name}={value!r}"


@contextmanager
def cli_wording() -> Iterator[None]:
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)
