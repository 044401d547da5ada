"""An independent judge of generated text: an interpolated Kneser-Ney character n-gram model.

`KneserNey.fit(train_text)` counts character n-grams of the training text; `bits_per_char(text)`
then scores text that a character language model generated (mean -log2 P per character under the
judge). Nothing here depends on a neural model; only the standard library is used.

The model is interpolated Kneser-Ney (Chen & Goodman 1999, section 3, "interpolated KN") with one
absolute discount per order, estimated with the Ney formula D = n1 / (n1 + 2 n2) (n_r = number of
n-grams of that order whose count is exactly r); `KN_DISCOUNT` is the fallback when the estimate is
undefined (n1 = 0 or n2 = 0, i.e. tiny texts). The highest order used for a prediction takes raw
counts; every lower order takes continuation counts N1+(. h w) (the number of distinct characters
seen before h w), each with its own discount.

Unknown characters: the unigram level is interpolated with a uniform distribution over the
training vocabulary plus one "unknown" slot, so every character gets a nonzero probability and
P(. | h) sums to 1 over vocab + {unknown}. Every character outside the vocabulary maps to that one
slot (they all get the unknown slot's probability). Contexts never seen in training back off fully
to the next lower order.
"""

from __future__ import annotations

import math
import random
from collections import Counter

DEFAULT_ORDER = 5
KN_DISCOUNT = 0.75  # used only when the Ney estimate n1 / (n1 + 2 n2) is undefined
BOOTSTRAP = 2000  # resamples of a ratio of mean judge BPCs


def _ney_discount(counts: Counter[str]) -> float:
    """D = n1 / (n1 + 2 n2) (Ney, Essen & Kneser 1994; Chen & Goodman 1999), in (0, 1)."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else KN_DISCOUNT


def _context_stats(counts: Counter[str]) -> dict[str, tuple[int, int]]:
    """For each context h: (sum_w c(h w), N1+(h .) = number of distinct w with c(h w) > 0)."""
    stats: dict[str, list[int]] = {}
    for gram, c in counts.items():
        s = stats.setdefault(gram[:-1], [0, 0])
        s[0] += c
        s[1] += 1
    return {h: (s[0], s[1]) for h, s in stats.items()}


class _Level:
    """Counts of one order k (k-grams), their per-context totals and their discount."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.context = _context_stats(counts)
        self.discount = _ney_discount(counts)


class KneserNey:
    """Interpolated Kneser-Ney character n-gram model (Chen & Goodman 1999, interpolated,
    one Ney-estimated discount per order and count type; not modified KN)."""

    def __init__(self, order: int = DEFAULT_ORDER) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        self.vocab: frozenset[str] = frozenset()
        # raw[k] / cont[k]: level k (k-grams, context length k-1), k = 1..order; cont[order] unused.
        self._raw: dict[int, _Level] = {k: _Level(Counter()) for k in range(1, order + 1)}
        self._cont: dict[int, _Level] = {k: _Level(Counter()) for k in range(1, order)}
        self._cache: dict[tuple[str, str, bool], float] = {}

    @classmethod
    def fit(cls, text: str, order: int = DEFAULT_ORDER) -> KneserNey:
        """Count all k-grams of `text` (k = 1..order) and build the model."""
        model = cls(order)
        n = order
        raw: dict[int, Counter[str]] = {n: Counter(text[i : i + n] for i in range(len(text) - n + 1))}
        # c(k-gram) = sum of c((k+1)-grams extending it to the right, plus 1 for the text's last k chars.
        for k in range(n - 1, 0, -1):
            lower: Counter[str] = Counter()
            for gram, c in raw[k + 1].items():
                lower[gram[:k]] += c
            if len(text) >= k:
                lower[text[-k:]] += 1
            raw[k] = lower
        # Continuation counts N1+(. g) = number of distinct x with c(x g) > 0 (Chen & Goodman 1999).
        cont: dict[int, Counter[str]] = {}
        for k in range(1, n):
            cont[k] = Counter(gram[1:] for gram in raw[k + 1])
        model.vocab = frozenset(text)
        model._raw = {k: _Level(c) for k, c in raw.items()}
        model._cont = {k: _Level(c) for k, c in cont.items()}
        return model

    def _p(self, h: str, w: str, raw: bool) -> float:
        """P(w | h) at level len(h)+1, using raw counts if `raw` else continuation counts."""
        key = (h, w, raw)
        p = self._cache.get(key)
        if p is not None:
            return p
        k = len(h) + 1
        level = self._raw[k] if raw else self._cont[k]
        total, types = level.context.get(h, (0, 0))
        if k == 1:
            uniform = 1.0 / (len(self.vocab) + 1)  # vocab + one unknown slot
            lower = uniform
        else:
            lower = self._p(h[1:], w, raw=False)
        if total == 0:  # unseen context: back off fully
            p = lower if k > 1 else uniform
        else:
            # P(w|h) = max(c(hw) - D, 0) / c(h.) + D N1+(h.) / c(h.) * P_lower(w | h[1:])
            # (Chen & Goodman 1999, interpolated KN; c = raw or continuation counts).
            d = level.discount
            p = max(level.counts.get(h + w, 0) - d, 0.0) / total + d * types / total * lower
        self._cache[key] = p
        return p

    def prob(self, context: str, char: str) -> float:
        """P(char | last order-1 characters of context); out-of-vocab chars share the unknown slot."""
        if len(char) != 1:
            raise ValueError(f"char must be a single character, got {char!r}")
        h = context[max(0, len(context) - self.order + 1) :] if self.order > 1 else ""
        return self._p(h, char, raw=True)

    def bits_per_char(self, text: str, context: str = "") -> float:
        """Mean -log2 P(c_i | context + text[:i]) over the characters c_i of `text`."""
        if not text:
            raise ValueError("cannot score empty text")
        full = context + text
        start = len(context)
        m = self.order - 1
        total = 0.0
        for i in range(start, len(full)):
            total -= math.log2(self.prob(full[max(0, i - m) : i], full[i]))
        return total / len(text)


def distinct_ngram_ratio(texts: list[str], n: int = 4) -> float:
    """Distinct n-grams / total n-grams over all texts (each text's own n-grams; 0.0 if none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [t[i : i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def judge_samples(judge: KneserNey, texts: list[str], prompt: str = "") -> dict:
    """The judge's verdict on generated texts that each start with `prompt`: every sample's BPC
    (`scores`, the prompt as context), their mean `judge_bpc` and the bodies' `distinct_4`."""
    bodies = [t[len(prompt):] for t in texts]
    scores = [judge.bits_per_char(b, context=prompt) for b in bodies]
    return {"judge_bpc": sum(scores) / len(scores), "distinct_4": distinct_ngram_ratio(bodies, 4),
            "scores": scores}


def ratio_interval(a: list[float], b: list[float], level: float = 0.95, resamples: int = BOOTSTRAP,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of mean(a) / mean(b), each list resampled on its own (independent samples)."""
    rng = random.Random(seed)
    ratios = sorted((sum(rng.choices(a, k=len(a))) / len(a)) / (sum(rng.choices(b, k=len(b))) / len(b))
                    for _ in range(resamples))
    tail = (1.0 - level) / 2
    return ratios[int(tail * resamples)], ratios[int((1.0 - tail) * resamples) - 1]
