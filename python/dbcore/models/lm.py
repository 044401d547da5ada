"""What the language-model recipes share: the character vocabulary in the store, token windows of
a text source, the token-and-position embedding, bits per character.

The store holds `tokens` (N, T) int32 windows and `vocab` (V,) int32 code points; `vocab` is a
frozen array, so every checkpoint carries it and evaluation or sampling maps text through the
vocabulary the run was trained on (a character outside it is a clear error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dbcore.errors import SourceError
from dbcore.method import layout
from dbcore.method.batch import INDEX, Frozen
from dbcore.method.options import Options
from dbcore.method.partition import block_layers
from dbcore.models.layers import KV, make_target_embedding
from dbcore.models.vocab import Vocabulary
from dbcore.wording import arg

POS_INIT_STD = 0.02  # learned positions and token embeddings, as GPT-2 / nanoGPT
EVAL_BATCH = 64  # windows per forward pass in evaluation


def check_text_source(source: Any, recipe: str) -> Any:
    if not hasattr(source, "windows"):
        raise SourceError(f"source {source.spec}: recipe {recipe!r} needs a text source (text:PATH)")
    return source


def vocab_array(vocab: Vocabulary) -> np.ndarray:
    """(V,) int32 code points: the store's `vocab` array."""
    return np.array([ord(ch) for ch in vocab.chars], dtype=np.int32)


def vocab_of(frozen: Frozen) -> Vocabulary:
    """The run's vocabulary from its frozen `vocab` array (store or checkpoint)."""
    return Vocabulary("".join(chr(int(c)) for c in frozen[layout.VOCAB].tolist()))


def text_arrays(source: Any, recipe: str, seq_len: int, stride: int) -> tuple[dict, dict]:
    """Cached arrays of a text recipe: token windows and the vocabulary, and their attributes."""
    src = check_text_source(source, recipe)
    windows = src.windows(seq_len, stride or seq_len)
    arrays = {layout.TOKENS: windows, layout.VOCAB: vocab_array(src.vocab)}
    attrs = {"text": {"num_chars": src.num_chars, "vocab_size": len(src.vocab), "seq_len": seq_len,
                      "stride": stride or seq_len}}
    return arrays, attrs


def token_target_arrays(source: Any, recipe: str, m: Any, seed: int) -> tuple[dict, dict]:
    """Cached arrays of a recipe whose targets are token embeddings (AR, looped): the windows,
    the vocabulary and the frozen rows E (seeded random, norm `target_scale`, METHOD.md 12)."""
    arrays, attrs = text_arrays(source, recipe, m.seq_len, m.stride)
    v = len(arrays[layout.VOCAB])
    arrays[layout.TARGET_EMBEDDING] = make_target_embedding(v, m.dim, seed, m.target_scale).numpy()
    attrs["target_embedding"] = {"kind": "seeded-random", "seed": seed, "scale": m.target_scale}
    return arrays, attrs


def example_token_frozen(m: Any, seed: int = 0) -> Frozen:
    """Frozen arrays as a fresh cache would write them for 65 printable characters (benchmarks)."""
    v = 65
    return {layout.VOCAB: torch.arange(32, 32 + v),
            layout.TARGET_EMBEDDING: make_target_embedding(v, m.dim, seed, m.target_scale)}


def example_token_batch(seq_len: int, batch_size: int, frozen: Frozen, device: torch.device
                        ) -> dict[str, torch.Tensor]:
    """A seeded random batch of token windows (N, seq_len) and its sample indices (benchmarks)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(frozen[layout.VOCAB]), (batch_size, seq_len), generator=g)
    return {layout.TOKENS: tokens.to(device, torch.int32), INDEX: torch.arange(batch_size, device=device)}


def prompt_rows(options: Options, vocab: Vocabulary, seq_len: int, device: torch.device
                ) -> tuple[torch.Tensor, int, torch.Generator]:
    """Where a next-token LM's generation starts: the prompt (default a newline) as `num` rows
    (N, P) on `device`, the length to grow them to (longer than the prompt, at most seq_len) and
    the sampling generator seeded from the options."""
    prompt = encode_prompt(options.prompt or "\n", vocab)
    length = options.length or seq_len
    if not len(prompt) < length <= seq_len:
        raise ValueError(f"{arg('length', length)} must be in {len(prompt) + 1}..seq_len {seq_len} "
                         f"(the prompt has {len(prompt)} characters)")
    g = torch.Generator().manual_seed(int(options.seed or 0))
    return prompt.to(device).expand(options.num, -1).clone(), length, g


def eval_windows(source: Any, seq_len: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows (N, T) int64 of a text source (read through the run's vocabulary)."""
    rows = source.windows(seq_len)
    n = len(rows) if not limit else min(limit, len(rows))
    return torch.from_numpy(rows[0:n]).long()


