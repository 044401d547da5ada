"""The Python API: what the `dbcore` command line does, as plain functions for data pipelines.

    from dbcore import api

    cfg = api.config({"model": {"recipe": "vit", "dim": 32, "depth": 2, "heads": 2}, "train": {"steps": 200}})
    store = api.cache(cfg, batches, "digits.zarr")  # a spec like "digits:train", a Source, or batches
    api.train(cfg, store, "run")                     # every block in turn, one in memory at a time
    print(api.evaluate("run", "digits:valid")["accuracy"])

`batches` is any iterable of dicts {"images": uint8 (n,H,W) or (n,H,W,C), "labels": integer (n,)}
of NumPy arrays or tensors: a generator, a torch DataLoader, a Ray Dataset's
`iter_batches(batch_format="numpy")`. They are spilled to temporary memmaps next to the store (never
held in memory as a whole) and removed afterwards. Errors are the library's own typed exceptions
(ConfigError, SourceError, StoreError, RunError, CheckpointError, ValueError), as the CLI prints them.

Import the module (`from dbcore import api`), not its names: `config`, `cache`, `train` and
`evaluate` are also the names of dbcore's modules, so `dbcore` itself does not export them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dbcore import config as config_mod
from dbcore.config import Config
from dbcore.data.decode import ImageFormat
from dbcore.data.hf_dataset import is_hf_dataset
from dbcore.data.images import Source, load_dataset, spill
from dbcore.data.location import is_url, parse_location
from dbcore.data.sources import image_format, load_source, load_source_for
from dbcore.data.text import TextSource
from dbcore.errors import SourceError
from dbcore.wording import arg

__all__ = ["cache", "config", "evaluate", "sample_images", "sample_text", "train"]

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- the steps of a run


def config(path_or_dict: PathLike | Mapping[str, Any]) -> Config:
    """A Config from a TOML file or a dict {"model": {...}, "train": {...}} (the same tables)."""
    if isinstance(path_or_dict, Mapping):
        return config_mod.from_dict(copy.deepcopy(dict(path_or_dict)))
    if isinstance(path_or_dict, (str, os.PathLike)):
        return config_mod.load(path_or_dict)
    raise TypeError(f"config: expected a TOML path or a dict, found {type(path_or_dict).__name__}")


def cache(cfg: Config, data: Any, out: PathLike, *, noise: Literal["online", "cached"] = "online",
          draws: int = 1, seed: int = 0, overwrite: bool = False, progress: bool = False,
          target_embedding: np.ndarray | None = None, ray: bool = False, address: str | None = None,
          tasks: int | None = None, break_lock: bool = False) -> Path:
    """Write the cache store `out` for `cfg` (as `dbcore cache`) and return its path.

    `data`: a source spec ("digits:train", "npz:PATH", "tar:PATTERN", "folder:DIR",
    "parquet:PATTERN[#IMAGE,LABEL]", "text:PATTERN", "jsonl:PATTERN[#FIELD]", "parquet:PATTERN[#COLUMN]"),
    a Source or TextSource, a Hugging Face `datasets.Dataset` with an Image column (its encoded
    images decoded to the config's size; the label column a ClassLabel, whose names are kept, or
    `label`), or an iterable of {"images", "labels"} batches (see the module docs; one such dict
    works too).
    `noise="cached"` also stores `draws` noised targets per sample and block; `target_embedding`:
    frozen rows E (num_classes, dim) instead of seeded random ones. `ray`: written by `tasks` Ray
    tasks (default: one per CPU) on the cluster at `address` (default: a local instance), from a
    source spec that every worker can load. `break_lock`: take over the writer lock of an `s3://`
    store that another process holds (one that was killed; an expired lock is taken anyway).
    """
    from dbcore.data.cache import write_cache

    if (address is not None or tasks is not None) and not ray:
        raise ValueError(f"{arg('address')} and {arg('tasks')} need {arg('ray')}")
    out = parse_location(out)
    if ray:
        from dbcore.runs.distributed import cache_on_ray

        if not isinstance(data, str):
            raise TypeError(f"cache(ray=True) needs a source spec that every worker can load, "
                            f"found {type(data).__name__}")
        cache_on_ray(cfg, data, out, noise=noise, draws=draws, seed=seed, overwrite=overwrite,
                     target_embedding=target_embedding, address=address, tasks=tasks, progress=progress,
                     break_lock=break_lock)
        return out
    with _opened(data, *_scratch_beside(out), cfg) as source:
        write_cache(cfg, source, out, noise=noise, draws=draws, seed=seed, overwrite=overwrite,
                    progress=progress, target_embedding=target_embedding, break_lock=break_lock)
    return out


def train(cfg: Config, store: PathLike, out: PathLike, *, block: int | None = None, e2e: bool = False,
          steps: int | None = None, mode: str | None = None, backend: str | None = None,
          activation_checkpointing: bool = False, checkpoint_chunks: int | None = None,
          frozen_prelude: PathLike | None = None, shuffle_window_mb: float | None = None,
          paper_shared: bool = False, progress: bool = False,
          ray: bool = False, address: str | None = None, cpus_per_block: float | None = None,
          gpus_per_block: float | None = None, memory_per_block: float | None = None,
          workers_per_block: int | None = None, echo: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every block of `cfg` in turn from `store` into the run directory `out`, or one `block`
    (0 = highest noise), or with `e2e` the end-to-end baseline, or (`paper_shared`, for comparison
    only) the paper's shared layout. Returns one result dict per model trained; an interrupted run
    resumes where it stopped when called again.

    Overrides of the config for this call only (`cfg` is never changed), checked as its TOML is:
    `steps`, `mode`, `backend`, `checkpoint_chunks` (with `activation_checkpointing`: each layer
    recomputed over that many slices of the batch), `frozen_prelude` (looped: a finished run whose
    prelude is frozen), `shuffle_window_mb` (the stream's shuffle window in MiB of decoded rows).
    `ray`: every unfinished block a Ray task on the cluster at `address` (default: a local
    instance), with `workers_per_block` processes each (data-parallel under torchrun inside the
    task), each asking for `cpus_per_block`, `gpus_per_block` and `memory_per_block` GiB (default:
    the config's); `echo` gets each block's result as it ends."""
    from dbcore.runs.train import train_run

    if steps is not None and steps < 1:
        raise ValueError(f"{arg('steps')} must be >= 1, found {steps}")
    if checkpoint_chunks is not None and not activation_checkpointing:
        raise ValueError(f"{arg('checkpoint_chunks')} needs {arg('activation_checkpointing')}")
    if frozen_prelude is not None and not hasattr(cfg.model, "frozen_prelude"):
        raise ValueError(f"{arg('frozen_prelude')}: recipe {cfg.recipe!r} has no prelude (looped only)")
    if ray and (e2e or paper_shared):
        raise ValueError(f"{arg('ray')} trains the blocks; train the baseline ({arg('e2e')}) and "
                         f"{arg('paper_shared')} without it")
    if address is not None and not ray:
        raise ValueError(f"{arg('address')} needs {arg('ray')}")
    if workers_per_block is not None and not ray:
        raise ValueError(f"{arg('workers_per_block')} needs {arg('ray')} (without Ray: torchrun)")
    if ray and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{arg('ray')} starts its own processes: run it without torchrun")
    prelude = None if frozen_prelude is None else str(Path(frozen_prelude).resolve())
    cfg = config_mod.with_overrides(
        cfg, where="train", model={"frozen_prelude": prelude},
        train={"steps": steps, "mode": mode, "backend": backend, "checkpoint_chunks": checkpoint_chunks,
               "shuffle_window_mb": shuffle_window_mb,
               "ray_cpus": cpus_per_block, "ray_gpus": gpus_per_block, "ray_memory_gb": memory_per_block,
               "ray_workers": workers_per_block})
    if ray:
        from dbcore.runs.distributed import train_blocks_on_ray

        blocks = None if block is None else [block]
        return train_blocks_on_ray(cfg, parse_location(store), parse_location(out), blocks,
                                   address=address, progress=progress, echo=echo or (lambda result: None),
                                   activation_checkpointing=activation_checkpointing)
    return train_run(cfg, parse_location(store), parse_location(out), block=block, e2e=e2e,
                     activation_checkpointing=activation_checkpointing, progress=progress,
                     paper_shared=paper_shared)


