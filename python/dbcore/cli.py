"""The `dbcore` command line: cache -> train -> eval, and store inspection."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dbcore import __version__
from dbcore.wording import cli_wording


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dbcore")
def main() -> None:
    """Train deep networks one block at a time with DiffusionBlocks."""


class _Fail(click.ClickException):
    """A user-facing error: printed as one line, exit code 1, no traceback."""


class _Location(click.ParamType):
    """A store or run: a local path (a Path) or an `s3://bucket/prefix` URL (kept as a string)."""

    name = "location"

    def get_metavar(self, *args, **kwargs):
        return "PATH|s3://BUCKET/PREFIX"

    def convert(self, value, param, ctx):
        from dbcore.data.location import parse_location

        return parse_location(value) if isinstance(value, str) else value


LOCATION = _Location()


def _user_errors():
    from dbcore.data.store import StoreError
    from dbcore.errors import CheckpointError, ConfigError, RunError, SourceError

    return (ConfigError, SourceError, StoreError, RunError, CheckpointError, FileExistsError, ValueError)


def _run_safely(fn, *args, **kwargs):
    """Run fn, turning a user-facing error into one line; DBCORE_DEBUG=1 keeps the traceback."""
    try:
        with cli_wording():
            return fn(*args, **kwargs)
    except _user_errors() as exc:
        if os.environ.get("DBCORE_DEBUG"):
            raise
        raise _Fail(str(exc)) from None


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "source", default="digits:train", show_default=True,
              help="digits[:train|:valid], npz:PATH, or a text corpus: text:PATTERN, "
                   "jsonl:PATTERN[#FIELD], parquet:PATTERN[#COLUMN] (a file, a glob, local or s3://)")
@click.option("--out", required=True, type=LOCATION, help="store to write")
@click.option("--noise", type=click.Choice(["online", "cached"]), default="online", show_default=True)
@click.option("--draws", default=4, show_default=True, help="noised draws per sample per block (cached)")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing store")
@click.option("--target-embedding", "emb_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=".npy (num_classes, dim) float rows E; default: seeded random unit rows")
@click.option("--ray", "use_ray", is_flag=True, help="write the store's shards in parallel Ray tasks")
@click.option("--address", default=None, help="with --ray: a running Ray cluster (default: start one here)")
@click.option("--tasks", type=int, default=None, help="with --ray: number of tasks (default: one per CPU)")
@click.option("--break-lock", is_flag=True,
              help="s3://: take over the writer lock a killed `cache` left (an expired one is taken anyway)")
def cache(config, source, out, noise, draws, seed, overwrite, emb_path, use_ray, address, tasks, break_lock):
    """Write inputs, targets, target embedding and schedule (and noised targets) to a store."""
    import numpy as np

    from dbcore import api
    from dbcore.data import store

    cfg = _run_safely(api.config, config)
    emb = _run_safely(np.load, emb_path, allow_pickle=False) if emb_path else None
    _run_safely(api.cache, cfg, source, out, noise=noise, draws=draws, seed=seed, overwrite=overwrite,
                progress=True, target_embedding=emb, ray=use_ray, address=address, tasks=tasks,
                break_lock=break_lock)
    attrs = _run_safely(store.open, out).attrs
    text = attrs.get("text")
    if text:
        docs = text["num_documents"]
        what = (f"{text['num_tokens']} tokens ({text['tokenizer']}, {text['vocab_size']} in the vocabulary) "
                f"of {docs} document{'s' * (docs != 1)}")
    else:
        what = f"{attrs['source']['num_samples']} samples"
    click.echo(f"cached {what} of {source} into {out} (noise: {noise})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_path", required=True, type=LOCATION)
@click.option("--out", "run", required=True, type=LOCATION, help="run directory")
@click.option("--block", type=int, default=None, help="train only this block (0 = highest noise)")
@click.option("--e2e", is_flag=True, help="train the end-to-end baseline of the same architecture")
@click.option("--activation-checkpointing", is_flag=True,
              help="checkpoint every layer (of each block, or with --e2e of the baseline)")
@click.option("--checkpoint-chunks", type=click.IntRange(min=1), default=None,
              help="override [train] checkpoint_chunks: slices of the batch each layer recomputes over")
@click.option("--paper-shared", is_flag=True,
              help="for comparison only: the paper's layout (shared embeddings and head, one "
              "optimizer, a random block per step)")
@click.option("--steps", type=int, default=None, help="override [train] steps")
@click.option("--mode", type=click.Choice(["independent", "sequential"]), default=None,
              help="override [train] mode")
@click.option("--backend", type=click.Choice(["auto", "torch", "cupy"]), default=None)
@click.option("--freeze-prelude", "prelude_run", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="looped: freeze the prelude of this finished run; its outputs are cached in the store")
@click.option("--shuffle-window-mb", type=float, default=None,
              help="override [train] shuffle_window_mb: the shuffle window in MiB of decoded rows")
@click.option("--ray", "use_ray", is_flag=True, help="every block a Ray task (unfinished blocks only)")
@click.option("--address", default=None, help="with --ray: a running Ray cluster (default: start one here)")
@click.option("--cpus-per-block", type=float, default=None, help="with --ray: override [train] ray_cpus")
@click.option("--gpus-per-block", type=float, default=None, help="with --ray: override [train] ray_gpus")
@click.option("--memory-per-block", type=float, default=None, help="with --ray: GiB, override ray_memory_gb")
@click.option("--workers-per-block", type=click.IntRange(min=1), default=None,
              help="with --ray: processes per block, data-parallel (torchrun in the task); the "
                   "resources above are per process; override ray_workers")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train(config, store_path, run, block, e2e, activation_checkpointing, checkpoint_chunks, paper_shared,
          steps, mode, backend, prelude_run, shuffle_window_mb, use_ray, address, cpus_per_block,
          gpus_per_block, memory_per_block, workers_per_block, quiet):
    """Train every block in turn (one in memory at a time), one block, or the --e2e baseline."""
    from dbcore import api

    cfg = _run_safely(api.config, config)
    results = _run_safely(
        api.train, cfg, store_path, run, block=block, e2e=e2e, steps=steps, mode=mode, backend=backend,
        activation_checkpointing=activation_checkpointing, checkpoint_chunks=checkpoint_chunks,
        frozen_prelude=prelude_run, shuffle_window_mb=shuffle_window_mb, paper_shared=paper_shared,
        progress=not quiet, ray=use_ray,
        address=address, cpus_per_block=cpus_per_block, gpus_per_block=gpus_per_block,
        memory_per_block=memory_per_block, workers_per_block=workers_per_block,
        echo=lambda r: click.echo(json.dumps(r)))
    if not use_ray and os.environ.get("RANK", "0") == "0":  # Ray's were echoed as each block ended;
        for r in results:  # under torchrun rank 0 speaks for all
            click.echo(json.dumps(r))


@main.command("eval")
@click.argument("run", type=LOCATION, metavar="RUN")
@click.option("--data", "source", default="digits:valid", show_default=True)
@click.option("--steps", type=int, default=None, help="sampler steps in all (default: the run's)")
@click.option("--decode", type=click.Choice(["last", "product"]), default=None,
              help="classifier: the last step's logits or the product of every step's beliefs")
@click.option("--num-samples", type=int, default=None,
              help="generator: samples for FID (default 2000); LM: held-out windows (default all)")
@click.option("--cfg-scale", type=float, default=None, help="generator: guidance scale (default: config)")
@click.option("--sampler", type=click.Choice(["euler", "heun", "ancestral"]), default=None,
              help="Euler (the paper's); DiT: or Heun's second-order step; AR and looped LMs: or ancestral")
@click.option("--chains", type=click.IntRange(min=1), default=None,
              help="AR (Euler) and looped LMs: initial states per position, readouts averaged "
                   "(default: config)")
@click.option("--exact", is_flag=True,
              help="AR and looped LMs, ancestral: sum every level over all its likely tokens (cost "
                   "grows with the vocabulary) instead of the stratified estimate")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_(run, source, steps, decode, num_samples, cfg_scale, sampler, chains, exact, as_json):
    """The recipe's report of a DiffusionBlocks or end-to-end run (accuracy; FID and class accuracy; BPC)."""
    from dbcore import api

    result = _run_safely(api.evaluate, run, source, steps=steps, decode=decode, num_samples=num_samples,
                         cfg_scale=cfg_scale, sampler=sampler, eval_chains=chains, exact=exact or None)
    if as_json:
        click.echo(json.dumps(result))
        return
    keys = ("accuracy", "loss", "fid", "class_accuracy", "fid_floor", "bpc", "bpc_stderr")
    shown = [f"{k} {result[k]:.4f}" for k in keys
             if isinstance(result.get(k), float)]
    count = f"{result['num_tokens']} tokens" if "num_tokens" in result else f"{result['num_samples']} samples"
    click.echo(f"{result['kind']}: {', '.join(shown)} on {count} of {source}")


