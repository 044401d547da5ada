"""Ray: blocks as tasks (`dbcore train ... --ray`) and a cache written by tasks (`dbcore cache ... --ray`).

Blocks share nothing, so each is one Ray task with the resources its config asks for
(`[train] ray_cpus`, `ray_gpus`, `ray_memory_gb` per worker), trained by the same `train_run` as on
one machine, from the same store and into the same run directory (a shared file system). With
`ray_workers` K > 1 the task asks for K workers' resources on one node and runs torchrun there
(`TORCHRUN_RESTARTS` restarts), whose K processes train the block data-parallel
(`dbcore.runs.data_parallel`); this module's `__main__` is what each of them runs. Ray retries a
task whose worker died (`MAX_RETRIES`) and one that failed with a transient I/O error
(`TRANSIENT_ERRORS`); a retried block resumes from its last checkpoint. The command skips blocks
whose checkpoints say they are finished, so running it again trains only what is left. Without
`--address` a local Ray instance starts for the command and stops with it.

`cache_on_ray` splits a cache's write units (whole shards or chunks, so no two tasks touch one
file) into contiguous runs, one task each. Every task loads the source by its spec, checks that it
sees the inputs the command saw, and writes its units into the arrays the command created; the
command records each finished task's units in the store's ledger (so running it again writes only
what is left) and finalizes the store once. The bytes equal a single-process cache's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dbcore.config import Config, from_dict
from dbcore.data import cache, store
from dbcore.data.location import is_url, parse_location
from dbcore.data.sources import load_source_for
from dbcore.errors import RunError
from dbcore.runs import checkpoint, mirror, rundir
from dbcore.wording import arg

MAX_RETRIES = 3
TORCHRUN_RESTARTS = 3  # a block's torchrun restarts its workers this often (then the task fails)
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


def _start(ray: Any, address: str | None) -> bool:
    """Connect to the cluster at `address`, or start a local instance; True if this call did."""
    if ray.is_initialized():
        return False
    if address:  # a running cluster: its nodes need dbcore installed
        ray.init(address=address, logging_level="ERROR", configure_logging=False)
    else:  # a local instance for this command
        ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=False)
    return True


def _raise_cause(ray: Any, ref: Any) -> Any:
    """`ray.get(ref)`, a task's own error raised as itself (printed as one line by the CLI)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _absolute(location: str | Path) -> str:
    """A store or run as every node names it: an s3:// URL, or an absolute path."""
    return location if is_url(location) else str(Path(location).resolve())


def _train_one(cfg_dict: dict, where: str, store_path: str, run: str, block: int, progress: bool,
               activation_checkpointing: bool) -> dict:
    """The task: one block, as `dbcore train --block` would train it; with `ray_workers` > 1,
    by that many processes under torchrun (`_torchrun_block`)."""
    from dbcore.runs.train import train_run

    cfg = from_dict(cfg_dict, where)
    if cfg.train.ray_workers > 1:
        return _torchrun_block(cfg_dict, where, store_path, run, block, progress, activation_checkpointing)
    return train_run(cfg, parse_location(store_path), parse_location(run), block=block, progress=progress,
                     activation_checkpointing=activation_checkpointing)[0]


def _torchrun_block(cfg_dict: dict, where: str, store_path: str, run: str, block: int, progress: bool,
                    activation_checkpointing: bool) -> dict:
    """Block `block` trained by `ray_workers` processes that torchrun starts on this node; the
    result rank 0 writes."""
    workers = from_dict(cfg_dict, where).train.ray_workers
    with tempfile.TemporaryDirectory(prefix="dbcore-torchrun-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"config": cfg_dict, "where": where, "store": store_path, "run": run,
                                   "block": block, "progress": progress,
                                   "activation_checkpointing": activation_checkpointing}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               f"--max-restarts={TORCHRUN_RESTARTS}", "-m", "dbcore.runs.distributed", str(job)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        result = job.with_suffix(".result.json")
        if out.returncode != 0 or not result.is_file():
            raise RunError(f"block {block}: torchrun with {workers} workers failed (exit {out.returncode}):\n"
                           f"{out.stdout[-2000:]}")
        return json.loads(result.read_text())


