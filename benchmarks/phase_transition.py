"""Compressed-sensing phase transition of the recovery methods on planted additive responses.

For each design and method, sweeps the number of sensing rows m and reports the fraction of
seeded trials whose support is recovered exactly, against m / (k·log(N/k)).
Rows are what recovery sees: a rademacher row costs two forward passes (a complementary pair).

    python benchmarks/phase_transition.py --out results/phase_transition.png
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cscompile.passes.designs import design_matrix, design_responses, draw_masks  # noqa: E402
from cscompile.passes.recover import recover  # noqa: E402

RATIOS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
# (label, recovery method, positive, planted signal): "unit" = k random units,
# "group" = k/d whole groups of d units (same number of nonzeros)
VARIANTS = (
    ("omp", "omp", False, "unit"),
    ("cosamp", "cosamp", False, "unit"),
    ("lasso", "lasso", False, "unit"),
    ("ols (lstsq)", "ols", False, "unit"),
    ("ols+ (nnls)", "ols", True, "unit"),
    ("block-omp, group w", "block", False, "group"),
    ("omp, group w", "omp", False, "group"),
)


def planted_trial(args, design, rows, method, positive, signal, seed) -> bool:
    rng = np.random.default_rng(10_000 + seed)
    n, k, d = args.n_units, args.k, args.group_size
    groups = np.arange(n) // d
    if signal == "unit":
        truth = np.zeros(n, dtype=bool)
        truth[rng.choice(n, k, replace=False)] = True
    else:
        truth = np.isin(groups, rng.choice(n // d, k // d, replace=False))
    w = np.where(truth, rng.uniform(0.5, 1.5, n), 0.0)
    passes = 2 * rows if design == "rademacher" else rows
    masks = draw_masks(n, passes, design, rate=args.rate, seed=seed)
    y = 0.3 + (1 - masks.astype(np.float64)) @ w + args.noise * rng.standard_normal(passes)
    k_arg = k // d if method == "block" else k
    result = recover(design_matrix(masks, design), design_responses(y, design), k_arg,
                     method=method, groups=groups, positive=positive, cv_folds=0)
    return np.array_equal(result.support, np.flatnonzero(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/phase_transition.png")
    parser.add_argument("--n-units", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.1, help="bernoulli drop rate")
    parser.add_argument("--noise", type=float, default=0.01, help="response noise std")
    parser.add_argument("--designs", default="bernoulli,rademacher")
    args = parser.parse_args()
    if args.k % args.group_size:
        parser.error("--k must be a multiple of --group-size (the group-sparse signal)")

    base = args.k * math.log(args.n_units / args.k)
    rows_for = [math.ceil(r * base) for r in RATIOS]
    designs = args.designs.split(",")
    fig, axes = plt.subplots(1, len(designs), figsize=(6 * len(designs), 4.5), squeeze=False)
    start = time.perf_counter()
    for ax, design in zip(axes[0], designs):
        print(f"\n{design} design, N={args.n_units}, k={args.k}, noise={args.noise}, "
              f"{args.trials} trials; exact-support success rate")
        print(f"{'m / (k log(N/k))':>20} " + " ".join(f"{r:>5g}" for r in RATIOS))
        print(f"{'m (sensing rows)':>20} " + " ".join(f"{m:>5d}" for m in rows_for))
        for label, method, positive, signal in VARIANTS:
            rates = [np.mean([planted_trial(args, design, rows, method, positive, signal, s)
                              for s in range(args.trials)]) for rows in rows_for]
            print(f"{label:>20} " + " ".join(f"{r:>5.2f}" for r in rates))
            ax.plot(RATIOS, rates, marker="o", label=label,
                    linestyle="--" if signal == "group" else "-")
        for c in (2, 4):
            ax.axvline(c, color="grey", linewidth=0.8, linestyle=":")
        ax.set(title=f"{design} (N={args.n_units}, k={args.k})", xlabel="m / (k log(N/k))",
               ylabel="exact support recovery", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nsaved {out} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
