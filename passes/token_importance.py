"""Token importance pass: how much each prompt token matters for what the model says next.

`token_importance(model, input_ids, method)` returns one score per prompt position (float
tensor [P], higher = more worth keeping); runtime.kv_reduce keeps attention sinks, a recent
window and the top positions by these scores. Methods:

  ``snapkv``    attention mass each position receives from the queries of the last `window`
                prompt positions (SnapKV's observation window): softmax(q K^T) summed over those
                queries and every query head, averaged over layers, then max-pooled over
                `pool` neighbouring positions (SnapKV's clustering: a kept token keeps its
                neighbours' context). The window's queries are recomputed from a copy of the
                prefill cache cut before the window (a `window`-token forward), so the pass
                can score the runtime's own prefill cache without hooks in it.
  ``selfinfo``  LLMLingua-like self-information -log p(x_t | x_<t) under the model (position 0,
                which has no prefix, gets +inf: it is the first attention sink anyway).
  ``measure``   random measurements, in the spirit of the rest of the project: `n_measure`
                random subsets of the positions before the window (blocks of `block` tokens,
                each dropped with probability `drop`, the first `sinks` never) are removed from
                the prefill's KV cache; the response is the mean KL of the window's next-token
                distributions to the full cache's; importance per block recovered by the
                positive relaxed lasso of passes.recover (y ~ c + A w, A = dropped indicator).
                Positions inside the window and the sinks get +inf (the reduction keeps them).
  ``recent``    the position itself (StreamingLLM: keep the most recent; no model call).

Everything runs the dense model (the per-token path's modules are not attached at prefill).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cscompile.compat import cache_kwargs
from cscompile.errors import UserInputError
from cscompile.stream import resident

METHODS = ("snapkv", "selfinfo", "measure", "recent")


def _prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    return cache


def _prefix_cache(model, cache, keep: torch.Tensor):
    """A new DynamicCache holding only the positions `keep` (sorted indices) of `cache`
    (the original's tensors are not touched: index_select copies)."""
    from transformers import DynamicCache

    new = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        new.update(layer.keys.index_select(-2, keep), layer.values.index_select(-2, keep), idx)
    return new


def _window_forward(model, ids: torch.Tensor, cache, start: int, keep: torch.Tensor | None,
                    capture: bool = False):
    """Run prompt positions [start, P) on a copy of `cache` cut to the positions `keep` of
    [0, start) (default: all of them), at their true positions. Returns (logits [w, V],
    captured attention inputs per layer or None)."""
    dev = ids.device
    keep = torch.arange(start, device=dev) if keep is None else keep
    past = _prefix_cache(model, cache, keep)
    seen = {}
    handles = []
    if capture:
        for layer in model.model.layers:
            def hook(mod, args, kwargs, attn=layer.self_attn):
                seen[attn] = (kwargs["hidden_states"], kwargs["position_embeddings"])
            handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        pos = torch.arange(start, ids.shape[1], device=dev).view(1, -1)
        out = model(input_ids=ids[:, start:], position_ids=pos, **cache_kwargs(model, past),
                    use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0].float(), (seen if capture else None)


def snapkv_scores(model, ids: torch.Tensor, cache, window: int, pool: int) -> torch.Tensor:
    """See the module docstring; ids [1, P], cache the dense prefill of ids."""
    from cscompile.runtime.decode_step import _rope

    n = ids.shape[1]
    w = min(window, n)
    start = n - w
    _, seen = _window_forward(model, ids, cache, start, None, capture=True)
    total = torch.zeros(n, dtype=torch.float64, device=ids.device)
    causal = torch.arange(n, device=ids.device)[None, :] <= torch.arange(start, n,
                                                                      device=ids.device)[:, None]
    for li, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h, (cos, sin) = seen[attn]
        d = attn.head_dim
        with resident(model, li):  # q_proj runs outside its layer's forward
            q = attn.q_proj(h).view(1, w, -1, d).transpose(1, 2)
        q = _rope(q, cos.unsqueeze(1), sin.unsqueeze(1))  # [1, heads, w, d]
        keys = cache.layers[getattr(attn, "layer_idx", li)].keys  # rotated at prefill
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        logits = (q.float() @ keys.float().transpose(-1, -2)) * attn.scaling
        probs = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
        total += probs.sum((0, 1, 2)).double()
    total /= len(model.model.layers)
    if pool > 1:  # odd window centred on each position
        total = F.max_pool1d(total.view(1, 1, -1), pool, stride=1, padding=pool // 2).view(-1)
    return total.float()


def early_exit_logits(model, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """Logits [P, V] of the model cut after its first `layers` decoder layers (final norm and
    lm_head kept): a cheap scorer for self-information (LLMLingua scores with a small model;
    the model's own first layers are a small model that shares its tokenizer)."""
    inner = model.model
    full, n = inner.layers, model.config.num_hidden_layers
    if not 1 <= layers <= n:
        raise UserInputError(f"scorer layers must be in 1..{n}, got {layers}")
    inner.layers, model.config.num_hidden_layers = full[:layers], layers
    try:
        return model(input_ids=ids, use_cache=False).logits[0]
    finally:
        inner.layers, model.config.num_hidden_layers = full, n


def selfinfo_scores(model, ids: torch.Tensor, logits: torch.Tensor | None = None,
                    chunk: int = 512, layers: int | None = None) -> torch.Tensor:
    """-log p(x_t | x_<t) per position; +inf at position 0. `logits` [P, V]: the prompt's own
    forward, when the caller already ran it (a prefill without logits_to_keep); `layers`:
    score with the first `layers` decoder layers only (early_exit_logits)."""
    if logits is None:
        logits = early_exit_logits(model, ids, layers) if layers is not None else \
            model(input_ids=ids).logits[0]
    scores = torch.full((ids.shape[1],), math.inf)
    for s in range(0, ids.shape[1] - 1, chunk):
        lp = torch.log_softmax(logits[s:s + chunk].float(), -1)
        nxt = ids[0, s + 1:s + 1 + chunk]
        scores[s + 1:s + 1 + lp.shape[0]] = -lp[torch.arange(len(nxt)), nxt].cpu()
    return scores


def measured_scores(model, ids, cache, window: int, n_measure: int, drop: float, block: int,
                    sinks: int, seed: int) -> torch.Tensor:
    """See the module docstring (method "measure")."""
    from .recover import recover

    n = ids.shape[1]
    start = n - min(window, n)
    scores = torch.full((n,), math.inf)
    n_blocks = max(0, math.ceil((start - sinks) / block))
    if n_blocks < 2:  # nothing outside the sinks and the window to measure
        return scores
    ref = torch.log_softmax(_window_forward(model, ids, cache, start, None)[0].double(), -1)
    rng = np.random.default_rng(seed)
    A = (rng.random((n_measure, n_blocks)) < drop).astype(np.float64)
    y = np.empty(n_measure)
    unit = (torch.arange(sinks, start) - sinks) // block  # block of each measured position
    for i in range(n_measure):
        dropped = torch.from_numpy(A[i].astype(bool))[unit]
        keep = torch.cat([torch.arange(sinks), torch.arange(sinks, start)[~dropped]])
        got = torch.log_softmax(_window_forward(model, ids, cache, start,
                                                keep.to(ids.device))[0].double(), -1)
        y[i] = float((ref.exp() * (ref - got)).sum(-1).mean())
    k = max(1, n_blocks // 4)
    rec = recover(A, y, k, method="lasso", positive=True, cv_folds=0, seed=seed)
    scores[sinks:start] = torch.from_numpy(rec.importance).float()[unit]
    return scores


@torch.no_grad()
def token_importance(model, input_ids, method: str = "snapkv", cache=None, window: int = 32,
                     pool: int = 7, n_measure: int = 96, drop: float = 0.5, block: int = 16,
                     sinks: int = 4, seed: int = 0) -> torch.Tensor:
    """Importance [P] of each prompt position (see the module docstring).

    input_ids: [P] or [1, P]. cache: the dense prefill's DynamicCache of input_ids (snapkv,
    measure; computed here when None, never modified)."""
    if method not in METHODS:
        raise UserInputError(f"token importance method must be one of {', '.join(METHODS)}, "
                             f"got {method!r}")
    ids = torch.as_tensor(input_ids).view(1, -1)
    if ids.shape[1] == 0:
        raise UserInputError("token importance needs a non-empty prompt")
    if window < 1 or pool < 1 or pool % 2 == 0 or n_measure < 2 or block < 1 or sinks < 0 \
            or not 0 < drop < 1:
        raise UserInputError("token importance: window, block >= 1, an odd pool, n_measure "
                             ">= 2, sinks >= 0 and drop in (0, 1) are required")
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    if method == "recent":
        return torch.arange(ids.shape[1], dtype=torch.float32)
    if method == "selfinfo":
        return selfinfo_scores(model, ids)
    if cache is None:
        cache = _prefill(model, ids)
    if cache.get_seq_length() != ids.shape[1]:
        raise UserInputError(f"token importance: the cache holds {cache.get_seq_length()} "
                             f"positions, the prompt {ids.shape[1]}")
    if method == "snapkv":
        from cscompile.runtime.decode_step import supports

        if not supports(model):  # it recomputes queries as a Llama-family layer does
            raise UserInputError("SnapKV-like importance needs a Llama-family model (Llama, "
                                 "Mistral, Qwen2); use method 'recent', 'selfinfo' or 'measure'")
        return snapkv_scores(model, ids, cache, window, pool).cpu()
    return measured_scores(model, ids, cache, window, n_measure, drop, block, sinks, seed)
