"""What the language-model recipes share: the tokenizer in the store, the token stream of a text
source, the token-and-position embedding, bits per token and per byte.

The store holds `tokens` (num_tokens,) uint16/uint32, the corpus as one stream cut into windows at
read time, and `tokenizer`, the tokenizer's JSON bytes; `tokenizer` is a frozen array, so every
checkpoint carries it and evaluation or sampling maps text through the tokenizer the run was
trained on (a character outside a `char` vocabulary is a clear error).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
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
from dbcore.models.tokenizer import Tokenizer, char_tokenizer, from_bytes, parse_spec
from dbcore.wording import arg

POS_INIT_STD = 0.02  # learned positions and token embeddings, as GPT-2 / nanoGPT
EVAL_BATCH = 64  # windows per forward pass in evaluation


def check_text_source(source: Any, recipe: str) -> Any:
    if not hasattr(source, "windows"):
        raise SourceError(f"source {source.spec}: recipe {recipe!r} needs a text source "
                          "(text:, jsonl: or parquet:)")
    return source


def tokenizer_array(tokenizer: Tokenizer) -> np.ndarray:
    """(nbytes,) uint8: the store's `tokenizer` array."""
    return np.frombuffer(tokenizer.to_bytes(), dtype=np.uint8).copy()


def tokenizer_of(frozen: Frozen) -> Tokenizer:
    """The run's tokenizer from its frozen `tokenizer` array (store or checkpoint)."""
    return from_bytes(frozen[layout.TOKENIZER].cpu().numpy().astype(np.uint8))


def vocab_size(frozen: Frozen) -> int:
    return len(tokenizer_of(frozen))


def text_arrays(source: Any, recipe: str, seq_len: int) -> tuple[dict, dict]:
    """Cached arrays of a text recipe: the token stream and the tokenizer, and their attributes.
    The store does not depend on the window, but a text shorter than one is refused."""
    src = check_text_source(source, recipe)
    src.windows(seq_len)  # a SourceError when the text is shorter than one window
    tokenizer = tokenizer_array(src.tokenizer)
    arrays = {layout.TOKENS: src.tokens, layout.TOKENIZER: tokenizer}
    attrs = {"text": {"num_tokens": src.num_tokens, "num_bytes": src.num_bytes,
                      "num_documents": src.num_documents, "tokenizer": src.tokenizer.spec,
                      "vocab_size": len(src.tokenizer),
                      # a Ray task that trained another BPE would write other ids: the plans differ
                      "tokenizer_sha256": hashlib.sha256(tokenizer.tobytes()).hexdigest()}}
    return arrays, attrs


def token_target_arrays(source: Any, recipe: str, m: Any, seed: int) -> tuple[dict, dict]:
    """Cached arrays of a recipe whose targets are token embeddings (AR, looped): the stream, the
    tokenizer and the frozen rows E (seeded random, norm `target_scale`, METHOD.md 12)."""
    arrays, attrs = text_arrays(source, recipe, m.seq_len)
    v = len(source.tokenizer)
    arrays[layout.TARGET_EMBEDDING] = make_target_embedding(v, m.dim, seed, m.target_scale).numpy()
    attrs["target_embedding"] = {"kind": "seeded-random", "seed": seed, "scale": m.target_scale}
    return arrays, attrs


def example_tokenizer() -> torch.Tensor:
    """The frozen `tokenizer` a fresh cache writes for 65 printable characters (benchmarks)."""
    return torch.from_numpy(tokenizer_array(char_tokenizer("".join(chr(c) for c in range(32, 32 + 65)))))


def example_token_frozen(m: Any, seed: int = 0) -> Frozen:
    """Frozen arrays as a fresh cache would write them for `example_tokenizer` (benchmarks)."""
    tokenizer = example_tokenizer()
    v = vocab_size({layout.TOKENIZER: tokenizer})
    emb = make_target_embedding(v, m.dim, seed, m.target_scale)
    return {layout.TOKENIZER: tokenizer, layout.TARGET_EMBEDDING: emb}


