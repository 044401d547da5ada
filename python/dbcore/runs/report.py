"""`dbcore sample` and `dbcore report`: sample grids and loss curves as PNG files (matplotlib).

A user should be able to look, not read: `report` draws the training loss of every block of a run
(and of a baseline run beside it) and, for a recipe that generates, a grid of samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dbcore.method.options import Options
from dbcore.recipes import for_config
from dbcore.runs import mirror, rundir
from dbcore.runs.evaluate import block_loader, load_e2e, load_run
from dbcore.wording import arg

GRID_MIN_WIDTH = 512  # pixels: a grid of 10 8x8 samples a row is 80 wide, upscaled 7x


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*H, cols*W, C) image, cells left to right, top to bottom."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return grid


def upscaled(grid: np.ndarray, min_width: int = GRID_MIN_WIDTH) -> np.ndarray:
    """(H, W, C) -> the same image, each pixel repeated k x k times (nearest neighbour), k the
    smallest whole factor that makes it at least `min_width` pixels wide."""
    k = max(1, -(-min_width // grid.shape[1]))
    return grid.repeat(k, axis=0).repeat(k, axis=1)


def save_grid(images: np.ndarray, rows: int, out: Path) -> None:
    """The samples as one PNG grid, upscaled to at least `GRID_MIN_WIDTH` pixels wide."""
    from PIL import Image

    grid = upscaled(image_grid(images, rows))
    fmt = Image.registered_extensions().get(Path(out).suffix.lower(), "PNG")  # PNG unless named otherwise
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(out, format=fmt)


@mirror.mirrored("run")
def sample_run(run: Path, num: int = 100, class_: int | None = None, cfg_scale: float | None = None,
               num_steps: int | None = None, seed: int | None = None, sampler: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 samples (N, H, W, C), their classes (N,), rows of the grid) of a generating run:
    rows per class when no class is given."""
    info, cfg = load_run(run)
    recipe = for_config(cfg)
    if not recipe.generates:
        raise rundir.RunError(f"run {run}: recipe {cfg.recipe!r} does not generate samples")
    k = cfg.model.num_classes
    if class_ is not None:
        if not 0 <= class_ < k:
            raise ValueError(f"{arg('label', class_)} is outside 0..{k - 1}")
        labels, rows = torch.full((num,), class_), max(1, int(round(num ** 0.5)))
    else:
        labels, rows = torch.arange(num) % k, k
        labels = labels.view(-1, k).T.reshape(-1) if num % k == 0 else labels
    opts = Options.of({"steps": num_steps, "cfg_scale": cfg_scale, "seed": seed, "sampler": sampler})
    if info["kind"] == "e2e":
        x = recipe.sample(None, load_e2e(run, recipe), labels, opts)
    else:
        x = recipe.sample(block_loader(run, info["kind"], recipe), None, labels, opts)
    return recipe.to_images(x), labels.numpy(), rows


def plot_losses(runs: list[Path], out: Path) -> None:
    """Loss against step of every trained part (block0.., e2e, shared) of each run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        by_name: dict[str, list[tuple[int, float]]] = {}
        for r in rundir.read_metrics(run):
            by_name.setdefault(r["name"], []).append((r["step"], r["loss"]))
        for name, pts in sorted(by_name.items()):
            steps, losses = zip(*sorted(pts), strict=True)
            ax.plot(steps, losses, label=f"{Path(run).name}: {name}", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over the logging window)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@mirror.mirrored("run")
@mirror.mirrored("baseline")
def report(run: Path, out_dir: Path, baseline: Path | None = None, num: int = 100) -> list[Path]:
    """Write `losses.png` (and `samples.png` for a generating recipe) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "losses.png"]
    plot_losses([run] + ([baseline] if baseline else []), written[0])
    _, cfg = load_run(run)
    if for_config(cfg).generates:
        for r, name in [(run, "samples.png")] + ([(baseline, "baseline_samples.png")] if baseline else []):
            images, _, rows = sample_run(r, num=num)
            save_grid(images, rows, out_dir / name)
            written.append(out_dir / name)
    return written
