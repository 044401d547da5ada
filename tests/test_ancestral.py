"""The token-ancestral chain's sum over a level's tokens: exact and stratified (`models.ancestral`)."""

import pytest
import torch

from dbcore.models.ancestral import Estimator, LevelNoise, level_probs

N, T, D = 3, 5, 8


def _setup(vocab_size: int, seed: int = 0, sharp: float = 3.0):
    """E (V, D), a readout that reads a token distribution off the noisy row, and a previous
    level's distribution (N, T, V) with a long tail."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(vocab_size, D, generator=g), dim=-1) * 2
    calls = []

    def readout(z: torch.Tensor) -> torch.Tensor:  # (C, N, T, D) -> (C, N, T, V)
        calls.append(len(z))
        return torch.softmax(sharp * z @ emb.T, -1)

    prev = torch.softmax(2.0 * torch.randn(N, T, vocab_size, generator=g), -1)
    truth = torch.randint(0, vocab_size, (N, T), generator=g)
    return emb, readout, prev, truth, calls


def _noise(vocab_size: int, seed: int = 0, level: int = 1) -> LevelNoise:
    return LevelNoise(torch.arange(N), (T, D), seed, 2, level, 1, vocab_size, torch.device("cpu"))


def _exact(readout, emb, prev):
    """sum_a prev[a] readout(E[a]) over every token, without noise (sigma = 0)."""
    rows = readout(emb[:, None, None, :].expand(-1, N, T, -1))  # (V, N, T, V): every token at every row
    return torch.einsum("ntv,vntw->ntw", prev, rows)


def test_stratified_sum_is_unbiased_and_exact_on_the_true_token_and_the_head():
    emb, readout, prev, truth, _ = _setup(40)
    exact = _exact(readout, emb, prev)
    est = Estimator(head=3, tail=2)
    runs = torch.stack([level_probs(readout, emb, 0.0, _noise(40, seed=s), prev, truth, est)
                        for s in range(300)])  # (S, N, T, V): tail draws from 300 seeds
    assert runs.sum(-1).sub(1).abs().max() < 1e-4  # each estimate sums to 1
    tv = 0.5 * (runs - exact).abs().sum(-1)  # (S, N, T): each estimate's error
    tv_of_mean = 0.5 * (runs.mean(0) - exact).abs().sum(-1)  # (N, T)
    assert (tv_of_mean / tv.mean(0)).max() < 0.2  # unbiased: the mean's error shrinks (~1/sqrt(S))
    # with no tail mass (a vocabulary the strata cover but for one token of no mass), no error at all
    head_only = prev.clone()
    least = prev.scatter(-1, truth[..., None], 2.0).argmin(-1, keepdim=True)  # a token besides the truth
    head_only.scatter_(-1, least, 0.0)
    head_only /= head_only.sum(-1, keepdim=True)
    one = level_probs(readout, emb, 0.0, _noise(40), head_only, truth, Estimator(head=38, tail=0))
    torch.testing.assert_close(one, _exact(readout, emb, head_only), atol=1e-6, rtol=1e-5)


def test_the_true_tokens_probability_is_accurate_where_a_level_keeps_its_token():
    """Late levels nearly keep the token they are handed: the truth's probability after them is
    mostly its probability before, which the stratum of the true token carries exactly."""
    emb, readout, prev, truth, _ = _setup(200, sharp=40.0)
    exact = _exact(readout, emb, prev).gather(-1, truth[..., None])
    est = level_probs(readout, emb, 0.0, _noise(200), prev, truth, Estimator(head=1, tail=1))
    rel = (est.gather(-1, truth[..., None]) - exact).abs() / exact
    assert rel.max() < 0.05, rel.max()


def test_the_stratified_cost_does_not_grow_with_the_vocabulary():
    counts = {}
    for vocab_size in (64, 1024):
        emb, readout, prev, truth, calls = _setup(vocab_size, sharp=0.5)
        level_probs(readout, emb, 0.5, _noise(vocab_size), prev, truth, Estimator(head=3, tail=4))
        stratified = sum(calls)
        calls.clear()
        level_probs(readout, emb, 0.5, _noise(vocab_size), prev, truth, Estimator(exact=True))
        counts[vocab_size] = (stratified, sum(calls))
    assert counts[64][0] == counts[1024][0] == 8  # true token + 3 + 4 rows of readout per level
    assert counts[1024][1] > 4 * counts[64][1]  # the exact sum's slots follow the mass


def test_a_vocabulary_the_strata_cover_is_summed_exactly():
    emb, readout, prev, truth, _ = _setup(6)
    assert Estimator(head=3, tail=4).slots(6) is None and Estimator(head=3, tail=4).slots(9) == 8
    a = level_probs(readout, emb, 0.3, _noise(6), prev, truth, Estimator(head=3, tail=4))
    b = level_probs(readout, emb, 0.3, _noise(6), prev, truth, Estimator(exact=True))
    assert torch.equal(a, b)


def test_negative_strata_are_refused():
    with pytest.raises(ValueError, match="eval_head and eval_tail must be >= 0"):
        Estimator(head=-1)