def example_token_batch(seq_len: int, batch_size: int, frozen: Frozen, device: torch.device
                        ) -> dict[str, torch.Tensor]:
    """A seeded random batch of token windows (N, seq_len) and its sample indices (benchmarks)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size(frozen), (batch_size, seq_len), generator=g)
    return {layout.TOKENS: tokens.to(device), INDEX: torch.arange(batch_size, device=device)}


def prompt_rows(options: Options, vocab: Tokenizer, seq_len: int, device: torch.device
                ) -> tuple[torch.Tensor, int, torch.Generator]:
    """Where a next-token LM's generation starts: the prompt (default a newline) as `num` rows
    (N, P) on `device`, the length to grow them to (`text_length`) and the sampling generator
    seeded from the options."""
    prompt = encode_prompt(options.prompt or "\n", vocab)
    length = text_length(options, len(prompt), seq_len)
    g = torch.Generator().manual_seed(int(options.seed or 0))
    return prompt.to(device).expand(options.num, -1).clone(), length, g


def text_length(options: Options, prompt_len: int, seq_len: int) -> int:
    """Tokens per text of a sample call, prompt included: `length` (default seq_len; any length,
    past the window too), more than the prompt's `prompt_len`."""
    length = options.length or seq_len
    if length <= prompt_len:
        raise ValueError(f"{arg('length', length)} must be more than the prompt's {prompt_len} tokens")
    return length


def eval_windows(source: Any, seq_len: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows (N, T) int64 of a text source (read through the run's tokenizer)."""
    rows = source.windows(seq_len)
    n = len(rows) if not limit else min(limit, len(rows))
    return torch.from_numpy(np.array(rows[:n], dtype=np.int64))


def text_scores(nats: torch.Tensor, scored: torch.Tensor, tokenizer: Tokenizer) -> dict[str, Any]:
    """The report of a language model's `nats` (N,) summed over each window's scored tokens
    `scored` (N, t): bits per token and its standard error over windows, `bpb` (bits per UTF-8
    byte of the text the scored tokens decode to, window by window: comparable across
    tokenizers) and, for `char`, the same per token as `bpc` and `bpc_stderr`."""
    n, t = scored.shape
    per_token = nats.double() / t  # (N,)
    num_bytes = sum(tokenizer.num_bytes(row.numpy()) for row in scored)
    out = {"bits_per_token": bits(float(per_token.mean())),
           "bits_per_token_stderr": bits(float(per_token.std()) / n**0.5) if n > 1 else float("nan"),
           "bpb": bits(float(nats.double().sum())) / max(1, num_bytes),
           "num_tokens": n * t, "num_bytes": num_bytes, "tokenizer": tokenizer.spec}
    if tokenizer.spec == "char":
        out["bpc"], out["bpc_stderr"] = out["bits_per_token"], out["bits_per_token_stderr"]
    return out


def encode_prompt(prompt: str, vocab: Tokenizer) -> torch.Tensor:
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
    stride: int = 0  # training windows start every `stride` tokens (jittered per epoch); 0 = seq_len
    tokenizer: str = "char"  # char, bpe:N (trained on the training source) or file:PATH (tokenizer.json)
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
        parse_spec(self.tokenizer)
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


Encode = Callable[[torch.Tensor, int, Any], tuple[torch.Tensor, Any]]  # `generate_tokens`'s `encode`


def generate_tokens(x: torch.Tensor, length: int, seq_len: int, encode: Encode, options: Options,
                    g: torch.Generator) -> torch.Tensor:
    """Tokens x (N, P) grown to `length` by a next-token LM of window seq_len, any length: it
    predicts a token from at most seq_len - 1 tokens of context at positions 0.. (as in training,
    where the last token of a window is a target only), picked by `pick`. `encode(tokens, start,
    caches)` takes tokens (N, t) at positions start.. into the KV caches (start 0: fresh caches,
    `caches` None) and returns the next token's logits (N, V) and the caches.

    The context slides as nanoGPT's `generate` crops it, but by half a window: once it is full,
    its last seq_len // 2 tokens are encoded afresh from position 0 (rotary positions or a
    learned table of seq_len rows: a cache cannot shift). One re-encoding of seq_len // 2 tokens
    per seq_len // 2 new ones costs about one more row per token, where cropping to seq_len - 1
    tokens at every token would re-encode the whole window per token (the looped LM's K
    iterations of it, too); each token still sees at least seq_len // 2 tokens, a window of the
    training text starting anywhere. The first context is the prompt's last seq_len - 1 tokens."""
    new, start, caches = x[:, -(seq_len - 1):], 0, None  # (N, t) at positions start..
    while True:
        logits, caches = encode(new, start, caches)  # (N, V)
        x = torch.cat([x, pick(logits, options, g)[:, None]], 1)  # (N, L + 1)
        if x.shape[1] >= length:
            return x
        start += new.shape[1]  # the context's tokens, all in the caches
        if start < seq_len - 1:
            new = x[:, -1:]
        else:  # the window is full: its last half from position 0
            new, start, caches = x[:, -(seq_len // 2):], 0, None
