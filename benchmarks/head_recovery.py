"""Which attention heads to keep: compressed sensing vs activation norms vs exhaustive ablation.

Keeps `--keep` of each layer's query heads (FFN dense) chosen from calibration WikiText-2 windows,
then scores held-out windows (perplexity of the last half, KL to dense). Every method is charged
the forward passes it spent. Methods:

  activation        head output energy at the o-projection input (1 pass per window)
  ablation          exhaustive single-head drops, KL response (N passes per window)
  cs                random Bernoulli drop masks (rate r), KL response, positive Lasso recovery
  cs+prior          the same, recovering a sparse correction to the activation scores
  cs shared         the same masks on all calibration windows at once (mean response), one Lasso
  cs shared logkl   the same measurements, log of the response (distortion compounds)
  cs around         masks flip heads relative to the activation support (drop kept heads,
                    restore dropped ones): marginal values at the operating point, signed Lasso
  cs around x2      two adaptive rounds of half the budget, the second around the first's support
  ablation around   exhaustive single flips around the activation support (the ceiling of
                    `cs around`: what a perfect linear model at the operating point gives)
  random            seeded

Remedy methods (cs shared ..., ablation around) are not in the default list; ask with --methods.

    python benchmarks/head_recovery.py --model smollm2-135m --calib 4 --eval 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cscompile.execute import Support, UnitMask, masked_logits
from cscompile.frontend import analyze, load_model
from cscompile.metrics import compare_to_dense, perplexity, wikitext_windows
from cscompile.passes.measure import measure, recover_importance, single_unit_costs, unit_space
from cscompile.passes.signature import prompt_signatures, unit_layout

err = Console(stderr=True)


DEFAULT_METHODS = ("activation", "ablation", "cs r=0.1", "cs r=0.3", "cs+prior r=0.1", "random")
ALL_METHODS = DEFAULT_METHODS + ("cs shared", "cs shared logkl", "cs around", "cs around x2",
                                 "ablation around")


def keep_vector(smap, support: Support) -> np.ndarray:
    """0/1 keep vector over the "head" unit space."""
    return np.array([float(u["index"] in support.heads[u["layer"]]) for u in unit_space(smap, "head")])


def flip_importance(smap, model, calib, around, m, rate, seed) -> np.ndarray:
    """Marginal value of each head at the operating point `around`: shared flip masks over all
    calibration windows, signed Lasso; a kept head's value is what dropping it costs, a dropped
    head's value is what restoring it gains."""
    meas = measure(model, smap, torch.cat(calib), "head", m=m, rate=rate, seed=seed, around=around,
                   batch_size=16)
    rec = recover_importance(meas, k=max(1, int(0.2 * len(around))), method="lasso", positive=False)
    return rec.importance * np.where(around > 0, 1.0, -1.0)


