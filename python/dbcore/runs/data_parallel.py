"""One block (or the baseline) trained data-parallel by processes that `torchrun` starts.

`[train] batch_size` is the global batch. Every rank streams the same epoch order and takes its
contiguous share of each global batch (`BatchStream(rank=, world_size=)`); noise is keyed by the
sample, not the rank, so N processes train what one process at that batch trains, up to float
rounding. `DistributedDataParallel` averages the gradients (gloo on CPU, NCCL on CUDA): it wraps
the step's loss (`StepLoss`), so a recipe's loss may call any method of its model. Rank 0 alone
writes checkpoints, metrics and progress; every rank reads the store and, on resume, the
checkpoint, whose stream position counts global batches (a run saved by N processes resumes with
M). Without torchrun's environment the world is one process and nothing here is used.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dbcore.errors import RunError
from dbcore.wording import arg

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering ends the step for all


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: `rank` of `size`, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        """Each rank's share of `[train] batch_size`; a world size that does not divide it is an
        error naming both."""
        if global_batch % self.size:
            raise RunError(f"[train] batch_size {global_batch} is the global batch: the world size "
                           f"{self.size} must divide it (got {global_batch % self.size} rows over)")
        return global_batch // self.size


ONE = World()  # a process alone


def world(device: str = "auto") -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or one
    process; the process group is started here: NCCL where the run's `[train] device` is CUDA,
    else gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ONE
    w = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = _is_cuda(device)
        if cuda:
            torch.cuda.set_device(w.local_rank)
        backend = "nccl" if cuda else "gloo"
        store = _attempt_store(size)
        if store is None:
            dist.init_process_group(backend, timeout=TIMEOUT)
        else:
            dist.init_process_group(backend, store=store, rank=w.rank, world_size=size, timeout=TIMEOUT)
    return w


def _attempt_store(size: int) -> dist.Store | None:
    """Torchrun's agent store under a prefix of this attempt (TORCHELASTIC_RESTART_COUNT), or
    None outside torchrun. Trap: the agent keeps its store across `--max-restarts`, and a rank of
    a restarted job could read the address a dead rank of the last attempt left there and fail to
    connect (seen with gloo); a prefix per attempt keeps the attempts apart."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=TIMEOUT)
    return dist.PrefixStore(f"dbcore/attempt{restart}", agent)


def _is_cuda(name: str) -> bool:
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def device_of(name: str, w: World) -> str:
    """The device of a rank: CUDA device LOCAL_RANK when the run's device is `cuda` or `auto`
    with CUDA available (a device named with its index stays as named)."""
    return f"cuda:{w.local_rank}" if w.size > 1 and ":" not in name and _is_cuda(name) else name


@contextlib.contextmanager
def writer_first(w: World) -> Iterator[None]:
    """Rank 0 runs the block first (it writes what the others then read), the others after it."""
    if w.size > 1 and not w.writer:
        dist.barrier()
    yield
    if w.size > 1 and w.writer:
        dist.barrier()


def agree(w: World, value: int, what: str) -> None:
    """Refuse a value that differs between ranks (a block index, a resumed step), on every rank."""
    if w.size == 1:
        return
    values = [None] * w.size
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise RunError(f"the ranks disagree on {what}: {values}")


def check_block(w: World, block: int, num_blocks: int) -> None:
    """A block index out of range is an error on every rank (and the ranks train one block)."""
    agree(w, block, "the block")
    if not 0 <= block < num_blocks:
        raise RunError(f"{arg('block', block)} is outside 0..{num_blocks - 1}")


class StepLoss(nn.Module):
    """A step's loss as a module's forward, so that DDP (which hooks forward) wraps it; `model`
    is a submodule, so DDP averages every one of its gradients."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *args: object) -> torch.Tensor:
        return self.loss(*args)


def distributed_loss(model: nn.Module, loss: Callable[..., torch.Tensor], w: World
                     ) -> Callable[..., torch.Tensor]:
    """`loss` as is in a world of one; else through DDP, which averages the model's gradients
    over the ranks in its backward."""
    if w.size == 1:
        return loss
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(StepLoss(model, loss), device_ids=ids,
                                              find_unused_parameters=True)
    return ddp


def mean_over_ranks(value: torch.Tensor, w: World) -> torch.Tensor:
    """The mean of a scalar over the ranks (the logged loss of the global batch)."""
    if w.size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / w.size


def finish(w: World, failed: bool = False) -> None:
    """Every rank waits for the others (unless this one failed: they fail on its absence), then
    leaves the process group."""
    if w.size > 1 and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