def train_blocks_on_ray(cfg: Config, store_path: Path, run: Path, blocks: list[int] | None = None,
                        address: str | None = None, progress: bool = True, echo: Any = print,
                        activation_checkpointing: bool = False) -> list[dict]:
    """Train `blocks` (default: all) of a run as Ray tasks; one result per block, in block order
    (finished blocks report `{"name", "skipped": "finished"}`). `echo` reports each block as it
    ends; `progress`: the tasks' progress lines (forwarded to this process by Ray)."""
    ray = import_ray()
    from dbcore.runs.train import check_store

    if cfg.train.mode == "sequential":
        raise RunError("--ray trains blocks independently; [train] mode = \"sequential\" needs them in order")
    check_store(cfg, store.open(store_path))
    blocks = list(range(cfg.model.num_blocks)) if blocks is None else blocks
    bad = [b for b in blocks if not 0 <= b < cfg.model.num_blocks]
    if bad:
        raise RunError(f"{arg('block', bad[0])} is outside 0..{cfg.model.num_blocks - 1}")
    with mirror.local_run(run) as local:  # an s3:// run: its mirror here; the tasks mirror it too
        rundir.write_run_json(local, cfg.to_dict(), store_path, "blocks")  # before any task: one writer
        results = {b: {"name": rundir.block_name(b), "skipped": "finished"} for b in blocks
                   if finished(local, b)}
    todo = [b for b in blocks if b not in results]
    if not todo:
        return [results[b] for b in blocks]
    t = cfg.train
    started_here = _start(ray, address)
    k = t.ray_workers  # one node's worth: torchrun starts the workers beside each other
    options = {"num_cpus": t.ray_cpus * k, "num_gpus": t.ray_gpus * k, "max_retries": MAX_RETRIES,
               "retry_exceptions": list(TRANSIENT_ERRORS)}
    if t.ray_memory_gb > 0:
        options["memory"] = int(t.ray_memory_gb * k * 2**30)
    task = ray.remote(_train_one)
    store_abs, run_abs = _absolute(store_path), _absolute(run)
    pending = {task.options(**options, name=f"dbcore-{rundir.block_name(b)}").remote(  # named in Ray
        cfg.to_dict(), cfg.source_path or "run.json", store_abs, run_abs, b, progress,
        activation_checkpointing): b for b in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                b = pending.pop(ref)
                results[b] = _raise_cause(ray, ref)
                echo(results[b])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return [results[b] for b in blocks]


def _cache_units(cfg_dict: dict, where: str, spec: str, noise: str, draws: int, seed: int,
                 target_embedding: Any, out: str, attrs: dict, units: list[cache.Unit]) -> list[cache.Unit]:
    """The task: write `units` of the store at `out`, from the source loaded by its spec."""
    cfg = from_dict(cfg_dict, where)
    plan = cache.plan_cache(cfg, load_source_for(cfg, spec), noise, draws, seed, target_embedding)
    if plan.attrs != attrs:  # another file at the same path, another package version...
        raise store.StoreError(f"{out}: a Ray worker sees other cache inputs than the command: "
                               f"{attrs.get('source')} there, {plan.attrs.get('source')} here")
    s = store.open(parse_location(out), require_complete=False)
    cache.write_units(s, plan.jobs, units)
    return units


def split_units(units: list[cache.Unit], tasks: int) -> list[list[cache.Unit]]:
    """`units` in at most `tasks` contiguous runs of about equal rows (rows stand for bytes within
    an array and keep neighbouring units, which share their computed rows, together)."""
    if not units:
        return []
    total = sum(b - a for _, a, b in units)
    runs: list[list[cache.Unit]] = [[]]
    done = 0
    for unit in units:
        if runs[-1] and done >= total * len(runs) / tasks:
            runs.append([])
        runs[-1].append(unit)
        done += unit[2] - unit[1]
    return runs


def _task_slots(ray: Any, cpus_per_task: float) -> int:
    """How many tasks of `cpus_per_task` CPUs the cluster runs at once."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) / cpus_per_task))


def cache_on_ray(cfg: Config, spec: str, out: Path, noise: str = "online", draws: int = 1, seed: int = 0,
                 overwrite: bool = False, target_embedding: Any = None, address: str | None = None,
                 tasks: int | None = None, cpus_per_task: float = 1.0, progress: bool = True,
                 break_lock: bool = False) -> store.Store:
    """`cache.write_cache` of the source `spec` by Ray tasks (default: one per CPU of the cluster);
    see the module docs."""
    ray = import_ray()
    from dbcore.progress import bar as progress_bar

    if tasks is not None and tasks < 1:
        raise ValueError(f"{arg('tasks', tasks)} must be >= 1")
    plan = cache.plan_cache(cfg, load_source_for(cfg, spec), noise, draws, seed, target_embedding)
    out = parse_location(out)
    with store.writer_lock(out, break_lock=break_lock):
        s, done = cache.open_for_writing(out, plan.attrs, overwrite)
        units = cache.pending_units(s, plan.jobs, done)
        started_here = _start(ray, address) if units else False
        bar = progress_bar(len(units), "cache", "block", enabled=progress)
        pending: list[Any] = []
        try:
            runs = split_units(units, tasks or _task_slots(ray, cpus_per_task)) if units else []
            options = {"num_cpus": cpus_per_task, "max_retries": MAX_RETRIES,
                       "retry_exceptions": list(TRANSIENT_ERRORS)}
            task = ray.remote(_cache_units)
            pending = [task.options(**options, name=f"dbcore-cache{i}").remote(
                cfg.to_dict(), cfg.source_path or "config", spec, noise, draws, seed, target_embedding,
                _absolute(out), plan.attrs, run) for i, run in enumerate(runs)]
            with cache.Ledger(s, done) as ledger:
                while pending:
                    (ref,), pending = ray.wait(pending, num_returns=1)
                    written = _raise_cause(ray, ref)
                    ledger.record(written)
                    bar.update(len(written))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
        bar.close()
        cache.finish(s)
    return s


def _worker_main(job_path: str) -> None:
    """One torchrun process of `_torchrun_block`: train the block over the world torchrun made;
    rank 0 writes the result beside the job."""
    from dbcore.runs.train import train_run

    job = json.loads(Path(job_path).read_text())
    cfg = from_dict(job["config"], job["where"])
    (result,) = train_run(cfg, parse_location(job["store"]), parse_location(job["run"]), block=job["block"],
                          progress=job["progress"], activation_checkpointing=job["activation_checkpointing"])
    if os.environ.get("RANK", "0") == "0":
        Path(job_path).with_suffix(".result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1])
