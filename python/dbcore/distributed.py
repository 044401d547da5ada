"""Blocks as Ray tasks (`dbcore train CONFIG --store S --out RUN --ray [--address ADDR]`).

Blocks share nothing, so each is one Ray task with the resources its config asks for
(`[train] ray_cpus`, `ray_gpus`, `ray_memory_gb`), trained by the same `train_run` as on one
machine, from the same store and into the same run directory (a shared file system). Ray retries a
task whose worker died (`MAX_RETRIES`) and one that failed with a transient I/O error
(`TRANSIENT_ERRORS`); a retried block resumes from its last checkpoint. The command skips blocks
whose checkpoints say they are finished, so running it again trains only what is left. Without
`--address` a local Ray instance starts for the command and stops with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbcore import checkpoint, rundir, store
from dbcore.config import Config, from_dict
from dbcore.rundir import RunError
from dbcore.wording import arg

MAX_RETRIES = 3
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, InterruptedError)
RAY_EXTRA = "pip install 'dbcore[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RunError(f"--ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def finished(run: Path, block: int) -> bool:
    """Whether block `block` of `run` has a finished checkpoint."""
    base = rundir.checkpoint_base(run, rundir.block_name(block))
    return checkpoint.exists(base) and bool(checkpoint.load_meta(base).get("done"))


def _train_one(cfg_dict: dict, where: str, store_path: str, run: str, block: int, progress: bool,
               activation_checkpointing: bool) -> dict:
    """The task: one block, as `dbcore train --block` would train it."""
    from dbcore.train import train_run

    cfg = from_dict(cfg_dict, where)
    return train_run(cfg, Path(store_path), Path(run), block=block, progress=progress,
                     activation_checkpointing=activation_checkpointing)[0]


def train_blocks_on_ray(cfg: Config, store_path: Path, run: Path, blocks: list[int] | None = None,
                        address: str | None = None, progress: bool = True, echo: Any = print,
                        activation_checkpointing: bool = False) -> list[dict]:
    """Train `blocks` (default: all) of a run as Ray tasks; one result per block, in block order
    (finished blocks report `{"name", "skipped": "finished"}`). `echo` reports each block as it
    ends; `progress`: the tasks' progress lines (forwarded to this process by Ray)."""
    ray = import_ray()
    from dbcore.train import check_store

    if cfg.train.mode == "sequential":
        raise RunError("--ray trains blocks independently; [train] mode = \"sequential\" needs them in order")
    check_store(cfg, store.open(store_path))
    rundir.write_run_json(run, cfg.to_dict(), store_path, "blocks")  # before any task: one writer
    blocks = list(range(cfg.model.num_blocks)) if blocks is None else blocks
    bad = [b for b in blocks if not 0 <= b < cfg.model.num_blocks]
    if bad:
        raise RunError(f"{arg('block', bad[0])} is outside 0..{cfg.model.num_blocks - 1}")
    results = {b: {"name": rundir.block_name(b), "skipped": "finished"} for b in blocks if finished(run, b)}
    todo = [b for b in blocks if b not in results]
    if not todo:
        return [results[b] for b in blocks]
    t = cfg.train
    started_here = not ray.is_initialized()
    if started_here and address:  # a running cluster: its nodes need dbcore installed
        ray.init(address=address, logging_level="ERROR", configure_logging=False)
    elif started_here:  # a local instance for this command
        ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
    options = {"num_cpus": t.ray_cpus, "num_gpus": t.ray_gpus, "max_retries": MAX_RETRIES,
               "retry_exceptions": list(TRANSIENT_ERRORS)}
    if t.ray_memory_gb > 0:
        options["memory"] = int(t.ray_memory_gb * 2**30)
    task = ray.remote(_train_one)
    store_abs, run_abs = str(Path(store_path).resolve()), str(Path(run).resolve())
    pending = {task.options(**options, name=f"dbcore-{rundir.block_name(b)}").remote(  # named in Ray
        cfg.to_dict(), cfg.source_path or "run.json", store_abs, run_abs, b, progress,
        activation_checkpointing): b for b in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                b = pending.pop(ref)
                try:
                    results[b] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the block's own error, as one line
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
                echo(results[b])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return [results[b] for b in blocks]
