"""RssAnon of one process as a block trains, stage by stage: after the imports, the opened store
and one tiny optimizer step (the fixed share), after the first batch, and after each forward,
backward and optimizer step of the first few steps (the step's own tensors freed in between).
Shows whether memory freed by a step goes back to the system (run it with and without
`MALLOC_MMAP_THRESHOLD_=65536` in the environment to see glibc's retention).

    python benches/trace_process_memory.py configs/dit_mnist.toml STORE [--block 0] [--steps 4]
"""

from __future__ import annotations

import argparse
import gc

import torch

from dbcore import api
from dbcore.data import store
from dbcore.data.frozen import read_frozen
from dbcore.data.stream import BatchStream
from dbcore.recipes import for_config
from dbcore.runs.loop import make_optimizer, to_device
from dbcore.runs.process_memory import status_bytes
from dbcore.runs.step import block_noised, block_step_loss


def rss_anon_mib() -> int:
    return status_bytes("RssAnon") // 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("store")
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    cfg, s = api.config(args.config), store.open(args.store)
    recipe = for_config(cfg)
    w = torch.zeros(1, requires_grad=True)  # the optimizer's machinery, loaded on a first step
    w.sum().backward()
    torch.optim.AdamW([w]).step()
    print(f"fixed share: {rss_anon_mib()} MiB")
    frozen = read_frozen(s, recipe.frozen_arrays)
    model = recipe.build_block(args.block, frozen)
    req = recipe.noise_request(recipe.target_shape(frozen))
    stream = BatchStream.for_block(s, args.block, cfg.train.batch_size, arrays=recipe.stream_arrays,
                                   gaussians=req.gaussians, uniforms=req.uniforms, drop_last=True)
    batches = iter(stream)
    next(batches)
    print(f"first batch: {rss_anon_mib()} MiB")
    opt = make_optimizer(model, cfg)
    for i in range(args.steps):
        raw = next(batches)
        batch = to_device(raw, recipe.stream_arrays, torch.device("cpu"))
        noised = block_noised(recipe, raw, batch, frozen, args.block, 0, 0, "torch")
        loss = block_step_loss(recipe, model, batch, noised, "torch")
        forward = rss_anon_mib()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        backward = rss_anon_mib()
        opt.step()
        del loss, noised, batch, raw
        gc.collect()
        print(f"step {i}: forward {forward}, backward {backward}, freed {rss_anon_mib()} MiB")


if __name__ == "__main__":
    main()