def evaluate(run: PathLike, data: Any, *, steps: int | None = None, num_samples: int | None = None,
             decode: str | None = None, **options: Any) -> dict:
    """The recipe's report of a run on `data` (as `dbcore eval --json`): accuracy and loss of a
    classifier, FID and class accuracy of a generator, bits per token and per byte of a
    language model (and per character with the `char` tokenizer).

    `data`: a source spec, a Source or TextSource, or an iterable of image batches (as for `cache`).
    `steps`: sampler steps in all (default: the run's); `num_samples`: generator samples for FID,
    or LM windows; `decode`: "last" or "product" (classifier). Other options go to the recipe:
    `cfg_scale`, `sampler` ("euler", "heun" or "ancestral"), `eval_chains` (AR and looped LMs),
    `exact` (AR and looped LMs, ancestral: every level summed exactly, not stratified).
    """
    from dbcore.runs.evaluate import evaluate as evaluate_run

    run = parse_location(run)
    if isinstance(data, str):
        return evaluate_run(run, data, steps, decode, num_samples=num_samples, **options)
    with _opened(data, *_scratch_beside(run)) as source:
        if isinstance(source, TextSource):
            return evaluate_run(run, source.spec, steps, decode, num_samples=num_samples, **options)
        folder = _scratch(*_scratch_beside(run), "eval")  # the recipes read images by spec: an npz
        try:
            path = folder / "data.npz"
            np.savez(path, images=source.images, labels=source.labels)
            result = evaluate_run(run, f"npz:{path}", steps, decode, num_samples=num_samples, **options)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {**result, "data": source.spec}


