"""Masked and physically reduced execution of a model over its StructureMap units.

* `UnitMask` — per batch row, which query heads, FFN channels and layers are on (float 0/1,
  or any weights). `masked(model, smap, mask)` installs forward hooks so one ordinary forward
  runs B different masks at once: a head is removed by zeroing its columns at the o-projection
  input, an FFN channel by zeroing its column at the down-projection input, a layer by passing
  its input through unchanged. That is exactly what deleting the unit does, so
* `reduce_model(model, smap, support)` — a copy with the weights physically sliced — must give
  the same logits (the core invariant, tested on every architecture).

A kv group is removed when all of its query heads are; its k/v rows then stop mattering.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import UserInputError
from .structure import StructureMap


# ----------------------------------------------------------------------------- supports & masks
@dataclass
class Support:
    """What one execution path keeps: query heads and FFN channels per layer, and layers."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    channels: dict[int, list[int]] = field(default_factory=dict)
    layers: list[int] | None = None  # None: every layer kept

    @classmethod
    def full(cls, smap: StructureMap) -> "Support":
        return cls({i: list(range(l.attention.n_heads)) for i, l in enumerate(smap.layers)
                    if l.attention},
                   {i: list(range(l.ffn.width)) for i, l in enumerate(smap.layers) if l.ffn},
                   None)

    def kept_layers(self, smap: StructureMap) -> list[int]:
        return list(range(smap.n_layers)) if self.layers is None else sorted(self.layers)

    def to_json(self) -> dict:
        return {"heads": {str(k): list(map(int, v)) for k, v in sorted(self.heads.items())},
                "channels": {str(k): list(map(int, v)) for k, v in sorted(self.channels.items())},
                "layers": None if self.layers is None else sorted(map(int, self.layers))}

    @classmethod
    def from_json(cls, d: dict) -> "Support":
        return cls({int(k): list(v) for k, v in d["heads"].items()},
                   {int(k): list(v) for k, v in d["channels"].items()}, d.get("layers"))

    def kept_bytes(self, smap: StructureMap) -> int:
        """Prunable bytes this support keeps (heads, kv groups of kept heads, channels)."""
        total = 0
        for li in self.kept_layers(smap):
            layer = smap.layers[li]
            if layer.attention is not None:
                heads = self.heads.get(li, list(range(layer.attention.n_heads)))
                groups = {layer.attention.kv_group_of(h) for h in heads}
                total += len(heads) * smap.head_bytes(li) + len(groups) * smap.kv_group_bytes(li)
            if layer.ffn is not None:
                chans = self.channels.get(li, range(layer.ffn.width))
                total += len(chans) * smap.channel_bytes(li)
        return total

    def density(self, smap: StructureMap) -> float:
        return self.kept_bytes(smap) / smap.prunable_bytes()


@dataclass
class UnitMask:
    """Per-row unit weights: heads[l] [B, n_heads], channels[l] [B, width], layers [B, L]."""

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    channels: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: torch.Tensor | None = None

    @classmethod
    def from_supports(cls, smap: StructureMap, supports: list[Support]) -> "UnitMask":
        mask = cls.ones(smap, len(supports))
        for b, sup in enumerate(supports):
            for li, heads in sup.heads.items():
                mask.heads[li][b] = 0
                mask.heads[li][b, list(heads)] = 1
            for li, chans in sup.channels.items():
                mask.channels[li][b] = 0
                mask.channels[li][b, list(chans)] = 1
            if sup.layers is not None:
                mask.layers[b] = 0
                mask.layers[b, list(sup.layers)] = 1
        return mask

    @classmethod
    def ones(cls, smap: StructureMap, batch: int = 1) -> "UnitMask":
        return cls({i: torch.ones(batch, l.attention.n_heads) for i, l in enumerate(smap.layers)
                    if l.attention},
                   {i: torch.ones(batch, l.ffn.width) for i, l in enumerate(smap.layers) if l.ffn},
                   torch.ones(batch, smap.n_layers))


