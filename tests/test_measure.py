"""Measurement pass: batched masked forwards with a distortion response."""
import numpy as np
import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.execute import UnitMask, masked_logits
from cscompile.passes.measure import measure, recover_importance, unit_space, units_to_mask


def _ids(t=32, seed=0):
    return torch.randint(0, 500, (1, t), generator=torch.Generator().manual_seed(seed))


def test_unit_spaces(stories):
    _, smap = stories
    assert len(unit_space(smap, "head")) == 5 * 8
    assert len(unit_space(smap, "kv_group")) == 5 * 4
    assert len(unit_space(smap, "ffn_block", tile=64)) == 5 * 3
    assert len(unit_space(smap, "layer")) == 5
    with pytest.raises(UserInputError):
        unit_space(smap, "neuron")


def test_units_to_mask_expands_members(stories):
    _, smap = stories
    units = unit_space(smap, "kv_group")
    keep = np.ones((1, len(units)))
    keep[0, 1] = 0  # layer 0, kv group 1 -> query heads 2 and 3
    mask = units_to_mask(smap, units, keep)
    assert mask.heads[0][0].tolist() == [1, 1, 0, 0, 1, 1, 1, 1]


def test_responses_match_single_masked_forwards(stories):
    """Batched responses equal KL computed from separate masked forwards."""
    loaded, smap = stories
    ids = _ids()
    meas = measure(loaded.model, smap, ids, "head", m=6, rate=0.3, seed=1, batch_size=4)
    dense = torch.log_softmax(masked_logits(loaded.model, smap, ids, UnitMask.ones(smap)), -1)
    for i in (0, 5):
        mask = units_to_mask(smap, meas.units, meas.masks[i:i + 1])
        logp = torch.log_softmax(masked_logits(loaded.model, smap, ids, mask), -1)
        kl = (dense.exp() * (dense - logp)).sum(-1)[:, :-1].mean().item()
        assert meas.responses[i] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert (meas.responses >= 0).all() and meas.responses.max() > 0
    assert meas.n_forwards == 7


def test_measure_is_seeded(stories):
    loaded, smap = stories
    a = measure(loaded.model, smap, _ids(), "ffn_block", m=8, seed=3)
    b = measure(loaded.model, smap, _ids(), "ffn_block", m=8, seed=3)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.responses, b.responses)


def test_measurement_count_follows_cs_bound(stories):
    loaded, smap = stories
    meas = measure(loaded.model, smap, _ids(16), "head", k=4, C=2.0)
    n = 40
    assert meas.m_needed == int(np.ceil(2.0 * 4 * np.log(n / 4)))
    capped = measure(loaded.model, smap, _ids(16), "head", k=4, C=2.0, budget=10)
    assert len(capped.responses) == 10 and capped.m_needed > 10


def test_recovery_finds_the_important_heads(stories):
    """Sanity on a real model: units with the largest recovered importance, when dropped
    alone, distort more than the least important ones."""
    loaded, smap = stories
    ids = _ids(48, seed=2)
    meas = measure(loaded.model, smap, ids, "head", m=160, rate=0.1, seed=0)
    rec = recover_importance(meas, k=8, method="lasso")
    order = np.argsort(-rec.importance)
    units = meas.units

    def single_drop(i):
        keep = np.ones((1, len(units)))
        keep[0, i] = 0
        return measure_one(loaded, smap, ids, units, keep)

    top = np.mean([single_drop(i) for i in order[:4]])
    bottom = np.mean([single_drop(i) for i in order[-4:]])
    assert top > 3 * bottom


def measure_one(loaded, smap, ids, units, keep):
    dense = torch.log_softmax(masked_logits(loaded.model, smap, ids, UnitMask.ones(smap)), -1)
    logp = torch.log_softmax(masked_logits(loaded.model, smap, ids, units_to_mask(smap, units, keep)), -1)
    return (dense.exp() * (dense - logp)).sum(-1)[:, :-1].mean().item()


def test_loss_response_and_base(stories):
    loaded, smap = stories
    ids = _ids(24)
    base = UnitMask.ones(smap)
    base.channels[0][:, :50] = 0
    meas = measure(loaded.model, smap, ids, "head", m=4, response="loss", base=base)
    assert meas.extra["base_response"] != 0.0 and len(meas.responses) == 4


