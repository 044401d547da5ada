"""Tests of the Kneser-Ney character judge (dbcore.metrics.judge)."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from dbcore.metrics.judge import (
    DEFAULT_ORDER,
    KN_DISCOUNT,
    KneserNey,
    distinct_ngram_ratio,
    judge_samples,
    ratio_interval,
)

SHAKESPEARE = Path("/work/shared/datasets/shakespeare")
WORDS = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far "]


def _word_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) for _ in range(n_words))


def _unknown_char(model: KneserNey) -> str:
    return next(c for c in "\x00\x01~#@" if c not in model.vocab)


def _total_mass(model: KneserNey, context: str) -> float:
    return math.fsum(model.prob(context, c) for c in model.vocab) + model.prob(context, _unknown_char(model))


def test_distribution_sums_to_one_for_every_context_length() -> None:
    text = _word_text(400, seed=0)
    model = KneserNey.fit(text, order=4)
    rng = random.Random(1)
    for length in range(0, 4):
        seen = sorted({text[i : i + length] for i in range(len(text) - length)})
        for context in rng.sample(seen, min(3, len(seen))):
            assert _total_mass(model, context) == pytest.approx(1.0, abs=1e-9), repr(context)
    # Unseen contexts: made of vocabulary characters, of unknown characters, and longer than order-1.
    for context in ["ttt", "zq", "\x00\x00\x00", "q", "xxxxxxthe", "t"]:
        assert _total_mass(model, context) == pytest.approx(1.0, abs=1e-9), repr(context)


def test_hand_computed_bigram() -> None:
    # "abcabd", order 2: bigrams ab:2 bc:1 ca:1 bd:1 -> n1=3, n2=1, D2 = 3/5.
    # Continuation unigrams N1+(. w) = 1 for a, b, c, d -> n2 = 0, so D1 = KN_DISCOUNT (0.75).
    model = KneserNey.fit("abcabd", order=2)
    d1, d2 = KN_DISCOUNT, 3 / 5
    p_uni = (1 - d1) / 4 + d1 * 4 / 4 / 5  # max(N1+(.w) - D, 0)/N1+(..) + D * 4 types / 4 * 1/(V+1)
    assert model.prob("b", "c") == pytest.approx((1 - d2) / 2 + d2 * 2 / 2 * p_uni)
    assert model.prob("b", "a") == pytest.approx(d2 * p_uni)
    assert model.prob("b", "z") == pytest.approx(d2 * d1 / 5)  # unknown: uniform share only


def test_order_one_is_smoothed_unigram() -> None:
    text = "aaabbc"  # a:3 b:2 c:1 -> n1=1, n2=1 -> D = 1/3
    model = KneserNey.fit(text, order=1)
    counts, total, v = Counter(text), len(text), len(set(text))
    d = 1 / 3
    for c in "abcz":
        expected = max(counts[c] - d, 0) / total + d * v / total / (v + 1)
        assert model.prob("", c) == pytest.approx(expected)
        assert model.prob("whatever context", c) == pytest.approx(expected)
    # A higher-order model with an empty context uses raw unigram counts too.
    high = KneserNey.fit(text, order=DEFAULT_ORDER)
    for c in "abcz":
        assert high.prob("", c) == pytest.approx(model.prob("", c))


def test_only_last_order_minus_one_chars_matter() -> None:
    model = KneserNey.fit(_word_text(300, seed=2), order=4)
    for c in "tca ":
        assert model.prob("qqqqq the", c) == pytest.approx(model.prob("the", c))
        assert model.prob("xx cat", c) == pytest.approx(model.prob("cat", c))


def test_higher_order_beats_unigram_on_held_out() -> None:
    train, held_out = _word_text(3000, seed=3), _word_text(300, seed=4)
    bpc = {k: KneserNey.fit(train, order=k).bits_per_char(held_out) for k in (1, 2, 3, 5)}
    assert bpc[1] > bpc[2] > bpc[3] > bpc[5]
    assert bpc[5] < bpc[1] - 1.0


def test_bits_per_char_matches_prob_with_context() -> None:
    model = KneserNey.fit(_word_text(200, seed=5), order=3)
    context, text = "the ca", "t sat"
    expected = -sum(math.log2(model.prob(context + text[:i], text[i])) for i in range(len(text)))
    assert model.bits_per_char(text, context=context) == pytest.approx(expected / len(text))


def test_unseen_characters_have_finite_cost() -> None:
    model = KneserNey.fit("aaaa", order=3)
    bpc = model.bits_per_char("xyz!")
    assert math.isfinite(bpc) and bpc > 0
    assert 0 < model.prob("aa", "x") < model.prob("aa", "a")
    assert math.isfinite(KneserNey.fit("a", order=5).bits_per_char("ba"))
    assert KneserNey().prob("", "q") == 1.0  # empty vocabulary: all mass on the unknown slot


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        KneserNey(order=0)
    model = KneserNey.fit("abc", order=2)
    with pytest.raises(ValueError):
        model.prob("a", "bc")
    with pytest.raises(ValueError):
        model.bits_per_char("")


def test_distinct_ngram_ratio() -> None:
    assert distinct_ngram_ratio(["abcabc"], n=3) == pytest.approx(3 / 4)  # abc, bca, cab, abc
    assert distinct_ngram_ratio(["abc", "abc"], n=3) == pytest.approx(1 / 2)
    assert distinct_ngram_ratio(["ab", "abcd"], n=3) == pytest.approx(1.0)  # abc, bcd; "ab" adds none
    assert distinct_ngram_ratio(["aaaa", "aaaa"], n=2) == pytest.approx(1 / 6)
    assert distinct_ngram_ratio(["ab"], n=4) == 0.0
    assert distinct_ngram_ratio([]) == 0.0
    assert distinct_ngram_ratio(["abcd", "bcda"]) == pytest.approx(1.0)  # default n=4, across texts


@pytest.mark.skipif(not (SHAKESPEARE / "train.txt").exists(), reason="Shakespeare data not present")
def test_shakespeare_bits_per_char() -> None:
    model = KneserNey.fit((SHAKESPEARE / "train.txt").read_text(encoding="utf-8"), order=DEFAULT_ORDER)
    valid = (SHAKESPEARE / "valid.txt").read_text(encoding="utf-8")[:20_000]
    bpc = model.bits_per_char(valid)
    assert 1.5 < bpc < 3.0
    for context in ["", "T", "th", "the", "the ", "ROMEO", "\x00zq"]:
        assert _total_mass(model, context) == pytest.approx(1.0, abs=1e-9)
    rng = random.Random(0)
    vocab = sorted(model.vocab)
    noise = "".join(rng.choice(vocab) for _ in range(5_000))
    assert model.bits_per_char(noise) > 5.0


def test_judge_samples_scores_bodies_after_the_prompt() -> None:
    model = KneserNey.fit("the cat sat on the mat. " * 20, order=3)
    texts = ["\nthe cat", "\nzzzzzzz"]
    verdict = judge_samples(model, texts, prompt="\n")
    assert verdict["scores"] == [model.bits_per_char("the cat", context="\n"),
                                 model.bits_per_char("zzzzzzz", context="\n")]
    assert verdict["scores"][1] > verdict["scores"][0]
    assert verdict["judge_bpc"] == pytest.approx(sum(verdict["scores"]) / 2)
    assert verdict["distinct_4"] == distinct_ngram_ratio(["the cat", "zzzzzzz"], 4)


def test_ratio_interval_brackets_the_ratio_and_narrows_with_samples() -> None:
    rng = random.Random(1)
    a = [2.0 + rng.gauss(0, 0.3) for _ in range(64)]
    b = [2.2 + rng.gauss(0, 0.3) for _ in range(64)]
    lo, hi = ratio_interval(a, b)
    ratio = (sum(a) / len(a)) / (sum(b) / len(b))
    assert lo < ratio < hi
    a4, b4 = a * 16, b * 16  # same means, 16x the samples: about 4x narrower
    lo4, hi4 = ratio_interval(a4, b4)
    assert 2.5 < (hi - lo) / (hi4 - lo4) < 6.5
    assert ratio_interval(a, b, seed=3) == ratio_interval(a, b, seed=3)
