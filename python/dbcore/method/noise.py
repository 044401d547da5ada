"""A block's noise for one batch: sigma from its law, z = y + sigma * eps (METHOD.md 2-3).

One path, three sources of the same counter-based draws keyed by (seed, sample, block, draw):
- cached: the store's `noised_z_b{b}` / `noised_sigma_b{b}` rows (draw `epoch % K`), written by
  `dbcore cache` through `noised_targets` below;
- online: the Gaussians and uniforms the Rust stream ships with each batch (draw = epoch);
- device: the CUDA noise kernel draws eps and sigma on the GPU (`dbcore.kernels.noise_and_input`),
  so the stream ships only the uniforms the device does not make.
All three give the same values; z is formed by `dbcore.method.edm.add_noise` (the kernel's CUDA twin).
"""

from __future__ import annotations

import numpy as np
import torch

from dbcore.kernels import noise_and_input
from dbcore.method import layout, rng
from dbcore.method.batch import EPS, INDEX, UNIFORMS, Noised, SigmaLaw
from dbcore.method.edm import add_noise
from dbcore.method.partition import sample_sigma_in_range


def noised_targets(
    y: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int, law: SigmaLaw,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, ...), sigma (N,) float32) from the generator, for clean targets y (N, ...) of
    samples `sample` (N,): the CUDA kernel on CUDA tensors, its PyTorch reference elsewhere."""
    z, _, sigma = noise_and_input(y, sample, seed, block, draw, *law, backend)
    return z, sigma


def block_noise(
    batch: dict[str, np.ndarray], y: torch.Tensor, block: int, draw: int, law: SigmaLaw, seed: int,
    backend: str = "torch",
) -> Noised:
    """The noise of a streamed batch for clean targets y (N, ...) on the training device."""
    dev = y.device
    uniforms = torch.from_numpy(batch[UNIFORMS]).to(dev) if UNIFORMS in batch else None
    zname = layout.noised_z(block)
    if zname in batch:  # cached
        z = torch.from_numpy(batch[zname]).to(dev, y.dtype).view(y.shape)
        sigma = torch.from_numpy(batch[layout.noised_sigma(block)]).to(dev)
        return Noised(z, sigma.float(), uniforms)
    if EPS in batch:  # online, from the stream
        if uniforms is None:
            raise ValueError("online noise needs the sigma uniform (uniforms >= 1) in the batch")
        sigma = sample_sigma_in_range(uniforms[:, 0].cpu(), *law)  # (N,) float64
        eps = torch.from_numpy(batch[EPS]).to(dev)
        return Noised(add_noise(y, sigma.to(dev), eps), sigma.float().to(dev), uniforms)
    # on the device: the kernel draws eps and sigma (bit-identical to the stream's)
    z, sigma = noised_targets(y, torch.from_numpy(batch[INDEX]), seed, block, draw, law, backend)
    return Noised(z, sigma, uniforms)


def mix_targets(
    emb: torch.Tensor, labels: torch.Tensor, sample: torch.Tensor, seed: int, block: int, draw: int,
    fraction: float,
) -> torch.Tensor:
    """Clean targets (N, d) with target mixing: for a share `fraction` of samples the target row
    becomes `alpha*E[label] + (1-alpha)*E[other]`, alpha ~ U(0, 1), `other` a random other class;
    the label stays. A block trained alone so meets the ambiguous states that earlier blocks hand
    over at inference (`softmax @ E` of an unsure block) and learns to overrule z with its input.
    Uniforms from the counter-based generator (group MIX_GROUP): reproducible and resumable."""
    y = emb[labels]  # (N, d)
    if fraction <= 0:
        return y
    v = emb.shape[0]
    u = rng.uniforms(sample.cpu(), seed, block, draw, rng.MIX_GROUP).float().to(emb.device)  # (N, 4)
    other = (labels + 1 + (u[:, 2] * (v - 1)).long().clamp(max=v - 2)) % v  # never the label
    alpha = u[:, 1:2]
    mixed = alpha * y + (1 - alpha) * emb[other]
    return torch.where((u[:, 0] < fraction)[:, None], mixed, y)


MIX_UNIFORMS_FROM = 8  # per-token mixing uses uniforms 8.. of a sample (0 picks sigma, 4..6 are ViT's mixing)


def mix_token_targets(emb: torch.Tensor, x: torch.Tensor, sample: torch.Tensor, seed: int, block: int,
                      draw: int, fraction: float) -> torch.Tensor:
    """Targets (N, T, d) with target mixing per token (as `mix_targets` per sample):
    for a share `fraction` of positions the row becomes alpha E[x_i] + (1 - alpha) E[other],
    alpha ~ U(0, 1), `other` a random other token; the label stays. A block so meets the blurred
    states (softmax @ E of an unsure block) that the chain hands it, instead of only pure rows."""
    n, t = x.shape
    v = emb.shape[0]
    u = rng.uniforms_of(sample.cpu(), MIX_UNIFORMS_FROM + 3 * t, seed, block, draw)[:, MIX_UNIFORMS_FROM:]
    u = u.view(n, t, 3).float().to(emb.device)  # (N, T, 3)
    other = (x + 1 + (u[..., 2] * (v - 1)).long().clamp(max=v - 2)) % v  # never the token itself
    alpha = u[..., 1:2]
    y = emb[x]  # (N, T, d)
    return torch.where((u[..., 0] < fraction)[..., None], alpha * y + (1 - alpha) * emb[other], y)
