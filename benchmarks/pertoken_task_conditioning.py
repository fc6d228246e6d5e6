"""Does task conditioning pay on the per-token path? Per-task allocations vs one global one.

For each task family, the compiled allocation (passes.allocate) is run on that task's own
calibration rows ("per-task") and once on the union of every task's calibration rows
("global"), both at the same budget. Each is scored on held-out rows of every task: prompt
prefilled dense, the reference answer teacher-forced on the per-token path (decode_kl: KL to
dense and top-1 agreement on the answer tokens). The per-task plan of task t is what a router
that sends t's prompts to their class would run, so "per-task on its own task" vs "global on
that task" is the comparison at equal bytes; the off-diagonal entries show how specific the
plans are.

    python benchmarks/pertoken_task_conditioning.py --model smollm2-135m --budget 0.6

Writes results/pertoken_task_conditioning_<model>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TASKS = ("gsm8k", "mbpp", "flores", "xsum", "boolq")


def _rows(task: str, n: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in (SHARED / "data" / task / "data.jsonl").open()]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[:n]]


def _text(row: dict) -> tuple[str, str]:
    if "choices" in row and "label" in row:
        return row["prompt"], " " + str(row["choices"][int(row["label"])])
    return row["prompt"], " " + str(row.get("answer", ""))


def _ids(tokenizer, row, max_tokens: int) -> tuple[torch.Tensor, int]:
    prompt, answer = _text(row)
    p = tokenizer(prompt)["input_ids"][-(max_tokens // 2):]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_tokens // 2]
    return torch.tensor(p + a), len(p)


@torch.no_grad()
def _answer_kl(model, pt, items) -> dict:
    """KL / top-1 on the answer tokens: prompt prefilled dense, answer on the per-token path
    (the last answer token predicts nothing and is dropped)."""
    from cscompile.passes.allocate import decode_kl

    return decode_kl(model, pt, [ids[:-1] for ids, _ in items], splits=[p for _, p in items])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--calib-rows", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--parts", default="qkv,o,ffn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        print("error: ../shared is absent (task data lives there)", file=sys.stderr)
        return 2
    from cscompile.frontend import analyze, load_model
    from cscompile.models import NAMED_MODELS, resolve_model
    from cscompile.passes.allocate import greedy_path, plan_for_budget
    from cscompile.passes.sketch import sketch
    from cscompile.runtime.pertoken import PerToken, plan_bytes

    t0 = time.time()
    path = resolve_model(args.model) if args.model in NAMED_MODELS else args.model
    loaded = load_model(path)
    smap = analyze(loaded)
    model, tok = loaded.model.eval(), loaded.tokenizer
    sk = sketch(model, smap, bits=3, seed=0)
    calib, held = {}, {}
    for t in TASKS:
        rows = _rows(t, args.calib_rows + args.eval_rows, seed=7)
        calib[t] = [_ids(tok, r, args.max_tokens)[0] for r in rows[:args.calib_rows]]
        held[t] = [_ids(tok, r, args.max_tokens) for r in rows[args.calib_rows:]]
    parts = tuple(args.parts.split(","))
    plans = {}
    for name, prompts in [("global", [x for t in TASKS for x in calib[t]])] + [
            (t, calib[t]) for t in TASKS]:
        p, _ = greedy_path(model, smap, prompts, sk, parts=parts, head=parts != ("ffn",))
        plans[name] = plan_for_budget(p, args.budget)[0]
        print(f"allocated {name} ({time.time() - t0:.0f} s)", file=sys.stderr)
    pt = PerToken(model, smap, plans["global"], sk)
    rows = []
    try:
        for name, plan in plans.items():
            pt.configure(plan)
            nb = plan_bytes(plan, pt.shapes)["fraction"]
            for t in TASKS:
                r = _answer_kl(model, pt, held[t])
                rows.append({"plan": name, "task": t, "bytes": nb, **r})
    finally:
        pt.detach()
    by = {(r["plan"], r["task"]): r for r in rows}
    lines = [f"# Task conditioning on the per-token path: {args.model}", "",
             f"Command: `python benchmarks/pertoken_task_conditioning.py --model {args.model} "
             f"--budget {args.budget} --parts {args.parts}`; {args.calib_rows} calibration and "
             f"{args.eval_rows} held-out rows per task (disjoint), answer tokens teacher-forced "
             f"after a dense prefill of the prompt; KL(dense || path) nats/token / top-1. "
             f"Run time {time.time() - t0:.0f} s, CPU, {args.threads} thread(s).", "",
             "| task | global plan | own task's plan | bytes (global / own) |", "|---|---|---|---|"]
    wins = 0
    for t in TASKS:
        g, o = by[("global", t)], by[(t, t)]
        wins += o["kl"] < g["kl"]
        lines.append(f"| {t} | {g['kl']:.4f} / {g['top1']:.3f} | {o['kl']:.4f} / {o['top1']:.3f}"
                     f" | {g['bytes']:.3f} / {o['bytes']:.3f} |")
    lines += ["", f"The task's own plan has lower KL than the global plan on {wins} of "
              f"{len(TASKS)} tasks at the same budget.", "",
              "Every plan on every task (KL):", "",
              "| plan \\ task | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for name in plans:
        lines.append(f"| {name} | " + " | ".join(f"{by[(name, t)]['kl']:.4f}" for t in TASKS)
                     + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pertoken_task_conditioning_{Path(str(args.model)).name}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2)
                                      + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
