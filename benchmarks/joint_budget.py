"""One budget over prompt tokens and model units, measured on long prompts (issue 14).

Bytes one decode token reads = kept weight bytes (runtime.pertoken.plan_bytes: the per-token
plan's matrices, sketches included) + kept KV bytes (runtime.kv_reduce.kv_bytes: every cached
position the step attends to, prompt positions kept + the answer's own), both at the model's
storage element size. Methods at equal total bytes:

* model reduction alone: the per-token plan of passes.allocate's greedy path at the weight
  budget the total leaves after the full KV cache;
* KV reduction alone: the dense model with the prompt's KV cut (StreamingLLM-like sinks +
  recent window; SnapKV-like, LLMLingua-like (self-information) and random-measurement
  importance, all with the same sinks and recent window), or prompt tokens dropped before the
  prefill by self-information (LLMLingua-like; its prefill speedup reported on its own);
* joint: a SnapKV-like kv keep fraction and the weight budget the total leaves, swept; the
  best split per length reported in-sample and chosen leave-one-prompt-out;
* joint, split from the build's table: the split runtime.kv_reduce.choose_split picks for
  the prompt's length from a passes.split table calibrated as `cscompile build` calibrates
  it, on calibration material the evaluation never uses (what `cscompile run --budget` does).

Long prompts (1k-4k tokens) from ../shared/data: several xsum articles concatenated, then a
request to summarise one of them; long few-shot gsm8k (solved examples, then a question).
Reference: the dense model's greedy answer (--gen-tokens); every method is teacher-forced on it
(one forward over the answer on the method's cache, every position on its path, as decode
computes it) and scored by KL(dense || method) and top-1 agreement on the answer tokens.

    python benchmarks/joint_budget.py            # results/joint_budget_smollm2.{md,json,png}
    python benchmarks/joint_budget.py --replot   # rewrite .md/.png from the JSON

On 2 shared CPU cores: the allocation path ~20 min once (kept as JSON in --alloc-cache), the
split table a few minutes, then ~10 min for 6 prompts of ~1.25k and ~2.7k tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO.parent))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from rich.console import Console  # noqa: E402

from cscompile.frontend import analyze, load_model  # noqa: E402
from cscompile.passes.allocate import Path as Path_, greedy_path  # noqa: E402
from cscompile.passes.sketch import sketch  # noqa: E402
from cscompile.runtime.generate import encode  # noqa: E402

CALIB_LEN = 96  # tokens per allocation calibration prompt (weights do not need long prompts)
SPLIT_ROWS = (920, 12)  # xsum rows (first, count) the split table's long contexts are made of


def calibration_prompts(tok, n_xsum: int = 4, n_gsm: int = 2) -> list[torch.Tensor]:
    """Short prompts for the weight allocation, from rows the evaluation never uses (the
    evaluation draws xsum rows < 600 and gsm8k rows < 600)."""
    out = []
    for name, first, n in (("xsum", 900, n_xsum), ("gsm8k", 1200, n_gsm)):
        rows = [json.loads(line) for line in open(SHARED / "data" / name / "data.jsonl")]
        for row in rows[first:first + n]:
            ids = tok(row["prompt"])["input_ids"][:CALIB_LEN]
            out.append(torch.tensor(ids))
    return out


def split_prompts(tok) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(long-context material, weight-curve prompts) for the split table, as the build takes
    them (its build prompts whole, its held-out prompts cut to 256 tokens): xsum prompts of
    rows the evaluation and the allocation never use."""
    first, n = SPLIT_ROWS
    rows = _rows("xsum")[first:first + n]
    whole = [torch.tensor(tok(r["prompt"])["input_ids"]) for r in rows]
    return whole, [w[:256] for w in whole[:8]]


