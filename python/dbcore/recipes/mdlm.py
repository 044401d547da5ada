"""Masked diffusion LM (MD4, Shi et al. 2024; METHOD.md 7, 11 "Masked diffusion LM").

Absorbing-state masking: token id V is MASK. A token stays unmasked at time t with probability
alpha(t) = (1 - 2e)(1 - t) + e (MD4's linear schedule; e = `mask_eps`). A network sees the masked
sequence x_t and t (adaLN, bidirectional attention) and predicts the clean token at every masked
position. Loss (continuous-time ELBO, per sample): w(t) * sum over masked positions of CE, with
w(t) = -alpha'(t) / (1 - alpha(t)) = (1 - 2e) / ((1 - 2e) t + e), divided by T.

DiffusionBlocks: time is the noise level. Block b owns t in [(B-1-b)/B, (B-b)/B] (block 0 the
highest t, run first by the sampler), draws t there (stratified across the batch as an option), and
owns its token table (with the MASK row), positions, time embedder, layers and head. The ELBO of
the chain is the sum of the blocks' slices, so BPC is evaluated block by block, one in memory.

The cut-off e keeps w(t) <= 1/e: with e -> 0 the estimator's variance diverges at small t. The
ELBO's two O(e) end terms (tokens still masked at t = 0, unmasked at t = 1) are left out, as in
MD4's training loss; they change BPC by about e * ln(V) / ln 2 per character.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dbcore.method import layout, rng
from dbcore.method.batch import UNIFORMS, Batch, Noised, NoiseRequest
from dbcore.method.options import Options
from dbcore.method.partition import layers_in_block
from dbcore.models.layers import AdaLNFinal, AdaLNLayer, NoiseEmbedder
from dbcore.models.lm import (
    EVAL_BATCH,
    TextModelConfig,
    TokenEmbedding,
    bits,
    encode_prompt,
    eval_windows,
    example_token_batch,
    example_tokenizer,
    pick,
    text_arrays,
    text_length,
    text_scores,
    tokenizer_of,
    vocab_size,
)
from dbcore.recipes.base import Recipe
from dbcore.wording import arg

EVAL_SEED = 0x5EED  # counter-based draws of the BPC estimator, apart from any training seed
MASK = -1  # a masked token in x_t; a model reads it as the last row of its token table


@dataclass
class MDLMConfig(TextModelConfig):
    """Model table of an MDLM run: the shared language-model keys and the masking schedule's."""

    mask_eps: float = 1e-4  # e of alpha(t) = (1 - 2e)(1 - t) + e
    stratified: bool = False  # t stratified across a batch (MD4's low-variance draws), inside the slice
    sample_steps: int = 128  # ancestral unmasking steps in all, allotted equally to blocks
    eval_draws: int = 2  # BPC: stratified t per window in each block's slice

    def __post_init__(self) -> None:
        super().__post_init__()  # the shared keys first: num_blocks is valid below
        if not 0 < self.mask_eps < 0.5:
            raise ValueError(f"mask_eps must be in (0, 0.5), got {self.mask_eps}")
        if self.sample_steps < self.num_blocks or self.sample_steps % self.num_blocks:
            raise ValueError(f"sample_steps {self.sample_steps} must be a multiple of num_blocks "
                             f"{self.num_blocks}")
        if self.eval_draws < 1:
            raise ValueError(f"eval_draws must be >= 1, got {self.eval_draws}")


def time_slice(block: int, num_blocks: int) -> tuple[float, float]:
    """[lo, hi] of t owned by block `block`: equal slices, block 0 the highest t."""
    return (num_blocks - 1 - block) / num_blocks, (num_blocks - block) / num_blocks


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    """1 - alpha(t) = (1 - 2e) t + e."""
    return (1 - 2 * eps) * t + eps


def elbo_weight(t: torch.Tensor, eps: float) -> torch.Tensor:
    """w(t) = -alpha'(t) / (1 - alpha(t)) = (1 - 2e) / ((1 - 2e) t + e)."""
    return (1 - 2 * eps) / mask_probability(t, eps)


