"""The token-ancestral chain's exact likelihood, shared by the AR and looped LMs.

Per token, each level reads logits from a noisy state, draws a token and restarts the next level
from that token's row, z = E[token] + sigma_next * eps. Given the true prefix, generation's
distribution of the token is then exact over the draws: level 0 gives
pi_0 = E_eps softmax(logits(sigma_max eps)), and each later level s maps the token distribution p
to p T_s, T_s[a, b] = E_eps softmax(logits(E[a] + sigma_s eps))[b]. A recipe supplies `readout`:
the probabilities of every noisy row of a window, each row seeing the window's context and itself
only, so one forward evaluates a candidate token at every position (a different one per row). Only
eps is Monte Carlo, and candidates of negligible mass are left out (`MASS_TOLERANCE`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dbcore.method import rng

TINY = 1e-30  # floor of a probability before its log
CANDIDATES = 8  # candidate tokens per forward of `level_probs` (batched along N)
MASS_TOLERANCE = 1e-3  # a row's token mass that `level_probs` may leave out (BPC errs upward only)
Readout = Callable[[torch.Tensor], torch.Tensor]  # noisy rows z (C, N, T, d) -> probs (C, N, T, V)


@dataclass
class LevelNoise:
    """The likelihood's eps: draw k (N, T, d) of candidate slot c (-1 at level 0) at level
    `level`, counter-based, keyed (seed, window, block = B + 1, draw): block id B + 1 belongs to no
    network block and not to the Euler chain's initial noise (B)."""

    windows: torch.Tensor  # (N,) window indices
    shape: tuple[int, int]  # (T, d)
    seed: int
    num_blocks: int
    level: int
    draws: int
    vocab_size: int
    device: torch.device

    def __call__(self, c: int, k: int) -> torch.Tensor:
        draw = (self.level * (self.vocab_size + 1) + c + 1) * self.draws + k
        eps = rng.gaussian(self.windows, math.prod(self.shape), self.seed, self.num_blocks + 1, draw)
        return eps.float().view(-1, *self.shape).to(self.device)


def level_probs(readout: Readout, emb: torch.Tensor, sigma: float, noise: LevelNoise,
                prev: torch.Tensor | None, tolerance: float = MASS_TOLERANCE) -> torch.Tensor:
    """One level for N windows of T rows: with prev None, E_eps readout(sigma eps); else
    sum_a prev[..., a] E_eps readout(E[a] + sigma eps) with emb = E (V, d). Each row's candidates
    go in slots by falling mass, `CANDIDATES` slots per forward, each slot with its own draws (so
    their errors average out in the sum), until every row's slots hold all but `tolerance` of its
    mass: the rest is left out, so a probability is under-estimated by at most `tolerance` per
    level and BPC errs upward only. Returns (N, T, V)."""
    if prev is None:
        return sum(readout(sigma * noise(-1, k)[None])[0] for k in range(noise.draws)) / noise.draws
    mass, order = prev.sort(-1, descending=True)  # (N, T, V) each: every row's candidates by mass
    left = mass.sum(-1, keepdim=True) - mass.cumsum(-1)  # a row's mass outside its first c + 1 slots
    slots = int((left > tolerance).sum(-1).max()) + 1 if tolerance > 0 else int((mass > 0).sum(-1).max())
    out = torch.zeros_like(prev)
    for start in range(0, slots, CANDIDATES):
        chunk = range(start, min(slots, start + CANDIDATES))
        token = order[..., chunk.start:chunk.stop].permute(2, 0, 1)  # (C, N, T)
        weight = mass[..., chunk.start:chunk.stop].permute(2, 0, 1) / noise.draws  # (C, N, T)
        for k in range(noise.draws):
            z = emb[token] + sigma * torch.stack([noise(c, k) for c in chunk])  # (C, N, T, d)
            out += torch.einsum("cnt,cntv->ntv", weight, readout(z))
    return out


def nats_of(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) (N, T) of distributions p (N, T, V) at tokens x (N, T)."""
    return -p.clamp_min(TINY).log().gather(-1, x[..., None])[..., 0]