# ----------------------------------------------------------------------------- masked execution
def _scale_input(x: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    """x [B, ..., C] * col_mask [B or 1, C] broadcast over the middle dimensions."""
    m = col_mask.to(x.dtype)
    return x * m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[-1])


@contextmanager
def masked(model: nn.Module, smap: StructureMap, mask: UnitMask):
    """Within the context, every forward of `model` applies `mask` row by row."""
    handles = []
    try:
        for li, layer in enumerate(smap.layers):
            a, f = layer.attention, layer.ffn
            if a is not None and li in mask.heads:
                col_head = torch.empty(sum(len(c) for c in a.o_cols), dtype=torch.long)
                for h, cols in enumerate(a.o_cols):
                    col_head[cols] = h
                cols = mask.heads[li][:, col_head]
                handles.append(model.get_submodule(a.o).register_forward_pre_hook(
                    lambda m, args, cols=cols: (_scale_input(args[0], cols), *args[1:])))
            if f is not None and li in mask.channels:
                chans = mask.channels[li]
                handles.append(model.get_submodule(f.down).register_forward_pre_hook(
                    lambda m, args, chans=chans: (_scale_input(args[0], chans), *args[1:])))
            if mask.layers is not None and not bool((mask.layers[:, li] == 1).all()):
                handles.append(model.get_submodule(layer.module).register_forward_hook(
                    _layer_gate(mask.layers[:, li]), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()


def _layer_gate(keep: torch.Tensor):
    """Forward hook: out = in + keep * (out - in) per batch row (keep=0 skips the block)."""

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        h = out[0] if isinstance(out, tuple) else out
        k = keep.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        new = x + k * (h - x)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


def masked_logits(model, smap, input_ids, mask: UnitMask) -> torch.Tensor:
    from .frontend import logits_of

    with masked(model, smap, mask), torch.no_grad():
        return logits_of(model, input_ids)


# ----------------------------------------------------------------------------- physical reduction
class SkipLayer(nn.Module):
    """A removed residual block: returns its input (in the block's output structure)."""

    def __init__(self, original: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        for k, v in vars(original).items():  # keep plain attributes models read (attention_type)
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None))):
                setattr(self, k, v)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def _slice_param(module: nn.Module, name: str, dim: int, index: list[int]) -> None:
    p = getattr(module, name)
    idx = torch.as_tensor(index, dtype=torch.long)
    setattr(module, name, nn.Parameter(p.detach().index_select(dim, idx).clone(),
                                       requires_grad=False))


def _slice_linear(model, path: str, layout: str, role: str, index: list[int]) -> None:
    """Keep `index` of a linear's outputs (role='out') or inputs (role='in')."""
    mod = model.get_submodule(path)
    out_dim = 0 if layout == "out_in" else 1
    dim = out_dim if role == "out" else 1 - out_dim
    _slice_param(mod, "weight", dim, index)
    if role == "out" and getattr(mod, "bias", None) is not None:
        _slice_param(mod, "bias", 0, index)
    for attr, value in (("out_features", mod.weight.shape[out_dim]),
                        ("in_features", mod.weight.shape[1 - out_dim]),
                        ("nf", mod.weight.shape[out_dim])):
        if hasattr(mod, attr):
            setattr(mod, attr, int(value))


def reduce_model(model: nn.Module, smap: StructureMap, support: Support) -> nn.Module:
    """A copy of `model` with the units outside `support` physically removed."""
    reduced = copy.deepcopy(model)
    kept_layers = set(support.kept_layers(smap))
    for li, layer in enumerate(smap.layers):
        if li not in kept_layers:
            parent, _, child = layer.module.rpartition(".")
            container = reduced.get_submodule(parent) if parent else reduced
            original = getattr(container, child) if not child.isdigit() else container[int(child)]
            skip = SkipLayer(original, layer.returns_tuple)
            if child.isdigit():
                container[int(child)] = skip
            else:
                setattr(container, child, skip)
            continue
        if layer.ffn is not None and li in support.channels:
            f = layer.ffn
            chans = sorted(support.channels[li])
            for mod in (f.gate, f.up):
                if mod is not None:
                    _slice_linear(reduced, mod, f.weight_layout, "out", chans)
            _slice_linear(reduced, f.down, f.weight_layout, "in", chans)
        if layer.attention is not None and li in support.heads:
            _reduce_attention(reduced, layer.attention, sorted(support.heads[li]), li)
    return reduced