def mask_tokens(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor:
    """x_t: token i of x (N, T) set to MASK where its uniform u (N, T) < 1 - alpha(t) (t (N,))."""
    masked = u < mask_probability(t.to(u.dtype), eps)[:, None]
    return torch.where(masked, torch.full_like(x, MASK), x)


class MaskedDenoiser(nn.Module):
    """A block (or the whole baseline): x_t (N, T) ids with MASK, t (N,) -> logits (N, T, V)."""

    def __init__(self, cfg: MDLMConfig, num_layers: int, tokenizer: torch.Tensor) -> None:
        super().__init__()
        d, v = cfg.dim, vocab_size({layout.TOKENIZER: tokenizer})
        self.register_buffer(layout.TOKENIZER, tokenizer.clone())  # frozen: carried by the checkpoint
        self.vocab_size = v
        self.embed = TokenEmbedding(v + 1, cfg.seq_len, d, cfg.positions)  # row V = MASK
        self.time = NoiseEmbedder(d)
        rope = cfg.positions == "rope"
        self.layers = nn.ModuleList(AdaLNLayer(d, cfg.heads, cfg.mlp_ratio, cfg.gate_init, rope)
                                    for _ in range(num_layers))
        self.final = AdaLNFinal(d, v)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, T) ids or MASK, t (N,) -> logits (N, T, V)."""
        h = self.embed(torch.where(x_t == MASK, self.vocab_size, x_t))  # (N, T, d)
        c = self.time(t)  # (N, d)
        for layer in self.layers:  # bidirectional
            h = layer(h, c)  # (N, T, d)
        return self.final(h, c)  # (N, T, V)


def masked_nats(model: MaskedDenoiser, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: float
                ) -> torch.Tensor:
    """w(t) * sum over masked positions of CE (N,): one sample of the ELBO's integrand, in nats."""
    logits = model(x_t, t)  # (N, T, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")  # (N, T)
    return elbo_weight(t, eps) * (ce * (x_t == MASK)).sum(1)



def no_sampler(options: Options) -> None:
    if options.sampler is not None:
        raise ValueError(f"{arg('sampler', options['sampler'])}: the masked-diffusion LM unmasks "
                         "ancestrally; no sampler applies")

