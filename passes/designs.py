"""Measurement designs: which units each masked forward pass drops, and the sensing matrix.

One measurement = one forward pass with a keep-mask over N units (1 = kept, 0 = dropped) and a
scalar response y (e.g. KL to the dense model). The working model is additive:

    y ≈ c + Σ_{i dropped} w_i + noise          (c: offset, w: sparse importance)

so the sensing matrix of a drop design is simply A = 1 - mask and y ≈ c + A w.

Designs
  bernoulli   every unit dropped independently with probability `rate`.
  block       whole groups (e.g. the channels of one FFN block) dropped together with prob `rate`.
  rademacher  masks come in complementary pairs (2j, 2j+1): mask 2j drops a random half of the
              units, mask 2j+1 drops exactly the other half. With s_i = +1 if unit i is dropped in
              mask 2j and -1 if it is kept there,
                  y[2j] - y[2j+1] = Σ_{dropped in 2j} w_i - Σ_{dropped in 2j+1} w_i = s · w,
              so each pair gives one ±1 sensing row s and one response (the offset c cancels).
              m masks therefore give m/2 rows: use `design_responses` to turn the m raw
              responses into the m/2 paired ones.
"""
from __future__ import annotations

import math

import numpy as np

from cscompile.errors import UserInputError

DESIGNS = ("bernoulli", "rademacher", "block")


def _check_design(design: str) -> None:
    if design not in DESIGNS:
        raise UserInputError(f"unknown design {design!r}; choose one of {', '.join(DESIGNS)}")


def group_index(groups, n_units: int, who: str = "the block design") -> np.ndarray:
    """Map arbitrary integer group ids to 0..G-1 (one entry per unit)."""
    if groups is None:
        raise UserInputError(f"{who} needs `groups` (one integer group id per unit)")
    groups = np.asarray(groups)
    if groups.shape != (n_units,) or not np.issubdtype(groups.dtype, np.integer):
        raise UserInputError(f"groups must be an integer array of shape ({n_units},), got "
                             f"{groups.dtype} {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def draw_masks(n_units: int, m: int, design: str = "bernoulli", rate: float = 0.1,
               seed: int = 0, groups=None) -> np.ndarray:
    """Draw m keep-masks over n_units units: float32 [m, n_units], 1 = kept, 0 = dropped.

    Reproducible: the same (arguments, seed) always give the same masks.
    `rate` is the drop probability (bernoulli, block); rademacher always drops half and needs
    an even m (complementary pairs, see the module docstring).
    """
    _check_design(design)
    if not isinstance(n_units, (int, np.integer)) or n_units < 1:
        raise UserInputError(f"n_units must be a positive integer, got {n_units!r}")
    if not isinstance(m, (int, np.integer)) or m <= 0:
        raise UserInputError(f"number of measurements m must be a positive integer, got {m!r}")
    if not 0.0 < rate < 1.0:
        raise UserInputError(f"drop rate must be in (0, 1), got {rate}")
    rng = np.random.default_rng(seed)

    if design == "bernoulli":
        return (rng.random((m, n_units)) >= rate).astype(np.float32)

    if design == "block":
        group_of_unit = group_index(groups, n_units)
        group_kept = rng.random((m, group_of_unit.max() + 1)) >= rate
        return group_kept[:, group_of_unit].astype(np.float32)

    # rademacher: pairs of complementary half-masks
    if m % 2:
        raise UserInputError(f"the rademacher design uses complementary mask pairs: m must be "
                             f"even, got {m}")
    if n_units < 2:
        raise UserInputError("the rademacher design needs at least 2 units")
    masks = np.ones((m, n_units), dtype=np.float32)
    for pair in range(m // 2):
        dropped = rng.permutation(n_units)[: n_units // 2]
        masks[2 * pair, dropped] = 0.0
        masks[2 * pair + 1] = 1.0 - masks[2 * pair]
    return masks


def _check_masks(masks) -> np.ndarray:
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim != 2 or masks.shape[0] == 0 or masks.shape[1] == 0:
        raise UserInputError(f"masks must be a non-empty [m, n_units] array, got shape {masks.shape}")
    if not np.isin(masks, (0.0, 1.0)).all():
        raise UserInputError("masks must contain only 0 (dropped) and 1 (kept)")
    return masks


def design_matrix(masks, design: str = "bernoulli") -> np.ndarray:
    """Sensing matrix A (float64) for `recover`.

    bernoulli / block: A = 1 - mask, shape [m, N] (A[j, i] = 1 when unit i is dropped in pass j).
    rademacher: one ±1 row per complementary pair, shape [m/2, N]; A[j, i] = +1 if unit i is
    dropped in mask 2j, -1 otherwise. Pair it with `design_responses(y, "rademacher")`.
    """
    _check_design(design)
    masks = _check_masks(masks)
    if design != "rademacher":
        return 1.0 - masks
    if masks.shape[0] % 2 or not np.array_equal(masks[0::2], 1.0 - masks[1::2]):
        raise UserInputError("rademacher masks must come in complementary pairs (rows 2j, 2j+1); "
                             "draw them with draw_masks(..., design='rademacher')")
    return 1.0 - 2.0 * masks[0::2]


def design_responses(y, design: str = "bernoulli") -> np.ndarray:
    """Responses matching the rows of `design_matrix`: identity for drop designs, pair
    differences y[2j] - y[2j+1] for rademacher (the offset c cancels there)."""
    _check_design(design)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise UserInputError(f"responses must be a 1-D array, got shape {y.shape}")
    if design != "rademacher":
        return y
    if y.shape[0] % 2:
        raise UserInputError(f"rademacher responses come in pairs: need an even count, got {len(y)}")
    return y[0::2] - y[1::2]


def measurements_needed(n_units: int, k: int, C: float = 2.0, budget: int | None = None):
    """Compressed-sensing measurement count m = ceil(C·k·log(N/k)), capped at `budget`.

    Returns (m, m_uncapped). The count is floored at k: k unknowns need at least k measurements
    even when log(N/k) is tiny (k close to N).
    """
    if not isinstance(n_units, (int, np.integer)) or n_units < 1:
        raise UserInputError(f"n_units must be a positive integer, got {n_units!r}")
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserInputError(f"sparsity k must be a positive integer, got {k!r}")
    if k > n_units:
        raise UserInputError(f"sparsity k={k} exceeds the number of units N={n_units}")
    if not C > 0:
        raise UserInputError(f"constant C must be positive, got {C}")
    m_uncapped = max(math.ceil(C * k * math.log(n_units / k)), int(k))
    if budget is None:
        return m_uncapped, m_uncapped
    if not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise UserInputError(f"measurement budget must be a positive integer, got {budget!r}")
    return min(m_uncapped, int(budget)), m_uncapped
