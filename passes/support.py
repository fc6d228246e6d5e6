"""Support selection: which heads and FFN channels a reduced model keeps, by any method.

One entry, `estimate_support(model, smap, prompts, density, method=...)`, returns a
`SupportEstimate` for every method, so baselines and the compressed-sensing estimator are
compared on equal terms (benchmarks/support_quality.py):

  kind        methods                     what decides the kept units
  static      magnitude, wanda,           weights (and calibration activations) once per task
              activation, random
  per_prompt  griffin, cs                 the prompt's own tokens (call once per prompt)
  per_token   teal, cats, oracle          every token, through hooks installed by `apply(model)`

Density is the fraction of FFN channels kept per layer (uniform by default; allocation="global"
ranks per-layer-normalised scores across layers). Heads: `heads_keep` of each layer's heads by
the method's head score (all heads when None). granularity="block" keeps whole tile-aligned
channel blocks (the last one may be partial) ranked by summed channel score.

`apply(model)` works for every kind: a context manager under which any forward of `model` is
the reduced model (static/per-prompt: the support as a mask; per-token: input-sparsity hooks —
zeroing a linear layer's dropped input entries per token is exactly what a gather-GEMV kernel
that reads only the kept weight columns computes).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cscompile.errors import UserInputError
from cscompile.execute import Support, UnitMask, masked
from cscompile.frontend import logits_of
from cscompile.structure import StructureMap

METHODS = ("magnitude", "wanda", "activation", "griffin", "teal", "cats", "oracle", "random", "cs")
KINDS = {"magnitude": "static", "wanda": "static", "activation": "static", "random": "static",
         "griffin": "per_prompt", "cs": "per_prompt",
         "teal": "per_token", "cats": "per_token", "oracle": "per_token"}
GRANULARITIES = ("channel", "block")
ALLOCATIONS = ("uniform", "global")
THRESHOLD_SAMPLES = 1 << 20  # |x| values kept per hook site to calibrate a magnitude threshold


@dataclass
class SupportEstimate:
    method: str
    kind: str  # static | per_prompt | per_token
    # static/per-prompt: the kept heads and channels; per-token: only the static head choice
    # (channels are decided token by token, so `channels` is empty)
    support: Support | None
    scores: dict  # {"channels": {layer: array}, "heads": {layer: array}} (diagnostics)
    forwards: int  # forward passes over prompts spent choosing (calibration, measurements)
    bytes_fraction: float  # fraction of FFN weight bytes read per token
    apply: Callable  # apply(model) -> context manager running the reduced model
    info: dict = field(default_factory=dict)  # method-specific details (thresholds, ...)


# ----------------------------------------------------------------------------- weights
def _weight_oi(model: nn.Module, path: str, layout: str) -> torch.Tensor:
    """The weight of linear `path` as [out, in] (GPT-2 Conv1D stores [in, out])."""
    w = model.get_submodule(path).weight.detach().float()
    return w if layout == "out_in" else w.t()


def _act_fn(name: str):
    fns = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
           "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
    if name not in fns:
        raise UserInputError(f"activation {name!r} is not supported by this method; "
                             f"supported: {', '.join(fns)}")
    return fns[name]


def _head_cols(a) -> torch.Tensor:
    return torch.as_tensor(a.o_cols, dtype=torch.long)  # [n_heads, head_dim]


def _down_col_norms(model, f) -> torch.Tensor:
    return _weight_oi(model, f.down, f.weight_layout).norm(dim=0)  # ||W_down[:, j]||


def _o_head_norms(model, a) -> torch.Tensor:
    wo = _weight_oi(model, a.o, a.weight_layout)
    return torch.stack([wo[:, cols].norm() for cols in a.o_cols])  # ||W_o[:, head cols]||_F


# ----------------------------------------------------------------------------- activations
def _run(model, ids):
    with torch.no_grad():
        logits_of(model, ids)


def _run_all(model, prompts, handles) -> None:
    """Forward every prompt with `handles` (hooks) installed, then remove them."""
    try:
        for ids in prompts:
            _run(model, ids)
    finally:
        for h in handles:
            h.remove()


def _collect(model, smap: StructureMap, prompts, on_ffn=None, on_attn=None) -> int:
    """Forward every prompt; call on_ffn(layer, h [tokens, width]) with each down-projection
    input and on_attn(layer, z [tokens, heads, head_dim]) with each o-projection input.
    Returns the number of forward passes."""
    handles = []
    for li, layer in enumerate(smap.layers):
        a, f = layer.attention, layer.ffn
        if f is not None and on_ffn is not None:
            handles.append(model.get_submodule(f.down).register_forward_pre_hook(
                lambda m, args, li=li: on_ffn(li, args[0].detach().float().reshape(-1, args[0].shape[-1]))))
        if a is not None and on_attn is not None:
            cols = _head_cols(a)
            handles.append(model.get_submodule(a.o).register_forward_pre_hook(
                lambda m, args, li=li, cols=cols: on_attn(
                    li, args[0].detach().float().reshape(-1, args[0].shape[-1])[:, cols])))
    _run_all(model, prompts, handles)
    return len(prompts)


class _Mean:
    """Running per-layer mean of per-token statistics (float64 sums, bounded memory)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, li, values: torch.Tensor):  # values [tokens, units]
        self.sums[li] = self.sums.get(li, 0) + values.double().sum(0)
        self.counts[li] = self.counts.get(li, 0) + values.shape[0]

    def result(self) -> dict:
        return {li: (s / self.counts[li]).float() for li, s in self.sums.items()}