def keep_top(smap, scores: np.ndarray, keep: int) -> Support:
    """Top-`keep` heads per layer by score (scores over the "head" unit space)."""
    units = unit_space(smap, "head")
    heads = {}
    for li in range(smap.n_layers):
        idx = [i for i, u in enumerate(units) if u["layer"] == li]
        order = sorted(idx, key=lambda i: -scores[i])[:keep]
        heads[li] = sorted(units[i]["index"] for i in order)
    return Support(heads, {}, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", type=int, default=4, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--eval", type=int, default=20, help="held-out windows of 256 tokens")
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--m", type=int, default=270, help="measurements per calibration window")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list from: {', '.join(ALL_METHODS)}")
    ap.add_argument("--json", default="results/head_recovery.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    smap = analyze(loaded)
    model, tok = loaded.model, loaded.tokenizer
    windows = wikitext_windows(tok, n_windows=args.calib + args.eval, window=256, seed=args.seed)
    calib = [w[None, :args.calib_len] for w in windows[:args.calib]]
    evals = windows[args.calib:]
    n = len(unit_space(smap, "head"))
    k_drop = n - args.keep * smap.n_layers  # units a support drops: what recovery must find

    layout = unit_layout(smap)
    sig = prompt_signatures(model, smap, calib).mean(0)
    activation = np.concatenate([sig[layout.heads[li]] for li in range(smap.n_layers)])
    wanted = args.methods.split(",")
    unknown = set(wanted) - set(ALL_METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    scores, forwards = {"activation": activation}, {"activation": args.calib}
    at_activation = keep_vector(smap, keep_top(smap, activation, args.keep))
    per_window = args.calib * (args.m + 1)
    shared = None
    for name in wanted:
        if name in scores:
            continue
        err.print(f"{name} ...")
        if name == "ablation":
            scores[name] = single_unit_costs(model, smap, calib, "head")
            forwards[name] = args.calib * (n + 1)
        elif name == "ablation around":
            costs = single_unit_costs(model, smap, calib, "head", around=at_activation)
            scores[name] = costs * np.where(at_activation > 0, 1.0, -1.0)
            forwards[name] = args.calib * (n + 2)
        elif name in ("cs r=0.1", "cs r=0.3", "cs+prior r=0.1"):
            rate = 0.3 if "0.3" in name else 0.1
            prior = activation if "prior" in name else None
            total = np.zeros(n)
            for i, ids in enumerate(calib):
                meas = measure(model, smap, ids, "head", m=args.m, rate=rate, seed=args.seed + i)
                rec = recover_importance(meas, k=k_drop, method="lasso", prior=prior)
                total += rec.importance / (np.abs(rec.importance).sum() or 1)
            scores[name], forwards[name] = total, per_window
        elif name in ("cs shared", "cs shared logkl"):
            if shared is None:  # one set of measurements serves both responses
                shared = measure(model, smap, torch.cat(calib), "head", m=args.m, rate=0.1,
                                 seed=args.seed)
            meas = shared
            if name.endswith("logkl"):
                meas = replace(shared, responses=np.log(np.maximum(shared.responses, 1e-8)))
            scores[name] = recover_importance(meas, k=k_drop, method="lasso").importance
            forwards[name] = shared.n_forwards
        elif name == "cs around":
            scores[name] = flip_importance(smap, model, calib, at_activation, args.m, 0.1, args.seed)
            forwards[name] = args.calib * (args.m + 2)
        elif name == "cs around x2":
            half = args.m // 2
            first = flip_importance(smap, model, calib, at_activation, half, 0.1, args.seed)
            around = keep_vector(smap, keep_top(smap, first, args.keep))
            scores[name] = flip_importance(smap, model, calib, around, half, 0.1, args.seed + 1)
            forwards[name] = 2 * args.calib * (half + 2)
        elif name == "random":
            scores[name] = np.random.default_rng(args.seed).random(n)
            forwards[name] = 0

    supports = {m: keep_top(smap, s, args.keep) for m, s in scores.items()}
    names = list(supports)
    ppl = {m: [] for m in ["dense"] + names}
    kl = {m: [] for m in names}
    for w in evals:
        ids = w[None]
        dense = masked_logits(model, smap, ids, UnitMask.ones(smap))
        ppl["dense"].append(perplexity(dense, ids, 128))
        logits = masked_logits(model, smap, ids.expand(len(names), -1),
                               UnitMask.from_supports(smap, [supports[m] for m in names]))
        for m, lg in zip(names, logits):
            ppl[m].append(perplexity(lg[None], ids, 128))
            kl[m].append(compare_to_dense(dense, lg[None], 128)["kl"])
    geo = {m: float(np.exp(np.mean(np.log(v)))) for m, v in ppl.items()}
    print(f"\n### Head selection — {loaded.model_id}, keep {args.keep}/{smap.layers[0].attention.n_heads} "
          f"heads per layer, FFN dense; {args.calib} calibration windows of {args.calib_len} tokens, "
          f"{args.eval} held-out windows (perplexity of the last 128 of 256 tokens)\n")
    print("| method | forwards | perplexity | KL to dense |\n|---|---|---|---|")
    print(f"| dense | – | {geo['dense']:.2f} | 0 |")
    for m in names:
        print(f"| {m} | {forwards[m]} | {geo[m]:.2f} | {np.mean(kl[m]):.3f} |")
    ref = "ablation" if "ablation" in supports else "activation"
    overlap = {m: float(np.mean([len(set(supports[m].heads[li]) & set(supports[ref].heads[li]))
                                 / args.keep for li in range(smap.n_layers)])) for m in names}
    print(f"\nkept-head overlap with {ref}: " + ", ".join(f"{m} {v:.2f}" for m, v in overlap.items()))
    out = {"model": loaded.model_id, "args": vars(args), "perplexity": geo,
           "kl": {m: float(np.mean(v)) for m, v in kl.items()}, "forwards": forwards,
           "overlap_reference": ref, "overlap": overlap, "seconds": time.perf_counter() - t0}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    err.print(f"wrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
