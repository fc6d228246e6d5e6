"""Which attention heads to keep: compressed sensing vs activation norms vs exhaustive ablation.

Keeps `--keep` of each layer's query heads (FFN dense) chosen from calibration WikiText-2 windows,
then scores held-out windows (perplexity of the last half, KL to dense). Every method is charged
the forward passes it spent. Methods:

  activation        head output energy at the o-projection input (1 pass per window)
  ablation          exhaustive single-head drops, KL response (N passes per window)
  cs                random Bernoulli drop masks (rate r), KL response, positive Lasso recovery
  cs+prior          the same, recovering a sparse correction to the activation scores
  random            seeded

    python benchmarks/head_recovery.py --model smollm2-135m --calib 4 --eval 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    scores, forwards = {"activation": activation}, {"activation": args.calib}
    err.print("exhaustive single-head ablation ...")
    scores["ablation"] = single_unit_costs(model, smap, calib, "head")
    forwards["ablation"] = args.calib * (n + 1)
    for name, rate, prior in (("cs r=0.1", 0.1, None), ("cs r=0.3", 0.3, None),
                              ("cs+prior r=0.1", 0.1, activation)):
        err.print(f"{name} ...")
        total = np.zeros(n)
        for i, ids in enumerate(calib):
            meas = measure(model, smap, ids, "head", m=args.m, rate=rate, seed=args.seed + i)
            rec = recover_importance(meas, k=k_drop, method="lasso", prior=prior)
            total += rec.importance / (np.abs(rec.importance).sum() or 1)
        scores[name] = total
        forwards[name] = args.calib * (args.m + 1)
    scores["random"] = np.random.default_rng(args.seed).random(n)
    forwards["random"] = 0

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
    overlap = {m: float(np.mean([len(set(supports[m].heads[li]) & set(supports["ablation"].heads[li]))
                                 / args.keep for li in range(smap.n_layers)])) for m in names}
    print("\nkept-head overlap with exhaustive ablation: " +
          ", ".join(f"{m} {v:.2f}" for m, v in overlap.items()))
    out = {"model": loaded.model_id, "args": vars(args), "perplexity": geo,
           "kl": {m: float(np.mean(v)) for m, v in kl.items()}, "forwards": forwards,
           "overlap_with_ablation": overlap, "seconds": time.perf_counter() - t0}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    err.print(f"wrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