def allocation(model, smap, tok, cache_file: Path | None, err: Console, seed: int = 0):
    """(greedy path, sketches): the path read from cache_file when present, else measured
    (minutes on 2 cores) and written there."""
    sk = sketch(model, smap, bits=3, group=64, seed=seed)
    if cache_file and cache_file.is_file():
        err.print(f"allocation path read from {cache_file}")
        return Path_.from_json(json.loads(cache_file.read_text())), sk
    prompts = calibration_prompts(tok)
    t0 = time.perf_counter()
    done = [0]

    def progress():
        done[0] += 1
        err.print(f"  allocation menus {done[0]}/{3 * smap.n_layers} "
                  f"({time.perf_counter() - t0:.0f} s)")

    path, report = greedy_path(model, smap, prompts, sk, bits=3, group=64, progress=progress)
    if cache_file:
        cache_file.write_text(json.dumps(path.to_json()))
    err.print(f"allocation: {len(path.steps)} steps in {time.perf_counter() - t0:.0f} s")
    return path, sk


# ----------------------------------------------------------------------------- prompts
def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in open(SHARED / "data" / name / "data.jsonl")]


def long_prompts(tok, lengths: list[int], per_length: int, seed: int) -> list[dict]:
    """Per target length: (per_length - 1) xsum prompts (articles concatenated until the
    target, then a request to summarise one of them) and one few-shot gsm8k prompt (solved
    examples until the target, then a question). Rows < 600 only (calibration uses later ones)."""
    rng = random.Random(seed)
    xsum, gsm = _rows("xsum")[:600], _rows("gsm8k")[:600]
    out = []
    for target in lengths:
        for j in range(per_length):
            if j < per_length - 1:
                parts, n = [], 0
                while n < target - 40:  # the last article cut so the prompt ends near target
                    row = xsum[rng.randrange(len(xsum))]
                    art = tok(row["input"].strip(), add_special_tokens=False)["input_ids"]
                    art = art[:max(64, target - n)]
                    parts.append(tok.decode(art))
                    n += len(art) + 6
                ask = rng.randrange(len(parts))
                text = "".join(f"Article {i + 1}:\n{a}\n\n" for i, a in enumerate(parts)) + \
                    f"Summarize Article {ask + 1} in one sentence."
                ids = encode(tok, text, chat=True)
                kind = f"xsum x{len(parts)}"
            else:
                shots, n = [], 0
                while n < target - 150:  # whole solved examples, then the question
                    row = gsm[rng.randrange(len(gsm))]
                    shots.append(f"Question: {row['prompt']}\nAnswer: {row['solution']}\n\n")
                    n += len(tok(shots[-1])["input_ids"])
                q = gsm[rng.randrange(len(gsm))]
                ids = tok("".join(shots) + f"Question: {q['prompt']}\nAnswer:")["input_ids"]
                kind = f"gsm8k {len(shots)}-shot"
            out.append({"target": target, "kind": kind, "ids": torch.tensor(ids)})
    return out


# ----------------------------------------------------------------------------- scoring
def copy_cache(model, cache, keep: torch.Tensor | None = None):
    """A new DynamicCache with the positions `keep` of `cache` (all when None)."""
    from transformers import DynamicCache

    new = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if keep is not None:
            k, v = k.index_select(-2, keep), v.index_select(-2, keep)
        new.update(k.clone(), v.clone(), idx)
    return new


def answer_logits(model, pt, cache, answer: torch.Tensor, start: int, pertoken: bool):
    """Teacher-forced logits [G-1, V] of answer[1:] given answer[:-1] fed at true positions
    start.. on `cache` (consumed), every position on the per-token plan when pertoken."""
    from cscompile.runtime.generate import pertoken_steps

    inp = answer[:-1].view(1, -1)
    pos = torch.arange(start, start + inp.shape[1]).view(1, -1)

    def run():
        return model(input_ids=inp, position_ids=pos, cache=cache, use_cache=True).logits[0]

    if not pertoken:
        return run().double()
    with pertoken_steps(pt):
        return run().double()