def encode_prompt(prompt: str, vocab: Vocabulary) -> torch.Tensor:
    """(P,) int64 ids of a prompt; a character outside the vocabulary is a clear error."""
    return torch.from_numpy(vocab.encode(prompt, where=arg("prompt"))).long()


def grown(past: KV | None, new: KV) -> KV:
    """A layer's KV cache with the keys and values of new positions appended (dim 2)."""
    if past is None:
        return new
    return torch.cat([past[0], new[0]], 2), torch.cat([past[1], new[1]], 2)


def repeated(caches: list[KV], times: int) -> list[KV]:
    """Every layer's keys and values (N, H, P, d/H) tiled `times` along N: the same prefix under a
    batch of `times` candidates, candidate-major as `z.reshape(times * N, ...)` lays them out."""
    return [(k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for k, v in caches]


def pick(logits: torch.Tensor, options: Options, g: torch.Generator) -> torch.Tensor:
    """Tokens (N,) from logits (N, V): greedy, or sampled with temperature and top-k (`dbcore sample`'s
    --greedy, --temperature, --top-k)."""
    if options.greedy:
        return logits.argmax(-1)
    logits = logits.float() / float(options.temperature or 1.0)
    k = options.top_k
    if k:
        kth = logits.topk(min(int(k), logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g)[:, 0].to(logits.device)


def chosen_sampler(options: Options, configured: str, samplers: tuple[str, ...], who: str) -> str:
    """The sampler of an eval or sample call: the option given, else the config's; one of `samplers`."""
    sampler = options.sampler or configured
    if sampler not in samplers:
        raise ValueError(f"{arg('sampler', sampler)}: {who} samples with one of {samplers}")
    return sampler


def bits(nats: float) -> float:
    return nats / math.log(2)


POSITIONS = ("rope", "learned")  # rotary in every attention layer, or a learned table added to the input


@dataclass
class TextModelConfig:
    """The [model] keys every language-model recipe shares; `depth` layers split into `num_blocks`
    blocks. A recipe's config extends it and calls `super().__post_init__()`."""

    seq_len: int = 128
    stride: int = 0  # windows of the training text start every `stride` characters; 0 = seq_len
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_blocks: int = 2
    layer_split: list[int] | None = None  # layers per block, network order; None = depth / B each
    gate_init: float = 0.0  # adaLN gates at initialisation: 0 = adaLN-Zero
    positions: str = "rope"  # rotary positions in every layer, or "learned" (a table added to the input)

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.stride < 0:
            raise ValueError(f"need seq_len >= 2 and stride >= 0, got {self.seq_len}, {self.stride}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.layer_split is not None:
            self.layer_split = [int(n) for n in self.layer_split]
        block_layers(self)  # validates depth, num_blocks and layer_split


class TokenEmbedding(nn.Module):
    """Token ids (N, T) -> (N, T, d): a learned table (`num_ids` rows), plus a learned position
    table when positions are "learned" (with "rope" the attention layers rotate q and k instead)."""

    def __init__(self, num_ids: int, seq_len: int, dim: int, positions: str = "rope") -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.table = nn.Embedding(num_ids, dim)
        nn.init.normal_(self.table.weight, std=POS_INIT_STD)
        self.pos = None
        if positions == "learned":
            self.pos = nn.Parameter(torch.zeros(seq_len, dim))
            nn.init.normal_(self.pos, std=POS_INIT_STD)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (N, t) at positions start..start+t-1 -> (N, t, d)."""
        return self.table(ids) + self.at(torch.arange(start, start + ids.shape[1], device=ids.device))

    def at(self, positions: torch.Tensor) -> torch.Tensor | float:
        """The learned position rows (t, d) of `positions` (t,), or 0 with rotary positions."""
        return 0.0 if self.pos is None else self.pos[positions]
