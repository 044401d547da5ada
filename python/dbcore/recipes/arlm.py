"""Autoregressive LM (METHOD.md 7, 11 "Autoregressive LM", 12).

A block sees 2T positions: the T clean tokens of a window (its own token table) followed by T noisy
targets z_i = E[x_i] + sigma * eps_i (E frozen, unit-norm rows, in the store; one sigma per
sequence). Mask (`ar_mask`): clean row r sees clean columns <= r; noisy row T+i sees clean columns
< i and itself, no other noisy position. Noisy i takes position i, the position of the token it
predicts. D_i = c_skip z_i + c_out F_i (`dbcore.method.edm.EDMPrecond`), a learned head reads logits over
the vocabulary from D_i, CE against x_i, weighted per sample by the run's `[train] weight`.

The clean rows are conditioned on a learned constant, not on sigma (per-token adaLN: the noisy
rows carry the noise embedding), so their keys and values do not depend on the noise level: each
block keeps a KV cache of the clean prefix while decoding; a new token costs `sample_steps` noisy
rows over the blocks, and each block takes the previous token's clean row in the same pass as its
first noisy row (the noisy row may see it). Two chains per token (`sampler`): the paper's Euler
chain, D_hat = softmax(logits) @ E; and the token-ancestral chain (this project's): each level draws
a token from its block's readout and the next level restarts from that token's row,
z = E[token] + sigma_next * eps, so every block meets states like those it trained on and the
likelihood is exact over the token draws (`ARRecipe.ancestral_probs`).

Baseline (`--e2e`): a standard pre-LN next-token transformer of the same depth and width.
BPC of both counts positions 1..T-1 of non-overlapping held-out windows (position 0 has no context
for the baseline); the blocks' BPC comes from the chain generation runs (every position from
sigma_max, given the true prefix), never from a plain causal forward.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dbcore.method import layout, rng
from dbcore.method.batch import INDEX, NoiseRequest
from dbcore.method.edm import SIGMA_DATA, SIGMA_MAX, EDMPrecond, precond
from dbcore.method.noise import mix_token_targets
from dbcore.method.options import Options
from dbcore.method.partition import CONFIG_SIGMA_DISTS, euler_schedule, layers_in_block
from dbcore.method.sampler import DECODES, run_chain
from dbcore.models.ancestral import EXACT, HEAD, TAIL, TINY, Estimator, LevelNoise, level_probs, nats_of
from dbcore.models.layers import KV, LN_EPS, AdaLNFinal, AdaLNLayer, NoiseEmbedder, PreLNLayer
from dbcore.models.lm import (
    EVAL_BATCH,
    TextModelConfig,
    TokenEmbedding,
    bits,
    chosen_sampler,
    eval_windows,
    example_token_batch,
    example_token_frozen,
    generate_tokens,
    grown,
    prompt_rows,
    repeated,
    text_scores,
    token_target_arrays,
    tokenizer_of,
    vocab_size,
)
from dbcore.recipes.base import Recipe
from dbcore.wording import arg

Caches = list[KV]  # one (keys, values) of the clean prefix per layer of a block
SAMPLERS = ("euler", "ancestral")  # the chain of levels per token, see the module docstring


@dataclass
class ARConfig(TextModelConfig):
    """Model table of an AR LM run: the shared language-model keys and the noise and decoding's."""

    gamma: float = 0.05  # overlap of the block ranges (METHOD.md 3)
    sigma_dist: str = "lognormal"  # in-block sigma law: method.partition.CONFIG_SIGMA_DISTS
    target_scale: float = 1.0  # norm of the rows of E (METHOD.md 12: unit norm, or scaled)
    sigma_data: float = SIGMA_DATA  # c_skip/c_out/c_in's data std (METHOD.md 12: or E's per-coordinate std)
    sample_steps: int = 4  # Euler steps per token in all, allotted to blocks (the paper's 4)
    decode: str = "last"  # the prediction: the last step's logits or the product of every step's
    eval_chains: int = 8  # BPC, Euler: chains from independent initial noise per position, averaged
    eval_draws: int = 1  # BPC, ancestral: noise draws per level and candidate token (`ancestral_probs`)
    eval_head: int = HEAD  # BPC, ancestral: likeliest tokens summed exactly per level (`Estimator`)
    eval_tail: int = TAIL  # BPC, ancestral: tokens drawn from the rest per level (`Estimator`)
    sampler: str = "euler"  # per token: the Euler chain (METHOD.md 6) or the token-ancestral one

    def __post_init__(self) -> None:
        super().__post_init__()  # the shared keys first: num_blocks is valid below
        if self.sigma_dist not in CONFIG_SIGMA_DISTS:
            raise ValueError(f"sigma_dist must be one of {CONFIG_SIGMA_DISTS}, got {self.sigma_dist!r}")
        if self.sample_steps < self.num_blocks:
            raise ValueError(f"sample_steps {self.sample_steps} must be >= num_blocks {self.num_blocks}")
        if self.target_scale <= 0 or self.sigma_data <= 0:
            raise ValueError(f"target_scale and sigma_data must be > 0, got {self.target_scale}, "
                             f"{self.sigma_data}")
        if min(self.eval_chains, self.eval_draws) < 1:
            raise ValueError(f"eval_chains and eval_draws must be >= 1, got {self.eval_chains}, "
                             f"{self.eval_draws}")
        Estimator(head=self.eval_head, tail=self.eval_tail)  # checks both
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")


