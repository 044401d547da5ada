"""Recurrent-depth (looped) LM (METHOD.md 7, 11 "Recurrent-depth"; Huginn, Geiping et al. 2025).

Both models share one layout. The prelude (causal layers over the tokens x_0..x_{T-2}) gives the
context e; a core of `core_layers` layers is applied K times to a state s (N, T-1, d), each time
reading adapter(concat(s, e)); a coda reads the state and gives next-token logits: row i predicts
x_{i+1}, so it may read x_0..x_i and nothing later.

DiffusionBlocks (a "blocks" run of one block: every iteration shares the core's weights, so the
whole noise range is the core's): the state is the noisy next-token embedding z_i = E[x_{i+1}] +
sigma eps_i (E frozen, rows of norm `target_scale`; one sigma per sequence over the full range).
D = c_skip z + c_out F with F the core's output; the coda reads D. Core and coda run the AR
recipe's masks (METHOD.md 11): the context rows e are causal and carry no sigma, so their keys and
values are computed once per window and shared by all K iterations; noisy row i sees the context
rows <= i and itself, no other noisy row. Training runs the prelude, the context rows and one
noisy pass of the core and coda at the sampled sigma: no unrolling, no back-propagation through
time. Inference: K levels from sigma_max (`euler_schedule(1, K)`), Euler steps with
D_hat = softmax(logits) @ E (METHOD.md 12) or the token-ancestral chain; the last logits predict.
Since the noisy rows are independent given the context, the ancestral chain's likelihood is a sum
over its token draws, exact or stratified (`dbcore.models.ancestral`).

Baseline (`--e2e`, Huginn's recipe at small scale): a random initial state, r ~ Poisson-lognormal
iterations around `train_iterations` per step, gradients through the last `backprop_iterations`
only (truncated BPTT), the coda on the final state; attention causal over positions everywhere,
so at iteration k row i sees the earlier rows' iteration-k states (generation's KV caches).

Both are evaluated with K iterations chosen at inference (test-time depth). A random initial state
makes a prediction depend on the noise: the baseline's (and the denoiser's Euler chain's) BPC
averages the readout's probabilities over `eval_chains` initial states.
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

from dbcore.errors import RunError
from dbcore.method import layout, rng
from dbcore.method.batch import EPS, INDEX, UNIFORMS, Noised, NoiseRequest
from dbcore.method.edm import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, precond
from dbcore.method.flops import layer_flops, linear_flops, score_flops
from dbcore.method.noise import mix_token_targets
from dbcore.method.options import Options
from dbcore.method.partition import SIGMA_DISTS, euler_schedule
from dbcore.models.ancestral import EXACT, HEAD, TAIL, Estimator, LevelNoise, Readout, level_probs, nats_of
from dbcore.models.layers import KV, LN_EPS, NoiseEmbedder, PreLNLayer
from dbcore.models.lm import (
    EVAL_BATCH,
    TextModelConfig,
    TokenEmbedding,
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
from dbcore.recipes.base import FrozenModule, Recipe

Caches = list[KV]  # one (keys, values) per layer of a stack
ContextCaches = tuple[Caches, Caches]  # the denoiser's context rows in the core and in the coda
HUGINN_SIGMA = 0.5  # std of ln(rate) of the Poisson-lognormal iteration count (Huginn)
BASELINE_LAW = (1.0, 1.0, "loguniform")  # the baseline's "noise": unit eps alone, its initial state
SAMPLERS = ("euler", "ancestral")  # the denoiser's steps, see run_iterations

PRELUDE_OUT = "prelude_out"  # (N, T-1, d) float16: a frozen prelude's output of x_0..x_{T-2}
PRELUDE_KEYS = ("embed.", "prelude.")  # the frozen modules' parameter names


@dataclass
class LoopedConfig(TextModelConfig):
    """Model table of a looped run: prelude, core and coda sizes, iterations, noise and evaluation."""

    depth: int = 0  # prelude + core + coda layers; 0 = their sum (set below)
    num_blocks: int = 1  # the core is one denoiser over the whole noise range
    prelude_layers: int = 2
    core_layers: int = 2
    coda_layers: int = 2
    iterations: int = 8  # K at inference (test-time depth; `--steps` overrides)
    train_iterations: int = 8  # baseline: mean iterations per training step (Huginn's r-bar)
    backprop_iterations: int = 4  # baseline: gradients through the last k iterations only
    init_std: float = 1.0  # baseline: std of the random initial state
    sigma_dist: str = "lognormal"  # DiffusionBlocks: sigma over the full range, lognormal or loguniform
    target_scale: float = 1.0  # norm of the rows of E (METHOD.md 12)
    eval_chains: int = 8  # BPC (baseline, Euler): readouts averaged over this many initial states
    eval_draws: int = 1  # BPC (ancestral): noise draws per level and candidate token (`ancestral_probs`)
    eval_head: int = HEAD  # BPC (ancestral): likeliest tokens summed exactly per level (`Estimator`)
    eval_tail: int = TAIL  # BPC (ancestral): tokens drawn from the rest per level (`Estimator`)
    sampler: str = "euler"  # the denoiser's steps: "euler" (METHOD.md 6) or "ancestral" (run_iterations)
    frozen_prelude: str = ""  # a finished looped run whose prelude is frozen (`--freeze-prelude`)

    def __post_init__(self) -> None:
        layers = self.prelude_layers + self.core_layers + self.coda_layers
        if min(self.prelude_layers, self.coda_layers) < 0 or self.core_layers < 1:
            raise ValueError("need prelude_layers >= 0, core_layers >= 1, coda_layers >= 0, got "
                             f"{self.prelude_layers}, {self.core_layers}, {self.coda_layers}")
        if self.depth == 0:
            self.depth = layers
        if self.depth != layers:
            raise ValueError(f"depth {self.depth} is not prelude + core + coda layers = {layers}")
        if self.num_blocks != 1:
            raise ValueError(f"num_blocks must be 1 (every iteration shares the core), got {self.num_blocks}")
        if self.layer_split is not None:
            raise ValueError("layer_split does not apply to a looped model: set prelude/core/coda_layers")
        super().__post_init__()
        if min(self.iterations, self.train_iterations, self.backprop_iterations, self.eval_chains,
               self.eval_draws) < 1:
            raise ValueError("iterations, train_iterations, backprop_iterations, eval_chains and eval_draws "
                             "must be >= 1")
        Estimator(head=self.eval_head, tail=self.eval_tail)  # checks both
        if self.sigma_dist not in SIGMA_DISTS:
            raise ValueError(f"sigma_dist must be one of {SIGMA_DISTS}, got {self.sigma_dist!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.target_scale <= 0 or self.init_std <= 0:
            raise ValueError(f"target_scale and init_std must be > 0, got {self.target_scale}, "
                             f"{self.init_std}")


def causal_stack(layers: nn.ModuleList, h: torch.Tensor, start: int, past: Caches | None
                 ) -> tuple[torch.Tensor, Caches]:
    """Rows h (N, t, d) at positions start.. through causal pre-LN layers after the cached prefix
    `past` (None: no prefix); returns (N, t, d) and every layer's grown cache."""
    pos = torch.arange(start, start + h.shape[1], device=h.device)
    caches = []
    for i, layer in enumerate(layers):
        p = None if past is None else past[i]
        h, kv = layer.step(h, p, pos)  # causal among the new rows, all of the prefix
        caches.append(grown(p, kv))
    return h, caches


