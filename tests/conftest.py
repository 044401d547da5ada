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


def _interrupted_at(monkeypatch, owner, name: str):
    """`with interrupted(n): ...`: the n-th call of `owner.name` raises KeyboardInterrupt (a crash
    mid-run), which the block expects; the real method is back after it."""
    from contextlib import contextmanager

    real = getattr(owner, name)

    @contextmanager
    def interrupted(n: int):
        calls = {"n": 0}

        def crashing(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        monkeypatch.setattr(owner, name, crashing)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(owner, name, real)

    return interrupted


@pytest.fixture
def interrupted_at_step(monkeypatch):
    """`with interrupted_at_step(n): train_run(...)`: the n-th AdamW step of the block crashes."""
    return _interrupted_at(monkeypatch, torch.optim.AdamW, "step")


@pytest.fixture
def interrupted_at_write(monkeypatch):
    """`with interrupted_at_write(n): write_cache(...)`: the n-th block written to a store crashes."""
    from dbcore.data import store

    return _interrupted_at(monkeypatch, store.ArrayWriter, "write")
