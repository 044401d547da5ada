"""`[torchrun ...] tests/helpers/save_first_gradients.py OUT dbcore-args...`: the CLI, with rank 0
saving every parameter's gradient at its first AdamW step into OUT (safetensors): after DDP's
all-reduce under torchrun, the global batch's gradient."""

import os
import sys

import torch
from safetensors.torch import save_file

from dbcore.cli import main

out, args = sys.argv[1], sys.argv[2:]
real_step, calls = torch.optim.AdamW.step, [0]


def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == 1 and os.environ.get("RANK", "0") == "0":
        params = [(f"{i}.{j}", p) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
        grads = {name: p.grad.detach().clone().contiguous() for name, p in params if p.grad is not None}
        save_file(grads, out)
    return real_step(self, *a, **k)


torch.optim.AdamW.step = step
main(args, prog_name="dbcore")