class LoopedLM(nn.Module):
    """What both models share: tokens, prelude, adapter, core, coda, head; E and tokenizer frozen."""

    def __init__(self, cfg: LoopedConfig, tokenizer: torch.Tensor, emb: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = v = vocab_size({layout.TOKENIZER: tokenizer})
        if tuple(emb.shape) != (v, cfg.dim):
            raise ValueError(f"target embedding is {tuple(emb.shape)}, expected ({v}, {cfg.dim})")
        self.register_buffer(layout.TOKENIZER, tokenizer.clone())
        self.register_buffer(layout.TARGET_EMBEDDING, emb.detach().float().clone())
        d, rope = cfg.dim, cfg.positions == "rope"

        def stack(n: int) -> nn.ModuleList:
            return nn.ModuleList(PreLNLayer(d, cfg.heads, cfg.mlp_ratio, rope) for _ in range(n))

        self.embed = TokenEmbedding(v, cfg.seq_len, d, cfg.positions)
        self.prelude = stack(cfg.prelude_layers)
        self.adapter = nn.Linear(2 * d, d)  # concat(state, context) -> the core's input
        self.core = stack(cfg.core_layers)
        self.coda_in = nn.Linear(d, d)
        self.coda = stack(cfg.coda_layers)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, v)

    @property
    def layers(self) -> nn.ModuleList:
        return nn.ModuleList([*self.prelude, *self.core, *self.coda])

    def context(self, x: torch.Tensor, start: int = 0, past: Caches | None = None
                ) -> tuple[torch.Tensor, Caches]:
        """The prelude's output e (N, t, d) of tokens x (N, t) at positions start.., and its caches."""
        return causal_stack(self.prelude, self.embed(x, start), start, past)

    def read(self, v: torch.Tensor, start: int = 0, past: Caches | None = None
             ) -> tuple[torch.Tensor, Caches]:
        """The coda's next-token logits (N, t, V) of states v (N, t, d), and its caches."""
        h, caches = causal_stack(self.coda, self.coda_in(v), start, past)
        return self.head(self.norm(h)), caches