def compare(ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    logp = torch.log_softmax(logits, -1)
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    top1 = float((ref_logp.argmax(-1) == logp.argmax(-1)).double().mean())
    return kl, top1


def dense_answer(model, cache, first: int, n_tokens: int, n_prompt: int) -> torch.Tensor:
    """The dense model's greedy answer (n_tokens ids, the first from the prefill)."""
    from cscompile.runtime.decode_step import decode_logits

    cache = copy_cache(model, cache)
    out = [first]
    for i in range(n_tokens - 1):
        logits = decode_logits(model, torch.tensor([[out[-1]]]), cache,
                               position_ids=torch.tensor([[n_prompt + i]]))
        out.append(int(logits[0, -1].argmax()))
    return torch.tensor(out)


# ----------------------------------------------------------------------------- one prompt
KV_METHODS = ("recent", "snapkv", "selfinfo", "measure")  # after a full prefill
KV_LABELS = {"recent": "StreamingLLM-like (sinks + recent)", "snapkv": "SnapKV-like",
             "selfinfo": "LLMLingua-like KV (self-information)",
             "measure": "random measurements (lasso)",
             "drop": "LLMLingua-like prompt dropping (before prefill)",
             "drop_early": "LLMLingua-like prompt dropping, first-quarter scorer"}
JOINT_KEEPS = (1.0, 0.75, 0.6, 0.5, 0.35, 0.25, 0.15, 0.1)


CHOSEN = "joint, split from the build's table"
CHOSEN_NEXT = "joint, split from a next-text-only table"  # the table before recall was added


def evaluate_prompt(model, smap, tok, pt, path, shapes, per_pos, item, budgets, args, err,
                    split_table=None):
    from cscompile.passes.allocate import plan_for_budget
    from cscompile.passes.token_importance import (measured_scores, selfinfo_scores,
                                                   snapkv_scores)
    from cscompile.runtime.kv_reduce import (choose_split, decode_bytes, keep_positions,
                                             kv_bytes, scorer_layers)
    from cscompile.runtime.pertoken import count, dense_plan

    ids = item["ids"].view(1, -1)
    n, G = ids.shape[1], args.gen_tokens
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
    prefill_s = time.perf_counter() - t0
    with torch.no_grad():
        scores = {"recent": torch.arange(n, dtype=torch.float32),
                  "selfinfo": selfinfo_scores(model, ids, out.logits[0])}
        first = int(out.logits[0, -1].argmax())
        del out
        t1 = time.perf_counter()
        scores["selfinfo_early"] = selfinfo_scores(model, ids, layers=scorer_layers(model))
        early_s = time.perf_counter() - t1
        t1 = time.perf_counter()  # the runtime's prefill: no logits but the last position's
        model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True,
              logits_to_keep=1)
        dense_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        scores["snapkv"] = snapkv_scores(model, ids, cache, args.window, 7)
        snap_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        scores["measure"] = measured_scores(model, ids, cache, args.window, args.measure,
                                            0.5, 16, 4, args.seed)
        measure_s = time.perf_counter() - t1
        answer = dense_answer(model, cache, first, G, n)
        ref = torch.log_softmax(answer_logits(model, pt, copy_cache(model, cache), answer, n,
                                              False), -1)
    gen_pos = (G + 1) / 2  # mean answer positions a decode step also reads
    dense = decode_bytes(dense_plan(smap), shapes, n + gen_pos, per_pos)
    W, dense_total = dense["weight_bytes"], dense["total_bytes"]
    rows = []
    base = {"prompt": item["name"], "kind": item["kind"], "prompt_tokens": n,
            "dense_weight_bytes": W, "dense_kv_bytes": dense["kv_bytes"],
            "dense_total_bytes": dense_total}

    def record(method, budget, plan, keep_idx, kv_keep, logits, extra=None):
        kl, top1 = compare(ref, logits)
        got = decode_bytes(plan, shapes, len(keep_idx) + gen_pos, per_pos)
        rows.append({**base, "method": method, "budget": budget, "kv_keep": kv_keep,
                     "kept_positions": len(keep_idx), "weight_bytes": got["weight_bytes"],
                     "kv_bytes": got["kv_bytes"], "total_bytes": got["total_bytes"],
                     "total_fraction": got["total_bytes"] / dense_total,
                     "kl": kl, "top1": top1, **(extra or {})})

    def run_kv(method, kv_keep, plan):
        keep = keep_positions(scores[method], kv_keep, args.sinks, args.window)
        pt.configure(plan)
        sparse = plan is not dplan
        with torch.no_grad():
            logits = answer_logits(model, pt, copy_cache(model, cache, keep), answer, n, sparse)
        return keep, logits

    dplan = dense_plan(smap)

    def weight_plan(weight_budget):
        if weight_budget >= 1:
            return dplan
        try:
            return plan_for_budget(path, weight_budget)[0]
        except Exception:  # noqa: BLE001  (below the sparsest plan)
            return None

    for name, total in budgets:  # None: weights + a quarter of the KV (KV-only can reach it)
        target = total * dense_total if total is not None else \
            W + 0.25 * kv_bytes(n + gen_pos, per_pos)
        for k in JOINT_KEEPS:  # joint sweep (k = 1: model reduction alone)
            kept = count(k, n)
            plan = weight_plan((target - kv_bytes(kept + gen_pos, per_pos)) / W)
            if plan is None:
                continue
            keep, logits = run_kv("snapkv", k, plan)
            record("model only" if k == 1.0 else "joint (SnapKV)", name, plan, keep, k, logits)
        if split_table is not None:  # what `cscompile run --budget` would run
            next_only = {**split_table, "kv": [{**r, "kl": r["kl_next"]}
                                               for r in split_table["kv"]]}
            for label, tab in ((CHOSEN, split_table), (CHOSEN_NEXT, next_only)):
                c = choose_split(tab, target / dense_total, n, new_tokens=G + 1)
                plan = weight_plan(c["weight_budget"] + 1e-9)
                keep, logits = run_kv("snapkv", c["kv_keep"], plan)
                record(label, name, plan, keep, c["kv_keep"], logits,
                       {"predicted_kl": c["predicted_kl"], "extrapolated": c["extrapolated"]})
        kv_only = (target - W) / per_pos - gen_pos  # prompt positions the weights leave
        if kv_only < args.sinks + 1:
            continue  # KV reduction alone cannot reach this total (weights alone exceed it)
        k = kv_only / n
        for method in KV_METHODS:
            keep, logits = run_kv(method, k, dplan)
            record(KV_LABELS[method], name, dplan, keep, k, logits)
        # LLMLingua-like: drop prompt tokens by self-information BEFORE the prefill, scored
        # by the whole model (its logits over the prompt: a full forward) or, as
        # `run --prompt-keep` does, by the model's first quarter of layers
        for label, score, score_s in (("drop", scores["selfinfo"], prefill_s),
                                      ("drop_early", scores["selfinfo_early"], early_s)):
            keep = keep_positions(score, k, args.sinks, args.window)
            short = ids[:, keep]
            t1 = time.perf_counter()
            c2 = DynamicCache(config=model.config)
            with torch.no_grad():
                o2 = model(input_ids=short, cache=c2, use_cache=True, logits_to_keep=1)
            short_s = time.perf_counter() - t1
            with torch.no_grad():
                logits = answer_logits(model, pt, c2, answer, short.shape[1], False)
            first_same = int(o2.logits[0, -1].argmax()) == first
            record(KV_LABELS[label], name, dplan, keep, k, logits,
                   {"prefill_s": short_s, "score_s": score_s, "dense_prefill_s": dense_s,
                    "first_token_same": first_same})
    err.print(f"  {item['name']}: {n} tokens, prefill {prefill_s:.1f} s, snapkv {snap_s:.1f} s, "
              f"measure {measure_s:.1f} s, {len(rows)} rows")
    return rows, {"prefill_s": prefill_s, "snapkv_s": snap_s, "measure_s": measure_s,
                  "answer": tok.decode(answer.tolist())}


