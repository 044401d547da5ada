"""The token-ancestral chain's likelihood, shared by the AR and looped LMs.

Per token, each level reads logits from a noisy state, draws a token and restarts the next level
from that token's row, z = E[token] + sigma_next * eps. Given the true prefix, generation's
distribution of the token is then exact over the draws: level 0 gives
pi_0 = E_eps softmax(logits(sigma_max eps)), and each later level s maps the token distribution p
to p T_s, T_s[a, b] = E_eps softmax(logits(E[a] + sigma_s eps))[b]. A recipe supplies `readout`:
the probabilities of every noisy row of a window, each row seeing the window's context and itself
only, so one forward evaluates a candidate token at every position (a different one per row).

The sum over a in p T_s is taken one of two ways (`Estimator`). Exact: every candidate by falling
mass until all but `MASS_TOLERANCE` is covered, so its cost grows with the vocabulary. Stratified
(the default): the true token, the `head` likeliest others, and `tail` tokens drawn from the rest
in proportion to their mass, 1 + head + tail readouts a level whatever the vocabulary. It is
unbiased for every probability (exact on the head, Monte Carlo on the tail, one level at a time),
so only the log of the final probability carries bias, upward in BPC. The true token is always a
stratum because the late, low-noise levels nearly keep the token they are handed: its probability
at the end is mostly its probability one level before, which a sample of the tail would miss.
Only eps is Monte Carlo in the exact sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dbcore.method import rng
from dbcore.method.options import Options

TINY = 1e-30  # floor of a probability before its log
CANDIDATES = 8  # candidate tokens per forward of `level_probs` (batched along N)
MASS_TOLERANCE = 1e-3  # a row's token mass the exact sum may leave out (BPC errs upward only)
HEAD, TAIL = 2, 2  # the stratified sum's default strata (benches/bench_ar_eval.py: error and cost)
Readout = Callable[[torch.Tensor], torch.Tensor]  # noisy rows z (C, N, T, d) -> probs (C, N, T, V)


@dataclass(frozen=True)
class Estimator:
    """How a level sums over the previous level's tokens (module docstring): exactly, or the true
    token plus `head` likeliest plus `tail` sampled tokens."""

    exact: bool = False
    head: int = HEAD
    tail: int = TAIL

    def __post_init__(self) -> None:
        if self.head < 0 or self.tail < 0:
            raise ValueError(f"eval_head and eval_tail must be >= 0, got {self.head}, {self.tail}")

    def slots(self, vocab_size: int) -> int | None:
        """Readouts a level takes (None: as many as the mass needs); a vocabulary no larger than
        the strata is summed exactly."""
        return None if self.exact or 1 + self.head + self.tail >= vocab_size else 1 + self.head + self.tail

    @classmethod
    def of(cls, options: Options, head: int, tail: int) -> Estimator:
        """The estimator an evaluation asks for (`options`), else the config's `head` and `tail`."""
        return cls(options.exact, head if options.eval_head is None else options.eval_head,
                   tail if options.eval_tail is None else options.eval_tail)

    def describe(self, vocab_size: int) -> dict:
        """The estimator as `eval --json` reports it."""
        if self.slots(vocab_size) is None:
            return {"estimator": "exact", "eval_head": None, "eval_tail": None}
        return {"estimator": "stratified", "eval_head": self.head, "eval_tail": self.tail}


EXACT = Estimator(exact=True)


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

    def uniforms(self, count: int) -> torch.Tensor:
        """`count` uniforms per row (N, T, count) of this level: the tail's token draws (the
        counter's uniform groups, disjoint from the Gaussians')."""
        draw = self.level * (self.vocab_size + 1) * self.draws
        u = rng.uniforms_of(self.windows, self.shape[0] * count, self.seed, self.num_blocks + 1, draw)
        return u.view(-1, self.shape[0], count).to(self.device)