def context_mask(rows: int, cached: int, start: int, device: torch.device | None = None) -> torch.Tensor:
    """(rows, cached + rows) bool, True where noisy row j (position start + j) may attend: the
    cached context rows at positions <= start + j, and itself (the AR masks, METHOD.md 11:
    e_i holds x_0..x_i and row i predicts x_{i+1}, so it sees context i; no other noisy row)."""
    pos = torch.arange(start, start + rows, device=device)
    ctx = torch.arange(cached, device=device)[None] <= pos[:, None]  # (rows, cached)
    return torch.cat([ctx, torch.eye(rows, dtype=torch.bool, device=device)], 1)


class LoopedDenoiser(LoopedLM):
    """DiffusionBlocks: the core is a denoiser of the next-token embedding at noise level sigma.
    Core and coda see two kinds of rows, as the AR recipe's blocks: context rows (the prelude's
    e, causal, no sigma in them, so their keys and values are computed once per window and shared
    by every iteration) and noisy rows, each seeing the context up to its position and itself."""

    def __init__(self, cfg: LoopedConfig, tokenizer: torch.Tensor, emb: torch.Tensor) -> None:
        super().__init__(cfg, tokenizer, emb)
        d = cfg.dim
        self.noise_embed = NoiseEmbedder(d)
        self.core_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.out = nn.Linear(d, d)  # F; zero-initialised: a fresh core has D = c_skip * z
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def context_caches(self, e: torch.Tensor, start: int = 0, past: ContextCaches | None = None
                       ) -> ContextCaches:
        """The (core, coda) caches of context rows e (N, t, d) at positions start.., grown from
        `past` (the earlier positions'): the core's causal pass over e, the coda's over its output."""
        h, core = causal_stack(self.core, e, start, None if past is None else past[0])
        _, coda = causal_stack(self.coda, h, start, None if past is None else past[1])
        return core, coda

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, e: torch.Tensor, caches: ContextCaches,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy rows z (N, t, d) at positions start.. and levels sigma (N,), with their context
        rows e (N, t, d), after `caches` (`context_caches` of positions up to start + t - 1)
        -> D (N, t, d) and logits (N, t, V)."""
        t = z.shape[1]
        p = precond(sigma.view(-1, 1, 1), SIGMA_DATA)  # each (N, 1, 1)
        h = self.adapter(torch.cat([p.c_in * z, e], -1))  # (N, t, d)
        h = h + self.noise_embed(p.c_noise.view(-1))[:, None]  # (N, t, d)
        pos = torch.arange(start, start + t, device=z.device)
        mask = context_mask(t, caches[0][0][0].shape[2], start, z.device)  # (t, cached + t)
        for layer, past in zip(self.core, caches[0], strict=True):
            h, _ = layer.step(h, past, pos, mask)
        d_hat = p.c_skip * z + p.c_out * self.out(self.core_norm(h))  # METHOD.md 2
        g = self.coda_in(d_hat)  # (N, t, d)
        for layer, past in zip(self.coda, caches[1], strict=True):
            g, _ = layer.step(g, past, pos, mask)
        return d_hat, self.head(self.norm(g))


class LoopedBPTT(LoopedLM):
    """Huginn's baseline: the core maps the state to the next state; the coda reads the last."""

    def __init__(self, cfg: LoopedConfig, tokenizer: torch.Tensor, emb: torch.Tensor) -> None:
        super().__init__(cfg, tokenizer, emb)
        self.state_norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)

    def iterate(self, s: torch.Tensor, e: torch.Tensor, start: int = 0, past: Caches | None = None
                ) -> tuple[torch.Tensor, Caches]:
        """One iteration: state s (N, t, d), context e (N, t, d) -> next state (N, t, d), caches."""
        h, caches = causal_stack(self.core, self.adapter(torch.cat([s, e], -1)), start, past)
        return self.state_norm(h), caches


