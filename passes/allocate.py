"""Allocate pass: one byte budget over every matrix a decode step reads.

`allocate(model, smap, prompts, sketches, budget)` chooses, for each layer's q/k/v inputs,
o-projection input and FFN, an operator and a sparsity (runtime.pertoken), and for the
lm_head a candidate count, so that the bytes one token reads are at most `budget` x dense.

How (TEAL's block-wise greedy, on the operators' own outputs):
1. One dense pass over the calibration prompts captures what each attention block and FFN
   receives, what it returns, and the residual stream leaving the layer.
2. Menu: every operator/sparsity option of each part (layer x {qkv, o, ffn}) is run on those
   captured inputs alone; its cost is the bytes it reads per token, its local distortion the
   squared change of the part's output relative to the residual stream there (mean over
   positions of |dy_t|^2 / |r_t|^2). Local distortion alone misjudges layers
   (measured on SmolLM2: it starved some layers to 10% of their channels and lost to a uniform
   plan), so each part's scale is measured: one teacher-forced forward with only that part at a
   reference config gives its KL to dense, and KL / local distortion (the part's sensitivity)
   converts every menu point to an estimated KL.
3. Greedy on the lower convex hull of each part's (bytes, distortion) points: from dense, take
   the step with the least distortion added per byte saved until the budget is met. The steps
   form one path from dense to the sparsest plan, so every budget's plan is a prefix of it.
4. lm_head first (the path's first step, so budget 1.0 is still exactly dense): the fewest
   candidates whose exact-on-candidates logits keep the calibration positions' top-1 at
   least `head_top1` and their mean KL at most `head_kl`.
`plan_at_kl` walks the same path and picks the smallest budget whose teacher-forced KL to
dense on held-out prompts is at most a target (bisection over the path's prefixes).

Sharding (cscompile.distributed): the calibration prompts are cut into fixed chunks of CHUNK
prompts; each rank captures and measures only its chunks, and every statistic (distortion
sums, KL sums, top-1 counts, token counts) is kept per chunk (per prompt for decode_kl) and
summed in chunk order after a gather, on one process exactly as on several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cscompile.compat import cache_kwargs
from cscompile.distributed import SINGLE, RankGroup
from cscompile.errors import UserInputError
from cscompile.runtime.pertoken import (PerToken, dense_plan, ffn_bytes, head_bytes,
                                        input_bytes, plan_bytes)
from cscompile.stream import resident
from cscompile.structure import StructureMap

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
INPUT_MENU = tuple({"op": op, "keep": k} for op in ("teal", "wina") for k in KEEPS)
FFN_MENU = (tuple({"op": "sketch", "keep": k, "cand": c} for k in KEEPS[1:] + (0.15, 0.1)
                  for c in (1.0, 1.5))
            + tuple({"op": "teal", "x_keep": x, "keep": k} for x in (1.0, 0.7, 0.5)
                    for k in (0.7, 0.5, 0.3))
            + tuple({"op": "cats", "keep": k} for k in (0.5, 0.3)))
HEAD_CANDIDATES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
PARTS = ("qkv", "o", "ffn")


@dataclass
class Step:
    layer: int
    part: str
    cfg: dict
    bytes_saved: float
    distortion: float


@dataclass
class Path:
    """The greedy path: a dense start and the steps in the order taken (part "lm_head",
    layer -1, for the lm_head's step)."""

    start: dict
    steps: list[Step] = field(default_factory=list)
    dense_bytes: float = 0.0
    start_bytes: float = 0.0  # the dense plan's bytes

    def plan_after(self, n: int) -> dict:
        plan = {**self.start, "layers": [dict(layer) for layer in self.start["layers"]]}
        for s in self.steps[:n]:
            if s.part == "lm_head":
                plan["lm_head"] = s.cfg
            else:
                plan["layers"][s.layer][s.part] = s.cfg
        return plan

    def bytes_after(self, n: int) -> float:
        return self.start_bytes - sum(s.bytes_saved for s in self.steps[:n])

    def to_json(self) -> dict:
        """The path as the bundle stores it (runtime re-cuts plans at any weight budget)."""
        return {"start": self.start, "dense_bytes": self.dense_bytes,
                "start_bytes": self.start_bytes,
                "steps": [[s.layer, s.part, s.cfg, s.bytes_saved, s.distortion]
                          for s in self.steps]}

    @classmethod
    def from_json(cls, d: dict) -> "Path":
        return cls(d["start"], [Step(int(li), str(part), dict(cfg), float(saved), float(dist))
                                for li, part, cfg, saved, dist in d["steps"]],
                   float(d["dense_bytes"]), float(d["start_bytes"]))

    def sketched_parts(self) -> set[str]:
        """Sketch prefixes ("layers.{l}." / "lm_head.") some prefix plan of the path reads."""
        out = set()
        for s in self.steps:
            if s.cfg.get("op") == "sketch":
                out.add("lm_head." if s.part == "lm_head" else f"layers.{s.layer}.")
        return out

    def steps_for(self, budget_bytes: float) -> int | None:
        """The fewest steps reaching budget_bytes, or None if the whole path cannot."""
        b = self.start_bytes
        for i, s in enumerate(self.steps):
            if b <= budget_bytes + 1e-6:
                return i
            b -= s.bytes_saved
        return len(self.steps) if b <= budget_bytes + 1e-6 else None


# ----------------------------------------------------------------------------- capture
class _Captured:
    """Per layer and per chunk of prompts this rank holds (global chunk ids in `ids`):
    attention calls (args, kwargs, output, valid positions), and the FFN inputs/outputs and
    residual stream at valid positions. `n_chunks` counts every rank's chunks."""

    def __init__(self, n_layers: int, ranks: RankGroup, n_chunks: int):
        self.ranks, self.n_chunks = ranks, n_chunks
        self.ids: list[int] = []
        self.positions = 0  # valid positions over every chunk
        self.attn: list[list[tuple]] = [[] for _ in range(n_layers)]
        self.ffn_in: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.ffn_out: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.resid: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.head_in: list[torch.Tensor] = []
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, mask) forwarded
        self.logp: list[torch.Tensor] = []  # dense log-probabilities at valid positions

    def reduce(self, local: list) -> list:
        """This rank's per-chunk partials (in `ids` order) -> every chunk's, in chunk order."""
        return self.ranks.gather(dict(zip(self.ids, local)), self.n_chunks)


