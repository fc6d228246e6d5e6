"""Support-selection methods compared on a real model: held-out KL to dense, top-1 agreement,
WikiText-2 perplexity, FFN bytes read per token and compute spent choosing.

Data (../shared): calibration rows and disjoint evaluation rows (fixed seed) from several task
files, each row = prompt + its reference continuation, truncated to --prompt-len tokens; and
--windows WikiText-2 windows of --window tokens. Every evaluation sequence is scored on its
second half (tasks) or last --score tokens (WikiText); per-prompt methods (griffin, cs) select
from the tokens before that, task-level methods from the calibration rows, per-token methods
calibrate their thresholds on the calibration rows.

    python benchmarks/support_quality.py --quick                      # stories260K, ~1 min
    python benchmarks/support_quality.py --model smollm2-135m --windows 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from cscompile.frontend import analyze, load_model, logits_of  # noqa: E402
from cscompile.metrics import compare_to_dense, nll, wikitext_windows  # noqa: E402
from cscompile.passes.support import KINDS, estimate_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TASKS = ("gsm8k", "mbpp", "flores", "xsum", "hellaswag", "boolq")
METHODS = ("random", "magnitude", "wanda", "activation", "griffin", "cs", "teal", "cats", "oracle")


def row_text(row: dict) -> str:
    """The prompt and its reference continuation (whatever the task file provides)."""
    cont = row.get("solution") or row.get("answer")
    if cont is None and "choices" in row and "label" in row:
        cont = row["choices"][row["label"]]
    return row["prompt"] + "\n" + str(cont or row.get("input", ""))


def task_rows(tokenizer, tasks, n_calib, n_eval, max_len, seed):
    """(calibration ids, evaluation ids) per task: disjoint seeded draws of rows >= 32 tokens."""
    calib, evals = [], []
    rng = np.random.default_rng(seed)
    for task in tasks:
        lines = (SHARED / "data" / task / "data.jsonl").read_text().splitlines()
        picked = []
        for i in rng.permutation(len(lines)):
            ids = tokenizer(row_text(json.loads(lines[i])), verbose=False)["input_ids"][:max_len]
            if len(ids) >= 32:
                picked.append(torch.tensor([ids]))
            if len(picked) == n_calib + n_eval:
                break
        calib += picked[:n_calib]
        evals += [(task, ids, ids.shape[1] // 2) for ids in picked[n_calib:]]
    return calib, evals


def evaluate(model, items, dense, apply_for):
    """KL/top-1 per item (tasks and wiki separately) and WikiText NLL under each item's apply."""
    out = {"task_kl": [], "task_top1": [], "wiki_kl": [], "wiki_top1": [], "wiki_nll": 0.0,
           "wiki_tokens": 0}
    for (task, ids, score_from), d in zip(items, dense):
        with torch.no_grad(), apply_for(ids, score_from)(model):
            logits = logits_of(model, ids)[:, score_from - 1:]
        r = compare_to_dense(d, logits, 1)
        group = "wiki" if task == "wikitext2" else "task"
        out[f"{group}_kl"].append(r["kl"])
        out[f"{group}_top1"].append(r["top1"])
        if group == "wiki":
            total, n = nll(logits, ids[:, score_from - 1:], 1)
            out["wiki_nll"] += total
            out["wiki_tokens"] += n
    return out