# ----------------------------------------------------------------------------- inference


def run_iterations(model: LoopedLM, e: torch.Tensor, noise: torch.Tensor, iterations: int, start: int = 0,
                   caches: Any = None, init_std: float = 1.0, sampler: str = "euler",
                   g: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
    """Logits (N, t, V) of rows with context e (N, t, d) at positions start.. after `iterations`
    iterations from the initial noise (N, t, d), and the caches grown by these rows (given: the
    prefix's). The baseline iterates its core from init_std * noise (a cache per iteration), then
    the coda reads. The denoiser grows its context caches once and steps from sigma_max down the
    grid of `euler_schedule(1, K)`: "euler" moves z along (z - D_hat) / sigma with
    D_hat = softmax(logits) @ E (METHOD.md 6, 12); "ancestral" draws a token from the logits and
    restarts from its row at the next level, z = E[token] + sigma_next * eps (draws from `g`), so
    every step sees a state like those it was trained on (its likelihood: `ancestral_probs`)."""
    if isinstance(model, LoopedDenoiser):
        caches = model.context_caches(e, start, caches)
        return denoiser_steps(model, e, caches, noise, iterations, start, sampler, g), caches
    grown_caches = []
    state = init_std * noise
    for k in range(iterations):
        state, c = model.iterate(state, e, start, None if caches is None else caches[k])
        grown_caches.append(c)
    logits, c = model.read(state, start, None if caches is None else caches[iterations])
    return logits, grown_caches + [c]


def denoiser_steps(model: LoopedDenoiser, e: torch.Tensor, caches: Any, noise: torch.Tensor, iterations: int,
                   start: int = 0, sampler: str = "euler", g: torch.Generator | None = None) -> torch.Tensor:
    """The denoiser's K steps (`run_iterations`) for rows e (N, t, d) at positions start.. whose
    context caches (`context_caches`, these rows included) are given: logits (N, t, V)."""
    z = SIGMA_MAX * noise
    emb = model.target_embedding
    for s in euler_schedule(1, iterations):
        sigma = torch.full((len(z),), s.sigma, device=z.device)
        _, logits = model.denoise(z, sigma, e, caches, start)
        probs = torch.softmax(logits.float(), -1)  # (N, t, V)
        if sampler == "ancestral":
            token = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=g)
            eps = torch.randn(z.shape, generator=g).to(z.device)
            z = emb[token.view(z.shape[:-1]).to(z.device)] + s.sigma_next * eps
        else:
            d_hat = probs @ emb  # METHOD.md 12
            z = z + (s.sigma_next - s.sigma) * (z - d_hat) / s.sigma
    return logits


