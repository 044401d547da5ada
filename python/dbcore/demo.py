"""The main job on the embedded default: cache -> train -> eval on scikit-learn's digits, with the
end-to-end baseline of the same architecture beside DiffusionBlocks.

    python -m dbcore.demo configs/vit_digits.toml --workdir demo
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dbcore import config as config_mod
from dbcore.data.cache import write_cache
from dbcore.data.sources import load_source
from dbcore.data.store import open as open_store
from dbcore.runs.evaluate import evaluate
from dbcore.runs.train import train_run


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workdir", default=Path("demo"), type=click.Path(file_okay=False, path_type=Path))
def main(config: Path, workdir: Path) -> None:
    cfg = config_mod.load(config)
    workdir.mkdir(parents=True, exist_ok=True)
    store_path = workdir / "digits_train.zarr"
    click.echo(f"[1/4] cache digits:train -> {store_path}")
    write_cache(cfg, load_source("digits:train"), store_path, overwrite=True, progress=False)
    click.echo(f"      {sorted(open_store(store_path).arrays())}")
    click.echo(f"[2/4] train the end-to-end baseline ({cfg.train.steps} steps)")
    train_run(cfg, store_path, workdir / "run_e2e", e2e=True, progress=True)
    click.echo(f"[3/4] train {cfg.model.num_blocks} blocks, one at a time ({cfg.train.steps} steps each)")
    train_run(cfg, store_path, workdir / "run_blocks", progress=True)
    click.echo("[4/4] evaluate on digits:valid")
    e2e = evaluate(workdir / "run_e2e", "digits:valid")
    blocks = evaluate(workdir / "run_blocks", "digits:valid")
    click.echo(f"{'model':<28}{'accuracy':>10}{'loss':>10}")
    click.echo(f"{'end-to-end ViT':<28}{e2e['accuracy']:>10.4f}{e2e['loss']:>10.4f}")
    name = f"DiffusionBlocks (B={cfg.model.num_blocks})"
    click.echo(f"{name:<28}{blocks['accuracy']:>10.4f}{blocks['loss']:>10.4f}")
    (workdir / "results.json").write_text(json.dumps({"e2e": e2e, "blocks": blocks}, indent=2))


if __name__ == "__main__":
    main()
