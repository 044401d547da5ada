"""Generation past the training window: every LM recipe (blocks and end-to-end runs) writes texts of
any length, the next-token LMs by sliding their context window, the MDLM window by window."""

import pytest
import torch

from dbcore import api
from dbcore.method.options import Options
from dbcore.models.lm import generate_tokens
from dbcore.recipes import for_config

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12
SEQ_LEN = 16
TINY = {"seq_len": SEQ_LEN, "dim": 32, "heads": 2}
MODELS = {
    "mdlm": {"recipe": "mdlm", "depth": 2, "num_blocks": 2, "sample_steps": 4},
    "arlm": {"recipe": "arlm", "depth": 2, "num_blocks": 2, "positions": "learned"},  # no row past the table
    "looped": {"recipe": "looped", "prelude_layers": 1, "core_layers": 1, "coda_layers": 1, "iterations": 3,
               "train_iterations": 3, "backprop_iterations": 2},
}
TRAIN = {"steps": 3, "batch_size": 8, "warmup_steps": 1}
LENGTH = 2 * SEQ_LEN + 5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{recipe: {"blocks": run, "e2e": run}}, each trained for a few steps."""
    root = tmp_path_factory.mktemp("long")
    (root / "train.txt").write_text(TEXT)
    out = {}
    for recipe, model in MODELS.items():
        cfg = api.config({"model": {**TINY, **model}, "train": TRAIN})
        store = api.cache(cfg, f"text:{root / 'train.txt'}", root / f"{recipe}.zarr")
        api.train(cfg, store, root / f"{recipe}-blocks")
        api.train(cfg, store, root / f"{recipe}-e2e", e2e=True)
        out[recipe] = {"blocks": root / f"{recipe}-blocks", "e2e": root / f"{recipe}-e2e"}
    return out


def _samplers(recipe: str, kind: str) -> list[str | None]:
    return ["euler", "ancestral"] if recipe != "mdlm" and kind == "blocks" else [None]


@pytest.mark.parametrize("kind", ["blocks", "e2e"])
@pytest.mark.parametrize("recipe", list(MODELS))
def test_texts_past_the_window_have_the_length_asked_and_are_reproducible(runs, recipe, kind):
    run = runs[recipe][kind]
    for sampler in _samplers(recipe, kind):
        texts = api.sample_text(run, num=2, length=LENGTH, prompt="To", seed=3, sampler=sampler)
        assert len(texts) == 2 and all(len(t) == LENGTH and t.startswith("To") for t in texts)
        assert set("".join(texts)) <= set(TEXT)
        assert texts == api.sample_text(run, num=2, length=LENGTH, prompt="To", seed=3, sampler=sampler)
        # the same draws inside the window: a longer text continues the text of length seq_len
        window = api.sample_text(run, num=2, length=SEQ_LEN, prompt="To", seed=3, sampler=sampler)
        assert [t[:SEQ_LEN] for t in texts] == window
        prompt = TEXT[:SEQ_LEN + 4]  # longer than the window: its tail conditions, all of it is kept
        (long,) = api.sample_text(run, length=LENGTH, prompt=prompt, seed=3, sampler=sampler, greedy=True)
        assert len(long) == LENGTH and long.startswith(prompt)


@pytest.mark.parametrize("recipe", list(MODELS))
def test_a_length_within_the_prompt_is_one_clear_error(runs, recipe):
    with pytest.raises(ValueError, match=r"^length=2 must be more than the prompt's 2 tokens$"):
        api.sample_text(runs[recipe]["blocks"], length=2, prompt="To")


def test_the_context_slides_by_half_a_window_and_stays_inside_it():
    """`encode` is handed the newest token at the next position while the context fits seq_len - 1
    tokens, else the last seq_len // 2 tokens from position 0 with fresh caches."""
    t, calls, greedy = 8, [], Options(greedy=True)

    def encode(new, start, caches):
        calls.append((start, new.shape[1], caches is None))
        return torch.eye(5)[(new[:, -1] + 1) % 5] * 9, "caches"  # (N, V): greedy picks the token after

    x = generate_tokens(torch.tensor([[0, 1, 2]]), 20, t, encode, greedy, torch.Generator())
    assert x.shape == (1, 20) and torch.equal(x[0, 3:], (torch.arange(3, 20) % 5))
    assert calls[:6] == [(0, 3, True), (3, 1, False), (4, 1, False), (5, 1, False), (6, 1, False),
                         (0, 4, True)]
    assert max(start + n for start, n, _ in calls) == t - 1
    assert all(n == t // 2 for start, n, fresh in calls[1:] if fresh)
    generate_tokens(torch.zeros(1, 12, dtype=torch.long), 13, t, encode, greedy, torch.Generator())
    assert calls[-1] == (0, t - 1, True)  # a long prompt: its last seq_len - 1 tokens


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_sliding_kv_caches_give_the_tokens_of_full_forwards_of_each_context(positions):
    """The baseline, greedy: KV-cached generation past the window equals re-running the whole
    context (the same slides) through the parallel forward at every token."""
    seq_len = 8
    recipe = for_config(api.config({"model": {**MODELS["arlm"], **TINY, "seq_len": seq_len,
                                              "positions": positions}}))
    torch.manual_seed(0)
    model = recipe.build_e2e(recipe.example_frozen()).eval()  # 65 tokens
    x = torch.randint(0, 65, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = generate_tokens(x, 30, seq_len, model.extend, Options(greedy=True), torch.Generator())
        ref, start = x, 0
        while ref.shape[1] < 30:
            if ref.shape[1] - start > seq_len - 1:
                start = ref.shape[1] - seq_len // 2
            ref = torch.cat([ref, model(ref[:, start:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