# Prompts per capture forward (right-padded; causal, so padding changes nothing). Also the
# unit of sharding: small enough that 32 prompts keep 8 ranks busy, large enough to batch.
CHUNK = 4


def _chunks(prompts, size: int = CHUNK) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(prompts), size):
        group = [p.reshape(-1) for p in prompts[i:i + size]]
        t = max(len(p) for p in group)
        ids = torch.zeros(len(group), t, dtype=torch.long)
        mask = torch.zeros(len(group), t, dtype=torch.long)
        for j, p in enumerate(group):
            ids[j, :len(p)], mask[j, :len(p)] = p, 1
        out.append((ids, mask))
    return out


@torch.no_grad()
def _capture(model, smap, pt: PerToken, prompts, ranks: RankGroup = SINGLE) -> _Captured:
    chunks = _chunks(prompts)
    cap = _Captured(smap.n_layers, ranks, len(chunks))
    valid = {}
    handles = []
    for li, layer in enumerate(smap.layers):
        attn = model.get_submodule(layer.attention.module)

        def attn_hook(mod, args, kwargs, out, li=li):
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                 "cache")}
            cap.attn[li].append((args, kw, out[0] if isinstance(out, tuple) else out, valid["m"]))

        def ffn_hook(mod, args, out, li=li):
            cap.ffn_in[li].append(args[0][valid["m"]])
            cap.ffn_out[li].append(out[valid["m"]])

        def layer_hook(mod, args, out, li=li):
            cap.resid[li].append((out[0] if isinstance(out, tuple) else out)[valid["m"]])

        handles.append(attn.register_forward_hook(attn_hook, with_kwargs=True))
        handles.append(pt.parts[li]["ffn"].register_forward_hook(ffn_hook))
        handles.append(model.get_submodule(layer.module).register_forward_hook(layer_hook))
    handles.append(pt.head.register_forward_pre_hook(
        lambda mod, args: cap.head_in.append(args[0][valid["m"]])))
    pt.mode = "dense"
    try:
        for k in ranks.mine(len(chunks)):
            ids, mask = chunks[k]
            valid["m"] = mask.bool()
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            cap.ids.append(k)
            cap.chunks.append((ids, mask))
            cap.logp.append(torch.log_softmax(out.logits[valid["m"]].float(), -1))
    finally:
        for h in handles:
            h.remove()
    cap.positions = sum(cap.reduce([int(mask.sum()) for _, mask in cap.chunks]))
    return cap