@main.command()
@click.argument("run", type=LOCATION, metavar="RUN")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="images: the PNG grid (required); text: a file for the texts (default: print them)")
@click.option("--num", type=int, default=None, help="samples (default: 100 images, 1 text)")
@click.option("--class", "class_", type=int, default=None, help="images: one class (default: a row each)")
@click.option("--cfg-scale", type=float, default=None, help="images: guidance scale (default: the config's)")
@click.option("--steps", type=int, default=None, help="sampler steps in all (default: the config's)")
@click.option("--sampler", type=click.Choice(["euler", "heun", "ancestral"]), default=None)
@click.option("--seed", type=int, default=None, help="sampling seed (default: the run's)")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="images: also write the raw samples: images uint8 (N,H,W,C), labels")
@click.option("--length", type=int, default=None,
              help="text: tokens per text (characters with a character vocabulary), prompt included; "
                   "default the run's seq_len, any length past it")
@click.option("--prompt", default=None, help="text: the beginning of every text")
@click.option("--prompts", default=None,
              help="text: a corpus whose every document is a prompt (jsonl:FILE, text:GLOB, ...): --num each")
@click.option("--temperature", type=float, default=None, help="text: softmax temperature (default 1)")
@click.option("--top-k", type=int, default=None, help="text: sample among the k likeliest tokens")
@click.option("--greedy", is_flag=True, help="text: the likeliest token every time")
def sample(run, out, num, class_, cfg_scale, steps, sampler, seed, npz, length, prompt, prompts, temperature,
           top_k, greedy):
    """Samples of a generating run, one block in memory at a time: a PNG grid (DiT) or texts (LMs)."""
    import numpy as np

    from dbcore.recipes import for_config
    from dbcore.runs.evaluate import load_run

    if num is not None and num < 1:
        raise _Fail(f"--num must be >= 1, got {num}")
    _, cfg = _run_safely(load_run, run)
    if _run_safely(for_config, cfg).source_kind == "text":
        from dbcore import api

        texts = _run_safely(api.sample_text, run, num=num or 1, length=length, prompt=prompt, prompts=prompts,
                            steps=steps, seed=seed, temperature=temperature, top_k=top_k,
                            greedy=greedy or None, sampler=sampler)
        if out is None:
            for text in texts:
                click.echo(text)
                click.echo("-" * 40)
            return
        out.write_text("\n".join(texts) + "\n", encoding="utf-8")
        click.echo(f"wrote {len(texts)} texts to {out}")
        return
    if out is None:
        raise _Fail("--out PNG is required for images")
    from dbcore.runs.report import sample_run, save_grid

    images, labels, rows = _run_safely(sample_run, run, num or 100, class_, cfg_scale, steps, seed, sampler)
    save_grid(images, rows, out)
    if npz is not None:
        np.savez(npz, images=images, labels=labels)
    click.echo(f"wrote {len(images)} samples to {out}" + (f" and {npz}" if npz else ""))


