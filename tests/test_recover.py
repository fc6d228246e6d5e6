"""Sparse recovery on planted additive responses: phase transition, diagnostics, determinism."""
import json
import math

import numpy as np
import pytest

from cscompile.errors import UserInputError
from cscompile.passes.designs import design_matrix, design_responses, draw_masks
from cscompile.passes.recover import Recovery, recover

N, K = 256, 8
BASE = K * math.log(N / K)  # k·log(N/k) ≈ 27.7
TRIALS = 20
OFFSET = 0.3  # response of the all-kept pass: recover() must not mistake it for importance


def planted(design, rows, seed, noise=0.01, groups=None, w=None):
    """A k-sparse positive w and (A, y) from `rows` sensing rows (2·rows passes for rademacher)."""
    rng = np.random.default_rng(1000 + seed)
    if w is None:
        w = np.zeros(N)
        w[rng.choice(N, K, replace=False)] = rng.uniform(0.5, 1.5, K)
    passes = 2 * rows if design == "rademacher" else rows
    masks = draw_masks(N, passes, design, rate=0.1, seed=seed, groups=groups)
    y = OFFSET + (1 - masks.astype(np.float64)) @ w + noise * rng.standard_normal(passes)
    return w, design_matrix(masks, design), design_responses(y, design)


def success_rate(design, method, rows, **kw):
    hits = 0
    for seed in range(TRIALS):
        w, A, y = planted(design, rows, seed)
        result = recover(A, y, K, method=method, cv_folds=0, **kw)
        hits += np.array_equal(result.support, np.flatnonzero(w))
    return hits / TRIALS


@pytest.mark.parametrize("design", ["bernoulli", "rademacher"])
@pytest.mark.parametrize("method", ["omp", "cosamp", "lasso"])
def test_exact_support_shows_phase_transition(design, method):
    assert success_rate(design, method, math.ceil(4 * BASE)) >= 0.95
    assert success_rate(design, method, math.ceil(0.5 * BASE)) <= 0.3
    assert success_rate(design, method, K) <= 0.3


def test_positive_least_squares_recovers_but_plain_least_squares_does_not():
    # NNLS on all units is itself a sparse recovery method for positive w; min-norm lstsq is not.
    rows = math.ceil(2 * BASE)
    assert success_rate("bernoulli", "ols", rows, positive=True) >= 0.95
    assert success_rate("bernoulli", "ols", rows, positive=False) <= 0.3


