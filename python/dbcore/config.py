"""TOML run configuration: `[model]` (the recipe's config) and `[train]` (the trainer's).

Unknown keys are errors that name the file, the table and the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dbcore.errors import ConfigError
from dbcore.recipes import REGISTRY, recipe_class

PRECISIONS = ("auto", "bf16", "fp32")
CACHED_NOISE_FIELDS = ("num_blocks", "gamma", "sigma_dist")  # what cached noised targets depend on


@dataclass
class TrainConfig:
    steps: int = 1000  # per block; the end-to-end baseline gets the same number (equal compute)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    decay: Literal["matrices", "all"] = "matrices"  # AdamW decays Linear/Conv weights only, or all
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    weight: str = "none"  # loss weight mode, see dbcore.method.loss.WEIGHT_MODES
    weight_clamp: float = 100.0
    mode: Literal["independent", "sequential"] = "independent"
    sequential_fraction: float = 0.5  # share of each batch taken from the chain states
    mix_fraction: float = 0.0  # share of each batch with mixed target rows, see noise.mix_targets
    augment_crop: int = 0  # image recipes: random crop after padding this many zero pixels a side
    augment_flip: bool = False  # image recipes: horizontal flip with probability 1/2 (method.augment)
    inference_steps: int = 0  # Euler steps at evaluation; 0 means one per block
    decode: str = "last"  # the prediction: "last" step's logits or "product", see dbcore.method.sampler
    checkpoint_every: int = 200
    backend: str = "auto"  # noise and loss kernels: auto | torch | cupy
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere | bf16 | fp32 (master weights fp32)
    checkpoint_chunks: int = 1  # with activation checkpointing: recompute each layer over this many
    # slices of the batch, dividing a recomputed layer's working set by about as many (layers.checkpointed)
    shuffle_window_mb: float = 0.0  # the stream's shuffle window in MiB of decoded rows (whole
    # chunks, at least one batch); 0: at least 4 chunks and 4096 rows, at most 128 MiB (data.stream)
    cache_limit_gb: float = -1.0  # s3:// stores: the local disk cache's limit in GiB (0: no cache);
    # -1: DBCORE_CACHE_LIMIT, else 32 GiB (data.store.configure_cache)
    compile: bool = False  # torch.compile the model (nn.Module.compile: parameter names unchanged)
    ray_cpus: float = 1.0  # `--ray`: CPUs each block's worker asks for
    ray_gpus: float = 0.0  # `--ray`: GPUs each block's worker asks for
    ray_memory_gb: float = 0.0  # `--ray`: memory each block's worker reserves; 0 = no reservation
    ray_workers: int = 1  # `--ray`: processes per block, data-parallel under torchrun in its task

    @property
    def augments(self) -> bool:
        """Whether image recipes augment their training images (`augment_crop`, `augment_flip`)."""
        return bool(self.augment_crop or self.augment_flip)

    def __post_init__(self) -> None:
        from dbcore.method.sampler import DECODES

        if self.decay not in ("matrices", "all"):
            raise ValueError(f"decay must be 'matrices' or 'all', got {self.decay!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.augment_crop < 0:
            raise ValueError(f"augment_crop must be >= 0, got {self.augment_crop}")
        if self.checkpoint_chunks < 1:
            raise ValueError(f"checkpoint_chunks must be >= 1, got {self.checkpoint_chunks}")
        if self.shuffle_window_mb < 0:
            raise ValueError(f"shuffle_window_mb must be >= 0, got {self.shuffle_window_mb}")
        if self.cache_limit_gb < 0 and self.cache_limit_gb != -1:
            raise ValueError(f"cache_limit_gb must be >= 0 (or -1: the environment's), "
                             f"got {self.cache_limit_gb}")
        if min(self.ray_cpus, self.ray_gpus, self.ray_memory_gb) < 0:
            raise ValueError("ray_cpus, ray_gpus and ray_memory_gb must be >= 0")
        if self.ray_workers < 1:
            raise ValueError(f"ray_workers must be >= 1, got {self.ray_workers}")


@dataclass
class Config:
    recipe: str
    model: Any  # the recipe's config dataclass (its `config_class`)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"recipe": self.recipe, **dataclasses.asdict(self.model)},
            "train": dataclasses.asdict(self.train),
        }

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the whole model table (recorded in checkpoints)."""
        return _sha256_json(self.to_dict()["model"])

    def window_bytes(self) -> int | None:
        """`[train] shuffle_window_mb` in bytes; None for the stream's default window."""
        mb = self.train.shuffle_window_mb
        return int(mb * 2**20) if mb > 0 else None

    def cache_fields(self, noise_cached: bool) -> dict[str, Any]:
        """The [model] values a cache depends on: the recipe's `cache_fields`, and the schedule
        when it holds noised targets. Depth, gate_init and the like are not among them."""
        names = recipe_class(self.recipe).cache_fields + (CACHED_NOISE_FIELDS if noise_cached else ())
        model = dataclasses.asdict(self.model)
        return {"recipe": self.recipe, **{k: model[k] for k in names}}

    def cache_fingerprint(self, noise_cached: bool) -> str:
        """sha256 of `cache_fields`: what a store and a training config must agree on."""
        return _sha256_json(self.cache_fields(noise_cached))


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def from_dict(data: dict[str, Any], where: str = "<config>") -> Config:
    extra = sorted(set(data) - {"model", "train"})
    if extra:
        raise ConfigError(f"{where}: unknown table(s) {extra}; expected [model] and [train]")
    model = dict(data.get("model", {}))
    recipe = model.pop("recipe", "vit")
    if recipe not in REGISTRY:
        raise ConfigError(f"{where} [model] recipe: expected one of {sorted(REGISTRY)}, found {recipe!r}")
    return _checked(Config(
        recipe=recipe,
        model=_build(recipe_class(recipe).config_class, model, f"{where} [model]"),
        train=_build(TrainConfig, dict(data.get("train", {})), f"{where} [train]"),
        source_path=where,
    ), where)


def _checked(cfg: Config, where: str) -> Config:
    """Refuse what the recipe cannot do with these tables."""
    if cfg.train.augments and recipe_class(cfg.recipe).augmented is None:
        raise ConfigError(f"{where} [train] augment_crop, augment_flip: recipe {cfg.recipe!r} has no images "
                          "to augment")
    return cfg


def with_overrides(cfg: Config, where: str = "overrides", **tables: dict[str, Any]) -> Config:
    """A copy of `cfg` with some values of its tables replaced (`train={...}`, `model={...}`;
    None values are skipped), checked as the TOML's are: an unknown key or a bad value is a
    ConfigError naming the table and the key. `cfg` itself is never changed."""
    extra = sorted(set(tables) - {"model", "train"})
    if extra:
        raise ConfigError(f"{where}: unknown table(s) {extra}; expected model and train")
    changed = {}
    for table, values in tables.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            current = getattr(cfg, table)
            changed[table] = _build(type(current), {**dataclasses.asdict(current), **values},
                                    f"{where} [{table}]")
    return _checked(dataclasses.replace(cfg, **changed), where) if changed else cfg


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(data, str(path))
