"""Does task conditioning pay? Routed class supports vs one global support vs static baselines.

Builds classes exactly as `cscompile build` does (signatures -> clusters -> constrained class
supports -> router) from calibration rows of several task families in ../shared/data, then scores
disjoint held-out rows of every family under each support at equal prunable bytes:

  dense          the model itself (reference)
  routed class   the class the router picks from the prompt's prefill
  oracle class   the class the build's clustering assigns to the prompt's own signature
  global         one support from all calibration rows (same pipeline, one class)
  ... (uniform)  the same, with all heads kept and the same FFN fraction in every layer
  wanda / magnitude / random   static baselines, all heads kept, FFN density set so the
                 prunable bytes kept equal the class supports'

Quality is teacher-forced on the row's own text (prompt + reference answer or correct choice):
KL(dense || reduced) and top-1 agreement on the answer tokens, plus multiple-choice acc_norm
where the task has choices. Prints one Markdown table and writes JSON.

    python benchmarks/task_conditioning.py --model smollm2-135m --calib-per-task 40 --eval-per-task 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from cscompile.calib import dedupe_prompts, read_prompts, split_rows
from cscompile.execute import Support, UnitMask, masked
from cscompile.frontend import analyze, load_model, logits_of
from cscompile.metrics import compare_to_dense
from cscompile.passes.cluster import alignment, cluster
from cscompile.passes.constrain import class_support, core_scores
from cscompile.passes.route import default_layer, fit_router_features, route, router_features
from cscompile.passes.signature import prompt_signatures
from cscompile.passes.support import estimate_support

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
err = Console(stderr=True)


def _ids(tok, text, max_tokens):
    return tok(text, return_tensors="pt").input_ids[:, :max_tokens]


def _row_texts(row):
    """(prompt, continuation) to score: the reference answer or the correct choice."""
    extra = row.extra
    if "choices" in extra:
        return row.prompt, " " + str(extra["choices"][extra["label"]])
    answer = extra.get("answer") or extra.get("solution") or ""
    return row.prompt, " " + str(answer)


def _masked_logits_many(model, smap, ids, supports):
    with torch.no_grad(), masked(model, smap, UnitMask.from_supports(smap, supports)):
        return logits_of(model, ids.expand(len(supports), -1))


def _mc_acc_norm(model, smap, tok, row, supports, max_tokens):
    """acc_norm per support: pick the choice with the best mean log-prob per character."""
    choices = row.extra["choices"]
    scores = np.zeros((len(supports), len(choices)))
    p_ids = _ids(tok, row.prompt, max_tokens)
    for c, choice in enumerate(choices):
        ids = _ids(tok, row.prompt + " " + str(choice), max_tokens + 64)
        n_prompt = min(p_ids.shape[1], ids.shape[1] - 1)
        logits = _masked_logits_many(model, smap, ids, supports)
        logp = F.log_softmax(logits[:, n_prompt - 1:-1].double(), -1)
        tgt = ids[0, n_prompt:]
        ll = logp.gather(-1, tgt.view(1, -1, 1).expand(len(supports), -1, 1)).sum((1, 2))
        scores[:, c] = ll.numpy() / max(1, len(str(choice)))
    return (scores.argmax(1) == row.extra["label"]).astype(float)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED.parent / "models" / "stories260K"))
    ap.add_argument("--tasks", default="gsm8k,mbpp,flores,xsum,hellaswag,boolq")
    ap.add_argument("--calib-per-task", type=int, default=40)
    ap.add_argument("--eval-per-task", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-classes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="results/task_conditioning.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    loaded = load_model(args.model)
    smap = analyze(loaded)
    tok, model = loaded.tokenizer, loaded.model
    tasks = args.tasks.split(",")
    calib_rows, eval_rows = [], {}
    for task in tasks:
        rows, _ = dedupe_prompts(read_prompts(SHARED / task / "data.jsonl"))
        cal, ev = split_rows(rows, args.calib_per_task, args.eval_per_task, args.seed)
        calib_rows += [(task, r) for r in cal]
        eval_rows[task] = ev
    err.print(f"{len(calib_rows)} calibration rows, {sum(map(len, eval_rows.values()))} held-out")

    calib_ids = [_ids(tok, r.prompt, args.max_tokens) for _, r in calib_rows]
    sig = prompt_signatures(model, smap, calib_ids)
    clus = cluster(sig, max_classes=args.max_classes, seed=args.seed)
    align = alignment(clus.labels, [t for t, _ in calib_rows])
    core = core_scores(sig, clus.labels)
    class_sups = [class_support(smap, sig[clus.labels == c], args.density, core_importance=core)
                  for c in range(clus.k)]
    global_sup = class_support(smap, sig, args.density)
    # same pipeline, Wanda/FLAP-style allocation: all heads, the same FFN fraction per layer
    class_uni = [class_support(smap, sig[clus.labels == c], args.density, allocation="uniform")
                 for c in range(clus.k)]
    global_uni = class_support(smap, sig, args.density, allocation="uniform")
    layer = default_layer(smap)
    router = fit_router_features(router_features(model, smap, calib_ids, layer), clus.labels,
                                 layer, seed=args.seed)
    err.print(f"classes: k={clus.k}, alignment {align}")

    # static baselines at equal prunable bytes: all heads kept, FFN density solves the budget
    target = float(np.mean([s.density(smap) for s in class_sups]))
    attn = sum(l.attention.n_heads * smap.head_bytes(i) + l.attention.n_kv_heads * smap.kv_group_bytes(i)
               for i, l in enumerate(smap.layers) if l.attention)
    ffn_density = (target * smap.prunable_bytes() - attn) / (smap.prunable_bytes() - attn)
    baselines = {}
    for method in ("wanda", "magnitude", "random"):
        est = estimate_support(model, smap, calib_ids[:40], ffn_density, method=method,
                               calib_prompts=calib_ids[:40], seed=args.seed)
        baselines[method] = est.support
    methods = ["routed class", "oracle class", "global", "routed class (uniform)",
               "global (uniform)"] + list(baselines)
    densities = {"global": global_sup.density(smap),
                 "routed class (uniform)": float(np.mean([s.density(smap) for s in class_uni])),
                 "global (uniform)": global_uni.density(smap),
                 **{m: s.density(smap) for m, s in baselines.items()},
                 "routed class": target, "oracle class": target}

    results = {t: {m: {"kl": [], "top1": [], "acc": []} for m in ["dense"] + methods} for t in tasks}
    routed_ok = []
    for task in tasks:
        for row in eval_rows[task]:
            prompt, cont = _row_texts(row)
            p_ids = _ids(tok, prompt, args.max_tokens)
            ids = _ids(tok, prompt + cont, args.max_tokens + 64)
            n_prompt = min(p_ids.shape[1], ids.shape[1] - 1)
            routed = route(model, smap, router, p_ids)
            oracle = int(clus.predict(prompt_signatures(model, smap, [p_ids]))[0])
            routed_ok.append(routed == oracle)
            sups = [class_sups[routed], class_sups[oracle], global_sup, class_uni[routed],
                    global_uni] + list(baselines.values())
            with torch.no_grad():
                dense = logits_of(model, ids)
            logits = _masked_logits_many(model, smap, ids, sups)
            for m, lg in zip(methods, logits):
                q = compare_to_dense(dense, lg.unsqueeze(0), n_prompt)
                results[task][m]["kl"].append(q["kl"])
                results[task][m]["top1"].append(q["top1"])
            if "choices" in row.extra:
                accs = _mc_acc_norm(model, smap, tok, row, [Support.full(smap)] + sups, args.max_tokens)
                for m, a in zip(["dense"] + methods, accs):
                    results[task][m]["acc"].append(float(a))
        err.print(f"  scored {task}")

    summary = {t: {m: {k: (float(np.mean(v)) if v else None) for k, v in r.items()}
                   for m, r in res.items()} for t, res in results.items()}
    print(f"\n### Task conditioning — {loaded.model_id}, density {args.density} of prunable bytes "
          f"(classes {target:.3f}, FFN density of static baselines {ffn_density:.3f})\n")
    print(f"classes k={clus.k}; task alignment ARI {align['ari']:.2f}, purity {align['purity']:.2f}; "
          f"router agrees with the oracle class on {np.mean(routed_ok):.0%} of held-out rows\n")
    print("| task | metric | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for task in tasks:
        for metric in ("kl", "top1", "acc"):
            vals = [summary[task][m][metric] for m in methods]
            if vals[0] is None:
                continue
            dense = summary[task]["dense"][metric] if metric == "acc" else None
            label = metric + (f" (dense {dense:.2f})" if dense is not None else "")
            print(f"| {task} | {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print("\nbytes kept (fraction of prunable): " +
          ", ".join(f"{m} {densities[m]:.3f}" for m in methods))
    out = {"model": loaded.model_id, "density": args.density, "class_density": target,
           "ffn_density_baselines": ffn_density, "k": clus.k, "alignment": align,
           "router_agreement": float(np.mean(routed_ok)), "densities": densities,
           "summary": summary, "args": vars(args), "seconds": time.perf_counter() - t0}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    err.print(f"wrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
