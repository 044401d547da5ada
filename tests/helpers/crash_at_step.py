"""`torchrun ... tests/helpers/crash_at_step.py N dbcore-args...`: the CLI, with every rank's N-th
AdamW step raising (a job killed mid-run, deterministically)."""

import sys

import torch

from dbcore.cli import main

crash_at, args = int(sys.argv[1]), sys.argv[2:]
real_step, calls = torch.optim.AdamW.step, [0]


def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == crash_at:
        raise RuntimeError(f"crash at step {crash_at}")
    return real_step(self, *a, **k)


torch.optim.AdamW.step = step
main(args, prog_name="dbcore")
