"""Split pass: how one total byte budget (weights + KV) is best divided for a prompt length.

A decode token reads the kept weights and every cached position's K and V. At a total budget
the split between the two moves with the prompt's length: short prompts make KV bytes
negligible, long ones make them a large share (results/joint_budget_smollm2.md). The build
measures two curves on its calibration prompts and stores them in the bundle; the runtime
(runtime.kv_reduce.choose_split) picks, per prompt length, the split whose predicted KL is
least at the total budget:

* weights: KL(dense || per-token plan) at a grid of weight budgets, each plan a prefix of the
  allocation path (passes.allocate), measured as the allocation checks its plan (decode_kl:
  teacher-forced on held-out prompts, dense prefill);
* KV: KL(dense || dense weights on a reduced cache) at a grid of kv keep fractions and prompt
  lengths. Long contexts are the build prompts concatenated (in two rotations); the first L
  tokens are prefilled, the cache reduced as the runtime reduces it (sinks, recent window,
  SnapKV-like importance: runtime.kv_reduce), and CONTINUATION tokens teacher-forced at their
  true positions: the text that follows (needs local context) and a span from the middle of
  the prefix repeated (needs recall of an earlier position). The table's KL is the worse of
  the two: on the joint budget benchmark the next-text KL alone underestimated what a
  "summarise Article j" answer loses (results/joint_budget_smollm2.md).

The prediction is additive, KL(w, k, L) ~ KL_w(w) + KL_kv(k, L): two 1-D curves cost a few
dozen forwards where a joint grid per length would cost hundreds, and the joint budget
benchmark measures how well the split it chooses does against the best split found by a
sweep on the evaluation prompts themselves.

Sharding: every decode_kl and every (context, length) item runs on the rank that owns it and
the results are gathered in a fixed order, so the table is the one-process table.
"""

from __future__ import annotations

import torch

from cscompile.compat import cache_kwargs
from cscompile.distributed import SINGLE, RankGroup

WEIGHT_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
KV_KEEPS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
MIN_LENGTH = 128  # calibrated lengths: MIN_LENGTH x 2^i up to what the prompts and context allow
MAX_LENGTH = 4096
CONTINUATION = 32  # teacher-forced tokens after each prefix
CONTEXTS = 2  # rotations of the concatenated prompts per length
# what follows each prefix: the text that comes next (local context), and a span from the
# middle of the prefix repeated (recall, as a question about an earlier document needs)
CONTINUATIONS = ("next", "recall")
WEIGHT_PROMPTS = 8  # held-out prompts the weight curve is measured on


# ----------------------------------------------------------------------------- entry
def calibrate_split(model, pt, path, build_prompts: list[torch.Tensor],
                    held_prompts: list[torch.Tensor], context_length: int | None,
                    per_position: int, ranks: RankGroup = SINGLE, progress=None) -> dict:
    """The bundle's "split" table: {"weights": [{budget, bytes, kl, top1}], "kv": [{length,
    keep, kl, top1}], ...}. `pt` is the per-token path on `model` (its plan is restored);
    `per_position`: KV bytes one cached position costs a decode step."""
    table = {"weights": weight_curve(model, pt, path, held_prompts[:WEIGHT_PROMPTS], ranks),
             "kv": kv_curve(model, build_prompts, context_length, ranks, progress),
             "kv_position_bytes": int(per_position),
             "dense_weight_bytes": float(path.dense_bytes),
             "kv_method": "snapkv", "continuation_tokens": CONTINUATION}
    return table


def weight_curve(model, pt, path, prompts, ranks: RankGroup = SINGLE) -> list[dict]:
    """decode_kl of the path's plan at each reachable budget of WEIGHT_BUDGETS."""
    from .allocate import decode_kl

    saved = pt.plan
    out, measured = [], {}
    try:
        for budget in WEIGHT_BUDGETS:
            n = path.steps_for(budget * path.dense_bytes)
            if n is None:
                break
            if n not in measured:  # two budgets can cut the path at the same step
                pt.configure(path.plan_after(n))
                measured[n] = decode_kl(model, pt, prompts, ranks=ranks)
            check = measured[n]
            out.append({"budget": budget, "bytes": path.bytes_after(n),
                        "kl": check["kl"], "top1": check["top1"], "tokens": check["tokens"]})
    finally:
        pt.configure(saved)
    return out


