"""Progress of long commands: a tqdm bar on a terminal, plain periodic lines in logs.

Where the bar's stream (stderr) is not a terminal (a log file, CI, a scheduler's capture),
carriage-return bars turn into one long unreadable line; `bar` then writes a plain line every
`PLAIN_EVERY_S` seconds and one when done.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """The part of tqdm's interface dbcore uses, printed as plain lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: TextIO | None = None,
                 every_s: float = PLAIN_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.every_s, self.postfix = every_s, ""
        self.t0 = self.last = time.monotonic()
        self.start = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{share}, {rate:.2f} {self.unit}s/s{tail}",
              file=self.stream, flush=True)


def bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> Any:
    """A progress reporter with tqdm's update / set_postfix / close."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled)