@main.command()
@click.argument("run", type=LOCATION, metavar="RUN")
@click.option("--baseline", type=LOCATION, default=None,
              help="an end-to-end run to draw beside it")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the PNGs (default: RUN/report)")
@click.option("--num", type=int, default=100, show_default=True, help="samples in a generator's grid")
def report(run, baseline, out, num):
    """PNGs to look at: loss curves of every block (and the baseline), samples of a generator."""
    from dbcore.runs.report import report as write_report

    if out is None and isinstance(run, str):
        raise _Fail("--out FOLDER is required for an s3:// run")
    written = _run_safely(write_report, run, out or run / "report", baseline, num)
    for path in written:
        click.echo(f"wrote {path}")


@main.group()
def bench() -> None:
    """Measurements: training memory."""


@bench.command("memory")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="override [train] batch_size")
@click.option("--device", default="cpu", show_default=True)
@click.option("--allocator", type=click.Choice(["tight", "default"]), default="tight", show_default=True,
              help="CPU: tight = live tensor bytes (fixed mmap threshold); default = glibc as is")
@click.option("--checkpoint-chunks", type=click.IntRange(min=1), default=None,
              help="override [train] checkpoint_chunks of the checkpointed runs")
@click.option("--timed-steps", type=click.IntRange(min=0), default=None,
              help="steps timed after the measured ones (0: memory only; default runs.memory.TIMED_STEPS)")
