"""KV reduction after prefill, prompt tokens dropped before it, and the KV half of the per-token
byte accounting.

After the dense prefill, `reduce_prompt_cache` keeps a fraction `kv_budget` of the prompt's
positions in the KV cache: the first `sinks` (attention sinks: softmax mass parks on them),
the last `recent` (a recent window), and the rest by importance (passes.token_importance,
SnapKV-like by default). Dropped positions are cut out of every layer's key/value tensors, so
no later step can read them. RoPE was applied to the cached keys at their true positions, so
the decode steps after a reduction pass explicit position_ids continuing from the true prompt
length (runtime.generate does): only the number of cached positions shrinks.

At kv_budget 1.0 nothing is computed and the cache is the one the prefill made (the decode
loop takes its unreduced code path, bit-identical logits).

Before the prefill, `drop_prompt_tokens` (LLMLingua-like) keeps a fraction `prompt_keep` of
the prompt's tokens by self-information under the model's first quarter of layers, so the
prefill itself is shorter; the scorer's time is part of the prefill time the runtime reports.
`choose_split` divides one total budget between the per-token plan and the KV cache for a
prompt length, from the table passes.split calibrates at build time.

Bytes: a decode step reads every cached position's key and value in every layer, so
`kv_bytes(positions, per_position)` = positions x per_position, per_position = sum over layers
of (k_proj + v_proj output rows) x the storage element size — the same element size
runtime.pertoken.plan_bytes charges the weights (Shapes.elsize), so `decode_bytes` (weights +
KV) is one accounting.
"""

from __future__ import annotations

import torch

from cscompile.errors import UserInputError

from .pertoken import Shapes, count, plan_bytes

SINKS = 4  # StreamingLLM keeps 4 initial tokens
RECENT = 32  # also SnapKV's default observation window


# ----------------------------------------------------------------------------- bytes
def kv_position_bytes(model, smap, elsize: int | None = None) -> int:
    """Bytes one cached position costs a decode step: K and V rows of every layer."""
    el = elsize or smap.elsize()
    rows = 0
    for layer in smap.layers:
        a = layer.attention
        rows += sum(model.get_submodule(p).weight.shape[0] for p in (a.k, a.v))
    return rows * el


def kv_bytes(positions: int | float, per_position: int) -> float:
    """KV bytes a decode step reads with `positions` cached positions."""
    if positions < 0:
        raise UserInputError(f"KV positions must be >= 0, got {positions}")
    return positions * per_position


def decode_bytes(plan: dict, shapes: Shapes, positions: int | float, per_position: int) -> dict:
    """Bytes one decode token reads: the plan's weight bytes + the KV bytes of `positions`
    cached positions (compare with a dense plan at every position for the fraction)."""
    w = plan_bytes(plan, shapes)
    kv = kv_bytes(positions, per_position)
    return {"weight_bytes": w["bytes"], "kv_bytes": kv, "total_bytes": w["bytes"] + kv,
            "dense_weight_bytes": w["dense_bytes"]}


# ----------------------------------------------------------------------------- positions
def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UserInputError(f"{what} must be a fraction in (0, 1] of the prompt's "
                             f"{'KV positions' if what == 'kv budget' else 'tokens'}, "
                             f"got {value!r}")
    return float(value)


def check_kv_budget(kv_budget) -> float:
    return _check_fraction(kv_budget, "kv budget")


def keep_positions(scores: torch.Tensor, kv_budget: float, sinks: int = SINKS,
                   recent: int = RECENT) -> torch.Tensor:
    """Sorted indices of the positions kept out of len(scores): count(kv_budget, P) of them,
    sinks and the recent window first (when the budget is smaller than both, the sinks and
    the most recent), the rest the top scores (ties go to the later position)."""
    n = scores.numel()
    check_kv_budget(kv_budget)
    k = count(kv_budget, n)
    if k >= n:
        return torch.arange(n)
    pos = torch.arange(n)
    forced = (pos < sinks) | (pos >= n - recent)
    if int(forced.sum()) >= k:
        first = pos[pos < min(sinks, k)]
        rest = k - len(first)
        return torch.cat([first, pos[n - rest:]]) if rest else first
    free = pos[~forced]
    s = scores.float().cpu()[free]
    # rank by score, then by position, so equal scores keep the more recent position
    order = torch.argsort(s, stable=True)  # ascending score, earlier position first
    chosen = free[order[len(free) - (k - int(forced.sum())):]]
    return torch.sort(torch.cat([pos[forced], chosen])).values


def check_prompt_keep(prompt_keep) -> float:
    return _check_fraction(prompt_keep, "prompt keep")