# ----------------------------------------------------------------------------- menus
def _distortion_sum(out: torch.Tensor, ref: torch.Tensor, resid: torch.Tensor) -> float:
    """Sum over one chunk's positions of |dy_t|^2 / |r_t|^2 (the distortion is its mean over
    every chunk's positions): a part's output change relative to the residual stream at the
    same position. Per position, because SmolLM2's first position carries a residual ~100x the
    others' from layer 11 on (an attention sink): pooled energy would make those layers look
    free to sparsify."""
    num = (out - ref).double().pow(2).sum(-1)
    den = resid.double().pow(2).sum(-1).clamp_min(1e-30)
    return float((num / den).sum())


def _chunk_means(cap: _Captured, sums: list[list[float]]) -> list[float]:
    """sums[point][j]: menu point's distortion sum on this rank's j-th chunk -> per point, the
    mean over every chunk's positions (chunk sums added in chunk order)."""
    per_chunk = cap.reduce([list(col) for col in zip(*sums)] if sums else [[] for _ in cap.ids])
    return [sum(chunk[p] for chunk in per_chunk) / max(cap.positions, 1)
            for p in range(len(sums))]


@torch.no_grad()
def _menu(model, smap, pt: PerToken, cap: _Captured, li: int, part: str, shapes):
    """[(cfg, bytes, distortion)] for one part, dense first."""
    el, h = shapes.elsize, shapes.hidden
    bits, group = pt.plan["sketch"]["bits"], pt.plan["sketch"]["group"]
    module = pt.parts[li][part]
    attn = model.get_submodule(smap.layers[li].attention.module)
    resid = cap.resid[li]
    sums = []  # [menu point][this rank's chunk]
    if part == "ffn":
        menu = [c for c in FFN_MENU if c["op"] != "sketch" or module.sketches is not None]
        costs = [ffn_bytes(cfg, h, shapes.ffn_width[li], shapes.gated[li], el, bits, group)
                 for cfg in menu]
        for cfg in menu:
            module.cfg = cfg
            sums.append([_distortion_sum(module(x), ref, r) for x, ref, r in
                         zip(cap.ffn_in[li], cap.ffn_out[li], resid)])
        module.cfg = {"op": "dense"}
        dense = ffn_bytes({"op": "dense"}, h, shapes.ffn_width[li], shapes.gated[li], el, bits,
                          group)
    else:
        n_in, n_out = (h, shapes.qkv_out[li]) if part == "qkv" else (shapes.o_in[li], h)
        menu = list(INPUT_MENU)
        costs = [input_bytes(cfg, n_in, n_out, el) for cfg in menu]
        for cfg in menu:
            module.cfg = cfg
            row = []
            for (a, kw, ref, m), r in zip(cap.attn[li], resid):
                o = attn(*a, **kw)
                row.append(_distortion_sum((o[0] if isinstance(o, tuple) else o)[m], ref[m], r))
            sums.append(row)
        module.cfg = {"op": "dense"}
        dense = input_bytes({"op": "dense"}, n_in, n_out, el)
    rows = list(zip(menu, costs, _chunk_means(cap, sums)))
    return [({"op": "dense"}, dense, 0.0)] + rows


def _reference(part: str, menu) -> tuple:
    """The menu point whose end-to-end KL calibrates the part's distortion scale: a moderate
    reduction (half the inputs; a third of the FFN channels by the sketch, else TEAL)."""
    want = ({"op": "teal", "keep": 0.5} if part != "ffn" else
            {"op": "sketch", "keep": 0.3, "cand": 1.0})
    for p in menu:
        if p[0] == want:
            return p
    return next(p for p in menu if p[0] == {"op": "teal", "x_keep": 1.0, "keep": 0.5})


@torch.no_grad()
def _sensitivity(model, pt: PerToken, cap: _Captured, li: int, part: str, menu) -> float:
    """Measured KL per unit of local distortion for this part: the local measure says how much
    a config changes the part's output, this says how much such a change costs at the logits
    (late layers and attention move them more than the residual's energy suggests)."""
    cfg, _, local = _reference(part, menu)
    if local <= 0:
        return 0.0
    module = pt.parts[li][part]
    module.cfg = cfg
    local_kl = []  # per chunk of this rank: summed KL over its positions
    try:
        pt.mode = "pertoken"
        for (ids, mask), logp in zip(cap.chunks, cap.logp):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            q = torch.log_softmax(out.logits[mask.bool()].float(), -1)
            local_kl.append(float((logp.exp() * (logp - q)).sum(-1).double().sum()))
    finally:
        module.cfg = {"op": "dense"}
    kl = 0.0
    for chunk_kl in cap.reduce(local_kl):  # in chunk order, as one process adds them
        kl += chunk_kl
    return max(kl / max(cap.positions, 1), 0.0) / local