def summarise(res: dict) -> dict:
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"task_kl": mean(res["task_kl"]), "task_top1": mean(res["task_top1"]),
            "wiki_kl": mean(res["wiki_kl"]), "wiki_top1": mean(res["wiki_top1"]),
            "wiki_ppl": float(np.exp(res["wiki_nll"] / max(1, res["wiki_tokens"])))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--score", type=int, default=128, help="scored last tokens of each window")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--calib-per-task", type=int, default=4)
    p.add_argument("--eval-per-task", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--densities", default="0.75,0.5")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--heads-keep", type=int, default=None,
                   help="heads kept per layer (default: 2/3 of them, e.g. 6 of 9)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cs-budget", type=int, default=64, help="masked forwards per prompt and unit kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids oversubscription next to other jobs)")
    p.add_argument("--quick", action="store_true", help="few rows and windows (a smoke run)")
    p.add_argument("--out", default=str(REPO / "results" / "support_quality.json"))
    args = p.parse_args()
    if args.quick:
        args.windows, args.calib_per_task, args.eval_per_task, args.cs_budget = 4, 2, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    err = Console(stderr=True)
    started = time.perf_counter()

    loaded = load_model(args.model)
    smap = analyze(loaded)
    model, tok = loaded.model, loaded.tokenizer
    n_heads = min(l.attention.n_heads for l in smap.layers if l.attention)
    heads_keep = args.heads_keep or max(1, round(2 * n_heads / 3))
    calib, items = task_rows(tok, args.tasks.split(","), args.calib_per_task, args.eval_per_task,
                             args.prompt_len, args.seed)
    windows = wikitext_windows(tok, None, args.windows, args.window, args.seed)
    items += [("wikitext2", w.view(1, -1), args.window - args.score) for w in windows]
    with torch.no_grad():
        dense = [logits_of(model, ids)[:, s - 1:] for _, ids, s in items]
    dense_ppl = summarise(evaluate(model, items, dense, lambda ids, s: _identity))["wiki_ppl"]
    err.print(f"{loaded.model_id}: {smap.n_layers} layers, heads kept {heads_keep}/{n_heads}, "
              f"{len(calib)} calibration rows, {len(items) - len(windows)} task rows, "
              f"{len(windows)} WikiText windows; dense WikiText ppl {dense_ppl:.2f}")

    methods = args.methods.split(",")
    configs = [(d, g, m) for d in map(float, args.densities.split(",")) for g in ("channel", "block")
               for m in methods if not (KINDS[m] == "per_token" and g == "block")]
    rows = []
    with Progress(console=err, transient=True) as progress:
        bar = progress.add_task("methods", total=len(configs))
        for density, gran, method in configs:
            progress.update(bar, description=f"{method} {gran} {density}")
            opts = {"budget": args.cs_budget, "prior": "activation"} if method == "cs" else {}
            t0 = time.perf_counter()
            spent = []

            def choose(prompts, calib_prompts=calib):
                est = estimate_support(model, smap, prompts, density, method=method,
                                       granularity=gran, tile=args.tile, heads_keep=heads_keep,
                                       calib_prompts=calib_prompts, seed=args.seed, **opts)
                spent.append(est)
                return est

            if KINDS[method] == "per_prompt":  # select from each sequence's own prefix
                apply_for = lambda ids, s: choose([ids[:, :s]], None).apply  # noqa: E731
            else:
                est = choose(calib)
                apply_for = lambda ids, s, est=est: est.apply  # noqa: E731
            res = summarise(evaluate(model, items, dense, apply_for))
            rows.append({"method": method, "kind": KINDS[method], "density": density,
                         "granularity": "channel" if gran == "channel" else f"block-{args.tile}",
                         "heads_keep": heads_keep, **res,
                         "bytes_fraction": float(np.mean([e.bytes_fraction for e in spent])),
                         "forwards": float(np.mean([e.forwards for e in spent])),
                         "seconds": time.perf_counter() - t0})
            r = rows[-1]
            err.print(f"{method:>10} {r['granularity']:>8} {density:.2f}: wiki KL {r['wiki_kl']:.3f}"
                      f", task KL {r['task_kl']:.3f} ({r['seconds']:.0f} s)")
            progress.advance(bar)

    elapsed = time.perf_counter() - started
    print_table(rows, loaded.model_id, dense_ppl, n_heads, elapsed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": loaded.model_id, "dense_wiki_ppl": dense_ppl,
                               "args": vars(args), "seconds": elapsed, "rows": rows}, indent=1))
    plot(rows, loaded.model_id, out.with_suffix(".png"))
    err.print(f"wrote {out} and {out.with_suffix('.png')} in {elapsed:.0f} s")


def _identity(model):
    from contextlib import nullcontext

    return nullcontext(model)


def print_table(rows, model_id, dense_ppl, n_heads, elapsed):
    table = Table(title=f"{model_id}: support selection vs dense (WikiText-2 dense ppl "
                        f"{dense_ppl:.2f}; {elapsed:.0f} s)")
    for col in ("density", "gran.", "method", "kind", "task KL", "task top1", "wiki KL",
                "wiki top1", "wiki ppl", "FFN bytes", "forwards"):
        table.add_column(col, justify="left" if col in ("gran.", "method", "kind") else "right")
    for r in rows:
        table.add_row(f"{r['density']:.2f}", r["granularity"], r["method"], r["kind"],
                      f"{r['task_kl']:.3f}", f"{r['task_top1']:.3f}", f"{r['wiki_kl']:.3f}",
                      f"{r['wiki_top1']:.3f}", f"{r['wiki_ppl']:.2f}",
                      f"{r['bytes_fraction']:.3f}", f"{r['forwards']:.0f}")
    Console(file=sys.stdout, width=160).print(table)


def plot(rows, model_id, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = sorted({r["method"] for r in rows})
    for i, m in enumerate(methods):
        for gran, marker in (("channel", "o"), ("block", "s")):
            pts = [r for r in rows if r["method"] == m and r["granularity"].startswith(gran)]
            if pts:
                ax.scatter([r["bytes_fraction"] for r in pts], [r["wiki_kl"] for r in pts],
                           marker=marker, color=f"C{i}", label=f"{m} ({gran})")
    ax.set_xlabel("FFN weight bytes read per token (fraction)")
    ax.set_ylabel("held-out KL to dense on WikiText-2 (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"{model_id}: support selection methods")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
