"""Progress output: plain periodic lines when stderr is not a terminal."""

from __future__ import annotations

import io

from tqdm import tqdm

from dbcore import progress
from dbcore.progress import PlainProgress


def test_plain_lines_every_interval_and_at_close():
    out = io.StringIO()
    p = PlainProgress(total=10, desc="block0", unit="step", stream=out, every_s=0.0)
    p.set_postfix(loss="1.2345")
    p.update(5)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("block0: 5/10 steps (50%)") and lines[0].endswith("loss=1.2345")
    assert lines[1].startswith("block0: 5/10 steps")


def test_plain_reporter_is_quiet_between_intervals():
    out = io.StringIO()
    p = PlainProgress(total=100, desc="cache", unit="block", stream=out, every_s=3600.0)
    for _ in range(100):
        p.update()
    assert out.getvalue() == ""
    p.close()
    assert out.getvalue().startswith("cache: 100/100 blocks (100%)")


def test_bar_is_plain_off_a_terminal_and_tqdm_on_one(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress.bar(3, "x", "step"), PlainProgress)
    assert isinstance(progress.bar(3, "x", "step", enabled=False), tqdm)  # disabled: silent tqdm
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(progress.bar(3, "x", "step"), tqdm)