def ancestral_probs(model: LoopedDenoiser, x: torch.Tensor, iterations: int, windows: torch.Tensor,
                    seed: int, draws: int, estimator: Estimator = EXACT) -> torch.Tensor:
    """Generation's distribution (N, T-1, V) of x_{i+1} given x_0..x_i for windows x (N, T) under
    the token-ancestral chain of K levels, each level summed over tokens by `estimator`
    (`dbcore.models.ancestral`): the context caches once per window, every candidate's noisy rows
    after them. `windows` (N,) key the counter-based eps (`draws` per level and candidate)."""
    n, t = x.shape
    e, _ = model.context(x[:, :-1])  # (N, T-1, d)
    caches = model.context_caches(e)
    emb = model.target_embedding
    def readout_at(sigma: float) -> Readout:
        def readout(z: torch.Tensor) -> torch.Tensor:  # (C, N, T-1, d) -> (C, N, T-1, V)
            c = len(z)
            rep = (repeated(caches[0], c), repeated(caches[1], c))  # one copy per candidate
            levels = torch.full((c * n,), sigma, device=z.device)
            _, logits = model.denoise(z.flatten(0, 1), levels, e.repeat(c, 1, 1), rep)
            return torch.softmax(logits.float(), -1).view(c, n, t - 1, -1)
        return readout

    p = None  # (N, T-1, V): the chain's token distribution so far
    for i, s in enumerate(euler_schedule(1, iterations)):
        noise = LevelNoise(windows, (t - 1, emb.shape[1]), seed, 1, i, draws, len(emb), x.device)
        p = level_probs(readout_at(s.sigma), emb, s.sigma, noise, p, x[:, 1:], estimator)
    assert p is not None
    return p


def poisson_lognormal(u_rate: float, u_count: float, mean: int) -> int:
    """Huginn's iteration count from two uniforms (inverse CDFs): tau ~ N(ln mean - s^2/2, s^2),
    r ~ Poisson(e^tau) + 1, so E[r] = mean + 1."""
    from scipy.stats import norm, poisson

    rate = math.exp(math.log(mean) - HUGINN_SIGMA**2 / 2 + HUGINN_SIGMA * norm.ppf(u_rate))
    return int(poisson.ppf(u_count, rate)) + 1


# ----------------------------------------------------------------------------- the recipe