def test_block_recovery_on_group_sparse_importance():
    d, k_groups = 4, 4
    groups = np.arange(N) // d
    block_base = k_groups * d + k_groups * math.log(N // d / k_groups)  # k·d + k·log(G/k)

    def rate(rows, design):
        hits = 0
        for seed in range(TRIALS):
            rng = np.random.default_rng(seed)
            truth = np.isin(groups, rng.choice(N // d, k_groups, replace=False))
            w = np.where(truth, rng.uniform(0.5, 1.5, N), 0.0)
            _, A, y = planted(design, rows, seed, groups=groups, w=w)
            result = recover(A, y, k_groups, method="block", groups=groups, cv_folds=0)
            hits += np.array_equal(result.support, np.flatnonzero(truth))
        return hits / TRIALS

    for design in ("bernoulli", "block"):  # units dropped independently, or by whole groups
        assert rate(math.ceil(4 * block_base), design) >= 0.95
        assert rate(math.ceil(0.5 * block_base), design) <= 0.3


def test_importance_and_intercept_are_estimated_not_just_the_support():
    w, A, y = planted("bernoulli", 150, seed=0, noise=1e-4)
    for method in ("omp", "cosamp", "lasso", "ols"):
        result = recover(A, y, K, method=method, positive=True)
        assert np.allclose(result.importance, w, atol=1e-2), method
        assert abs(result.diagnostics["intercept"] - OFFSET) < 1e-2, method
        assert (result.importance >= 0).all()


def test_diagnostics_on_planted_model_are_sensible():
    w, A, y = planted("bernoulli", 120, seed=1)
    _, A_test, y_test = planted("bernoulli", 60, seed=99, w=w)
    result = recover(A, y, K, method="omp", holdout=(A_test, y_test))
    diag = result.diagnostics
    assert (diag["N"], diag["k"], diag["m"]) == (N, K, 120)
    assert 0.0 <= diag["coherence"] <= 1.0
    assert diag["relative_residual"] < 0.05
    assert diag["heldout_r2"] > 0.98 and diag["cv_r2"] is None
    assert diag["warnings"] == []
    again = recover(A, y, K, method="omp")  # no holdout: cross-validated R² instead
    assert again.diagnostics["cv_r2"] > 0.95 and again.diagnostics["heldout_r2"] is None


def test_pure_noise_response_is_flagged():
    rng = np.random.default_rng(5)
    A = design_matrix(draw_masks(N, 120, seed=5))
    A_test = design_matrix(draw_masks(N, 60, seed=6))
    y, y_test = rng.standard_normal(120), rng.standard_normal(60)
    diag = recover(A, y, K, method="omp", holdout=(A_test, y_test)).diagnostics
    assert diag["heldout_r2"] < 0.2
    assert diag["relative_residual"] > 0.5
    assert any("additive sparse model looks violated" in w for w in diag["warnings"])
    cv = recover(A, y, K, method="lasso").diagnostics
    assert cv["cv_r2"] < 0.2 and any("cross-validated R²" in w for w in cv["warnings"])


def test_warnings_for_too_few_measurements_and_units_that_never_vary():
    w, A, y = planted("bernoulli", 20, seed=2)
    assert any("below C·k·log(N/k)" in msg for msg in recover(A, y, K).diagnostics["warnings"])
    A[:, :5] = 0.0  # five units never dropped
    result = recover(A, y, K, method="cosamp")
    assert (result.importance[:5] == 0).all() and not np.isin(result.support, range(5)).any()
    assert any("never vary" in msg for msg in result.diagnostics["warnings"])


def test_recovery_is_deterministic_and_json_safe():
    w, A, y = planted("rademacher", 60, seed=3)
    for method in ("omp", "cosamp", "lasso", "ols"):
        first, second = (recover(A, y, K, method=method, seed=4) for _ in range(2))
        assert isinstance(first, Recovery) and first.method == method
        assert np.array_equal(first.importance, second.importance)
        assert first.diagnostics == second.diagnostics
        data = json.loads(json.dumps(first.to_json()))
        assert data["support"] == sorted(data["support"]) and len(data["support"]) == K
        assert len(data["importance"]) == N and data["diagnostics"]["method"] == method


def test_support_of_block_method_is_whole_groups():
    groups = np.arange(N) // 4
    w, A, y = planted("bernoulli", 80, seed=0)
    result = recover(A, y, 3, method="block", groups=groups)
    assert result.support.size == 12 and len(np.unique(groups[result.support])) == 3
    assert result.diagnostics["n_groups"] == 64


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="magic"), "unknown recovery method"),
    (dict(k=0), "positive integer"),
    (dict(k=N + 1), "exceeds"),
    (dict(method="block"), "needs `groups`"),
    (dict(method="block", groups=np.arange(N) // 128, k=3), "only 2 groups"),
    (dict(y=np.ones(7)), "shape"),
    (dict(y=np.full(40, np.nan)), "finite"),
    (dict(holdout=(np.ones((5, N - 1)), np.ones(5))), "columns"),
    (dict(holdout=np.ones(5)), "pair"),
])
def test_bad_arguments_raise_user_input_error(kwargs, fragment):
    _, A, y = planted("bernoulli", 40, seed=0)
    args = dict(A=A, y=y, k=K) | kwargs
    with pytest.raises(UserInputError, match=fragment):
        recover(**args)