# ----------------------------------------------------------------------------- report
def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(rows: list[dict]) -> tuple[list[dict], dict]:
    """Mean over the prompts of one length per (budget, length, method [, kv keep]); the
    joint's best split per (budget, length), in-sample and leave-one-prompt-out."""
    groups = {}
    for r in rows:
        keep = r["kv_keep"] if r["method"] == "joint (SnapKV)" else None
        groups.setdefault((r["budget"], r["target"], r["method"], keep), []).append(r)
    table = []
    for (budget, target, method, keep), rs in groups.items():
        table.append({"budget": budget, "target": target, "method": method, "kv_keep": keep,
                      "prompts": len(rs),
                      **{k: _mean([r[k] for r in rs]) for k in
                         ("prompt_tokens", "weight_bytes", "kv_bytes", "total_bytes",
                          "total_fraction", "kl", "top1", "kept_positions")},
                      "weight_fraction": _mean([r["weight_bytes"] / r["dense_weight_bytes"]
                                                for r in rs]),
                      "kv_fraction": _mean([r["kv_bytes"] / r["dense_kv_bytes"] for r in rs])})
    splits = {}
    for budget, target in sorted({(t["budget"], t["target"]) for t in table}):
        joint = [t for t in table if t["budget"] == budget and t["target"] == target
                 and t["method"] in ("joint (SnapKV)", "model only")]
        best = min(joint, key=lambda t: t["kl"])
        # leave one prompt out: the split chosen on the other prompts of this length
        prompts = sorted({r["prompt"] for r in rows if r["target"] == target})
        loo = []
        for held in prompts:
            cand = {}
            for r in rows:
                if r["budget"] == budget and r["target"] == target and r["prompt"] != held \
                        and r["method"] in ("joint (SnapKV)", "model only"):
                    cand.setdefault(r["kv_keep"], []).append(r["kl"])
            if not cand:
                continue
            k = min(cand, key=lambda kk: _mean(cand[kk]))
            got = [r for r in rows if r["budget"] == budget and r["prompt"] == held
                   and r["kv_keep"] == k and r["method"] in ("joint (SnapKV)", "model only")]
            loo.extend(got)
        splits[f"{budget}@{target}"] = {
            "budget": budget, "target": target, "best_kv_keep": best["kv_keep"] or 1.0,
            "best_weight_fraction": best["weight_fraction"], "best_kl": best["kl"],
            "best_top1": best["top1"],
            "loo_kl": _mean([r["kl"] for r in loo]), "loo_top1": _mean([r["top1"] for r in loo]),
            "loo_total_fraction": _mean([r["total_fraction"] for r in loo]),
            "loo_weight_bytes": _mean([r["weight_bytes"] for r in loo]),
            "loo_kv_bytes": _mean([r["kv_bytes"] for r in loo]),
            "loo_total_bytes": _mean([r["total_bytes"] for r in loo]),
            "loo_prompt_tokens": _mean([r["prompt_tokens"] for r in loo]),
            "loo_prompts": len(loo)}
    return table, splits


