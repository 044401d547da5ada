"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (deterministic, quiet on a shared machine), then
    back to what it was. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupted_at_step(monkeypatch):
    """`with interrupted_at_step(n): train_run(...)`: the n-th AdamW step of the block raises
    KeyboardInterrupt (a crash mid-run), which the block expects; the real step is back after it."""
    from contextlib import contextmanager

    real_step = torch.optim.AdamW.step

    @contextmanager
    def interrupted(n: int):
        calls = {"n": 0}

        def crashing_step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_step(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(torch.optim.AdamW, "step", real_step)

    return interrupted
