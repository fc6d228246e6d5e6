"""Teacher-forced comparison metrics: KL to dense, top-1 agreement, perplexity, WikiText windows."""
import math

import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.metrics import compare_to_dense, forwards_and_score, perplexity, wikitext_windows


def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(0))
    out = compare_to_dense(logits, logits.clone(), score_from=3)
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["top1"] == 1.0 and out["tokens"] == 2 * 4  # positions 2..5 of each row


def test_known_kl_and_agreement_on_toy_logits():
    # position 0: p = (1/2, 1/2) vs q = (3/4, 1/4); position 1: p = q (both argmax 0)
    # position 2 (predicts nothing) is never scored
    dense = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 9.0]]])
    reduced = torch.tensor([[[math.log(3), 0.0], [2.0, 0.0], [9.0, 0.0]]])
    out = compare_to_dense(dense, reduced, score_from=1)
    assert out["kl"] == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-6)  # float32 log 3
    assert out["top1"] == 1.0  # the tie at position 0 resolves to index 0 on both sides
    flipped = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    assert compare_to_dense(dense, flipped, 2)["top1"] == 0.0  # only position 1 scored


def test_perplexity_known_values():
    ids = torch.tensor([[0, 1, 2, 3, 1]])
    uniform = torch.zeros(1, 5, 4)
    assert perplexity(uniform, ids, 1) == pytest.approx(4.0)
    half = torch.zeros(1, 5, 4)
    half[0, 2:4, :] = torch.tensor([-1e9, 0, 0, -1e9])  # positions 2, 3 predict {1, 2} evenly
    # scored tokens ids[3:] = (3, 1) predicted by positions 2, 3: p(3) ~ 0, p(1) = 1/2
    assert perplexity(half, ids, 4) == pytest.approx(2.0)  # only token ids[4] = 1
    assert perplexity(half, ids, 3) > 1e6


def test_forwards_and_score_runs_under_apply(stories):
    loaded, _ = stories
    text = "Once upon a time, there was a little girl named Lily. She loved to play in the park."
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:24]])
    dense = forwards_and_score(loaded.model, ids, 12)
    assert dense["tokens"] == 12 and 1 < dense["ppl"] < 20  # a story the model knows well
    from contextlib import contextmanager

    @contextmanager
    def flip_sign(model):  # a deliberately broken model: negated final norm weight
        w = model.model.norm.weight
        w.data.neg_()
        try:
            yield model
        finally:
            w.data.neg_()

    broken = forwards_and_score(loaded.model, ids, 12, apply=flip_sign,
                                dense_logits=dense["logits"])
    assert broken["kl"] > 0.5 and broken["ppl"] > dense["ppl"]
    again = forwards_and_score(loaded.model, ids, 12, dense_logits=dense["logits"])
    assert again["kl"] == pytest.approx(0.0, abs=1e-9) and again["top1"] == 1.0


def test_wikitext_windows_are_seeded_and_disjoint(stories, shared_dir):
    loaded, _ = stories
    a = wikitext_windows(loaded.tokenizer, n_windows=6, window=64, seed=0)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, wikitext_windows(loaded.tokenizer, n_windows=6, window=64, seed=0))
    assert not torch.equal(a, wikitext_windows(loaded.tokenizer, n_windows=6, window=64, seed=1))
    assert len({tuple(r.tolist()) for r in a}) == 6


def test_metric_input_errors():
    x = torch.zeros(1, 4, 3)
    with pytest.raises(UserInputError, match="differ in shape"):
        compare_to_dense(x, torch.zeros(1, 5, 3), 1)
    with pytest.raises(UserInputError, match="score_from"):
        compare_to_dense(x, x, 4)
    with pytest.raises(UserInputError, match="does not exist"):
        wikitext_windows(object(), "/nonexistent/wiki.raw")
