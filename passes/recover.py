"""Sparse recovery: which units matter, from m << N masked-forward-pass measurements.

Model (see designs.py): y ≈ c + A w + noise with a k-sparse (or compressible) importance w.

Intercept: with fit_intercept=True (default) the columns of A and y are centred before solving,
so the offset c (e.g. the response of an all-kept pass, or any constant bias of the metric) drops
out; it is reported as diagnostics["intercept"]. Every solver then works on the centred columns
scaled to unit norm (OMP and CoSaMP select by correlation, which is only fair between equal-norm
columns); coefficients are mapped back to the original scale. Units never dropped in any
measurement have a zero centred column: their importance is unidentifiable, set to 0, and warned
about. For rademacher pair differences c has already cancelled: fit_intercept=False is then
allowed (it saves one degree of freedom) but not required.

Methods
  omp     sklearn OrthogonalMatchingPursuit with k atoms.
  cosamp  CoSaMP (Needell & Tropp): 2k-candidate proxy, least squares on the merged support,
          prune to k; least squares by numpy.linalg.lstsq (NNLS when positive).
  block   block-OMP: adds one whole group per step, the one whose columns carry the most
          residual correlation energy; k counts groups; needs `groups`.
  lasso   relaxed lasso: the exact lasso path (sklearn lars_path, method="lasso") up to the
          first breakpoint (alpha, reported) with 2k active units, least-squares debiasing of
          those, keep the k largest.
  ols     least squares on all units (min-norm when m < N) and top-k by |w|; a baseline whose
          importance stays dense.
All sparse methods return the least-squares (NNLS when positive) refit on their support.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import OrthogonalMatchingPursuit, lars_path
from sklearn.model_selection import KFold

from cscompile.errors import UserInputError

from .designs import group_index

from .designs import measurements_needed

METHODS = ("omp", "cosamp", "block", "lasso", "ols")
R2_WARN = 0.5  # below this held-out R², the additive sparse model does not explain the responses


@dataclass
class Recovery:
    importance: np.ndarray  # [N] estimated per-unit importance w
    support: np.ndarray  # sorted unit indices: k units, or the units of k groups (block)
    method: str
    diagnostics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"importance": [float(v) for v in self.importance],
                "support": [int(i) for i in self.support],
                "method": self.method,
                "diagnostics": _json_safe(self.diagnostics)}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, bool, np.bool_)):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------- small shared helpers

def _top_k(score: np.ndarray, k: int, positive: bool, tiebreak: np.ndarray) -> np.ndarray:
    """Indices of the k best scores (signed if positive, else |score|); ties by |tiebreak|."""
    primary = score if positive else np.abs(score)
    return np.lexsort((-np.abs(tiebreak), -primary))[:k]


def _solve(A: np.ndarray, y: np.ndarray, positive: bool) -> np.ndarray:
    """Least squares (min-norm if underdetermined), or NNLS when positive."""
    if A.shape[1] == 0:
        return np.zeros(0)
    if positive:
        return nnls(A, y)[0]
    return np.linalg.lstsq(A, y, rcond=None)[0]


def _refit(A, y, support, positive) -> np.ndarray:
    coef = np.zeros(A.shape[1])
    coef[support] = _solve(A[:, support], y, positive)
    return coef


# ---------------------------------------------------------------- solvers
# Each takes centred unit-norm columns An [m, n], centred y, and returns (coef [n], support, info).

def _omp(An, y, k, positive, group_idx):
    n_atoms = min(k, An.shape[0], An.shape[1])
    coef = OrthogonalMatchingPursuit(n_nonzero_coefs=n_atoms, fit_intercept=False).fit(An, y).coef_
    support = _top_k(coef, k, positive, An.T @ y)
    return _refit(An, y, support, positive), support, {}


def _cosamp(An, y, k, positive, group_idx, max_iter: int = 50):
    support = np.zeros(0, dtype=int)
    residual = y.copy()
    tol = 1e-10 * np.linalg.norm(y)
    for _ in range(max_iter):
        proxy = An.T @ residual
        candidates = _top_k(proxy, 2 * k, positive, proxy)
        merged = np.union1d(candidates, support)
        b = _solve(An[:, merged], y, positive)
        keep = _top_k(b, k, positive, An[:, merged].T @ y)
        new_support = np.sort(merged[keep])
        residual = y - An[:, merged[keep]] @ b[keep]
        converged = np.array_equal(new_support, support)
        support = new_support
        if converged or np.linalg.norm(residual) <= tol:
            break
    return _refit(An, y, support, positive), support, {}


def _block_omp(An, y, k, positive, group_idx):
    n_groups = group_idx.max() + 1
    chosen: list[int] = []
    residual = y.copy()
    units = np.zeros(0, dtype=int)
    for _ in range(k):
        corr = An.T @ residual
        if positive:
            corr = np.clip(corr, 0.0, None)
        energy = np.bincount(group_idx, weights=corr ** 2, minlength=n_groups)
        energy[chosen] = -np.inf
        chosen.append(int(np.argmax(energy)))
        units = np.flatnonzero(np.isin(group_idx, chosen))
        b = _solve(An[:, units], y, positive)
        residual = y - An[:, units] @ b
    return _refit(An, y, units, positive), units, {}


def _lasso(An, y, k, positive, group_idx):
    # Relaxed lasso: units entering the path first are not reliably the k largest (shrinkage
    # favours correlated early entrants), so follow the path to 2k active units, debias them by
    # least squares and keep the k largest. Measured: ~4x fewer failures than stopping at k.
    rank = An.shape[0] - 1  # centred rows: beyond this many active units the path degenerates
    target = min(max(k, min(2 * k, rank)), An.shape[1])
    alphas, _, coefs = lars_path(An, y, method="lasso", positive=positive,
                                 max_iter=4 * target + 20)
    reached = np.flatnonzero(np.count_nonzero(coefs, axis=0) >= target)
    step = reached[0] if reached.size else coefs.shape[1] - 1
    active = np.flatnonzero(coefs[:, step])
    debiased = np.zeros(An.shape[1])
    debiased[active] = _solve(An[:, active], y, positive)
    support = _top_k(debiased, k, positive, An.T @ y)
    return _refit(An, y, support, positive), support, {"lasso_alpha": float(alphas[step])}


def _ols(An, y, k, positive, group_idx):
    coef = _solve(An, y, positive)
    return coef, _top_k(coef, k, positive, An.T @ y), {}


SOLVERS = {"omp": _omp, "cosamp": _cosamp, "block": _block_omp, "lasso": _lasso, "ols": _ols}


# ---------------------------------------------------------------- fitting and diagnostics

@dataclass
class _Fit:
    importance: np.ndarray
    support: np.ndarray
    intercept: float
    coherence: float
    relative_residual: float
    info: dict  # solver-specific figures (lasso_alpha)
    n_dead: int


COHERENCE_COLUMNS = 4096  # above this many columns, coherence is taken over a seeded sample


def _coherence(An: np.ndarray, block: int = 1024) -> float:
    """max |<a_i, a_j>| over distinct unit-norm columns, in column blocks to bound memory.

    The exact value costs N² inner products — minutes for N = 46,080 single channels — so
    wider matrices use a seeded sample of COHERENCE_COLUMNS columns (a lower bound)."""
    n = An.shape[1]
    if n < 2:
        return 0.0
    if n > COHERENCE_COLUMNS:
        cols = np.sort(np.random.default_rng(0).choice(n, COHERENCE_COLUMNS, replace=False))
        An, n = An[:, cols], COHERENCE_COLUMNS
    worst = 0.0
    for start in range(0, n, block):
        gram = np.abs(An[:, start:start + block].T @ An)
        rows = np.arange(gram.shape[0])
        gram[rows, start + rows] = 0.0
        worst = max(worst, float(gram.max()))
    return min(worst, 1.0)


def _fit(A, y, k, method, group_idx, positive, fit_intercept, coherence=True) -> _Fit:
    n_units = A.shape[1]
    a_mean = A.mean(axis=0) if fit_intercept else np.zeros(n_units)
    y_mean = float(y.mean()) if fit_intercept else 0.0
    Ac, yc = A - a_mean, y - y_mean
    norms = np.linalg.norm(Ac, axis=0)
    live = np.flatnonzero(norms > 1e-12 * max(1.0, norms.max(initial=0.0)))
    live_groups = None
    if group_idx is not None:
        live_groups = np.unique(group_idx[live], return_inverse=True)[1].reshape(-1)
        if k > live_groups.max(initial=-1) + 1:
            raise UserInputError(f"only {live_groups.max() + 1} groups vary across the "
                                 f"measurements; cannot select k={k} groups")
    elif k > live.size:
        raise UserInputError(f"only {live.size} units vary across the measurements; cannot "
                             f"select k={k}")
    An = Ac[:, live] / norms[live]

    # Below the phase transition sklearn warns about degenerate lars paths and premature OMP
    # stops; our diagnostics report that regime (m below the bound, low R²) in one place instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "Orthogonal matching pursuit ended prematurely")
        coef_live, support_live, info = SOLVERS[method](An, yc, k, positive, live_groups)

    importance = np.zeros(n_units)
    importance[live] = coef_live / norms[live]
    residual = yc - An @ coef_live
    y_norm = np.linalg.norm(yc)
    return _Fit(importance=importance,
                support=np.sort(live[support_live]),
                intercept=y_mean - float(a_mean @ importance),
                coherence=_coherence(An) if coherence else float("nan"),
                relative_residual=float(np.linalg.norm(residual) / y_norm) if y_norm > 0 else 0.0,
                info=info,
                n_dead=n_units - live.size)


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    total = float(np.sum((y_true - y_true.mean()) ** 2))
    if total == 0.0:
        return None
    return 1.0 - float(np.sum((y_true - y_pred) ** 2)) / total


def _as_matrix_and_responses(A, y, what: str):
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
        raise UserInputError(f"{what} sensing matrix must be a non-empty 2-D array, got shape {A.shape}")
    if y.shape != (A.shape[0],):
        raise UserInputError(f"{what} responses must have shape ({A.shape[0]},) to match the "
                             f"sensing matrix, got {y.shape}")
    if not (np.isfinite(A).all() and np.isfinite(y).all()):
        raise UserInputError(f"{what} sensing matrix and responses must be finite (no NaN/inf)")
    return A, y


def recover(A, y, k: int, method: str = "omp", groups=None, positive: bool = False,
            holdout=None, seed: int = 0, fit_intercept: bool = True,
            cv_folds: int = 5) -> Recovery:
    """Estimate the sparse importance w in y ≈ c + A w from m measurements.

    A: [m, N] sensing matrix (designs.design_matrix), y: [m] responses (designs.design_responses).
    k: number of units to select (number of groups for method="block").
    groups: integer group id per unit (required for "block").
    positive: constrain importance ≥ 0: NNLS refits everywhere, positive lasso path, signed
    selection in CoSaMP/block; sklearn's OMP still selects by |correlation|.
    holdout: optional (A_test, y_test) from fresh masks, scored by R² of c + A_test ŵ.
    seed, cv_folds: without a holdout, the whole recovery is cross-validated over `cv_folds`
    shuffled folds (seeded) to give diagnostics["cv_r2"]; cv_folds=0 skips it.
    """
    if method not in METHODS:
        raise UserInputError(f"unknown recovery method {method!r}; choose one of {', '.join(METHODS)}")
    A, y = _as_matrix_and_responses(A, y, "")
    m, n_units = A.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise UserInputError(f"sparsity k must be a positive integer, got {k!r}")

    group_idx = None
    if method == "block":
        group_idx = group_index(groups, n_units, "method 'block'")
        n_groups = int(group_idx.max()) + 1
        if k > n_groups:
            raise UserInputError(f"k={k} groups requested but there are only {n_groups} groups")
    elif k > n_units:
        raise UserInputError(f"sparsity k={k} exceeds the number of units N={n_units}")
    if holdout is not None:
        if not (isinstance(holdout, (tuple, list)) and len(holdout) == 2):
            raise UserInputError("holdout must be a pair (A_test, y_test)")
        A_test, y_test = _as_matrix_and_responses(*holdout, "held-out")
        if A_test.shape[1] != n_units:
            raise UserInputError(f"held-out sensing matrix has {A_test.shape[1]} columns, "
                                 f"expected N={n_units}")

    fit = _fit(A, y, k, method, group_idx, positive, fit_intercept)

    # Recommended measurement count: C·k·log(N/k) with C=2; for blocks the model-based bound
    # C·(k·d + k·log(G/k)) with d the largest group size.
    if method == "block":
        d = int(np.bincount(group_idx).max())
        m_needed = math.ceil(2.0 * (k * d + k * math.log(n_groups / k)))
    else:
        m_needed = measurements_needed(n_units, int(k))[0]

    diagnostics = {"N": n_units, "k": int(k), "m": m, "method": method, "positive": positive,
                   "fit_intercept": fit_intercept, "intercept": fit.intercept,
                   "coherence": fit.coherence,
                   "coherence_sampled": n_units > COHERENCE_COLUMNS, "relative_residual": fit.relative_residual,
                   "m_recommended": m_needed, "heldout_r2": None, "cv_r2": None}
    if method == "block":
        diagnostics["n_groups"] = n_groups
    diagnostics.update(fit.info)

    if holdout is not None:
        diagnostics["heldout_r2"] = _r2(y_test, fit.intercept + A_test @ fit.importance)
    elif cv_folds >= 2 and m >= 2 * cv_folds:
        predicted = np.empty(m)
        for train, test in KFold(cv_folds, shuffle=True, random_state=seed).split(A):
            try:
                fold = _fit(A[train], y[train], k, method, group_idx, positive, fit_intercept,
                            coherence=False)  # folds only predict
            except UserInputError:  # a fold where too few units vary: no CV estimate
                predicted = None
                break
            predicted[test] = fold.intercept + A[test] @ fold.importance
        if predicted is not None:
            diagnostics["cv_r2"] = _r2(y, predicted)

    notes = []
    for name, label in (("heldout_r2", "held-out R²"), ("cv_r2", "cross-validated R²")):
        r2 = diagnostics[name]
        if r2 is not None and r2 < R2_WARN:
            notes.append(f"{label} {r2:.2f} < {R2_WARN}: additive sparse model looks violated")
    if m < m_needed:
        notes.append(f"m={m} below C·k·log(N/k)={m_needed} (C=2): support recovery is unreliable")
    if fit.n_dead:
        notes.append(f"{fit.n_dead} units never vary across the measurements: their importance "
                     f"is unidentifiable and set to 0")
    if fit.coherence > 0.99:
        notes.append(f"mutual coherence {fit.coherence:.3f}: some units are always dropped "
                     f"together and cannot be told apart")
    if np.ptp(y) == 0.0:
        notes.append("responses are constant: there is nothing to recover")
    diagnostics["warnings"] = notes

    return Recovery(importance=fit.importance, support=fit.support, method=method,
                    diagnostics=diagnostics)