def ar_mask(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(2T, 2T) bool, True where row may attend: clean r -> clean <= r; noisy T+i -> clean < i
    and itself (METHOD.md 11)."""
    t = seq_len
    mask = torch.zeros(2 * t, 2 * t, dtype=torch.bool, device=device)
    mask[:t, :t] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask[t:, :t] = torch.ones(t, t, dtype=torch.bool, device=device).tril(-1)
    mask[t:, t:] = torch.eye(t, dtype=torch.bool, device=device)
    return mask


class ARBackbone(nn.Module):
    """F of one block: clean tokens and noisy targets c_in*z side by side under `ar_mask`."""

    def __init__(self, cfg: ARConfig, num_layers: int, vocab_size: int) -> None:
        super().__init__()
        d = cfg.dim
        self.embed = TokenEmbedding(vocab_size, cfg.seq_len, d, cfg.positions)  # clean tokens, positions
        self.z_embed = nn.Linear(d, d)  # c_in * z -> hidden; zero weight: pure noise adds nothing at first
        nn.init.zeros_(self.z_embed.weight)
        self.noise_embed = NoiseEmbedder(d)
        self.clean_cond = nn.Parameter(torch.zeros(d))  # the clean rows' adaLN input: no sigma in it
        rope = cfg.positions == "rope"
        self.layers = nn.ModuleList(AdaLNLayer(d, cfg.heads, cfg.mlp_ratio, cfg.gate_init, rope)
                                    for _ in range(num_layers))
        self.final = AdaLNFinal(d, d)  # F, zero-initialised: a fresh block has D = c_skip * z

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """c_in*z (N, T, d), c_noise (N,), clean tokens x (N, T) -> F (N, T, d)."""
        n, t = x.shape
        clean = self.embed(x)  # (N, T, d)
        at = torch.arange(t, device=x.device)
        noisy = self.z_embed(z_in) + self.embed.at(at)  # (N, T, d): noisy i at position i
        h = torch.cat([clean, noisy], 1)  # (N, 2T, d)
        c_noisy = self.noise_embed(c_noise)  # (N, d)
        c_clean = self.clean_cond.to(c_noisy.dtype).expand(n, -1)  # (N, d)
        c = torch.stack([c_clean, c_noisy], 1)  # (N, 2, d): one adaLN input per half
        mask = ar_mask(t, x.device)
        pos = torch.cat([at, at])  # (2T,): clean r at r, noisy i at i
        *body, last = self.layers
        for layer in body:
            h = layer(h, c, mask, pos)  # (N, 2T, d), adaLN per half
        noisy = slice(t, 2 * t)  # F is read at the noisy rows: the last layer computes only them
        return self.final(last.forward_rows(h, c, noisy, mask[noisy], pos), c_noisy)  # (N, T, d)

    def extend(self, x_new: torch.Tensor, start: int, caches: Caches | None) -> Caches:
        """Decoding: the clean prefix's caches grown by tokens x_new (N, t) at positions start..."""
        h = self.embed(x_new, start)  # (N, t, d)
        c = self.clean_cond.expand(len(x_new), -1)  # (N, d)
        pos = torch.arange(start, start + x_new.shape[1], device=x_new.device)
        out = []
        for i, layer in enumerate(self.layers):
            past = None if caches is None else caches[i]
            h, kv = layer.step(h, c, past, pos)
            out.append(grown(past, kv))
        return out

    def noisy_rows(self, z_in: torch.Tensor, c_noise: torch.Tensor, caches: Caches) -> torch.Tensor:
        """F (N, T, d) of all T noisy rows c_in*z (N, T, d) after the clean rows' caches
        (`extend` of the whole window): the noisy half of `forward` without recomputing the clean
        half, as `ar_mask` says (noisy i sees clean < i and itself)."""
        t = z_in.shape[1]
        at = torch.arange(t, device=z_in.device)
        h = self.z_embed(z_in) + self.embed.at(at)  # (N, T, d)
        c_noisy = self.noise_embed(c_noise)  # (N, d)
        mask = ar_mask(t, z_in.device)[t:]  # (T, 2T): the noisy rows of the training mask
        for layer, past in zip(self.layers, caches, strict=True):
            h, _ = layer.step(h, c_noisy, past, at, mask)
        return self.final(h, c_noisy)  # (N, T, d)

    def noisy_step(self, z_in: torch.Tensor, c_noise: torch.Tensor, pos: int, caches: Caches | None,
                   new_token: torch.Tensor | None = None) -> tuple[torch.Tensor, Caches | None]:
        """Decoding: F (N, d) of one noisy row c_in*z (N, d) at position `pos` after the cached
        clean prefix. With `new_token` (N, 1), the clean token at pos - 1 that the caches lack yet,
        both rows run in one pass (the noisy row may see it: clean < pos) and the caches grow by it."""
        at = torch.tensor([pos], device=z_in.device)
        h = (self.z_embed(z_in) + self.embed.at(at))[:, None]  # (N, 1, d)
        c_noisy = self.noise_embed(c_noise)  # (N, d)
        c = c_noisy
        if new_token is not None:
            h = torch.cat([self.embed(new_token, pos - 1), h], 1)  # (N, 2, d): clean, then noisy
            c = torch.stack([self.clean_cond.expand(len(h), -1), c_noisy], 1)  # (N, 2, d), per row
            at = torch.tensor([pos - 1, pos], device=z_in.device)
        out = []
        for i, layer in enumerate(self.layers):
            past = None if caches is None else caches[i]
            h, (k, v) = layer.step(h, c, past, at)
            if new_token is not None:
                out.append(grown(past, (k[:, :, :1], v[:, :, :1])))  # the clean row's keys only
        return self.final(h[:, -1], c_noisy), (out if new_token is not None else caches)


class ARBlock(nn.Module):
    """One DiffusionBlock of the AR LM: its own token table, layers, head; E and tokenizer frozen."""

    def __init__(self, cfg: ARConfig, num_layers: int, tokenizer: torch.Tensor, emb: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = v = vocab_size({layout.TOKENIZER: tokenizer})
        if tuple(emb.shape) != (v, cfg.dim):
            raise ValueError(f"target embedding is {tuple(emb.shape)}, expected ({v}, {cfg.dim})")
        self.register_buffer(layout.TOKENIZER, tokenizer.clone())
        self.register_buffer(layout.TARGET_EMBEDDING, emb.detach().float().clone())
        self.denoiser = EDMPrecond(ARBackbone(cfg, num_layers, v), cfg.sigma_data)
        self.head = nn.Linear(cfg.dim, v)  # learned readout of D

    @property
    def layers(self) -> nn.ModuleList:
        return self.denoiser.backbone.layers

    def forward(self, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T), z (N, T, d), sigma (N,) -> D (N, T, d), logits (N, T, V)."""
        d_hat = self.denoiser(z, sigma, x)
        return d_hat, self.head(d_hat)

    def noisy_logits(self, z: torch.Tensor, sigma: float, caches: Caches) -> torch.Tensor:
        """Logits (N, T, V) of every noisy row z (N, T, d) at level sigma after the window's clean
        caches (`ARBackbone.noisy_rows`): `forward`'s logits without recomputing the clean rows."""
        return self.head(self.denoiser(z, sigma, caches, network=self.denoiser.backbone.noisy_rows))

    def decode_step(self, z: torch.Tensor, sigma: float, pos: int, caches: Caches | None,
                    new_token: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, Caches | None]:
        """Decoding: D (N, d) and logits (N, V) of one noisy row z (N, d) at level sigma, and the
        caches (grown by `new_token` when given, see `ARBackbone.noisy_step`)."""
        s = torch.full((len(z),), sigma, dtype=z.dtype, device=z.device)
        p = precond(s[:, None], self.denoiser.sigma_data)  # each (N, 1)
        raw, caches = self.denoiser.backbone.noisy_step(p.c_in * z, p.c_noise.reshape(-1), pos, caches,
                                                        new_token)
        d_hat = p.c_skip * z + p.c_out * raw
        return d_hat, self.head(d_hat), caches


class ARBaseline(nn.Module):
    """Standard next-token transformer: tokens and positions, causal pre-LN layers, LN, head."""

    def __init__(self, cfg: ARConfig, tokenizer: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = v = vocab_size({layout.TOKENIZER: tokenizer})
        self.register_buffer(layout.TOKENIZER, tokenizer.clone())
        self.embed = TokenEmbedding(v, cfg.seq_len, cfg.dim, cfg.positions)
        rope = cfg.positions == "rope"
        self.layers = nn.ModuleList(PreLNLayer(cfg.dim, cfg.heads, cfg.mlp_ratio, rope)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.head = nn.Linear(cfg.dim, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, T) -> next-token logits (N, T, V): row i predicts x_{i+1}."""
        h = self.embed(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        for layer in self.layers:
            h = layer(h, mask)  # (N, T, d)
        return self.head(self.norm(h))

    def extend(self, x_new: torch.Tensor, start: int, caches: Caches | None) -> tuple[torch.Tensor, Caches]:
        """Decoding: logits (N, V) after tokens x_new (N, t) at positions start..., and the grown caches."""
        h = self.embed(x_new, start)
        pos = torch.arange(start, start + x_new.shape[1], device=x_new.device)
        out = []
        for i, layer in enumerate(self.layers):
            past = None if caches is None else caches[i]
            h, kv = layer.step(h, past, pos)
            out.append(grown(past, kv))
        return self.head(self.norm(h[:, -1])), out




def sampler_of(options: Options, cfg: ARConfig) -> str:
    return chosen_sampler(options, cfg.sampler, SAMPLERS, "the AR LM")


def _bits_per_token(scores: torch.Tensor, x: torch.Tensor) -> float:
    """Bits per token of scores (n, T, V) (logits or log-beliefs) at positions 1..T-1 of x."""
    return round(bits(float(F.cross_entropy(scores[:, 1:].transpose(1, 2), x[:, 1:]))), 6)


class ARRecipe(Recipe):
    name = "arlm"
    config_class = ARConfig
    stream_arrays = (layout.TOKENS,)
    cond_arrays = (layout.TOKENS,)
    frozen_arrays = (layout.TOKENIZER, layout.TARGET_EMBEDDING)
    cache_fields = ("tokenizer", "dim", "target_scale")
    source_kind = "text"
    cached_noise = False  # (N, K, T, d) noised targets would be K*d times the text: drawn online
    chain_training = False

    def cache_arrays(self, source, seed, target_embedding):
        return token_target_arrays(source, self.name, self.model_cfg, seed)

    def target_shape(self, frozen):
        return (self.model_cfg.seq_len, self.model_cfg.dim)

    def noise_request(self, target_shape):
        return NoiseRequest(gaussians=math.prod(target_shape), uniforms=1)  # one sigma per sequence

    def targets(self, batch, frozen):
        return frozen[layout.TARGET_EMBEDDING][batch[layout.TOKENS].long()]  # E[x], (N, T, d)

    def train_targets(self, y, batch, frozen, block, draw):
        t = self.cfg.train
        if t.mix_fraction <= 0:
            return y
        return mix_token_targets(frozen[layout.TARGET_EMBEDDING], batch[layout.TOKENS].long(), batch[INDEX],
                                 t.seed, block, draw, t.mix_fraction)

    def build_block(self, block, frozen):
        m = self.model_cfg
        tokenizer, emb = frozen[layout.TOKENIZER], frozen[layout.TARGET_EMBEDDING]
        return ARBlock(m, layers_in_block(m, block), tokenizer, emb)

    def build_e2e(self, frozen):
        return ARBaseline(self.model_cfg, frozen[layout.TOKENIZER])

    def block_loss(self, block, batch, noised, w, backend="torch"):
        x = batch[layout.TOKENS].long()
        _, logits = block(x, noised.z, noised.sigma)  # (N, T, V)
        ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none").mean(1)  # (N,)
        return (w * ce).mean()  # weight per sample (METHOD.md 2)

    def e2e_loss(self, model, batch, noised, w, backend="torch"):
        x = batch[layout.TOKENS].long()
        logits = model(x[:, :-1])  # (N, T-1, V)
        return F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:])

    def example_frozen(self, seed=0):
        return example_token_frozen(self.model_cfg, seed)

    def example_batch(self, batch_size, frozen, device):
        return example_token_batch(self.model_cfg.seq_len, batch_size, frozen, device)

    def denoise_step(self, block, cond, z, sigma, options):
        _, logits = block(cond[layout.TOKENS].long(), z, sigma)  # (N, T, V)
        d_hat = torch.softmax(logits.float(), dim=-1) @ block.target_embedding  # (N, T, d), METHOD.md 12
        return d_hat, logits

    # ------------------------------------------------------------------ teacher-forced BPC

    def evaluate(self, load_block, e2e, source, options):
        """Bits per token (`text_scores`: and per byte, per character) over positions 1..T-1 of
        non-overlapping windows of `data`: the baseline's causal
        forward, or generation's own likelihood of the true token given the true prefix, per
        sampler (`_euler_nats`, `_ancestral_nats`: the stratified estimate unless `exact`);
        `per_block`: the prediction after each block (its probe)."""
        m = self.model_cfg
        t0 = time.perf_counter()
        sampler = sampler_of(options, m)
        steps = options.steps or m.sample_steps
        decode = options.decode or m.decode
        num_chains = options.eval_chains or m.eval_chains
        draws = options.eval_draws or m.eval_draws
        estimator = Estimator.of(options, m.eval_head, m.eval_tail)
        summed: dict = {}
        if e2e is not None:
            vocab = tokenizer_of({layout.TOKENIZER: e2e.tokenizer})
            x = eval_windows(source, m.seq_len, options.num_samples)
            with torch.no_grad():
                logits = torch.cat([e2e(xb.to(next(e2e.parameters()).device)).float().cpu()
                                    for xb in x.split(EVAL_BATCH)])[:, :-1]  # predicts x_1..x_{T-1}
            nats = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (n, T-1)
            steps = decode = sampler = num_chains = draws = None
            per_block: list[dict] = []
        else:
            first = load_block(0)
            vocab = tokenizer_of({layout.TOKENIZER: first.tokenizer})
            del first
            x = eval_windows(source, m.seq_len, options.num_samples)
            if sampler == "ancestral":
                no_product(options)
                decode = num_chains = None
                nats, per_block = self._ancestral_nats(load_block, x, steps, draws, estimator)
                summed = estimator.describe(len(vocab))
            else:
                draws = None
                nats, per_block = self._euler_nats(load_block, x, len(vocab), steps, decode, num_chains)
        return {
            **text_scores(nats.double().sum(1), x[:, 1:], vocab),
            "num_windows": len(x),
            "inference_steps": steps,
            "sampler": sampler,
            "decode": decode,
            "eval_chains": num_chains,
            "eval_draws": draws,
            **summed,
            "seconds": round(time.perf_counter() - t0, 3),
            "per_block": per_block,
        }

    def _euler_nats(self, load_block: Any, x: torch.Tensor, vocab_size: int, steps: int, decode: str,
                    num_chains: int) -> tuple[torch.Tensor, list[dict]]:
        """-log p(x_i) (n, T-1) of the Euler chain from sigma_max given the true prefix: the
        readout's (last logits or product of beliefs) probability of the true token averaged over
        `num_chains` initial noises (a sharp readout commits to the token its chain chose, so one
        chain alone is not generation's distribution); probes of the first chain."""
        m, seed = self.model_cfg, self.cfg.train.seed
        n, t = x.shape
        last, product = torch.zeros(n, t, vocab_size), torch.zeros(n, t, vocab_size)  # (n, T, V)
        chains = torch.zeros(num_chains, n, t - 1)  # log p(x_i) of each chain's readout
        per_block: list[dict] = []

        def observe(b: int, rows: slice, i: int, logits: torch.Tensor | None) -> None:
            assert logits is not None
            last[rows] = logits.float().cpu()
            product[rows] += torch.log_softmax(logits.float(), -1).cpu()

        def block_done(b: int) -> None:  # the chain's prediction so far: a probe per block
            if k == 0:
                per_block.append({"block": b, "bits_per_token_last": _bits_per_token(last, x),
                                  "bits_per_token_product": _bits_per_token(product, x)})

        for k in range(num_chains):  # independent initial noise: the chain's own distribution
            product.zero_()
            eps = rng.gaussian(torch.arange(n), t * m.dim, seed, m.num_blocks, k)  # k = 0: initial_noise
            eps = eps.float().view(n, t, m.dim)
            run_chain(self, load_block, {layout.TOKENS: x}, SIGMA_MAX * eps, m.num_blocks, steps,
                      batch_size=EVAL_BATCH, observe=observe, block_done=block_done)
            scores = product if decode == "product" else last
            chains[k] = torch.log_softmax(scores[:, 1:], -1).gather(-1, x[:, 1:, None])[..., 0]
        return -(torch.logsumexp(chains, 0) - math.log(num_chains)), per_block  # (n, T-1)

    def _ancestral_nats(self, load_block: Any, x: torch.Tensor, steps: int, draws: int,
                        estimator: Estimator) -> tuple[torch.Tensor, list[dict]]:
        """-log p(x_i) (n, T-1) of the token-ancestral chain (`ancestral_probs`) and its probes."""
        p, per_block = self.ancestral_probs(load_block, x, steps, draws, estimator)
        return nats_of(p[:, 1:], x[:, 1:]), per_block

    def ancestral_probs(self, load_block: Any, x: torch.Tensor, steps: int, draws: int,
                        estimator: Estimator = EXACT) -> tuple[torch.Tensor, list[dict]]:
        """Generation's distribution (n, T, V) of token i given the true prefix x_<i under the
        token-ancestral chain (`dbcore.models.ancestral`; noisy rows see no other noisy row),
        summed over each level's tokens by `estimator`, with `draws` eps per level and candidate.
        Unbiased for each probability, so it has none of the Euler chain's log-of-a-mean bias from
        committed tokens. Probes: BPC after each block."""
        m, seed = self.model_cfg, self.cfg.train.seed
        schedule = euler_schedule(m.num_blocks, steps)
        n, t = x.shape
        p: torch.Tensor | None = None  # (n, T, V): generation's token distribution so far
        per_block: list[dict] = []
        for b in range(m.num_blocks):
            block = load_block(b)
            block.eval()
            device = next(block.parameters()).device
            with torch.no_grad():
                for i, s in ((i, s) for i, s in enumerate(schedule) if s.block == b):
                    level = torch.zeros(n, t, block.vocab_size)  # (n, T, V) after this level
                    for start in range(0, n, EVAL_BATCH):
                        rows = slice(start, min(n, start + EVAL_BATCH))
                        noise = LevelNoise(torch.arange(rows.start, rows.stop), (t, m.dim), seed,
                                           m.num_blocks, i, draws, block.vocab_size, device)
                        prev = None if p is None else p[rows].to(device)
                        level[rows] = _level_probs(block, x[rows].to(device), s.sigma, noise, prev,
                                                   estimator).cpu()
                    p = level
            del block
            assert p is not None
            per_block.append({"block": b, "bits_per_token": _bits_per_token(p.clamp_min(TINY).log(), x)})
        assert p is not None
        return p, per_block

    # ------------------------------------------------------------------ generation

    def sample_text(self, load_block: Any, e2e: nn.Module | None, options: Options) -> list[str]:
        """`num` texts of `length` tokens (prompt included, any length: the context window slides,
        `generate_tokens`; the prompt defaults to a newline): per new token, the chain over the
        blocks from sigma_max (Euler or token-ancestral, `sampler`) with the clean prefix in every
        block's KV cache; greedy or sampled (temperature, top-k) from the last level's logits. The
        ancestral chain's earlier levels draw at temperature 1: the distribution its likelihood
        measures."""
        m = self.model_cfg
        sampler = sampler_of(options, m)
        models = [e2e] if e2e is not None else [load_block(b) for b in range(m.num_blocks)]
        for model in models:
            model.eval()
        vocab = tokenizer_of({layout.TOKENIZER: models[0].tokenizer})
        x, length, g = prompt_rows(options, vocab, m.seq_len, next(models[0].parameters()).device)  # (N, P)
        with torch.no_grad():
            if e2e is not None:
                x = generate_tokens(x, length, m.seq_len, e2e.extend, options, g)
            else:
                if sampler == "ancestral":
                    no_product(options)
                x = self._generate(models, x, length, options, g, sampler)
        return [vocab.decode(row.cpu().numpy()) for row in x]

    def _generate(self, blocks: list[ARBlock], x: torch.Tensor, length: int, options: Options,
                  g: torch.Generator, sampler: str) -> torch.Tensor:
        """Tokens x (N, P) grown to `length` by the chain of blocks (`generate_tokens`)."""
        m = self.model_cfg
        steps = euler_schedule(m.num_blocks, options.steps or m.sample_steps)
        decode = options.decode or m.decode

        def encode(new: torch.Tensor, start: int, caches: list[Caches] | None
                   ) -> tuple[torch.Tensor, list[Caches]]:
            """The chain's scores (N, V) of the token after tokens new (N, t) at positions start..,
            and every block's caches of the clean rows."""
            pending: list[torch.Tensor | None] = [new] * len(blocks)  # until a block's first step caches it
            if caches is None:  # a fresh window: its clean rows first
                caches = [b.denoiser.backbone.extend(new, 0, None) for b in blocks]
                pending = [None] * len(blocks)
            pos = start + new.shape[1]  # the noisy row's position: the token it predicts
            z = SIGMA_MAX * torch.randn(len(new), m.dim, generator=g).to(new.device)  # (N, d)
            score = torch.zeros(len(new), blocks[0].vocab_size, device=new.device)
            for j, s in enumerate(steps):
                block, b = blocks[s.block], s.block
                _, logits, caches[b] = block.decode_step(z, s.sigma, pos, caches[b], pending[b])
                pending[b] = None
                probs = torch.softmax(logits.float(), -1)  # (N, V)
                if sampler == "ancestral":  # draw a token, restart from its row at the next level
                    if j < len(steps) - 1:
                        token = torch.multinomial(probs.cpu(), 1, generator=g)[:, 0].to(new.device)
                        eps = torch.randn(len(new), m.dim, generator=g).to(new.device)
                        z = block.target_embedding[token] + s.sigma_next * eps
                else:
                    z = z + (s.sigma_next - s.sigma) * (z - probs @ block.target_embedding) / s.sigma
                score = score + torch.log_softmax(logits.float(), -1) if decode == "product" else logits
            return score, caches

        return generate_tokens(x, length, m.seq_len, encode, options, g)


def no_product(options: Options) -> None:
    if options.decode == "product":
        raise ValueError(f"{arg('decode', 'product')}: the ancestral sampler reads the last level's "
                         "logits only")


def _level_probs(block: ARBlock, x: torch.Tensor, sigma: float, noise: LevelNoise, prev: torch.Tensor | None,
                 estimator: Estimator = EXACT) -> torch.Tensor:
    """One level of the token-ancestral chain (`dbcore.models.ancestral.level_probs`) for
    windows x (N, T): the clean rows' caches once, every candidate's noisy rows after them."""
    n, t = x.shape
    clean = block.denoiser.backbone.extend(x, 0, None)  # the clean rows' caches, once per window

    def readout(z: torch.Tensor) -> torch.Tensor:  # z (C, N, T, d) -> probs (C, N, T, V)
        c = len(z)
        logits = block.noisy_logits(z.reshape(c * n, t, -1), sigma, repeated(clean, c))
        return torch.softmax(logits.float(), -1).view(c, n, t, -1)

    return level_probs(readout, block.target_embedding, sigma, noise, prev, x, estimator)


def arlm_tiny(**overrides: Any) -> ARConfig:
    """A config small enough for tests."""
    return dataclasses.replace(ARConfig(seq_len=16, dim=32, depth=2, heads=2, num_blocks=2), **overrides)