class CountSketch:
    """Count-sketch of the sum of a stream of vectors in R^n in `depth` x `width` numbers.

    Unit j is hashed to one bucket per row with a random sign; the sum's entry j is estimated
    as the median over rows of sign * bucket (unbiased; error ~ ||sum||_2 / sqrt(width)).
    Memory is fixed by (depth, width), whatever n and however many tokens are added.
    """

    def __init__(self, n: int, width: int, depth: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.bucket = torch.randint(0, width, (depth, n), generator=g)
        self.sign = torch.randint(0, 2, (depth, n), generator=g).double() * 2 - 1
        self.table = torch.zeros(depth, width, dtype=torch.float64)

    def add(self, vector: torch.Tensor) -> None:
        v = vector.double()
        for r in range(self.table.shape[0]):
            self.table[r].index_add_(0, self.bucket[r], self.sign[r] * v)

    def estimate(self) -> torch.Tensor:
        return (self.sign * self.table.gather(1, self.bucket)).median(dim=0).values


def activation_energy(model, smap: StructureMap, prompts, exact: bool = False,
                      sketch_width: int | None = None, sketch_depth: int = 7, seed: int = 0):
    """Mean squared contribution of each unit to the residual stream over all prompt tokens.

    FFN channel j: E[h_j^2] * ||W_down[:, j]||^2; head h: E[||W_o[:, cols_h] z_h||^2].
    Channel energies go through one CountSketch per layer (`sketch_depth` x `sketch_width`,
    default width = the layer's width) unless exact=True, which keeps the exact running sum.
    Both are bounded in the number of calibration tokens; the sketch also fixes the memory per
    layer whatever the FFN width, at some accuracy (on stories260K, width = 2x the layer width
    and depth 9 keep >95% of the exact top-50% channels; width = 1x, depth 7: ~85-90%).
    Returns (channel energies, head energies, forwards).
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    exact_sum, sketches, counts, heads = _Mean(), {}, {}, _Mean()
    wo = {li: _weight_oi(model, l.attention.o, l.attention.weight_layout)[:, _head_cols(l.attention)]
          for li, l in enumerate(smap.layers) if l.attention is not None}  # [D, H, d]

    def on_ffn(li, h):
        if exact:
            exact_sum.add(li, h.square())
            return
        if li not in sketches:
            width = smap.layers[li].ffn.width
            sketches[li] = CountSketch(width, sketch_width or width, sketch_depth,
                                       seed + li)
        sketches[li].add(h.square().double().sum(0))
        counts[li] = counts.get(li, 0) + h.shape[0]

    def on_attn(li, z):  # z [T, H, d] -> per-head residual contribution [T, H, D]
        heads.add(li, torch.einsum("thd,Dhd->thD", z, wo[li]).square().sum(-1))

    forwards = _collect(model, smap, prompts, on_ffn, on_attn)
    mean_sq = exact_sum.result() if exact else {li: (s.estimate() / counts[li]).float()
                                                   for li, s in sketches.items()}
    chans = {li: v * _down_col_norms(model, smap.layers[li].ffn).square()
             for li, v in mean_sq.items()}
    return chans, heads.result(), forwards


# ----------------------------------------------------------------------------- scores
def _magnitude_scores(model, smap):
    chans, heads = {}, {}
    for li, layer in enumerate(smap.layers):
        if (f := layer.ffn) is not None:
            s = _down_col_norms(model, f)
            for mod in (f.up, f.gate):
                if mod is not None:
                    s = s * _weight_oi(model, mod, f.weight_layout).norm(dim=1)
            chans[li] = s
        if (a := layer.attention) is not None:
            heads[li] = _o_head_norms(model, a)
    return chans, heads


def _wanda_scores(model, smap, prompts):
    """Calibration |activation| times weight norm (Wanda / FLAP style)."""
    abs_h, head_norm = _Mean(), _Mean()
    forwards = _collect(model, smap, prompts, lambda li, h: abs_h.add(li, h.abs()),
                        lambda li, z: head_norm.add(li, z.norm(dim=-1)))
    chans = {li: v * _down_col_norms(model, smap.layers[li].ffn)
             for li, v in abs_h.result().items()}
    heads = {li: v * _o_head_norms(model, smap.layers[li].attention)
             for li, v in head_norm.result().items()}
    return chans, heads, forwards


def _griffin_scores(model, smap, prompts):
    """GRIFFIN: L2 norm over the prompt's tokens of each token's unit-normalised activation."""
    sq_h, sq_z = _Mean(), _Mean()

    def on_ffn(li, h):
        sq_h.add(li, (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)).square())

    def on_attn(li, z):
        n = z.norm(dim=-1)  # [T, H] per-head output norm, normalised over heads like h
        sq_z.add(li, (n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)).square())

    forwards = _collect(model, smap, prompts, on_ffn, on_attn)
    return ({li: v.sqrt() for li, v in sq_h.result().items()},
            {li: v.sqrt() for li, v in sq_z.result().items()}, forwards)


def _random_scores(smap, seed):
    g = torch.Generator().manual_seed(seed)
    chans = {li: torch.rand(l.ffn.width, generator=g) for li, l in enumerate(smap.layers) if l.ffn}
    heads = {li: torch.rand(l.attention.n_heads, generator=g)
             for li, l in enumerate(smap.layers) if l.attention}
    return chans, heads


# ----------------------------------------------------------------------------- selection
def _n_keep(density: float, n: int) -> int:
    return min(n, max(1, int(round(density * n))))


def _top(scores: np.ndarray, k: int) -> list[int]:
    order = np.lexsort((np.arange(len(scores)), -scores))  # ties: lower index first
    return sorted(order[:k].tolist())


def select_channels(smap: StructureMap, scores: dict, density: float, granularity: str = "channel",
                    tile: int = 64, allocation: str = "uniform") -> dict[int, list[int]]:
    """Kept channels per layer from per-channel scores.

    uniform: round(density * width) channels (or round(density * width / tile) blocks) per
    layer; global: per-layer scores divided by their layer mean, then ranked across layers
    (every layer keeps at least one channel / block).
    """
    units = {}  # layer -> (unit scores, channel lists)
    for li, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if granularity == "block":
            blocks = smap.blocks(li, tile)
            units[li] = (np.array([s[b].sum() for b in blocks]), blocks)
        else:
            units[li] = (s, [[j] for j in range(len(s))])
    if allocation == "uniform":
        kept = {}
        for li, (s, groups) in units.items():
            width = smap.layers[li].ffn.width
            k = min(len(groups), max(1, round(density * width / tile))) \
                if granularity == "block" else _n_keep(density, width)
            kept[li] = sorted(c for g in _top(s, k) for c in groups[g])
        return kept
    # global: normalise, give every layer its best unit, then fill by rank up to the budget
    budget = density * sum(smap.layers[li].ffn.width for li in units)
    ranked = []
    for li, (s, groups) in units.items():
        norm = s / max(s.mean(), 1e-30)
        ranked += [(-norm[g], li, g) for g in range(len(groups))]
    ranked.sort()
    chosen = {li: {_top(s, 1)[0]} for li, (s, _) in units.items()}
    used = sum(len(units[li][1][next(iter(g))]) for li, g in chosen.items())
    for _, li, g in ranked:
        size = len(units[li][1][g])
        if g in chosen[li]:
            continue
        if used + size > budget + (size / 2):  # stop at the unit that would overshoot most
            continue
        chosen[li].add(g)
        used += size
    return {li: sorted(c for g in chosen[li] for c in units[li][1][g]) for li in units}


def select_heads(scores: dict, heads_keep: int | None) -> dict[int, list[int]]:
    if heads_keep is None:
        return {}
    return {li: _top(np.asarray(s, dtype=np.float64), heads_keep) for li, s in scores.items()}


def _ffn_bytes(smap: StructureMap, li: int) -> dict[str, int]:
    """Weight bytes of the gate, up and down matrices of layer li."""
    f = smap.layers[li].ffn
    return {role: smap.slice_bytes([s for s in smap.channel_slices(li, list(range(f.width)))
                                    if s.param == f"{mod}.weight"])
            for role, mod in (("gate", f.gate), ("up", f.up), ("down", f.down)) if mod}


def _static_bytes_fraction(smap: StructureMap, channels: dict[int, list[int]]) -> float:
    kept = total = 0
    for li, layer in enumerate(smap.layers):
        if layer.ffn is not None:
            per = smap.channel_bytes(li)
            kept += len(channels.get(li, range(layer.ffn.width))) * per
            total += layer.ffn.width * per
    return kept / total


def _per_token_bytes_fraction(smap, fraction_of: Callable[[int, str], float]) -> float:
    """Σ over FFN matrices of bytes x fraction read (fraction_of(layer, role)) / FFN bytes."""
    read = total = 0.0
    for li, layer in enumerate(smap.layers):
        if layer.ffn is not None:
            for role, nbytes in _ffn_bytes(smap, li).items():
                read += nbytes * fraction_of(li, role)
                total += nbytes
    return read / total


# ----------------------------------------------------------------------------- per-token hooks
def _calibrate_thresholds(model, smap, prompts, sites: dict, keep: dict, seed: int) -> dict:
    """Magnitude thresholds: for each site (key -> (module path, 'in'|'out', transform)), the
    (1 - keep[key]) quantile of |x| over the calibration tokens (x = the module's input or its
    output passed through `transform`), from at most THRESHOLD_SAMPLES sampled values."""
    samples = {key: [] for key in sites}
    g = torch.Generator().manual_seed(seed)
    per_call = max(1, THRESHOLD_SAMPLES // max(1, len(prompts)))

    def record(key, x):
        v = x.detach().float().abs().reshape(-1)
        if v.numel() > per_call:
            v = v[torch.randint(0, v.numel(), (per_call,), generator=g)]
        samples[key].append(v)

    handles = []
    for key, (path, where, transform) in sites.items():
        mod = model.get_submodule(path)
        if where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: record(key, a[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, a, out, key=key, t=transform: record(key, t(out))))
    _run_all(model, prompts, handles)
    return {key: float(torch.quantile(torch.cat(v), 1.0 - keep[key]).item()) if keep[key] < 1
            else 0.0 for key, v in samples.items()}


def _zero_small(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x * (x.abs() > threshold).to(x.dtype)


def _keep_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = x.abs().topk(k, dim=-1).indices
    return x * torch.zeros_like(x).scatter_(-1, idx, 1.0)


def _apply_factory(smap: StructureMap, heads: dict, install: Callable | None = None,
                   channels: dict | None = None):
    """apply(model): masks static heads/channels and installs per-token hooks (install(model)
    returns hook handles)."""

    @contextmanager
    def apply(model):
        mask = UnitMask.from_supports(smap, [Support(heads, channels or {})])
        handles = install(model) if install is not None else []
        try:
            with masked(model, smap, mask):
                yield model
        finally:
            for h in handles:
                h.remove()

    return apply


def _pre_hook(model, path, fn):
    return model.get_submodule(path).register_forward_pre_hook(
        lambda m, args: (fn(args[0]), *args[1:]))


def _teal(model, smap, calib, density, heads, seed, hidden_keep=None, inter_keep=None,
          attn_keep=None):
    """TEAL: zero the small-magnitude entries of each linear layer's input, per token."""
    hidden_keep = density if hidden_keep is None else hidden_keep
    inter_keep = density if inter_keep is None else inter_keep
    if attn_keep is None:  # attention inputs are sparsified when heads are reduced
        attn_keep = hidden_keep if heads else 1.0
    for name, v in (("hidden_keep", hidden_keep), ("inter_keep", inter_keep),
                    ("attn_keep", attn_keep)):
        _check_fraction(name, v)
    sites, keep = {}, {}
    for li, layer in enumerate(smap.layers):
        if (f := layer.ffn) is not None:
            sites[(li, "hidden")], keep[(li, "hidden")] = (f.up, "in", None), hidden_keep
            sites[(li, "inter")], keep[(li, "inter")] = (f.down, "in", None), inter_keep
        if (a := layer.attention) is not None and attn_keep < 1:
            sites[(li, "attn")], keep[(li, "attn")] = (a.q, "in", None), attn_keep
    thresholds = _calibrate_thresholds(model, smap, calib, sites, keep, seed)

    def install(m):
        handles = []
        for li, layer in enumerate(smap.layers):
            f, a = layer.ffn, layer.attention
            if f is not None and hidden_keep < 1:
                t = thresholds[(li, "hidden")]
                for path in {f.up, f.gate} - {None}:
                    handles.append(_pre_hook(m, path, lambda x, t=t: _zero_small(x, t)))
            if f is not None and inter_keep < 1:
                t = thresholds[(li, "inter")]
                handles.append(_pre_hook(m, f.down, lambda x, t=t: _zero_small(x, t)))
            if a is not None and attn_keep < 1:
                t = thresholds[(li, "attn")]
                for path in {a.q, a.k, a.v}:
                    handles.append(_pre_hook(m, path, lambda x, t=t: _zero_small(x, t)))
        return handles

    frac = {"gate": hidden_keep, "up": hidden_keep, "down": inter_keep}
    return (install, _per_token_bytes_fraction(smap, lambda li, role: frac[role]),
            {"thresholds": {f"{k[0]}.{k[1]}": v for k, v in thresholds.items()},
             "hidden_keep": hidden_keep, "inter_keep": inter_keep, "attn_keep": attn_keep},
            len(calib))


def _cats(model, smap, calib, density, heads, seed):
    """CATS: threshold |act(gate)| per token (gate read fully), drop those channels from up
    and down. A plain FFN has no gate: the threshold applies to act(up), up is read fully."""
    sites, acts = {}, {}
    for li, layer in enumerate(smap.layers):
        if (f := layer.ffn) is not None:
            if f.gated:
                acts[li] = _act_fn(f.activation)
                sites[li] = (f.gate, "out", acts[li])
            else:
                sites[li] = (f.down, "in", None)
    thresholds = _calibrate_thresholds(model, smap, calib, sites, {k: density for k in sites}, seed)

    def install(m):
        handles, current = [], {}
        for li, (path, where, act) in sites.items():
            t, f = thresholds[li], smap.layers[li].ffn
            if density >= 1:
                continue
            if where == "out":  # remember the gate's per-token keep mask, apply it at down
                handles.append(m.get_submodule(path).register_forward_hook(
                    lambda mod, a, out, li=li, t=t, act=act:
                    current.__setitem__(li, (act(out).abs() > t).to(out.dtype))))
                handles.append(_pre_hook(m, f.down, lambda x, li=li: x * current.pop(li)))
            else:
                handles.append(_pre_hook(m, f.down, lambda x, t=t: _zero_small(x, t)))
        return handles

    def fraction(li, role):
        return 1.0 if (role == "gate" or (role == "up" and not smap.layers[li].ffn.gated)) \
            else density

    return (install, _per_token_bytes_fraction(smap, fraction),
            {"thresholds": {str(k): v for k, v in thresholds.items()}}, len(calib))


def _oracle(smap, density):
    """Each token keeps its own top-k |h_j| (h = the true down-projection input)."""

    def install(m):
        if density >= 1:
            return []
        return [_pre_hook(m, l.ffn.down, lambda x, k=_n_keep(density, l.ffn.width): _keep_top_k(x, k))
                for l in smap.layers if l.ffn is not None]

    return install, _per_token_bytes_fraction(
        smap, lambda li, role: density if role == "down" else 1.0), {}, 0


# ----------------------------------------------------------------------------- compressed sensing
CS_MEASURE_OPTS = ("m", "C", "budget", "design", "rate", "response", "batch_size")


def _cs_scores(model, smap, prompts, density, granularity, tile, heads_keep, calib, seed, opts):
    """Per-unit importance from masked-forward measurements on the prompts (passes.measure):
    FFN blocks (granularity="block") or channels, and heads when heads_keep is given."""
    try:
        from . import measure
    except ImportError as e:
        raise UserInputError(f"method 'cs' needs cscompile.passes.measure, which is not "
                             f"available ({e})") from None
    prior_name = opts.pop("prior", None)
    recovery = opts.pop("recovery", "lasso")
    unknown = set(opts) - set(CS_MEASURE_OPTS)
    if unknown:
        raise UserInputError(f"method 'cs' takes no options {sorted(unknown)}; it takes prior, "
                             f"recovery, {', '.join(CS_MEASURE_OPTS)}")
    prior_ch = prior_h = None
    forwards = 0
    if prior_name == "activation":
        prior_ch, prior_h, forwards = activation_energy(model, smap, calib or prompts, exact=True)
    elif prior_name is not None:
        raise UserInputError(f"cs prior must be 'activation' or None, got {prior_name!r}")

    def run(unit_kind, prior_by_layer, keep_fraction):
        units = measure.unit_space(smap, unit_kind, tile)
        prior = None if prior_by_layer is None else np.array(
            [float(np.asarray(prior_by_layer[u["layer"]])[u["members"]].sum()) for u in units])
        k = min(len(units) - 1, max(1, round(keep_fraction * len(units))))
        total, spent = np.zeros(len(units)), 0
        for i, ids in enumerate(prompts):  # importance averaged over the given prompts
            meas = measure.measure(model, smap, ids, unit_kind, k=k, tile=tile, seed=seed + i,
                                   **opts)
            rec = measure.recover_importance(meas, k, method=recovery, prior=prior, seed=seed)
            total += rec.importance
            spent += meas.n_forwards
        by_layer = {}
        for u, w in zip(units, total / len(prompts)):
            by_layer.setdefault(u["layer"], []).append(w / len(u["members"]))
        return {li: np.array(v) for li, v in by_layer.items()}, spent

    unit_kind = "ffn_block" if granularity == "block" else "ffn_channel"
    unit_scores, spent = run(unit_kind, prior_ch, density)
    forwards += spent
    chans = unit_scores
    if granularity == "block":  # each channel gets its block's per-channel importance
        chans = {li: np.repeat(s, [len(b) for b in smap.blocks(li, tile)])
                 for li, s in unit_scores.items()}
    heads = {}
    if heads_keep is not None:
        n_heads = max(l.attention.n_heads for l in smap.layers if l.attention is not None)
        heads, spent = run("head", prior_h, heads_keep / n_heads)
        forwards += spent
    return chans, heads, forwards


# ----------------------------------------------------------------------------- entry point
def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise UserInputError(f"{name} must be a number in (0, 1], got {value!r}")


def _context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_prompts(prompts, model, what: str) -> list[torch.Tensor]:
    if prompts is None:
        return []
    if isinstance(prompts, torch.Tensor):
        raise UserInputError(f"{what} must be a list of input_ids tensors [1, T], not one tensor")
    prompts = list(prompts)
    if not prompts:
        raise UserInputError(f"{what} is an empty list: give at least one prompt")
    context = _context_length(model)
    out = []
    for i, ids in enumerate(prompts):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise UserInputError(f"{what}[{i}] must be an integer input_ids tensor")
        ids = ids.long().view(1, -1) if ids.dim() == 1 else ids.long()
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise UserInputError(f"{what}[{i}] must have shape [1, T] with T > 0, got "
                                 f"{list(ids.shape)}")
        if context is not None and ids.shape[1] > context:
            raise UserInputError(f"{what}[{i}] has {ids.shape[1]} tokens, longer than the "
                                 f"model's context of {context}")
        out.append(ids)
    return out


def estimate_support(model, smap: StructureMap, prompts, density: float,
                     method: str = "magnitude", granularity: str = "channel", tile: int = 64,
                     heads_keep: int | None = None, calib_prompts=None, seed: int = 0,
                     allocation: str = "uniform", **opts) -> SupportEstimate:
    """Choose what to keep with `method` at FFN `density` (see the module docstring).

    prompts: list of input_ids [1, T]. Per-prompt methods select from them; static and
    per-token methods calibrate on `calib_prompts` when given, else on `prompts`. magnitude
    and random need no data (prompts may be None).
    opts: activation: exact, sketch_width, sketch_depth; teal: hidden_keep, inter_keep,
    attn_keep; cs: prior ("activation"), recovery (passes.recover method) and measure()
    options m, C, budget, design, rate, response, batch_size.
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if method not in METHODS:
        raise UserInputError(f"unknown support method {method!r}; choose one of "
                             f"{', '.join(METHODS)}")
    _check_fraction("density", density)
    if granularity not in GRANULARITIES:
        raise UserInputError(f"granularity must be one of {', '.join(GRANULARITIES)}, "
                             f"got {granularity!r}")
    if allocation not in ALLOCATIONS:
        raise UserInputError(f"allocation must be one of {', '.join(ALLOCATIONS)}, "
                             f"got {allocation!r}")
    if not isinstance(tile, int) or tile < 1:
        raise UserInputError(f"tile must be a positive integer, got {tile!r}")
    n_heads = [l.attention.n_heads for l in smap.layers if l.attention is not None]
    if heads_keep is not None and (not isinstance(heads_keep, int) or isinstance(heads_keep, bool)
                                   or not 1 <= heads_keep <= min(n_heads or [0])):
        raise UserInputError(f"heads_keep must be an integer in [1, {min(n_heads or [0])}] "
                             f"(heads per layer), got {heads_keep!r}")
    prompts = _check_prompts(prompts, model, "prompts")
    calib = _check_prompts(calib_prompts, model, "calib_prompts") or prompts
    needs = {"griffin": prompts, "cs": prompts}.get(method, calib)
    if method not in ("magnitude", "random", "oracle") and not needs:
        raise UserInputError(f"method {method!r} needs prompts"
                             + ("" if method in ("griffin", "cs") else " or calib_prompts"))
    if method == "oracle" and heads_keep is not None and not calib:
        raise UserInputError("method 'oracle' with heads_keep needs prompts to score heads")
    kind = KINDS[method]
    model.eval()

    if kind == "per_token":
        heads, head_scores, forwards = {}, {}, 0
        if heads_keep is not None:  # static head choice from calibration (Wanda-style)
            _, head_scores, forwards = _wanda_scores(model, smap, calib)
            heads = select_heads(head_scores, heads_keep)
        if method == "teal":
            install, frac, info, spent = _teal(model, smap, calib, density, heads, seed, **opts)
        elif method == "cats":
            _no_opts(method, opts)
            install, frac, info, spent = _cats(model, smap, calib, density, heads, seed)
        else:
            _no_opts(method, opts)
            install, frac, info, spent = _oracle(smap, density)
        return SupportEstimate(method, kind, Support(heads, {}), {"channels": {},
                               "heads": _np(head_scores)}, forwards + spent, frac,
                               _apply_factory(smap, heads, install), info)

    info, forwards = {}, 0
    if method == "magnitude":
        _no_opts(method, opts)
        chans, heads = _magnitude_scores(model, smap)
    elif method == "random":
        _no_opts(method, opts)
        chans, heads = _random_scores(smap, seed)
    elif method == "wanda":
        _no_opts(method, opts)
        chans, heads, forwards = _wanda_scores(model, smap, calib)
    elif method == "activation":
        chans, heads, forwards = activation_energy(model, smap, calib, seed=seed, **opts)
    elif method == "griffin":
        _no_opts(method, opts)
        chans, heads, forwards = _griffin_scores(model, smap, prompts)
    else:
        chans, heads, forwards = _cs_scores(model, smap, prompts, density, granularity, tile,
                                            heads_keep, calib_prompts and calib, seed, dict(opts))
    chans, heads = _np(chans), _np(heads)
    support = Support(select_heads(heads, heads_keep),
                      select_channels(smap, chans, density, granularity, tile, allocation))
    return SupportEstimate(method, kind, support, {"channels": chans, "heads": heads}, forwards,
                           _static_bytes_fraction(smap, support.channels),
                           _apply_factory(smap, support.heads, channels=support.channels), info)


def _np(scores: dict) -> dict:
    return {li: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
            for li, v in scores.items()}


def _no_opts(method: str, opts: dict) -> None:
    if opts:
        raise UserInputError(f"method {method!r} takes no options {sorted(opts)}")