def test_shared_masks_average_prompts(stories):
    """Two prompts sharing every mask: the response is the mean of each prompt's own response."""
    loaded, smap = stories
    a, b = _ids(24, seed=1), _ids(24, seed=2)
    both = measure(loaded.model, smap, torch.cat([a, b]), "head", m=5, rate=0.3, seed=4, batch_size=4)
    one = [measure(loaded.model, smap, x, "head", m=5, rate=0.3, seed=4) for x in (a, b)]
    assert np.allclose(both.responses, (one[0].responses + one[1].responses) / 2, rtol=1e-4, atol=1e-7)
    assert both.n_forwards == 2 * 6
    logkl = measure(loaded.model, smap, a, "head", m=5, rate=0.3, seed=4, response="logkl")
    assert np.allclose(logkl.responses, np.log(one[0].responses), rtol=1e-4, atol=1e-6)


def test_around_flips_units_relative_to_a_target(stories):
    """With `around`, a touched kept unit is dropped and a touched dropped unit restored."""
    loaded, smap = stories
    ids = _ids(24)
    n = len(unit_space(smap, "head"))
    target = np.ones(n, np.float32)
    target[:n // 2] = 0  # the first half of the heads are dropped at the operating point
    meas = measure(loaded.model, smap, ids, "head", m=3, rate=0.3, seed=5, around=target)
    dense = torch.log_softmax(masked_logits(loaded.model, smap, ids, UnitMask.ones(smap)), -1)
    for i in range(3):
        keep = np.where(meas.masks[i] > 0, target, 1 - target)[None]
        logp = torch.log_softmax(masked_logits(loaded.model, smap, ids,
                                               units_to_mask(smap, meas.units, keep)), -1)
        kl = (dense.exp() * (dense - logp)).sum(-1)[:, :-1].mean().item()
        assert meas.responses[i] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert meas.extra["base_response"] > 0  # the target itself distorts
    with pytest.raises(UserInputError):
        measure(loaded.model, smap, ids, "head", m=3, around=np.full(n, 0.5))


def test_bad_input(stories):
    loaded, smap = stories
    with pytest.raises(UserInputError):
        measure(loaded.model, smap, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(UserInputError):
        measure(loaded.model, smap, _ids(), response="mse")
    with pytest.raises(UserInputError):
        measure(loaded.model, smap, _ids(), "head", k=100)  # k > N


def test_estimate_cs_averages_prompts(stories):
    from cscompile.passes.measure import estimate_cs

    loaded, smap = stories
    prompts = [_ids(24, seed=s) for s in range(2)]
    imp, info = estimate_cs(loaded.model, smap, prompts, density=0.75, unit_kind="head", budget=40)
    assert imp.shape == (40,) and info["k"] == 10 and info["forwards"] == 2 * 41
    assert all(d["m"] == 40 for d in info["per_prompt"])
    with pytest.raises(UserInputError):
        estimate_cs(loaded.model, smap, [], density=0.5)
    with pytest.raises(UserInputError):
        estimate_cs(loaded.model, smap, prompts, density=1.5)


def test_single_unit_costs_match_one_at_a_time(stories):
    from cscompile.passes.measure import single_unit_costs

    loaded, smap = stories
    ids = _ids(20)
    costs = single_unit_costs(loaded.model, smap, [ids], "layer", batch_size=3)
    units = unit_space(smap, "layer")
    keep = np.ones((1, 5))
    keep[0, 2] = 0
    assert costs[2] == pytest.approx(measure_one(loaded, smap, ids, units, keep), rel=1e-4)
    assert (costs > 0).all()


def test_single_unit_costs_around_a_target_flip_one_unit(stories):
    from cscompile.passes.measure import single_unit_costs

    loaded, smap = stories
    ids = _ids(20)
    target = np.array([1, 0, 1, 1, 0], np.float32)  # layers 1 and 4 skipped at the target
    costs = single_unit_costs(loaded.model, smap, [ids], "layer", batch_size=2, around=target)
    units = unit_space(smap, "layer")
    restore_1 = target.copy()[None]
    restore_1[0, 1] = 1
    drop_0 = target.copy()[None]
    drop_0[0, 0] = 0
    at_target = measure_one(loaded, smap, ids, units, target[None])
    assert costs[1] == pytest.approx(measure_one(loaded, smap, ids, units, restore_1) - at_target,
                                     rel=1e-4, abs=1e-6)
    assert costs[0] == pytest.approx(measure_one(loaded, smap, ids, units, drop_0) - at_target,
                                     rel=1e-4, abs=1e-6)
    assert costs[1] < 0 < costs[0]  # restoring a layer helps, dropping one hurts