class MDLMRecipe(Recipe):
    name = "mdlm"
    config_class = MDLMConfig
    stream_arrays = (layout.TOKENS,)
    cond_arrays = ()
    frozen_arrays = (layout.TOKENIZER,)
    cache_fields = ("tokenizer",)
    source_kind = "text"
    cached_noise = False
    chain_training = False

    def cache_arrays(self, source, seed, target_embedding):
        return text_arrays(source, self.name, self.model_cfg.seq_len)

    # ------------------------------------------------------------------ noise: masking

    def target_shape(self, frozen):
        return (self.model_cfg.seq_len,)

    def noise_request(self, target_shape):
        return NoiseRequest(gaussians=0, uniforms=1 + target_shape[0])  # t, then one per token

    def sigma_law(self, block):
        return (*time_slice(block, self.model_cfg.num_blocks), "uniform")

    def e2e_law(self):
        return (0.0, 1.0, "uniform")

    def targets(self, batch, frozen):
        return batch[layout.TOKENS].long()  # (N, T)

    def noise(self, batch, y, block, draw, law, seed, backend="torch"):
        """t from uniform 0 inside the law's [lo, hi] (stratified across the batch as an option),
        token i masked by uniform 1 + i: `Noised(z = x_t, sigma = t)`."""
        m = self.model_cfg
        u = torch.from_numpy(batch[UNIFORMS]).to(y.device)  # (N, 1 + T) float64
        u0 = u[:, 0]
        if m.stratified:  # one offset per batch, N equal strata: the batch covers the slice evenly
            u0 = torch.frac(u0[:1] + torch.arange(len(u0), device=u.device, dtype=u.dtype) / len(u0))
        lo, hi, _ = law
        t = lo + (hi - lo) * u0  # (N,)
        return Noised(mask_tokens(y, t, u[:, 1:], m.mask_eps), t.float(), u)

    def loss_weights(self, noised):
        return elbo_weight(noised.sigma, self.model_cfg.mask_eps)

    # ------------------------------------------------------------------ models and loss

    def build_block(self, block, frozen):
        m = self.model_cfg
        return MaskedDenoiser(m, layers_in_block(m, block), frozen[layout.TOKENIZER])

    def build_e2e(self, frozen):
        m = self.model_cfg
        return MaskedDenoiser(m, m.depth, frozen[layout.TOKENIZER])

    def _loss(self, model: MaskedDenoiser, batch: Batch, noised: Noised, w: torch.Tensor) -> torch.Tensor:
        x = batch[layout.TOKENS].long()
        logits = model(noised.z, noised.sigma)  # (N, T, V)
        ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")  # (N, T)
        per_sample = (ce * (noised.z == MASK)).sum(1) / x.shape[1]  # (N,) nats per token
        return (w * per_sample).mean()  # weight per sample (METHOD.md 2)

    def block_loss(self, block, batch, noised, w, backend="torch"):
        return self._loss(block, batch, noised, w)

    e2e_noise = True

    def e2e_loss(self, model, batch, noised, w, backend="torch"):
        return self._loss(model, batch, noised, w)

    def example_frozen(self, seed=0):
        return {layout.TOKENIZER: example_tokenizer()}

    def example_batch(self, batch_size, frozen, device):
        return example_token_batch(self.model_cfg.seq_len, batch_size, frozen, device)

    def denoise_step(self, block, cond, z, sigma, options):
        raise NotImplementedError("recipe 'mdlm' samples by ancestral unmasking (`sample_text`)")

    # ------------------------------------------------------------------ evaluation: BPC by the ELBO

    def evaluate(self, load_block, e2e, source, options):
        """The ELBO in bits per token (`text_scores`: and per byte, per character) on
        non-overlapping windows of `source`, Monte Carlo over t with `eval_draws` stratified draws
        in each block's slice; `per_block`: each slice's share. Blocks and baseline see the same t
        and masks."""
        m = self.model_cfg
        t0 = time.perf_counter()
        no_sampler(options)
        models = (lambda b: e2e) if e2e is not None else load_block
        x_all = eval_windows(source, m.seq_len, options.num_samples)
        n, seq = x_all.shape
        nats = torch.zeros(n, dtype=torch.float64)  # per window, summed over the slices
        per_block = []
        for b in range(m.num_blocks):
            model = models(b)
            if b == 0:  # the run's tokenizer, read from the model in hand (not loaded again)
                tokenizer = tokenizer_of({layout.TOKENIZER: model.tokenizer})
            model.eval()
            device = next(model.parameters()).device
            lo, hi = time_slice(b, m.num_blocks)
            share = torch.zeros(n, dtype=torch.float64)
            with torch.no_grad():
                for k in range(m.eval_draws):
                    u = rng.uniforms_of(torch.arange(n), 1 + seq, EVAL_SEED, b, k)  # (n, 1 + T)
                    t = lo + (hi - lo) * (k + u[:, 0]) / m.eval_draws  # stratum k of the slice
                    for rows in torch.arange(n).split(EVAL_BATCH):
                        x = x_all[rows].to(device)
                        x_t = mask_tokens(x, t[rows].to(device), u[rows, 1:].to(device), m.mask_eps)
                        share[rows] += masked_nats(model, x, x_t, t[rows].float().to(device),
                                                   m.mask_eps).double().cpu()
            share *= (hi - lo) / m.eval_draws  # integral over the slice of w(t) E[sum CE]
            nats += share
            per_block.append({"block": b, "t": [lo, hi],
                              "bits_per_token": round(bits(float(share.mean()) / seq), 6)})
            del model
        return {
            **text_scores(nats, x_all, tokenizer),
            "num_windows": n,
            "eval_draws": m.eval_draws,
            "seconds": round(time.perf_counter() - t0, 3),
            "per_block": per_block,
        }

    # ------------------------------------------------------------------ sampling: ancestral unmasking

    def sample_text(self, load_block: Any, e2e: nn.Module | None, options: Options) -> list[str]:
        """`num` texts of `length` tokens (prompt included, any length), window by window
        (`_unmask`): the first holds the prompt (its last seq_len - 1 tokens at most) and masks
        the rest of the window; past seq_len, each next window starts with the last seq_len // 2
        tokens of the text so far, unmasked and fixed, and masks the rest, until `length` (every
        window loads the blocks again, one in memory at a time)."""
        m = self.model_cfg
        no_sampler(options)
        steps = options.steps or m.sample_steps
        if steps % m.num_blocks:
            raise ValueError(f"{arg('steps', steps)} must be a multiple of num_blocks {m.num_blocks}")
        models = (lambda b: e2e) if e2e is not None else load_block
        held = {0: models(0)}  # block 0, read for the vocabulary, serves the first window

        def model_of(b: int) -> nn.Module:
            return held.pop(b) if b in held else models(b)

        vocab = tokenizer_of({layout.TOKENIZER: held[0].tokenizer})
        prompt = encode_prompt(options.prompt or "", vocab)
        length = text_length(options, len(prompt), m.seq_len)
        g = torch.Generator().manual_seed(int(options.seed or 0))
        x = prompt.expand(options.num, -1)  # (N, P): the text so far
        kept = min(len(prompt), m.seq_len - 1)  # known tokens that open the window
        while x.shape[1] < length:
            new = min(length - x.shape[1], m.seq_len - kept)
            masked = torch.full((len(x), new), MASK, dtype=torch.long)
            window = torch.cat([x[:, x.shape[1] - kept:], masked], 1)  # (N, kept + new)
            x = torch.cat([x, self._unmask(model_of, window, steps, options, g)[:, kept:]], 1)
            kept = m.seq_len // 2
        return [vocab.decode(row.numpy()) for row in x]

    def _unmask(self, model_of: Callable[[int], nn.Module], x: torch.Tensor, steps: int, options: Options,
                g: torch.Generator) -> torch.Tensor:
        """Window x (N, L) (L <= seq_len) with its MASK positions filled by ancestral unmasking over
        `steps` steps from t = 1 to 0, allotted equally to blocks (`model_of(b)`, one in memory at
        a time): a masked token is revealed from t to s with probability (alpha_s - alpha_t) /
        (1 - alpha_t), all at the end, as drawn by `pick` (temperature, top-k) or the likeliest
        token (greedy)."""
        m = self.model_cfg
        num, length = x.shape
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        per_block = steps // m.num_blocks
        for b in range(m.num_blocks):
            model = model_of(b)
            model.eval()
            device = next(model.parameters()).device
            with torch.no_grad():
                for i in range(b * per_block, (b + 1) * per_block):
                    t, s = float(grid[i]), float(grid[i + 1])
                    p_t, p_s = (float(mask_probability(torch.tensor(v), m.mask_eps)) for v in (t, s))
                    # (alpha_s - alpha_t) / (1 - alpha_t); everything left at the last step
                    reveal = 1.0 if i == steps - 1 else (p_t - p_s) / p_t
                    tt = torch.full((num,), t, device=device)
                    logits = model(_pad(x, m.seq_len).to(device), tt)[:, :length].float().cpu()
                    draw = pick(logits.reshape(-1, logits.shape[-1]), options, g).view(num, length)  # (N, L)
                    masked = x == MASK
                    now = masked & (torch.rand(num, length, generator=g, dtype=torch.float64) < reveal)
                    x = torch.where(now, draw, x)
            del model  # one block in memory at a time
        return x


def _pad(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Masked positions up to seq_len: the network always sees full windows, as in training."""
    if x.shape[1] == seq_len:
        return x
    return torch.cat([x, torch.full((len(x), seq_len - x.shape[1]), MASK, dtype=x.dtype)], 1)


def mdlm_tiny(**overrides: Any) -> MDLMConfig:
    """A config small enough for tests."""
    return dataclasses.replace(MDLMConfig(seq_len=16, dim=32, depth=2, heads=2, num_blocks=2,
                                          sample_steps=4), **overrides)


__all__ = ["MASK", "MDLMConfig", "MDLMRecipe", "MaskedDenoiser", "elbo_weight", "mask_probability",
           "mask_tokens", "masked_nats", "time_slice"]