def _hull(points):
    """The lower convex hull of [(cfg, bytes, distortion)], dense (most bytes) first: Pareto
    points (fewer bytes only at more distortion) whose price per byte saved keeps rising."""
    pareto, least = [], math.inf
    for p in sorted(points, key=lambda p: (p[1], p[2])):  # fewest bytes first
        if p[2] < least:
            pareto.append(p)
            least = p[2]
    hull = []
    for p in reversed(pareto):  # dense first
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], p):
            hull.pop()
        hull.append(p)
    return hull


def _slope(a, b) -> float:
    """Distortion added per byte saved from a to b."""
    return (b[2] - a[2]) / max(a[1] - b[1], 1e-9)


# ----------------------------------------------------------------------------- lm_head
@torch.no_grad()
def _choose_head(pt: PerToken, cap: _Captured, head_top1: float, head_kl: float):
    head = pt.head
    if head.sketch is None:
        return {"op": "dense"}, {"reason": "no lm_head sketch"}
    vocab = head.weight.shape[0]
    exact = [head.head(x).float() for x in cap.head_in]  # per chunk of this rank
    logp = [torch.log_softmax(e, -1) for e in exact]
    saved = pt.plan
    tried = []
    try:
        pt.mode = "pertoken"
        for n in HEAD_CANDIDATES:
            if n >= vocab // 2:
                break
            cfg = {"op": "sketch", "candidates": n}
            pt.plan = {**saved, "lm_head": cfg}
            local = []  # per chunk: (positions whose top-1 is kept, summed KL)
            for x, e, lp in zip(cap.head_in, exact, logp):
                got = head(x).float()
                local.append((int((got.argmax(-1) == e.argmax(-1)).sum()), float(
                    (lp.exp() * (lp - torch.log_softmax(got, -1))).sum(-1).double().sum())))
            agree, kl = 0, 0.0
            for chunk_agree, chunk_kl in cap.reduce(local):  # in chunk order
                agree, kl = agree + chunk_agree, kl + chunk_kl
            top1, kl = agree / max(cap.positions, 1), kl / max(cap.positions, 1)
            tried.append({"candidates": n, "top1": top1, "kl": kl})
            if top1 >= head_top1 and kl <= head_kl:
                return cfg, {"tried": tried}
    finally:
        pt.plan, pt.mode = saved, "dense"
    return {"op": "dense"}, {"tried": tried}


# ----------------------------------------------------------------------------- entry
def greedy_path(model, smap: StructureMap, prompts: list[torch.Tensor], sketches: dict,
                bits: int = 3, group: int = 64, head_top1: float = 0.995,
                head_kl: float = 0.01, parts=PARTS, head: bool = True,
                progress=None, ranks: RankGroup = SINGLE) -> tuple[Path, dict]:
    """The allocation path from dense (with the lm_head chosen) to the sparsest plan.

    `parts` limits which parts may leave dense (("ffn",) for an FFN-only allocation) and
    head=False keeps the lm_head dense; `progress()` is called once per part measured.
    `ranks`: this process's share of the calibration chunks (every rank returns the path)."""
    if not prompts:
        raise UserInputError("allocation needs at least one calibration prompt")
    plan = dense_plan(smap, bits, group)
    pt = PerToken(model, smap, plan, sketches)
    try:
        cap = _capture(model, smap, pt, prompts, ranks)
        head_cfg, head_report = (_choose_head(pt, cap, head_top1, head_kl) if head
                                 else ({"op": "dense"}, {"reason": "kept dense"}))
        pt.mode = "pertoken"
        hulls, menus = {}, {}
        units = [(li, part) for li in range(smap.n_layers) for part in parts]
        sensitivity = {}
        for li, part in units:
            with resident(model, li):  # the part runs outside its layer's forward
                menu = _menu(model, smap, pt, cap, li, part, pt.shapes)
            sensitivity[(li, part)] = _sensitivity(model, pt, cap, li, part, menu)
            menus[(li, part)] = [(c, b, d * sensitivity[(li, part)]) for c, b, d in menu]
            hulls[(li, part)] = _hull(menus[(li, part)])
            if progress:
                progress()
    finally:
        pt.mode = "dense"
        pt.remove()
    shapes = pt.shapes
    dense_bytes = plan_bytes(plan, shapes)["bytes"]
    path = Path(plan, dense_bytes=dense_bytes, start_bytes=dense_bytes)
    if head_cfg["op"] != "dense":
        saved = dense_bytes - plan_bytes({**plan, "lm_head": head_cfg}, shapes)["bytes"]
        path.steps.append(Step(-1, "lm_head", head_cfg, saved, 0.0))
    at = {u: 0 for u in units}
    while True:
        best, best_slope = None, math.inf
        for u in units:
            hull, i = hulls[u], at[u]
            if i + 1 < len(hull):
                s = _slope(hull[i], hull[i + 1])
                if s < best_slope:
                    best, best_slope = u, s
        if best is None:
            break
        i = at[best]
        a, b = hulls[best][i], hulls[best][i + 1]
        path.steps.append(Step(best[0], best[1], b[0], a[1] - b[1], b[2] - a[2]))
        at[best] = i + 1
    report = {"lm_head": {"choice": head_cfg, **head_report},
              "sensitivity": {f"{li}.{part}": round(v, 6) for (li, part), v in
                              sensitivity.items()},
              "menu_points": sum(len(m) for m in menus.values()),
              "calibration_tokens": int(sum(p.numel() for p in prompts))}
    return path, report


