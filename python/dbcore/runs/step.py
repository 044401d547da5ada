"""One training step, defined once: the loss of a batch (a block's, or the baseline's) and the
update it makes. Training, the paper-shared comparison and `dbcore bench memory` all run these.

    def loss():  # under the run's precision, as `update` calls it
        noised = block_noised(recipe, raw, batch, frozen, block, draw, seed, backend)
        return block_step_loss(recipe, model, batch, noised, backend)

    update(model, opt, loss, precision, grad_clip)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dbcore.config import TrainConfig
from dbcore.method import rng
from dbcore.method.augment import augment_images
from dbcore.method.batch import INDEX, UNIFORMS, Batch, Frozen, Noised
from dbcore.recipes.base import Recipe

NumpyBatch = dict[str, np.ndarray]  # a batch as the stream ships it (arrays, indices, draws)
Chain = tuple[torch.Tensor, torch.Tensor]  # (z (N, ...), sigma (N,)) handed by earlier blocks


def e2e_noise_key(num_blocks: int) -> int:
    """The generator's block id of a denoising baseline: B + 1, no network block's id (0..B-1)
    and not the sampler's initial noise (B)."""
    return num_blocks + 1


def drawn_here(index: np.ndarray, uniforms: int, seed: int, key: int, draw: int) -> NumpyBatch:
    """A batch's sample indices and the uniforms that the stream would ship for generator block
    `key` (`dbcore.method.rng`), drawn here: `Recipe.noise` then draws eps and sigma itself."""
    u = rng.uniforms_of(torch.from_numpy(index), uniforms, seed, key, draw)
    return {INDEX: index, UNIFORMS: u.numpy()}


def augmented(recipe: Recipe, batch: Batch, train: TrainConfig, epoch: int) -> Batch:
    """The batch with the recipe's images augmented as `[train] augment_*` say (`method.augment`)."""
    name = recipe.augmented
    if name is None or not train.augments:
        return batch
    images = augment_images(batch[name], batch[INDEX], train.seed, epoch, train.augment_crop,
                            train.augment_flip)
    return {**batch, name: images}


def block_noised(recipe: Recipe, raw: NumpyBatch, batch: Batch, frozen: Frozen, block: int, draw: int,
                 seed: int, backend: str, chain: Chain | None = None, chain_fraction: float = 0.0
                 ) -> Noised:
    """Block `block`'s noise of a batch at draw (epoch) `draw`, around the targets it learns; with
    `chain`, the first `chain_fraction` of the batch starts from the earlier blocks' states."""
    y = recipe.targets(batch, frozen)  # (B, ...)
    noised = recipe.noise(raw, y, block, draw, recipe.sigma_law(block), seed, backend)
    y_train = recipe.train_targets(y, batch, frozen, block, draw)
    if y_train is not y:  # e.g. target mixing: the same sigma * eps around the new target
        noised.z = noised.z + (y_train - y)
    if chain is not None:
        take = int(round(chain_fraction * len(y)))
        idx = batch[INDEX][:take].cpu()
        noised.z, noised.sigma = noised.z.clone(), noised.sigma.clone()
        noised.z[:take] = chain[0][idx].to(noised.z.device, noised.z.dtype)
        noised.sigma[:take] = chain[1][idx].to(noised.z.device)
    return noised


def block_step_loss(recipe: Recipe, model: nn.Module, batch: Batch, noised: Noised, backend: str
                    ) -> torch.Tensor:
    """The recipe's block loss of a batch, weighted by the run's loss weights of sigma."""
    return recipe.block_loss(model, batch, noised, recipe.loss_weights(noised), backend)


def e2e_noised(recipe: Recipe, raw: NumpyBatch, batch: Batch, frozen: Frozen, key: int, draw: int,
               seed: int, backend: str) -> Noised | None:
    """The baseline's noise over the whole range (None for a baseline that draws none)."""
    if not recipe.e2e_noise:
        return None
    y = recipe.targets(batch, frozen)
    return recipe.noise(raw, y, key, draw, recipe.e2e_law(), seed, backend)


def e2e_step_loss(recipe: Recipe, model: nn.Module, batch: Batch, noised: Noised | None, backend: str
                  ) -> torch.Tensor:
    """The recipe's baseline loss of a batch."""
    w = None if noised is None else recipe.loss_weights(noised)
    return recipe.e2e_loss(model, batch, noised, w, backend)


def precision_of(precision: str, device: torch.device) -> str:
    """The forward's precision that `[train] precision` gives on `device`: "bf16" for "bf16", and
    for "auto" on CUDA; "fp32" otherwise."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `precision_of` says bf16 (master weights, gradients and optimizer state
    stay fp32); no autocast otherwise."""
    if precision_of(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def update(model: nn.Module, opt: torch.optim.Optimizer, loss_of_batch: Callable[[], torch.Tensor],
           precision: str, grad_clip: float = 0.0) -> torch.Tensor:
    """One step: the loss under the run's precision, its gradients, clipping, the optimizer's step.
    Returns the loss (on the device, not synced)."""
    device = next(model.parameters()).device
    with autocast_for(precision, device):
        loss = loss_of_batch()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss
