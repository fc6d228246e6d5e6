"""KV reduction after prefill, and the KV half of the per-token byte accounting.

After the dense prefill, `reduce_prompt_cache` keeps a fraction `kv_budget` of the prompt's
positions in the KV cache: the first `sinks` (attention sinks: softmax mass parks on them),
the last `recent` (a recent window), and the rest by importance (passes.token_importance,
SnapKV-like by default). Dropped positions are cut out of every layer's key/value tensors, so
no later step can read them. RoPE was applied to the cached keys at their true positions, so
the decode steps after a reduction pass explicit position_ids continuing from the true prompt
length (runtime.generate does): only the number of cached positions shrinks.

At kv_budget 1.0 nothing is computed and the cache is the one the prefill made (the decode
loop takes its unreduced code path, bit-identical logits).

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
def check_kv_budget(kv_budget) -> float:
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) \
            or not 0 < kv_budget <= 1:
        raise UserInputError(f"kv budget must be a fraction in (0, 1] of the prompt's KV "
                             f"positions, got {kv_budget!r}")
    return float(kv_budget)


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
