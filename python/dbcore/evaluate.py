"""`dbcore eval`: accuracy and loss of a DiffusionBlocks run (sampler, one block at a time) or an
end-to-end run, on a data source."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dbcore import checkpoint
from dbcore.config import Config, from_dict
from dbcore.recipes.vit import ViTClassifier
from dbcore.sampler import sample_labels
from dbcore.sources import load_source
from dbcore.train import RunError, load_trained_block

EVAL_BATCH = 512


def load_run(run: Path) -> tuple[dict, Config]:
    path = run / "run.json"
    if not path.is_file():
        raise RunError(f"{run}: no run.json; is this a directory written by `dbcore train`?")
    info = json.loads(path.read_text())
    return info, from_dict(info["config"], str(path))


def _images(source) -> torch.Tensor:
    return torch.from_numpy(source.images).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)


def evaluate(run: Path, data: str, num_steps: int | None = None, decode: str | None = None) -> dict:
    """One JSON-able dict: accuracy and loss (CE of the prediction's scores) of a run on `data`."""
    info, cfg = load_run(run)
    decode = decode or cfg.train.decode
    trace: list[dict[str, torch.Tensor]] = []
    source = load_source(data)
    x, labels = _images(source), torch.from_numpy(source.labels)
    t0 = time.perf_counter()
    if info["kind"] == "e2e":
        tensors, _ = checkpoint.load(run / "e2e", prefix="model.")
        model = ViTClassifier(cfg.model)
        model.load_state_dict(tensors)
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(xb) for xb in x.split(EVAL_BATCH)])
        steps = None
    else:
        if info["kind"] == "paper-shared":
            from dbcore.paper_shared import load_shared

            shared = load_shared(run, cfg)

            def load_block(b: int):
                return shared.blocks[b]
        else:
            tensors, _ = checkpoint.load(run / "block0", prefix="model.")
            emb = tensors.get("target_embedding")
            if emb is None:
                raise RunError(f"{run}/block0: checkpoint lacks the target embedding")

            def load_block(b: int):
                return load_trained_block(run, cfg, b, emb)

        steps = num_steps or cfg.train.inference_steps or cfg.model.num_blocks
        _, logits = sample_labels(load_block, x, cfg.model, num_steps=steps, batch_size=EVAL_BATCH,
                                  seed=cfg.train.seed, decode=decode, trace=trace)
    pred = logits.argmax(dim=1)

    def acc(scores: torch.Tensor) -> float:
        return round(float((scores.argmax(dim=1) == labels).float().mean()), 6)

    per_block = [{"block": b, "accuracy_last": acc(t["last"]), "accuracy_product": acc(t["product"])}
                 for b, t in enumerate(trace)]
    return {
        "kind": info["kind"],
        "data": data,
        "num_samples": len(labels),
        "accuracy": float((pred == labels).float().mean()),
        "loss": float(F.cross_entropy(logits.float(), labels)),
        "inference_steps": steps,
        "decode": decode if info["kind"] != "e2e" else None,
        "seconds": round(time.perf_counter() - t0, 3),
        # along the chain: the accuracy of each block's last logits and of the product so far
        "per_block": per_block,
    }
