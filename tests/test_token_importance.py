"""passes/token_importance.py: each importance operator against a small reference (stories260K)."""
import math

import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.passes.token_importance import _prefill, _window_forward, token_importance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompt(stories):
    loaded, _ = stories
    text = ("Once upon a time there was a little girl named Lily. She loved to play in the "
            "park with her dog Max. One day Max ran after a red ball and Lily ran after him. ")
    ids = loaded.tokenizer(text * 2)["input_ids"]
    return torch.tensor(ids).view(1, -1)


def test_snapkv_equals_eager_attention_mass(stories, prompt):
    """Reference: transformers' own attention probabilities (eager, output_attentions) of the
    last `window` queries, summed over queries and heads, averaged over layers."""
    model = stories[0].model
    window = 8
    got = token_importance(model, prompt, "snapkv", window=window, pool=1)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=prompt, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    ref = torch.stack([a[0, :, -window:, :].sum((0, 1)) for a in att]).mean(0)
    assert got.shape == (prompt.shape[1],)
    assert torch.allclose(got, ref.float(), atol=1e-4, rtol=1e-4)
    # each layer's window rows sum to 1 per query and head
    heads = att[0].shape[1]
    assert math.isclose(float(got.sum()), window * heads, rel_tol=1e-4)
    pooled = token_importance(model, prompt, "snapkv", window=window, pool=3)
    padded = torch.nn.functional.pad(got, (1, 1), value=-1.0)
    assert torch.allclose(pooled, torch.stack([padded[:-2], padded[1:-1], padded[2:]]).amax(0))


def test_selfinfo_equals_prefix_by_prefix_logprob(stories, prompt):
    model = stories[0].model
    got = token_importance(model, prompt, "selfinfo")
    assert math.isinf(float(got[0]))
    with torch.no_grad():
        for t in (1, 5, prompt.shape[1] - 1):
            logits = model(input_ids=prompt[:, :t]).logits[0, -1]
            ref = -torch.log_softmax(logits.float(), -1)[prompt[0, t]]
            assert abs(float(got[t]) - float(ref)) < 1e-4


def test_window_forward_on_a_cut_cache_equals_stepwise_decode(stories, prompt):
    """What the measurements (and KV reduction) compute: the last positions run on the prefix
    cache without some positions equal decode steps on that reduced cache at true positions."""
    from cscompile.runtime.decode_step import decode_logits
    from cscompile.runtime.kv_reduce import reduce_cache

    model = stories[0].model
    n, start = prompt.shape[1], prompt.shape[1] - 4
    with torch.no_grad():
        cache = _prefill(model, prompt)
        full = model(input_ids=prompt).logits[0, start:].float()
        same, _ = _window_forward(model, prompt, cache, start, None)
        assert torch.allclose(same, full, atol=1e-4)
        keep = torch.tensor([0, 1, 2, 3] + list(range(10, start)))
        cut, _ = _window_forward(model, prompt, cache, start, keep)
        assert not torch.allclose(cut, full, atol=1e-3)  # the cut positions mattered
        steps = _prefill(model, prompt[:, :start])
        reduce_cache(steps, keep)
        for i in range(start, n):
            logits = decode_logits(model, prompt[:, i:i + 1], steps,
                                   position_ids=torch.tensor([[i]]))
            assert torch.allclose(logits[0, -1].float(), cut[i - start], atol=1e-4)
        assert steps.get_seq_length() == len(keep) + (n - start)


def test_measured_scores_structure_and_determinism(stories, prompt):
    model = stories[0].model
    kw = dict(window=8, n_measure=24, block=4, sinks=2, seed=1)
    a = token_importance(model, prompt, "measure", **kw)
    b = token_importance(model, prompt, "measure", **kw)
    n = prompt.shape[1]
    assert torch.equal(a, b)
    assert torch.isinf(a[:2]).all() and torch.isinf(a[n - 8:]).all()
    mid = a[2:n - 8]
    assert torch.isfinite(mid).all() and (mid >= 0).all() and float(mid.max()) > 0
    blocks = [mid[i:i + 4] for i in range(0, len(mid), 4)]
    assert all(bool((blk == blk[0]).all()) for blk in blocks)  # one value per measured block


def test_measured_scores_rank_like_exact_single_block_drops(stories, prompt):
    """Reference: the exact response of dropping each block alone (one window forward per
    block). The random measurements (48 < 28 blocks x 2) recover the same top two blocks."""
    model = stories[0].model
    n, window, sinks, block = prompt.shape[1], 8, 2, 4
    start = n - window
    scores = token_importance(model, prompt, "measure", window=window, n_measure=48,
                              block=block, sinks=sinks, seed=1)
    with torch.no_grad():
        cache = _prefill(model, prompt)
        ref = torch.log_softmax(_window_forward(model, prompt, cache, start, None)[0].double(), -1)
        exact = []
        for b in range(math.ceil((start - sinks) / block)):
            keep = torch.tensor([p for p in range(start)
                                 if p < sinks or (p - sinks) // block != b])
            got = torch.log_softmax(_window_forward(model, prompt, cache, start, keep)[0].double(),
                                    -1)
            exact.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
    recovered = [float(scores[sinks + b * block]) for b in range(len(exact))]
    top = lambda xs: sorted(range(len(xs)), key=lambda b: -xs[b])[:2]  # noqa: E731
    assert top(recovered) == top(exact)


def test_recent_and_bad_input(stories, prompt):
    model = stories[0].model
    assert torch.equal(token_importance(model, prompt, "recent"),
                       torch.arange(prompt.shape[1], dtype=torch.float32))
    with pytest.raises(UserInputError, match="method"):
        token_importance(model, prompt, "h2o")
    with pytest.raises(UserInputError, match="odd pool"):
        token_importance(model, prompt, "snapkv", pool=4)
    with pytest.raises(UserInputError, match="cache holds"):
        token_importance(model, prompt, "snapkv", cache=_prefill(model, prompt[:, :5]))