@click.option("--store", "store_path", type=LOCATION, default=None,
              help="also the process: a short real `train` of the baseline and each block over this store")
@click.option("--process-steps", type=click.IntRange(min=1), default=None,
              help="with --store: steps of each short train (default runs.process_memory.PROCESS_STEPS)")
@click.option("--json", "as_json", is_flag=True)
def bench_memory(config, batch_size, device, allocator, checkpoint_chunks, timed_steps, store_path,
                 process_steps, as_json):
    """Peak training memory: end-to-end, with activation checkpointing, and each block."""
    from dbcore.runs.memory import TIMED_STEPS, measure_all
    from dbcore.runs.process_memory import PROCESS_STEPS, measure_process

    if process_steps is not None and store_path is None:
        raise _Fail("--process-steps needs --store")
    result = _run_safely(measure_all, config, batch_size=batch_size, device=device, allocator=allocator,
                         checkpoint_chunks=checkpoint_chunks,
                         timed_steps=TIMED_STEPS if timed_steps is None else timed_steps)
    if store_path is not None:
        result["process"] = _run_safely(measure_process, config, store_path, result["num_blocks"],
                                        process_steps or PROCESS_STEPS, allocator, device.split(":")[0])
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k}: {v}")
    sys.stdout.flush()


def _codecs_summary(codecs: list) -> str:
    parts = []
    for c in codecs:
        cfg = c.get("configuration") or {}
        if c["name"] == "sharding_indexed":
            parts.append(f"sharding[{_codecs_summary(cfg.get('codecs', []))}]")
        elif c["name"] == "zstd":
            parts.append(f"zstd:{cfg.get('level')}")
        else:
            parts.append(c["name"])
    return ",".join(parts)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("store_path", metavar="STORE", type=LOCATION)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def info(store_path, as_json):
    """Arrays (shape, dtype, chunks, codecs, bytes), attributes and state of a store."""
    from dbcore.data import store

    s = _run_safely(store.open, store_path, require_complete=False)
    arrays = {name: _run_safely(s.info, name).to_dict() for name in _run_safely(s.arrays)}
    if as_json:
        report = {"path": str(s.path), "complete": s.complete, "attrs": s.attrs, "arrays": arrays}
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{s.path}  ({'complete' if s.complete else 'INCOMPLETE: never finalized'})")
    click.echo(f"attributes: {json.dumps(s.attrs)}")
    head = ("array", "shape", "dtype", "chunks", "shards", "codecs", "memory", "disk", "ratio")
    rows = [head]
    for name, a in arrays.items():
        ratio = a["nbytes"] / a["nbytes_stored"] if a["nbytes_stored"] else 0.0
        rows.append((name, str(tuple(a["shape"])), a["dtype"], str(tuple(a["chunks"])),
                     str(tuple(a["shards"])) if a["shards"] else "-", _codecs_summary(a["codecs"]),
                     _size(a["nbytes"]), _size(a["nbytes_stored"]), f"{ratio:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
