"""Names of the arrays and attributes of a dbcore cache store: the one place they are spelled."""

from __future__ import annotations

FORMAT = "dbcore-cache"
FORMAT_VERSION = 2  # 2: text as one token stream and a tokenizer

IMAGES = "images"  # (N, H, W, C) uint8: the conditioning inputs, in source order
LABELS = "labels"  # (N,) int64: the clean discrete targets
TARGET_EMBEDDING = "target_embedding"  # (V, d) float32: frozen rows E, y = E[label]
TOKENS = "tokens"  # (num_tokens,) uint16/uint32: a text corpus as one stream of token ids, in order
TOKENIZER = "tokenizer"  # (nbytes,) uint8: the tokenizer as JSON (dbcore.models.tokenizer.to_bytes)
OLD_VOCAB = "vocab"  # the character vocabulary of text stores before format 2 (windows of int32)


def noised_z(block: int) -> str:
    """(N, K, d) float32: z = y + sigma * eps for each of K cached draws of network block `block`."""
    return f"noised_z_b{block}"


def noised_sigma(block: int) -> str:
    """(N, K) float32: the sigma of each cached draw."""
    return f"noised_sigma_b{block}"