class LoopedRecipe(Recipe):
    name = "looped"
    config_class = LoopedConfig
    stream_arrays = (layout.TOKENS,)
    cond_arrays = (layout.TOKENS,)
    frozen_arrays = (layout.TOKENIZER, layout.TARGET_EMBEDDING)
    cache_fields = ("tokenizer", "dim", "target_scale")
    source_kind = "text"
    cached_noise = False
    chain_training = False
    e2e_noise = True  # the baseline draws its initial state and iteration count (`e2e_law`)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.prelude_state: dict[str, torch.Tensor] | None = None  # frozen weights, in training
        if self.model_cfg.frozen_prelude:  # the core and coda train from the cached activations
            self.stream_arrays = (layout.TOKENS, PRELUDE_OUT)

    def frozen_module(self):
        """With `frozen_prelude`: the token table and prelude of that finished looped run."""
        m = self.model_cfg
        if not m.frozen_prelude:
            return None
        return FrozenModule(m.frozen_prelude, PRELUDE_KEYS, PRELUDE_OUT, "frozen_prelude")

    def freeze(self, tensors):
        self.prelude_state = tensors

    def frozen_outputs(self, model, rows):
        """e (N, T-1, d) float16: the prelude's output of x_0..x_{T-2}."""
        return model.context(rows[layout.TOKENS][:, :-1].long())[0].to(torch.float16)

    def _with_prelude(self, model: LoopedLM) -> LoopedLM:
        """The model with the frozen prelude's weights loaded and excluded from training."""
        if self.prelude_state is None:
            return model
        try:
            missing, unexpected = model.load_state_dict(self.prelude_state, strict=False)
        except RuntimeError as exc:
            raise RunError(f"--freeze-prelude {self.model_cfg.frozen_prelude}: its prelude does not fit "
                           f"this config ({str(exc).splitlines()[0]})") from None
        if unexpected:
            raise RunError(f"--freeze-prelude {self.model_cfg.frozen_prelude}: unexpected {unexpected[:3]}")
        for module in (model.embed, model.prelude):
            module.requires_grad_(False)
        return model

    def _sampler(self, options: Options) -> str:
        """The denoiser's sampler of an eval or sample call: the option given, else the config's."""
        return chosen_sampler(options, self.model_cfg.sampler, SAMPLERS, "a looped run")

    def _context(self, model: LoopedLM, batch) -> torch.Tensor:
        """e (N, T-1, d): the cached activations of a frozen prelude, or the prelude's forward."""
        if PRELUDE_OUT in batch:
            return batch[PRELUDE_OUT].float()
        return model.context(batch[layout.TOKENS][:, :-1].long())[0]

    def cache_arrays(self, source, seed, target_embedding):
        return token_target_arrays(source, self.name, self.model_cfg, seed)

    def sigma_law(self, block):
        return (SIGMA_MIN, SIGMA_MAX, self.model_cfg.sigma_dist)  # one block: the whole range

    def e2e_law(self):
        return BASELINE_LAW

    def noise(self, batch, y, block, draw, law, seed, backend="torch"):
        """The denoiser's z = y + sigma * eps; for the baseline (`BASELINE_LAW`) the same
        counter-based eps alone, its random initial state (no target in it), and the uniforms
        that pick its iteration count."""
        if law != BASELINE_LAW:
            return super().noise(batch, y, block, draw, law, seed, backend)
        index = torch.from_numpy(batch[INDEX])
        eps = batch.get(EPS)
        if eps is None:
            eps = rng.gaussian(index, y[0].numel(), seed, block, draw)
        eps = torch.as_tensor(eps)
        u = batch.get(UNIFORMS)
        u = torch.from_numpy(u) if u is not None else rng.uniforms_of(index, 3, seed, block, draw)
        return Noised(eps.to(y.device, y.dtype).view(y.shape), torch.ones(len(y), device=y.device), u)

    def target_shape(self, frozen):
        return (self.model_cfg.seq_len - 1, self.model_cfg.dim)

    def noise_request(self, target_shape):
        return NoiseRequest(gaussians=math.prod(target_shape), uniforms=3)

    def targets(self, batch, frozen):
        return frozen[layout.TARGET_EMBEDDING][batch[layout.TOKENS][:, 1:].long()]  # E[x_{i+1}], (N, T-1, d)

    def train_targets(self, y, batch, frozen, block, draw):
        t = self.cfg.train
        if t.mix_fraction <= 0:
            return y
        return mix_token_targets(frozen[layout.TARGET_EMBEDDING], batch[layout.TOKENS][:, 1:].long(),
                                 batch[INDEX], t.seed, block, draw, t.mix_fraction)

    def build_block(self, block, frozen):
        m = self.model_cfg
        tokenizer, emb = frozen[layout.TOKENIZER], frozen[layout.TARGET_EMBEDDING]
        return self._with_prelude(LoopedDenoiser(m, tokenizer, emb))

    def build_e2e(self, frozen):
        m = self.model_cfg
        return self._with_prelude(LoopedBPTT(m, frozen[layout.TOKENIZER], frozen[layout.TARGET_EMBEDDING]))

    def block_loss(self, block, batch, noised, w, backend="torch"):
        x = batch[layout.TOKENS].long()
        e = self._context(block, batch)  # (N, T-1, d)
        caches = block.context_caches(e)  # the context rows: one causal pass of the core and coda
        _, logits = block.denoise(noised.z, noised.sigma, e, caches)  # one core pass at the sampled sigma
        ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none").mean(1)  # (N,)
        return (w * ce).mean()  # weight per sample (METHOD.md 2)

    def baseline_iterations(self, noised) -> tuple[int, int]:
        """(iterations r, of which the last k back-propagate) of a baseline step, from its uniforms."""
        m = self.model_cfg
        u = noised.uniforms[0].tolist()  # the batch's first sample decides
        r = poisson_lognormal(u[1], u[2], m.train_iterations)
        return r, min(r, m.backprop_iterations)

    def e2e_loss(self, model, batch, noised, w, backend="torch"):
        x = batch[layout.TOKENS].long()
        r, k = self.baseline_iterations(noised)
        state = self.model_cfg.init_std * noised.z  # (N, T-1, d): eps, see `noise`
        e = self._context(model, batch)
        with torch.no_grad():  # truncated BPTT: the first r - k iterations carry no gradient
            for _ in range(r - k):
                state, _ = model.iterate(state, e)
        for _ in range(k):
            state, _ = model.iterate(state, e)
        logits, _ = model.read(state)  # (N, T-1, V)
        return F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:])

    # ------------------------------------------------------------------ compute accounting

    def step_passes(self, kind: str, noised) -> dict[str, tuple[int, int]]:
        """(forward, backward) passes of each module in one training step of a block or the baseline."""
        prelude = (0, 0) if self.model_cfg.frozen_prelude else (1, 1)  # cached: no prelude pass
        if kind == "block":
            return {"prelude": prelude, "context": (1, 1), "core": (1, 1), "coda": (1, 1)}
        r, k = self.baseline_iterations(noised)
        return {"prelude": prelude, "core": (r, k), "coda": (1, 1)}

    def pass_flops(self, batch_size: int, frozen) -> dict[str, float]:
        """Forward FLOPs of one pass of each module over a training batch (dense masked attention).
        "context": the denoiser's context rows through the core and the coda, and its noisy rows'
        attention scores against them."""
        m = self.model_cfg
        t = m.seq_len - 1
        rows, v = batch_size * t, vocab_size(frozen)

        def stack(n: int) -> float:
            return n * layer_flops(rows, m.dim, m.mlp_ratio, t)

        core = stack(m.core_layers) + linear_flops(rows, 2 * m.dim, m.dim) + linear_flops(rows, m.dim, m.dim)
        coda = stack(m.coda_layers) + linear_flops(rows, m.dim, m.dim) + linear_flops(rows, m.dim, v)
        scores = (m.core_layers + m.coda_layers) * score_flops(rows, t, m.dim)
        context = stack(m.core_layers + m.coda_layers) + scores
        return {"prelude": stack(m.prelude_layers), "context": context, "core": core, "coda": coda}

    def example_frozen(self, seed=0):
        return example_token_frozen(self.model_cfg, seed)

    def example_batch(self, batch_size, frozen, device):
        return example_token_batch(self.model_cfg.seq_len, batch_size, frozen, device)

    def denoise_step(self, block, cond, z, sigma, options):
        x = cond[layout.TOKENS].long()
        e, _ = block.context(x[:, :-1])
        _, logits = block.denoise(z, sigma, e, block.context_caches(e))
        return torch.softmax(logits.float(), -1) @ block.target_embedding, logits

    # ------------------------------------------------------------------ evaluation and generation

    def evaluate(self, load_block, e2e, source, options):
        """Bits per token (`text_scores`: and per byte, per character) over positions 1..T-1 of
        non-overlapping windows of `data` after K iterations
        (`num_steps`, default the config's `iterations`): the denoiser's token-ancestral chain
        (`ancestral_probs`, summed stratified unless `exact`, `eval_draws` noise draws per level
        and candidate); else (the baseline, or the denoiser's Euler chain) the readout's probability
        of the true token averaged over `eval_chains` initial states."""
        m, seed = self.model_cfg, self.cfg.train.seed
        t0 = time.perf_counter()
        iterations = options.steps or m.iterations
        num_chains = options.eval_chains or m.eval_chains
        draws = options.eval_draws or m.eval_draws
        estimator = Estimator.of(options, m.eval_head, m.eval_tail)
        sampler = self._sampler(options) if e2e is None else None
        model = e2e if e2e is not None else load_block(0)
        model.eval()
        device = next(model.parameters()).device
        x = eval_windows(source, m.seq_len, options.num_samples)
        n, t = x.shape
        ancestral = sampler == "ancestral"
        chains = torch.zeros(1 if ancestral else num_chains, n, t - 1)  # log p(x_{i+1}) of each chain
        with torch.no_grad():
            for start in range(0, n, EVAL_BATCH):
                xb = x[start:start + EVAL_BATCH].to(device)
                windows = torch.arange(start, start + len(xb))
                if ancestral:
                    p = ancestral_probs(model, xb, iterations, windows, seed, draws, estimator)
                    chains[0, start:start + len(xb)] = -nats_of(p, xb[:, 1:]).cpu()
                    continue
                e, _ = model.context(xb[:, :-1])
                caches = model.context_caches(e) if e2e is None else None  # shared by every chain
                for k in range(num_chains):
                    noise = rng.gaussian(windows, (t - 1) * m.dim, seed, 1, k)
                    noise = noise.float().view(len(xb), t - 1, m.dim).to(device)
                    if e2e is None:
                        logits = denoiser_steps(model, e, caches, noise, iterations)
                    else:
                        logits, _ = run_iterations(model, e, noise, iterations, init_std=m.init_std)
                    logp = torch.log_softmax(logits.float(), -1).gather(-1, xb[:, 1:, None])[..., 0]
                    chains[k, start:start + len(xb)] = logp.cpu()
        nats = -(torch.logsumexp(chains, 0) - math.log(len(chains)))  # (n, T-1)
        return {
            **text_scores(nats.double().sum(1), x[:, 1:], tokenizer_of({layout.TOKENIZER: model.tokenizer})),
            "num_windows": n,
            "iterations": iterations,
            "eval_chains": None if ancestral else num_chains,
            "eval_draws": draws if ancestral else None,
            **(estimator.describe(len(model.target_embedding)) if ancestral else {}),
            "sampler": sampler,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def sample_text(self, load_block: Any, e2e: nn.Module | None, options: Options) -> list[str]:
        """`num` texts of `length` tokens (prompt included, any length: the context window slides,
        `generate_tokens`; the prompt defaults to a newline): per new token K iterations (`steps`,
        default `iterations`) over the prefix's KV caches (the baseline's: one per iteration; the
        denoiser's: its context rows', shared by every iteration); greedy or sampled (temperature,
        top-k)."""
        m = self.model_cfg
        model = e2e if e2e is not None else load_block(0)
        model.eval()
        vocab = tokenizer_of({layout.TOKENIZER: model.tokenizer})
        x, length, g = prompt_rows(options, vocab, m.seq_len, next(model.parameters()).device)  # (N, P)
        with torch.no_grad():
            x = generate(model, x, length, m.seq_len, options.steps or m.iterations, options, g, m.init_std,
                         self._sampler(options))
        return [vocab.decode(row.cpu().numpy()) for row in x]


def generate(model: LoopedLM, x: torch.Tensor, length: int, seq_len: int, iterations: int, options: Options,
             g: torch.Generator, init_std: float = 1.0, sampler: str = "euler") -> torch.Tensor:
    """Tokens x (N, P) grown to `length` (`generate_tokens`, window seq_len): a window's first
    rows run their K iterations in one pass, then each new token is one row through the prelude
    and K iterations, every stack KV-cached."""
    d = model.embed.table.embedding_dim

    def encode(new: torch.Tensor, start: int, caches: tuple[Caches, Any] | None
               ) -> tuple[torch.Tensor, tuple[Caches, Any]]:
        """Next-token logits (N, V) after tokens new (N, t) at positions start.., and the
        (prelude, iterations) caches grown by them."""
        ctx, past = caches or (None, None)
        e, ctx = model.context(new, start, ctx)  # (N, t, d)
        noise = torch.randn(*new.shape, d, generator=g).to(new.device)  # (N, t, d)
        logits, past = run_iterations(model, e, noise, iterations, start, past, init_std, sampler, g)
        return logits[:, -1], (ctx, past)

    return generate_tokens(x, length, seq_len, encode, options, g)


def looped_tiny(**overrides: Any) -> LoopedConfig:
    """A config small enough for tests."""
    base = LoopedConfig(seq_len=16, dim=32, heads=2, prelude_layers=1, core_layers=1, coda_layers=1,
                        iterations=4, train_iterations=3, backprop_iterations=2)
    return dataclasses.replace(base, **{"depth": 0, **overrides})