def sample_images(run: PathLike, *, num: int = 16, label: int | None = None,
                  cfg_scale: float | None = None, steps: int | None = None, seed: int | None = None,
                  sampler: str | None = None) -> np.ndarray:
    """uint8 (num, H, W, C) samples of an image-generating run (the DiT recipe), as `dbcore sample`.

    With `label`, every sample is of that class; without, classes cycle 0..K-1 (grouped by class,
    num // K of each, when num is a multiple of K). Defaults come from the run's config and seed.
    """
    from dbcore.runs.report import sample_run

    _check_num(num)
    images, _, _ = sample_run(parse_location(run), num, label, cfg_scale, steps, seed, sampler)
    return images


def sample_text(run: PathLike, *, num: int = 1, length: int | None = None, prompt: str | None = None,
                prompts: str | Sequence[str] | None = None, **options: Any) -> list[str]:
    """`num` texts of a language-model run, as `dbcore sample`: `length` tokens each (characters
    with a character vocabulary), prompt included (default: the config's seq_len; any length past
    it, the next-token LMs sliding their window, the MDLM window by window). `prompts`: a corpus
    spec ("jsonl:PROMPTS.jsonl", "text:DIR/*.txt", ...) whose every document is a prompt, or a list
    of prompts: `num` texts of each, prompt after prompt. Options: `steps`, `seed`,
    `temperature`, `top_k`, `greedy`, and recipe-specific ones."""
    from dbcore.data.documents import document_texts
    from dbcore.runs.evaluate import sample_text_run

    _check_num(num)
    if prompts is not None and prompt is not None:
        raise ValueError(f"give {arg('prompt')} or {arg('prompts')}, not both")
    if prompts is None:
        prompts = [prompt]
    elif isinstance(prompts, str):
        prompts = document_texts(prompts)
    run = parse_location(run)
    return [text for p in prompts
            for text in sample_text_run(run, {"num": num, "length": length, "prompt": p, **options})]


def _check_num(num: int) -> None:
    if num < 1:
        raise ValueError(f"num must be >= 1, found {num}")


# ----------------------------------------------------------------------------- data as a source


