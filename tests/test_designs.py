"""Measurement designs: mask statistics, sensing matrices, measurement counts, validation."""
import math

import numpy as np
import pytest

from cscompile.errors import UserInputError
from cscompile.passes.designs import (design_matrix, design_responses, draw_masks,
                                      measurements_needed)


def test_bernoulli_masks_are_binary_float32_with_requested_drop_rate():
    masks = draw_masks(200, 1000, "bernoulli", rate=0.1, seed=3)
    assert masks.shape == (1000, 200) and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert abs((1 - masks).mean() - 0.1) < 0.005  # 200k draws: std 0.0007


def test_masks_are_reproducible_per_seed():
    for design in ("bernoulli", "rademacher"):
        a = draw_masks(64, 10, design, seed=7)
        assert np.array_equal(a, draw_masks(64, 10, design, seed=7))
        assert not np.array_equal(a, draw_masks(64, 10, design, seed=8))


def test_rademacher_pairs_are_complementary_halves_and_give_pm1_rows():
    n_units, m = 51, 12
    masks = draw_masks(n_units, m, "rademacher", seed=1)
    assert np.array_equal(masks[0::2], 1 - masks[1::2])
    assert ((1 - masks[0::2]).sum(axis=1) == n_units // 2).all()  # exactly half dropped
    A = design_matrix(masks, "rademacher")
    assert A.shape == (m // 2, n_units) and set(np.unique(A)) == {-1.0, 1.0}
    # additive response with an offset: the pair difference is exactly the ±1 row times w
    w = np.random.default_rng(0).normal(size=n_units)
    y = 5.0 + (1 - masks) @ w
    assert np.allclose(design_responses(y, "rademacher"), A @ w)


def test_block_design_drops_whole_groups_at_rate():
    groups = np.repeat([10, 3, 7, 42], 8)  # arbitrary ids, 4 groups of 8 units
    masks = draw_masks(32, 4000, "block", rate=0.25, groups=groups, seed=0)
    for gid in np.unique(groups):
        cols = masks[:, groups == gid]
        assert (cols == cols[:, :1]).all()  # a group is kept or dropped as a whole
        assert abs((1 - cols[:, 0]).mean() - 0.25) < 0.03
    assert not np.array_equal(masks[:, 0], masks[:, 8])  # groups are independent


def test_design_matrix_of_drop_designs_marks_dropped_units():
    masks = draw_masks(20, 5, "bernoulli", rate=0.3, seed=0)
    assert np.array_equal(design_matrix(masks, "bernoulli"), 1.0 - masks)
    assert np.array_equal(design_responses([1.0, 2.0], "bernoulli"), [1.0, 2.0])


def test_measurements_needed_formula_cap_and_floor():
    assert measurements_needed(256, 8) == (math.ceil(2 * 8 * math.log(32)),) * 2 == (56, 56)
    assert measurements_needed(256, 8, C=4.0) == (111, 111)
    assert measurements_needed(256, 8, budget=40) == (40, 56)
    assert measurements_needed(256, 8, budget=500) == (56, 56)
    assert measurements_needed(10, 9) == (9, 9)  # 2·9·log(10/9) = 1.9 < k: floored at k


@pytest.mark.parametrize("call, fragment", [
    (lambda: measurements_needed(10, 11), "exceeds"),
    (lambda: measurements_needed(10, 0), "positive"),
    (lambda: measurements_needed(10, -2), "positive"),
    (lambda: measurements_needed(10, 2, budget=0), "budget"),
    (lambda: draw_masks(10, 5, rate=0.0), "rate"),
    (lambda: draw_masks(10, 5, rate=1.0), "rate"),
    (lambda: draw_masks(10, 5, rate=1.5), "rate"),
    (lambda: draw_masks(10, 0), "positive"),
    (lambda: draw_masks(10, -3), "positive"),
    (lambda: draw_masks(10, 5, "rademacher"), "even"),
    (lambda: draw_masks(10, 4, "sobol"), "unknown design"),
    (lambda: draw_masks(10, 4, "block"), "groups"),
    (lambda: draw_masks(10, 4, "block", groups=np.zeros(9, int)), "groups"),
    (lambda: design_matrix(np.full((2, 3), 0.5)), "only 0"),
    (lambda: design_matrix(np.ones((2, 3)), "rademacher"), "complementary"),
    (lambda: design_responses([1.0, 2.0, 3.0], "rademacher"), "even"),
])
def test_bad_arguments_raise_user_input_error(call, fragment):
    with pytest.raises(UserInputError, match=fragment):
        call()