def _reduce_attention(model, a, heads: list[int], li: int) -> None:
    if len(heads) == a.n_heads:
        return
    if not heads:
        raise UserInputError(f"layer {li} keeps no attention head; drop the whole layer instead")
    per = a.n_heads // a.n_kv_heads
    groups = sorted({a.kv_group_of(h) for h in heads})
    counts = {g: sum(1 for h in heads if a.kv_group_of(h) == g) for g in groups}
    uniform = len(set(counts.values())) == 1
    # kv heads the reduced attention sees: each kept group once (uniform GQA), or one copy per
    # kept query head when groups keep different numbers of heads (runs as multi-head attention)
    kv_for = groups if uniform else [a.kv_group_of(h) for h in heads]
    q_rows = [r for h in heads for r in a.q_rows[h]]
    k_rows = [r for g in kv_for for r in a.k_rows[g]]
    v_rows = [r for g in kv_for for r in a.v_rows[g]]
    o_cols = [c for h in heads for c in a.o_cols[h]]
    attn = model.get_submodule(a.module)
    new_per = counts[groups[0]] if uniform else 1
    rows_of: dict[str, list[int]] = {}
    for mod, rows in ((a.q, q_rows), (a.k, k_rows), (a.v, v_rows)):
        rows_of.setdefault(mod, []).extend(rows)
    fused = len(rows_of) < 3
    if fused and not uniform:
        raise UserInputError(f"layer {li}: a fused projection cannot keep kv groups unevenly; "
                             f"keep the same number of heads per kv group or use masked execution")
    for mod, rows in rows_of.items():
        # a fused projection keeps its layout: its kept rows stay in their original order
        _slice_linear(model, mod, a.weight_layout, "out", sorted(rows) if fused else rows)
    _slice_linear(model, a.o, a.weight_layout, "in", o_cols)
    if new_per != per:
        if not hasattr(attn, "num_key_value_groups"):
            raise UserInputError(f"layer {li}: {a.module} has no num_key_value_groups; cannot "
                                 f"slice kv groups unevenly; use masked execution")
        attn.num_key_value_groups = new_per
    # size attributes some attention modules read instead of inferring (-1) from the weights
    for attr, old, new in (("split_size", a.n_heads * a.head_dim, len(heads) * a.head_dim),
                           ("num_heads", a.n_heads, len(heads)),
                           ("num_attention_heads", a.n_heads, len(heads)),
                           ("num_key_value_heads", a.n_kv_heads, len(kv_for))):
        if getattr(attn, attr, None) == old:
            setattr(attn, attr, new)


def random_support(smap: StructureMap, density: float, rng: np.random.Generator,
                   min_heads: int = 1, drop_layers: int = 0) -> Support:
    """A random support keeping ~`density` of heads and of channels in every layer."""
    sup = Support()
    for li, layer in enumerate(smap.layers):
        if layer.attention is not None:
            n = layer.attention.n_heads
            k = max(min_heads, int(round(density * n)))
            sup.heads[li] = sorted(rng.choice(n, size=k, replace=False).tolist())
        if layer.ffn is not None:
            w = layer.ffn.width
            sup.channels[li] = sorted(rng.choice(w, size=max(1, int(round(density * w))),
                                                 replace=False).tolist())
    if drop_layers:
        drop = set(rng.choice(smap.n_layers, size=drop_layers, replace=False).tolist())
        sup.layers = [i for i in range(smap.n_layers) if i not in drop]
    return sup