def _scratch(parent: Path, name: str, what: str) -> Path:
    """A new hidden temporary folder in `parent` (created if missing), named after `name`."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{what}-", dir=parent))


def _scratch_beside(where: str | Path) -> tuple[Path, str]:
    """(folder, name) for scratch files of a store or run: beside a local one, in the temporary
    folder for an s3:// one."""
    if is_url(where):
        return Path(tempfile.gettempdir()), "dbcore-" + hashlib.sha256(str(where).encode()).hexdigest()[:12]
    return Path(where).parent, Path(where).name


@contextmanager
def _opened(data: Any, parent: Path, name: str, cfg: Config | None = None) -> Iterator[Source | TextSource]:
    """`data` as a source (a spec as `cfg` caches it); batches are spilled to a temporary folder in
    `parent`, removed on exit."""
    if isinstance(data, str):
        source = load_source(data) if cfg is None else load_source_for(cfg, data)
        try:
            yield source
        finally:
            source.close()
        return
    if isinstance(data, (Source, TextSource)):
        yield data
        return
    if is_hf_dataset(data):  # its encoded images, decoded as files are (never by `datasets`)
        folder = _scratch(parent, name, "spill")
        fmt = ImageFormat() if cfg is None else image_format(cfg.model) or ImageFormat()
        try:
            with closing(load_dataset(data, fmt, scratch=folder)) as source:
                yield source
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if isinstance(data, Mapping):  # one batch
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a source spec ('digits:train', 'npz:PATH', 'text:PATH'), a Source, "
                        f"or an iterable of {{'images', 'labels'}} batches; found {type(data).__name__}")
    folder = _scratch(parent, name, "spill")
    try:
        yield _spill(data, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spill(batches: Iterable[Any], folder: Path) -> Source:
    """Validate each batch and append its rows to memmaps in `folder`."""
    return spill("iterable", _checked_batches(batches), folder)


def _checked_batches(batches: Iterable[Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    first_shape: tuple[int, ...] | None = None
    count = rows = 0
    for i, batch in enumerate(batches):
        x, y = _checked_batch(i, batch)
        if first_shape is None:
            first_shape = x.shape[1:]
        elif x.shape[1:] != first_shape:
            raise SourceError(f"batch {i}: field 'images' has rows of shape {x.shape[1:]} (H, W, C), "
                              f"expected {first_shape} as in batch 0")
        count, rows = i + 1, rows + len(x)
        if len(x):
            yield x, y
    if rows == 0:
        raise SourceError(f"the data holds no rows ({count} batches): expected batches with fields "
                          "'images' and 'labels'")


def _checked_batch(i: int, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, C), labels int64 (n,)) of batch `i`, or a SourceError naming it."""
    if not isinstance(batch, Mapping):
        if isinstance(batch, str):
            raise SourceError(f"batch {i}: found a str; iterables of text are not supported, write the "
                              "text to a UTF-8 file and pass 'text:PATH'")
        raise SourceError(f"batch {i}: expected a dict with fields 'images' and 'labels', "
                          f"found {type(batch).__name__}")
    for key in ("images", "labels"):
        if key not in batch:
            raise SourceError(f"batch {i}: missing field {key!r}; found fields {sorted(map(str, batch))}")
    images, labels = _numpy(batch["images"]), _numpy(batch["labels"])
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise SourceError(f"batch {i}: field 'images' must be uint8 (n,H,W) or (n,H,W,C), "
                          f"found {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"batch {i}: field 'labels' must be integer (n,), "
                          f"found {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise SourceError(f"batch {i}: field 'images' has {len(images)} rows, field 'labels' {len(labels)}")
    if len(labels) and labels.min() < 0:
        raise SourceError(f"batch {i}: field 'labels' must be non-negative, found {labels.min()}")
    return (images[..., None] if images.ndim == 3 else images), labels.astype(np.int64, copy=False)


def _numpy(value: Any) -> np.ndarray:
    """A NumPy array of a batch field: an array, a tensor (any device), or a list."""
    if hasattr(value, "detach"):  # torch: off the autograd graph and onto the host
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)
