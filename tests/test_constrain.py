"""Class supports under the byte budget and tile constraint; exact channel permutations."""
import copy

import numpy as np
import pytest
import torch

from cscompile.execute import Support, UnitMask, masked_logits
from cscompile.frontend import logits_of
from cscompile.passes.constrain import (apply_permutation, channel_permutation, class_support,
                                        core_scores, permute_support)
from cscompile.passes.signature import unit_layout


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _importances(smap, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(unit_layout(smap).n_units) * 0.3, size=n)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_density_tile_and_min_heads(stories, density):
    _, smap = stories
    imp = _importances(smap)
    core = core_scores(imp, np.array([0, 0, 1, 1, 1]))
    sup = class_support(smap, imp, density, core_importance=core, tile=64)
    assert abs(sup.density(smap) - density) <= 0.04, sup.density(smap)
    for li, layer in enumerate(smap.layers):
        n = len(sup.channels[li])
        assert n % 64 == 0 or n == layer.ffn.width
        assert 1 <= len(sup.heads[li]) <= layer.attention.n_heads
        assert sup.heads[li] == sorted(set(sup.heads[li]))


def test_allocation_follows_importance_across_layers(stories):
    """Importance concentrated in layer 0's channels: layer 0 keeps more than the rest."""
    _, smap = stories
    layout = unit_layout(smap)
    imp = np.full((1, layout.n_units), 1e-6)
    imp[0, layout.channels[0]] = 1.0
    imp[0, layout.channels[3].start + 7] = 50.0  # one strong channel elsewhere is kept
    sup = class_support(smap, imp, 0.25, tile=64)
    assert len(sup.channels[0]) == smap.layers[0].ffn.width
    assert 7 in sup.channels[3]
    assert max(len(sup.channels[li]) for li in (1, 2, 4)) <= 64  # not a uniform 25% each


def test_heads_keep_and_no_tile(stories):
    _, smap = stories
    sup = class_support(smap, _importances(smap), 0.5, heads_keep=3, pad_to_tile=False)
    assert all(len(h) == 3 for h in sup.heads.values())
    assert abs(sup.density(smap) - 0.5) <= 0.01
    assert any(len(c) % 64 for c in sup.channels.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_permutation_is_exact(tiny, arch):
    loaded, smap = tiny(arch)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    dense = logits_of(loaded.model, ids)
    profiles = {li: np.random.default_rng(li).random((l.ffn.width, 6))
                for li, l in enumerate(smap.layers)}
    perms = channel_permutation(profiles, tile=32, seed=0)
    assert all(sorted(p.tolist()) == list(range(96)) for p in perms.values())
    assert any((p != np.arange(96)).any() for p in perms.values())
    model = apply_permutation(copy.deepcopy(loaded.model), smap, perms)
    with torch.no_grad():
        assert (logits_of(model, ids) - dense).abs().max().item() <= 1e-5
    # a support means the same units after renumbering
    sup = Support({li: [0, 1] for li in range(3)}, {li: list(range(0, 96, 3)) for li in range(3)})
    before = masked_logits(loaded.model, smap, ids, UnitMask.from_supports(smap, [sup]))
    moved = permute_support(sup, perms)
    after = masked_logits(model, smap, ids, UnitMask.from_supports(smap, [moved]))
    assert (before - after).abs().max().item() <= 1e-5
    assert (before - dense).abs().max().item() > 1e-2


def test_permutation_groups_coactivated_channels():
    """Two interleaved groups with opposite profiles end up in two contiguous tiles."""
    prof = np.zeros((8, 4))
    prof[0::2] = [1, 1, 0, 0]
    prof[1::2] = [0, 0, 1, 1]
    prof[1::2] *= 2  # second group has more energy: laid out first
    perm = channel_permutation({0: prof}, tile=4, seed=0)[0]
    assert sorted(perm[:4].tolist()) == [1, 3, 5, 7] and sorted(perm[4:].tolist()) == [0, 2, 4, 6]


def test_uniform_allocation_keeps_heads_and_equal_ffn_fraction(stories):
    from cscompile.passes.constrain import class_support
    from cscompile.passes.signature import unit_layout

    _, smap = stories
    layout = unit_layout(smap)
    rng = np.random.default_rng(0)
    scores = rng.random((3, layout.n_units))
    sup = class_support(smap, scores, 0.5, allocation="uniform", tile=4)
    assert all(len(h) == 8 for h in sup.heads.values())
    counts = {len(c) for c in sup.channels.values()}
    assert len(counts) == 1 and counts.pop() % 4 == 0
    assert abs(sup.density(smap) - 0.5) < 0.05
    # within a layer the class's best channels are the ones kept
    li = 0
    best = np.argsort(-scores.mean(0)[layout.channels[li]])[:len(sup.channels[li])]
    assert sorted(best.tolist()) == sup.channels[li]


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_kv_group_granularity_keeps_whole_groups(stories, allocation):
    from cscompile.passes.constrain import class_support
    from cscompile.passes.signature import unit_layout

    _, smap = stories
    scores = np.random.default_rng(1).random((2, unit_layout(smap).n_units))
    sup = class_support(smap, scores, 0.5, allocation=allocation, kv_groups=True, tile=4,
                        heads_keep=4 if allocation == "uniform" else None)
    for li, heads in sup.heads.items():
        groups = {h // 2 for h in heads}  # 8 heads / 4 kv groups
        assert sorted(heads) == sorted(h for g in groups for h in (2 * g, 2 * g + 1))
    assert abs(sup.density(smap) - 0.5) < 0.06


def test_skip_layers_frees_their_bytes(stories):
    from cscompile.passes.constrain import class_support
    from cscompile.passes.signature import unit_layout

    loaded, smap = stories
    scores = np.random.default_rng(2).random((2, unit_layout(smap).n_units))
    sup = class_support(smap, scores, 0.5, skip_layers=[4])
    assert sup.layers == [0, 1, 2, 3] and 4 not in sup.heads and 4 not in sup.channels
    assert abs(sup.density(smap) - 0.5) < 0.06
    with pytest.raises(Exception):
        class_support(smap, scores, 0.5, skip_layers=range(5))
    # the support still runs physically reduced, equal to masked execution
    from cscompile.execute import reduce_model

    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    masked = masked_logits(loaded.model, smap, ids, UnitMask.from_supports(smap, [sup]))
    with torch.no_grad():
        sliced = logits_of(reduce_model(loaded.model, smap, sup), ids)
    assert (masked - sliced).abs().max() <= 1e-4