def scorer_layers(model) -> int:
    """Decoder layers the prompt-dropping scorer runs: the first quarter (at least one)."""
    return max(1, model.config.num_hidden_layers // 4)


@torch.no_grad()
def drop_prompt_tokens(model, ids: list[int], prompt_keep: float, sinks: int = SINKS,
                       recent: int = RECENT) -> list[int]:
    """LLMLingua-like reduction before the prefill: keep count(prompt_keep, P) of the prompt's
    tokens (sinks, the recent window, the rest by self-information under the model's first
    scorer_layers layers); the prefill then runs on the shorter prompt, positions renumbered
    as if it were the whole prompt. prompt_keep 1.0 returns ids unchanged."""
    from cscompile.passes.token_importance import selfinfo_scores

    n = len(ids)
    if count(check_prompt_keep(prompt_keep), n) >= n:
        return ids
    dev = next(model.parameters()).device
    scores = selfinfo_scores(model, torch.tensor([ids], device=dev), layers=scorer_layers(model))
    keep = keep_positions(scores, prompt_keep, sinks, recent)
    return [ids[i] for i in keep.tolist()]


def reduce_cache(cache, keep: torch.Tensor) -> None:
    """Cut every layer of a DynamicCache down to the positions `keep` (sorted), in place."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise UserInputError("KV reduction needs plain full-attention cache layers "
                                 f"(this model's cache has {type(layer).__name__})")
    for layer in cache.layers:
        if layer.is_initialized:
            idx = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)


def reduce_prompt_cache(model, ids: list[int], cache, kv_budget: float,
                        method: str = "snapkv", sinks: int = SINKS,
                        recent: int = RECENT) -> int:
    """Keep count(kv_budget, P) of the prompt's positions in `cache` (the dense prefill of
    ids); returns how many stayed. kv_budget 1.0 leaves the cache untouched."""
    from cscompile.passes.token_importance import token_importance

    n = len(ids)
    if count(check_kv_budget(kv_budget), n) >= n:
        return n
    scores = token_importance(model, ids, method, cache=cache, window=recent)
    keep = keep_positions(scores, kv_budget, sinks, recent)
    reduce_cache(cache, keep)
    return len(keep)


# ----------------------------------------------------------------------------- the split
def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) over sorted xs, held constant outside them."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def kv_kl(table: dict, keep: float, positions: int) -> tuple[float, bool]:
    """(predicted KL of keeping `keep` of a `positions`-long prompt's KV, extrapolated?) from
    the bundle's split table (passes.split): linear in log2 length between calibrated
    lengths, the nearest calibrated length outside them."""
    import math

    longest = max((r["length"] for r in table["kv"]), default=0)
    if keep >= 1:
        return 0.0, positions > longest
    x = math.log2(max(positions, 1))
    worst = 0.0
    for k in {r["keep"] for r in table["kv"] if r["keep"] >= keep}:
        rows = sorted((r["length"], r["kl"]) for r in table["kv"] if r["keep"] == k)
        # keeping less never helps in expectation: the envelope over larger keeps smooths
        # the calibration's noise
        worst = max(worst, _interp(x, [math.log2(n) for n, _ in rows], [kl for _, kl in rows]))
    return worst, positions > longest


def choose_split(table: dict, total_budget: float, prompt_tokens: int, new_tokens: int = 0,
                 kv_budget: float | None = None) -> dict:
    """The split of `total_budget` x (dense weights + full KV) bytes per decode token for a
    prompt of `prompt_tokens` whose answer adds `new_tokens` (half of them cached on average):
    the kv keep (of the table's calibrated keeps, or `kv_budget` when given) and weight budget
    whose predicted KL_w + KL_kv (passes.split) is least. Raises UserInputError where no
    measured weight plan fits."""
    if not 0 < total_budget <= 1:
        raise UserInputError(f"--budget must be in (0, 1], got {total_budget}")
    pp, dense_w = table["kv_position_bytes"], table["dense_weight_bytes"]
    gen = new_tokens / 2
    target = total_budget * (dense_w + (prompt_tokens + gen) * pp)
    weights, worst = [], 0.0
    for b, kl in sorted(((r["bytes"], r["kl"]) for r in table["weights"]), reverse=True):
        worst = max(worst, kl)  # fewer bytes never help in expectation (as kv_kl)
        weights.insert(0, (b, worst))
    keeps = [check_kv_budget(kv_budget)] if kv_budget is not None else \
        sorted({r["keep"] for r in table["kv"]} | {1.0}, reverse=True)
    best = None
    for keep in keeps:
        kept = count(keep, prompt_tokens) if prompt_tokens else 0
        w_bytes = min(dense_w, target - (kept + gen) * pp)
        if w_bytes < weights[0][0] - 1e-6:
            continue  # below the sparsest measured plan
        kl_w = _interp(w_bytes, [b for b, _ in weights], [kl for _, kl in weights])
        kl_kv, extrapolated = kv_kl(table, keep, prompt_tokens)
        if kv_budget is not None:
            kl_kv = None  # set by hand: no prediction for keeps the table does not hold
        predicted = kl_w + (kl_kv or 0.0)
        if best is None or predicted < best["predicted_kl"] - 1e-12:
            best = {"kv_keep": keep, "weight_budget": w_bytes / dense_w,
                    "predicted_kl": predicted, "weight_kl": kl_w, "kv_kl": kl_kv,
                    "kept_positions": kept, "extrapolated": extrapolated}
    if best is None:
        least = (weights[0][0] + (count(keeps[-1], prompt_tokens) + gen) * pp) / \
            (dense_w + (prompt_tokens + gen) * pp)
        raise UserInputError(f"--budget {total_budget} is below what this bundle reaches for "
                             f"a {prompt_tokens}-token prompt ({least:.3f} of its dense bytes "
                             f"per token)")
    return best