def level_probs(readout: Readout, emb: torch.Tensor, sigma: float, noise: LevelNoise,
                prev: torch.Tensor | None, truth: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """One level for N windows of T rows: with prev None, E_eps readout(sigma eps); else
    sum_a prev[..., a] E_eps readout(E[a] + sigma eps) with emb = E (V, d), summed by `estimator`
    over candidate tokens (N, T) per slot; `truth` (N, T) are the rows' true tokens. Returns
    (N, T, V)."""
    if prev is None:
        return sum(readout(sigma * noise(-1, k)[None])[0] for k in range(noise.draws)) / noise.draws
    if estimator.slots(prev.shape[-1]) is None:
        token, weight = _by_mass(prev)
    else:
        token, weight = _strata(prev, truth, estimator, noise)
    out = torch.zeros_like(prev)
    for start in range(0, len(token), CANDIDATES):  # slots of one forward
        chunk = range(start, min(len(token), start + CANDIDATES))
        for k in range(noise.draws):
            eps = torch.stack([noise(c, k) for c in chunk])  # (C, N, T, d)
            z = emb[token[start:chunk.stop]] + sigma * eps
            out += torch.einsum("cnt,cntv->ntv", weight[start:chunk.stop] / noise.draws, readout(z))
    return out


def _by_mass(prev: torch.Tensor, tolerance: float = MASS_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact sum's slots: each row's candidates by falling mass until every row's slots hold
    all but `tolerance` of its mass (each slot with its own draws, so their errors average out).
    The rest is left out, so a probability is under-estimated by at most `tolerance` per level
    and BPC errs upward only. Tokens and weights, (S, N, T) each."""
    mass, order = prev.sort(-1, descending=True)  # (N, T, V) each: every row's candidates by mass
    left = mass.sum(-1, keepdim=True) - mass.cumsum(-1)  # a row's mass outside its first c + 1 slots
    slots = int((left > tolerance).sum(-1).max()) + 1 if tolerance > 0 else int((mass > 0).sum(-1).max())
    return order[..., :slots].permute(2, 0, 1), mass[..., :slots].permute(2, 0, 1)


def _strata(prev: torch.Tensor, truth: torch.Tensor, estimator: Estimator, noise: LevelNoise
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stratified sum's slots: the true token with its mass, the `head` likeliest others with
    theirs, and `tail` systematic draws from the rest (points (k + u) / tail of its CDF, one
    uniform u a row), each weighing the rest's mass / tail: a token is drawn tail * its share of
    the rest times in expectation, so the sum is unbiased. Tokens and weights, (1 + head + tail,
    N, T) each."""
    truth = truth[..., None]  # (N, T, 1)
    rest = prev.scatter(-1, truth, 0.0)  # (N, T, V): mass of every other token
    head_mass, head = rest.topk(estimator.head, -1)  # (N, T, head) each
    rest = rest.scatter(-1, head, 0.0)  # the tail
    tokens, weights = [truth, head], [prev.gather(-1, truth), head_mass]
    if estimator.tail:
        cdf = rest.cumsum(-1)  # (N, T, V)
        tail_mass = cdf[..., -1:]  # (N, T, 1)
        grid = torch.arange(estimator.tail, device=cdf.device, dtype=cdf.dtype)
        u = (grid + noise.uniforms(1).to(cdf.dtype)) / estimator.tail * tail_mass  # (N, T, tail)
        drawn = torch.searchsorted(cdf, u, right=True).clamp_max(prev.shape[-1] - 1)  # inverse CDF
        tokens.append(drawn)
        weights.append((tail_mass / estimator.tail).expand_as(u))
    return torch.cat(tokens, -1).permute(2, 0, 1), torch.cat(weights, -1).permute(2, 0, 1)


def nats_of(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) (N, T) of distributions p (N, T, V) at tokens x (N, T)."""
    return -p.clamp_min(TINY).log().gather(-1, x[..., None])[..., 0]