def calibration_lengths(total_tokens: int, context_length: int | None) -> list[int]:
    """MIN_LENGTH x 2^i with room for the continuation in the prompts and the context."""
    cap = min(total_tokens, context_length or MAX_LENGTH + CONTINUATION, MAX_LENGTH +
              CONTINUATION) - CONTINUATION
    out, n = [], MIN_LENGTH
    while n <= cap:
        out.append(n)
        n *= 2
    return out


def kv_curve(model, prompts: list[torch.Tensor], context_length: int | None,
             ranks: RankGroup = SINGLE, progress=None) -> list[dict]:
    """KL and top-1 of a reduced cache against the full one, per (length, keep) and
    continuation kind (CONTINUATIONS), each the mean over CONTEXTS rotations of the
    concatenated prompts; "kl" / "top1" are the worse of the kinds."""
    flat = [p.reshape(-1) for p in prompts]
    total = sum(int(p.numel()) for p in flat)
    lengths = calibration_lengths(total, context_length)
    if not lengths:
        return []
    starts = sorted({round(j * len(flat) / CONTEXTS) for j in range(CONTEXTS)})
    contexts = [torch.cat(flat[s:] + flat[:s]) for s in starts]
    items = [(c, n) for n in lengths for c in range(len(contexts))]

    def one(i):
        c, n = items[i]
        got = _kv_item(model, contexts[c][:n + CONTINUATION], n)
        if progress:
            progress()
        return got

    results = ranks.map(len(items), one)
    out = []
    for n in lengths:
        for j, keep in enumerate(KV_KEEPS):
            row = {"length": n, "keep": keep}
            for kind in CONTINUATIONS:
                got = [r[kind][j] for (c, m), r in zip(items, results) if m == n]
                row[f"kl_{kind}"] = sum(g[0] for g in got) / len(got)
                row[f"top1_{kind}"] = sum(g[1] for g in got) / len(got)
            row["kl"] = max(row[f"kl_{kind}"] for kind in CONTINUATIONS)
            row["top1"] = min(row[f"top1_{kind}"] for kind in CONTINUATIONS)
            out.append(row)
    return out


@torch.no_grad()
def _kv_item(model, ids: torch.Tensor, n: int) -> dict[str, list[tuple[float, float]]]:
    """Per continuation kind, [(KL, top-1)] per KV_KEEPS of the continuation teacher-forced on
    the reduced cache of ids[:n]: "next" = ids[n:], "recall" = the CONTINUATION tokens from
    the middle of the prefix, repeated."""
    from transformers import DynamicCache

    from cscompile.runtime.kv_reduce import RECENT, SINKS, keep_positions, reduce_cache

    from .token_importance import _prefix_cache, token_importance

    ids = ids.view(1, -1)
    prefix = ids[:, :n]
    rests = {"next": ids[:, n:], "recall": prefix[:, n // 2:n // 2 + CONTINUATION]}
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, **cache_kwargs(model, cache), use_cache=True)
    scores = token_importance(model, prefix, "snapkv", cache=cache, window=RECENT)
    out = {}
    for kind in CONTINUATIONS:
        rest = rests[kind]
        pos = torch.arange(n, n + rest.shape[1]).view(1, -1)
        ref = None
        out[kind] = []
        for keep in KV_KEEPS:
            copy = _prefix_cache(model, cache, torch.arange(n))
            if keep < 1:
                reduce_cache(copy, keep_positions(scores, keep, SINKS, RECENT))
            logits = model(input_ids=rest, position_ids=pos, **cache_kwargs(model, copy),
                           use_cache=True).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            if ref is None:
                ref = logp  # keep 1.0 comes first: the unreduced cache
            out[kind].append((float((ref.exp() * (ref - logp)).sum(-1).mean()),
                              float((ref.argmax(-1) == logp.argmax(-1)).double().mean())))
    return out