def plan_for_budget(path: Path, budget: float) -> tuple[dict, int]:
    """The plan at `budget` x dense bytes per token (a prefix of the path) and its step count."""
    n = path.steps_for(budget * path.dense_bytes)
    if n is None:
        least = path.bytes_after(len(path.steps)) / path.dense_bytes
        raise UserInputError(f"budget {budget} is below the sparsest plan this model allows "
                             f"({least:.3f} of dense bytes per token)")
    return path.plan_after(n), n


@torch.no_grad()
def decode_kl(model, pt: PerToken, prompts: list[torch.Tensor], splits=None,
              ranks: RankGroup = SINGLE) -> dict:
    """Teacher-forced check of the path as decode runs it: each prompt's first half (or its
    first splits[i] tokens) prefilled dense into a KV cache, the rest in one per-token forward
    on that cache; token-weighted KL(dense || path) and top-1 agreement over those positions.
    Each prompt runs on the rank that owns it; the sums are added in prompt order."""
    kl_sum, agree, n = 0.0, 0.0, 0
    for part in ranks.map(len(prompts), lambda i: _decode_kl_one(
            model, pt, prompts[i], None if splits is None else splits[i])):
        if part is not None:
            kl_sum, agree, n = kl_sum + part[0], agree + part[1], n + part[2]
    return {"kl": kl_sum / max(n, 1), "top1": agree / max(n, 1), "tokens": n}


def _decode_kl_one(model, pt: PerToken, ids: torch.Tensor, split) -> tuple | None:
    """(summed KL, top-1 agreements, positions) of one prompt; None if nothing is decoded."""
    from transformers import DynamicCache

    ids = ids.view(1, -1)
    half = max(1, ids.shape[1] // 2) if split is None else int(split)
    if ids.shape[1] - half < 1:
        return None
    logp = []
    for mode in ("dense", "pertoken"):
        cache = DynamicCache(config=model.config)
        pt.mode = "dense"
        model(input_ids=ids[:, :half], **cache_kwargs(model, cache), use_cache=True)
        pt.mode = mode
        try:
            out = model(input_ids=ids[:, half:], **cache_kwargs(model, cache), use_cache=True)
        finally:
            pt.mode = "dense"
        logp.append(torch.log_softmax(out.logits[0].double(), -1))
    d, g = logp
    return (float((d.exp() * (d - g)).sum(-1).sum()),
            float((d.argmax(-1) == g.argmax(-1)).double().sum()), d.shape[0])


def plan_at_kl(path: Path, model, pt: PerToken, prompts, max_kl: float,
               ranks: RankGroup = SINGLE) -> tuple[dict, int, dict]:
    """The sparsest prefix of the path whose decode_kl on `prompts` is at most max_kl
    (bisection: KL grows along the path up to measurement noise); (plan, steps, check).
    Every rank takes the same bisection steps (each decode_kl is gathered)."""
    lo, hi = 0, len(path.steps)  # lo always meets the target (dense + head choice)
    pt.configure(path.plan_after(0))
    best = decode_kl(model, pt, prompts, ranks=ranks)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        pt.configure(path.plan_after(mid))
        check = decode_kl(model, pt, prompts, ranks=ranks)
        if check["kl"] <= max_kl:
            lo, best = mid, check
        else:
            hi = mid - 1
    return path.plan_after(lo), lo, best