def write_report(out: Path, result: dict) -> None:
    table, splits = result["table"], result["splits"]
    lines = [f"# Joint budget over prompt tokens and model units: {result['model']}", "",
             f"`{result['command']}` — {result['machine']}, {result['seconds']:.0f} s.", "",
             "Bytes per decode token = weight bytes (plan_bytes) + KV bytes: (kept prompt "
             "positions + the answer's mean cached positions) x "
             f"{result['kv_bytes_per_position']} bytes per position (K and V rows of every "
             f"layer at {result['elsize']} bytes per element, the element size plan_bytes "
             "charges the weights). KL(dense || method) and top-1 agreement on the dense "
             f"greedy answer's {result['gen_tokens'] - 1} decode-step tokens (teacher-forced), "
             "mean over the "
             "prompts of a length. `total` is a fraction of the dense weights + full KV. "
             "Weight plans are prefixes of one allocation path (passes.allocate) at or under "
             "the weight budget the KV leaves; its first step (the lm_head sketch, 42 MB on "
             "SmolLM2) is taken at any weight budget below 1, so a row can sit under its "
             "total.", ""]
    for budget in result["budget_names"]:
        lines += [f"## total budget {budget}", "",
                  "| prompt tokens | method | kv keep | weight MB | KV MB | total MB | total / dense | KL | top-1 | prompts |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for target in result["lengths"]:
            rows = [t for t in table if t["budget"] == budget and t["target"] == target]
            rows.sort(key=lambda t: (t["method"] != "model only", t["method"],
                                     -(t["kv_keep"] or 0)))
            for t in rows:
                keep = "1" if t["method"] == "model only" else (
                    f"{t['kv_keep']:.2f}" if t["kv_keep"] is not None else
                    f"{t['kept_positions'] / t['prompt_tokens']:.2f}")
                lines.append(f"| {t['prompt_tokens']:.0f} | {t['method']} | {keep} | "
                             f"{t['weight_bytes'] / 1e6:.1f} | {t['kv_bytes'] / 1e6:.1f} | "
                             f"{t['total_bytes'] / 1e6:.1f} | {t['total_fraction']:.3f} | "
                             f"{t['kl']:.4f} | {t['top1']:.3f} | {t['prompts']} |")
            if not any(t["method"] in KV_LABELS.values() for t in rows):
                share = _mean([r["dense_weight_bytes"] / r["dense_total_bytes"]
                               for r in result["rows"] if r["target"] == target])
                lines.append(f"| | *KV reduction alone cannot reach this total: the dense "
                             f"weights alone are {share:.3f} of the dense total* | | | | | | | | |")
            s = splits.get(f"{budget}@{target}")
            if s:
                lines.append(f"| {s['loo_prompt_tokens']:.0f} | **joint, split chosen "
                             f"leave-one-prompt-out** | | {s['loo_weight_bytes'] / 1e6:.1f} | "
                             f"{s['loo_kv_bytes'] / 1e6:.1f} | {s['loo_total_bytes'] / 1e6:.1f} | "
                             f"{s['loo_total_fraction']:.3f} | {s['loo_kl']:.4f} | "
                             f"{s['loo_top1']:.3f} | {s['loo_prompts']} |")
        lines.append("")
    lines += ["## Where the split moves (best kv keep of the joint sweep, in-sample; the "
              "keep the build's table chose)", "",
              "| budget | target length | best kv keep | its weight fraction | KL | top-1 | "
              "table's kv keep | its weight fraction | KL | top-1 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in splits.values():
        ours = [t for t in table if t["budget"] == s["budget"] and t["target"] == s["target"]
                and t["method"] == CHOSEN]
        tail = (f" {ours[0]['kept_positions'] / ours[0]['prompt_tokens']:.2f} | "
                f"{ours[0]['weight_fraction']:.3f} | {ours[0]['kl']:.4f} | "
                f"{ours[0]['top1']:.3f} |") if ours else " | | | |"
        lines.append(f"| {s['budget']} | {s['target']} | {s['best_kv_keep']:.2f} | "
                     f"{s['best_weight_fraction']:.3f} | {s['best_kl']:.4f} | "
                     f"{s['best_top1']:.3f} |" + tail)
    cal = result.get("split_calibration")
    if cal:
        lines += ["", f"The build's table (passes.split) here: calibrated on {cal['material']} "
                  f"in {cal['seconds']:.0f} s; KV KL at lengths "
                  f"{sorted({r['length'] for r in cal['kv']})}, weight KL at budgets "
                  f"{[w['budget'] for w in cal['weights']]}."]
    drop = [r for r in result["rows"] if "prefill_s" in r]
    if drop:
        lines += ["", "## Prompt dropping before prefill (LLMLingua-like): prefill time", "",
                  "Dense prefill = the runtime's (logits of the last position only). The "
                  "scorer's time is charged: the whole-model scorer is a full forward with "
                  "logits at every position, the first-quarter scorer (`run --prompt-keep`) "
                  "runs the first quarter of the layers and the lm_head at every position.", "",
                  "| prompt | tokens | scorer | kept | prefill s (dense) | scoring s | prefill s (dropped) | speedup, prefill alone | speedup, scoring included | KL | first token as dense |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in drop:
            scorer = "first quarter" if "first-quarter" in r["method"] else "whole model"
            lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {scorer} | "
                         f"{r['kept_positions']} | {r['dense_prefill_s']:.2f} | "
                         f"{r['score_s']:.2f} | {r['prefill_s']:.2f} | "
                         f"{r['dense_prefill_s'] / r['prefill_s']:.2f}x | "
                         f"{r['dense_prefill_s'] / (r['prefill_s'] + r['score_s']):.2f}x | "
                         f"{r['kl']:.3f} | {r['first_token_same']} |")
    lines += ["", "Prompts:", ""] + [f"- {p['name']}: {p['kind']}, {p['tokens']} tokens"
                                     for p in result["prompts"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    names = result["budget_names"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    markers = {"StreamingLLM-like (sinks + recent)": "v", "SnapKV-like": "s",
               "LLMLingua-like KV (self-information)": "^", "random measurements (lasso)": "D",
               "LLMLingua-like prompt dropping (before prefill)": "x",
               "LLMLingua-like prompt dropping, first-quarter scorer": "+", CHOSEN: "*",
               CHOSEN_NEXT: "P"}
    for ax, budget in zip(axes[0], names):
        for ci, target in enumerate(result["lengths"]):
            color = f"C{ci}"
            joint = sorted([t for t in table if t["budget"] == budget and t["target"] == target
                            and t["method"] in ("joint (SnapKV)", "model only")],
                           key=lambda t: t["kv_keep"] or 1.0)
            if joint:
                n = _mean([t["prompt_tokens"] for t in joint])
                ax.plot([t["kv_keep"] or 1.0 for t in joint], [t["kl"] for t in joint], "o-",
                        color=color, label=f"joint sweep, ~{n:.0f} tok (keep 1 = model only)")
            for t in table:
                if t["budget"] == budget and t["target"] == target and t["method"] in markers:
                    ours = t["method"] in (CHOSEN, CHOSEN_NEXT)  # drawn over the sweep
                    ax.scatter([t["kept_positions"] / t["prompt_tokens"]], [t["kl"]],
                               marker=markers[t["method"]], color=color,
                               s=160 if ours else 36, edgecolors="black" if ours else None,
                               linewidths=0.8, zorder=5 if ours else 3,
                               label=f"{t['method']}" if ci == 0 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KV positions kept (fraction of the prompt)")
        ax.set_ylabel("KL(dense || method) on the answer")
        ax.set_title(f"total bytes per decode token: {budget}"
                     + (" of dense" if budget[0].isdigit() else ""), fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--alloc-cache", default="/tmp/joint_budget_alloc_smollm2.json",
                   help="the allocation path (JSON): read if present, else written")
    p.add_argument("--alloc-only", action="store_true")
    p.add_argument("--lengths", default="1200,2600", help="target prompt lengths (tokens)")
    p.add_argument("--per-length", type=int, default=3, help="prompts per length")
    p.add_argument("--gen-tokens", type=int, default=33, help="dense greedy answer length")
    p.add_argument("--window", type=int, default=32, help="recent window = SnapKV window")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--measure", type=int, default=64, help="random measurements per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "results" / "joint_budget_smollm2.json"))
    p.add_argument("--replot", action="store_true", help="rewrite .md/.png from --out")
    args = p.parse_args()
    out = Path(args.out)
    if args.replot:
        result = json.loads(out.read_text())
        write_report(out, result)
        plot(out, result)
        return
    from cscompile.passes.split import calibrate_split
    from cscompile.runtime.kv_reduce import kv_position_bytes
    from cscompile.runtime.pertoken import PerToken, Shapes, dense_plan

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    err = Console(stderr=True)
    started = time.perf_counter()
    command = "python " + " ".join([sys.argv[0].replace(str(REPO) + "/", "")] + sys.argv[1:])
    loaded = load_model(args.model)
    smap = analyze(loaded)
    model, tok = loaded.model, loaded.tokenizer
    path, sk = allocation(model, smap, tok, Path(args.alloc_cache), err)
    if args.alloc_only:
        return
    elsize = smap.elsize()  # storage bytes per element (2 for SmolLM2's bf16), as plan_bytes
    pt = PerToken(model, smap, dense_plan(smap), sk, elsize=elsize)
    shapes = Shapes.of(model, smap, elsize)
    per_pos = kv_position_bytes(model, smap, elsize)
    t0 = time.perf_counter()
    whole, held = split_prompts(tok)
    split_table = calibrate_split(model, pt, path, whole, held, loaded.context_length, per_pos)
    split_s = time.perf_counter() - t0
    err.print(f"split table: {len(split_table['weights'])} weight budgets, "
              f"{len(split_table['kv'])} (length, keep) points in {split_s:.0f} s")
    pt.detach()  # attached only inside the per-token forwards (runtime.generate.pertoken_steps)
    lengths = [int(x) for x in args.lengths.split(",")]
    items = long_prompts(tok, lengths, args.per_length, args.seed)
    for i, it in enumerate(items):
        it["name"] = f"p{i}"
    budgets = [("0.5", 0.5), ("0.7", 0.7), ("weights + KV/4", None)]
    err.print(f"{len(items)} prompts: " + ", ".join(f"{it['kind']} {it['ids'].numel()} tok"
                                                   for it in items))
    rows, info = [], {}
    for i, it in enumerate(items):
        err.print(f"[{i + 1}/{len(items)}] {time.perf_counter() - started:.0f} s")
        got, meta = evaluate_prompt(model, smap, tok, pt, path, shapes, per_pos, it, budgets,
                                    args, err, split_table)
        for r in got:
            r["target"] = it["target"]
        rows += got
        info[it["name"]] = meta
    table, splits = summarise(rows)
    result = {"model": loaded.model_id, "command": command,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                         f"{__import__('os').cpu_count()} CPUs (shared), no GPU, torch "
                         f"{torch.__version__}",
              "seconds": time.perf_counter() - started, "elsize": elsize,
              "kv_bytes_per_position": per_pos, "gen_tokens": args.gen_tokens,
              "lengths": lengths, "budget_names": [b for b, _ in budgets],
              "prompts": [{"name": it["name"], "kind": it["kind"], "tokens": it["ids"].numel(),
                           "target": it["target"], **info[it["name"]]} for it in items],
              "rows": rows, "table": table, "splits": splits,
              "split_calibration": {**split_table, "seconds": split_s,
                                    "material": f"xsum rows {SPLIT_ROWS[0]}.."
                                                f"{sum(SPLIT_ROWS) - 1}, whole prompts"},
              "split_table": {f"{s['budget']}@{s['target']}": s["best_kv_keep"]
                              for s in splits.values()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    write_report(out, result)
    plot(out, result)
    err.print(f"wrote {out} and .md/.png ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
