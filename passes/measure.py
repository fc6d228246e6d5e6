"""Measurement pass: random masks over units, one masked forward each, a distortion response.

A measurement is (keep-mask over N units, response y). The response is the distortion of the
masked model against the dense model on the same prompt: by default the mean KL divergence of
next-token distributions over the prompt's positions (`response="kl"`), or the change of the
cross-entropy loss on the prompt's continuation tokens (`response="loss"`). Many masks of one
prompt run as one batched forward (`cscompile.execute.masked` applies a different mask per row).

Units are one of: query heads ("head"), kv groups ("kv_group"), FFN channel blocks
("ffn_block", tile-aligned, last block partial), single FFN channels ("ffn_channel"), or whole
layers ("layer"). `base` masks (e.g. a target support) can be applied under every measurement,
so measurements linearise around that support rather than around the dense model; `around`
goes further and *flips* units relative to a target keep-vector (drops kept units, restores
dropped ones), so recovery sees the marginal value of every unit at the operating point.
Several prompts of one length can share every mask (`input_ids` [P, T]): the response is
their mean, which averages out prompt noise before recovery rather than after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cscompile.errors import UserInputError
from cscompile.execute import UnitMask, masked
from cscompile.frontend import logits_of
from cscompile.structure import StructureMap

from .designs import design_matrix, design_responses, draw_masks, measurements_needed
from .recover import Recovery, recover

UNIT_KINDS = ("head", "kv_group", "ffn_block", "ffn_channel", "layer")


@dataclass
class Measurements:
    units: list[dict]
    masks: np.ndarray  # [m, N] keep-masks
    responses: np.ndarray  # [m]
    design: str
    rate: float
    seed: int
    m_needed: int | None = None  # C·k·log(N/k) before any budget cap
    n_forwards: int = 0  # forward passes over the prompt (rows of batched forwards)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.n_forwards / self.seconds if self.seconds else float("nan")


def unit_space(smap: StructureMap, unit_kind: str, tile: int = 64) -> list[dict]:
    """The units of one kind as {kind, layer, index, members} (members: heads or channels)."""
    if unit_kind not in UNIT_KINDS:
        raise UserInputError(f"unknown unit kind {unit_kind!r}; choose one of {', '.join(UNIT_KINDS)}")
    units = []
    for li, layer in enumerate(smap.layers):
        a, f = layer.attention, layer.ffn
        if unit_kind == "head" and a is not None:
            units += [{"kind": "head", "layer": li, "index": h, "members": [h]} for h in range(a.n_heads)]
        elif unit_kind == "kv_group" and a is not None:
            per = a.n_heads // a.n_kv_heads
            units += [{"kind": "kv_group", "layer": li, "index": g,
                       "members": list(range(g * per, (g + 1) * per))} for g in range(a.n_kv_heads)]
        elif unit_kind == "ffn_block" and f is not None:
            units += [{"kind": "ffn_block", "layer": li, "index": b, "members": chans}
                      for b, chans in enumerate(smap.blocks(li, tile))]
        elif unit_kind == "ffn_channel" and f is not None:
            units += [{"kind": "ffn_channel", "layer": li, "index": j, "members": [j]}
                      for j in range(f.width)]
        elif unit_kind == "layer":
            units.append({"kind": "layer", "layer": li, "index": li, "members": [li]})
    return units


def units_to_mask(smap: StructureMap, units: list[dict], keep: np.ndarray,
                  base: UnitMask | None = None) -> UnitMask:
    """Expand keep weights over units [B, N] to a per-row UnitMask (multiplied into `base`)."""
    keep = torch.as_tensor(np.asarray(keep, dtype=np.float32))
    batch = keep.shape[0]
    mask = UnitMask.ones(smap, batch)
    if base is not None:
        for li in mask.heads:
            mask.heads[li] = base.heads[li].expand(batch, -1).clone()
        for li in mask.channels:
            mask.channels[li] = base.channels[li].expand(batch, -1).clone()
        mask.layers = base.layers.expand(batch, -1).clone()
    for col, u in enumerate(units):
        w = keep[:, col:col + 1]
        if u["kind"] in ("head", "kv_group"):
            mask.heads[u["layer"]][:, u["members"]] *= w
        elif u["kind"] in ("ffn_block", "ffn_channel"):
            mask.channels[u["layer"]][:, u["members"]] *= w
        else:
            mask.layers[:, u["layer"]] *= w[:, 0]
    return mask


RESPONSES = ("kl", "logkl", "loss")


def _response(dense_logp, logits, response: str, input_ids, target_from: int):
    """Distortion per row; rows are masks x prompts (prompt-major within a mask), averaged
    over the prompts so each mask gets one response."""
    n_prompts = input_ids.shape[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    dense_logp = dense_logp.repeat(logp.shape[0] // n_prompts, 1, 1)
    if response in ("kl", "logkl"):  # KL(dense || masked) per position, averaged over the prompt
        kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)
        per_row = kl[:, :-1].mean(-1)
    else:
        targets = input_ids[:, target_from + 1:].repeat(logp.shape[0] // n_prompts, 1)
        pos = slice(target_from, input_ids.shape[1] - 1)
        nll = -logp[:, pos].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        dense_nll = -dense_logp[:, pos].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        per_row = (nll - dense_nll).mean(-1)
    per_mask = per_row.view(-1, n_prompts).mean(-1)
    # log-KL: distortion compounds multiplicatively as units go, so log makes it closer to additive
    return torch.log(per_mask.clamp_min(1e-8)) if response == "logkl" else per_mask


def measure(model, smap: StructureMap, input_ids: torch.Tensor, unit_kind: str = "head",
            m: int | None = None, k: int | None = None, C: float = 3.0, budget: int | None = None,
            design: str = "bernoulli", rate: float = 0.1, seed: int = 0, response: str = "kl",
            tile: int = 64, batch_size: int = 16, base: UnitMask | None = None,
            target_from: int | None = None, around: np.ndarray | None = None) -> Measurements:
    """Draw random masks over one kind of unit and record each masked forward's distortion.

    `masks` in the result are the drawn masks (0 = unit touched). With `around` (a 0/1 keep
    vector over the units) a touched unit is flipped: dropped if kept, restored if dropped."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise UserInputError("measure needs prompts of at least 2 tokens (input_ids [P, T])")
    if response not in RESPONSES:
        raise UserInputError(f"unknown response {response!r}; choose {', '.join(RESPONSES)}")
    units = unit_space(smap, unit_kind, tile)
    n = len(units)
    if n == 0:
        raise UserInputError(f"the model has no units of kind {unit_kind!r}")
    m_needed = None
    if m is None:
        k = k if k is not None else max(1, n // 10)
        m, m_needed = measurements_needed(n, k, C, budget)
    if design == "rademacher" and m % 2:
        m += 1
    target_from = target_from if target_from is not None else input_ids.shape[1] // 2
    groups = np.array([u["layer"] for u in units]) if design == "block" else None
    masks = draw_masks(n, m, design, rate, seed, groups)
    if around is not None:
        around = np.asarray(around, dtype=np.float32).reshape(-1)
        if around.shape != (n,) or not np.isin(around, (0, 1)).all():
            raise UserInputError(f"around must be a 0/1 keep vector over the {n} units")
    n_prompts = input_ids.shape[0]
    per_chunk = max(1, batch_size // n_prompts)

    start = time.perf_counter()
    with torch.no_grad():
        dense_logits = logits_of(model, input_ids)
        dense_logp = F.log_softmax(dense_logits.float(), dim=-1)
        base_logits = dense_logits
        if base is not None or around is not None:
            base_keep = np.ones((n_prompts, n), np.float32) if around is None else \
                around[None].repeat(n_prompts, 0)
            with masked(model, smap, units_to_mask(smap, units, base_keep, base)):
                base_logits = logits_of(model, input_ids)
        responses = []
        for s in range(0, m, per_chunk):
            chunk = masks[s:s + per_chunk]
            keep = chunk if around is None else np.where(chunk > 0, around, 1.0 - around)
            mask = units_to_mask(smap, units, np.repeat(keep, n_prompts, axis=0), base)
            with masked(model, smap, mask):
                logits = logits_of(model, input_ids.repeat(len(chunk), 1))
            responses.append(_response(dense_logp, logits, response, input_ids, target_from))
    seconds = time.perf_counter() - start
    y = torch.cat(responses).double().numpy()
    extra_passes = base is not None or around is not None
    return Measurements(units, masks, y, design, rate, seed, m_needed,
                        (m + 1 + extra_passes) * n_prompts, seconds,
                        {"response": response, "n_prompts": n_prompts,
                         "base_response": float(_response(dense_logp, base_logits, response,
                                                          input_ids, target_from)[0])})


def recover_importance(meas: Measurements, k: int, method: str = "lasso", positive: bool = True,
                       prior: np.ndarray | None = None, holdout: Measurements | None = None,
                       seed: int = 0) -> Recovery:
    """Sparse recovery of per-unit importance from measurements.

    With a `prior` importance vector (e.g. activation energies, rescaled to response units by
    least squares), recovery fits only the sparse *correction* y - A·prior: compressed sensing
    then pays for what the cheap prior gets wrong, not for the whole dense profile."""
    A = design_matrix(meas.masks, meas.design)
    y = design_responses(meas.responses, meas.design)
    hold = None
    if holdout is not None:
        hold = (design_matrix(holdout.masks, holdout.design),
                design_responses(holdout.responses, holdout.design))
    if prior is None:
        return recover(A, y, k, method=method, positive=positive, holdout=hold, seed=seed)
    scale = _prior_scale(A, y, prior)
    p = scale * prior
    rec = recover(A, y - A @ p, k, method=method, positive=False,
                  holdout=None if hold is None else (hold[0], hold[1] - hold[0] @ p), seed=seed)
    rec.importance = rec.importance + p
    rec.diagnostics["prior_scale"] = float(scale)
    return rec


def _prior_scale(A, y, prior) -> float:
    pred = A @ prior
    pred_c, y_c = pred - pred.mean(), y - y.mean()
    denom = float(pred_c @ pred_c)
    return max(0.0, float(pred_c @ y_c) / denom) if denom > 0 else 0.0


def estimate_cs(model, smap: StructureMap, prompts_ids: list[torch.Tensor], density: float,
                unit_kind: str = "head", method: str = "lasso", prior: np.ndarray | None = None,
                C: float = 3.0, budget: int | None = None, rate: float = 0.1,
                design: str = "bernoulli", response: str = "kl", tile: int = 64, seed: int = 0,
                k: int | None = None) -> tuple[np.ndarray, dict]:
    """Compressed-sensing importance of every unit of `unit_kind`, averaged over prompts.

    Per prompt: m random masks (m = C·k·log(N/k), capped by `budget`), batched masked
    forwards, sparse recovery of the units whose removal costs most (k of them: by default the
    units a support at `density` drops, at least 1). Returns (importance [N], diagnostics)."""
    if not prompts_ids:
        raise UserInputError("estimate_cs needs at least one prompt")
    if not 0 < density <= 1:
        raise UserInputError(f"density must be in (0, 1], got {density}")
    units = unit_space(smap, unit_kind, tile)
    n = len(units)
    k = k if k is not None else max(1, min(n - 1, int(round((1 - density) * n)) or 1))
    total = np.zeros(n)
    diags, forwards, seconds = [], 0, 0.0
    for i, ids in enumerate(prompts_ids):
        meas = measure(model, smap, ids, unit_kind, k=k, C=C, budget=budget, design=design,
                       rate=rate, seed=seed + i, response=response, tile=tile)
        rec = recover_importance(meas, k=k, method=method, prior=prior, seed=seed)
        imp = rec.importance
        total += imp / (np.abs(imp).sum() or 1.0)  # each prompt weighs the same
        forwards += meas.n_forwards
        seconds += meas.seconds
        diags.append({"m": len(meas.responses), "m_needed": meas.m_needed, **{
            key: rec.diagnostics.get(key) for key in ("coherence", "relative_residual", "cv_r2",
                                                     "heldout_r2", "warnings")}})
    return total / len(prompts_ids), {"units": units, "k": k, "n_units": n, "forwards": forwards,
                                      "seconds": seconds, "per_prompt": diags}


def single_unit_costs(model, smap: StructureMap, prompts_ids: list[torch.Tensor],
                      unit_kind: str = "layer", tile: int = 64, batch_size: int = 8,
                      around: np.ndarray | None = None) -> np.ndarray:
    """Exhaustive one-at-a-time ablation: mean KL to dense when each unit alone is dropped
    (with `around`, a 0/1 keep vector: the change of that KL when each unit alone is flipped
    from the target — positive for a kept unit that matters, negative for a dropped one).

    N batched forwards per prompt — affordable for whole layers (30 on SmolLM2) and heads,
    which is where an interventional measurement beats any activation statistic: a layer's
    activations say nothing about what skipping it does downstream."""
    units = unit_space(smap, unit_kind, tile)
    n = len(units)
    start = np.ones(n, np.float32) if around is None else np.asarray(around, np.float32)
    total = np.zeros(n)
    with torch.no_grad():
        for ids in prompts_ids:
            dense_logp = F.log_softmax(logits_of(model, ids).float(), dim=-1)
            if around is not None:  # costs are changes from the target's own distortion
                with masked(model, smap, units_to_mask(smap, units, start[None])):
                    total -= _response(dense_logp, logits_of(model, ids), "kl", ids, 0).item()
            for s in range(0, n, batch_size):
                rows = range(s, min(n, s + batch_size))
                keep = np.repeat(start[None], len(rows), axis=0)
                for r, u in enumerate(rows):
                    keep[r, u] = 1 - start[u]
                with masked(model, smap, units_to_mask(smap, units, keep)):
                    logits = logits_of(model, ids.expand(len(rows), -1))
                total[list(rows)] += _response(dense_logp, logits, "kl", ids, 0).double().numpy()
    return total / max(1, len(prompts_ids))
