"""`torchrun ... tests/helpers/crash_at_step.py N dbcore-args...`: the CLI, with the last rank's N-th
AdamW step raising in the job's first attempt (a process killed mid-run, deterministically; a
restart by `torchrun --max-restarts` runs clean)."""

import os
import sys

import torch

from dbcore.cli import main

crash_at, args = int(sys.argv[1]), sys.argv[2:]
last_rank = os.environ.get("RANK", "0") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
real_step, calls = torch.optim.AdamW.step, [0]


def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == crash_at and last_rank and first_attempt:
        raise RuntimeError(f"crash at step {crash_at}")
    return real_step(self, *a, **k)


torch.optim.AdamW.step = step
main(args, prog_name="dbcore")
