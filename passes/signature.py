"""Prompt signatures: each prompt's recovered unit importance, from one dense forward.

A unit's importance on a prompt is the energy it writes into the residual stream:
  * FFN channel j:  E_t[h_j^2] * ||W_down[:, j]||^2   (h = the down-projection input)
  * query head h:   sum over its o-projection input columns c of E_t[x_c^2] * ||W_o[:, c]||^2
Both are read by forward pre-hooks on the down and o projections (the same places where
`cscompile.execute.masked` removes those units), so one dense pass per prompt suffices.
Energies are normalised per layer (a layer's head and channel scores together sum to 1),
which makes layers comparable while heads and channels of a layer stay in one currency
(energy written to the residual stream), and gives the per-channel vectors class supports
are cut from.

The signature matrix is [P, N] with units laid out layer by layer: that layer's heads, then
its FFN channels (see `unit_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cscompile.frontend import logits_of
from cscompile.stream import resident
from cscompile.structure import StructureMap


@dataclass
class UnitLayout:
    """Where each layer's heads and channels sit in a signature row."""

    heads: dict[int, slice]
    channels: dict[int, slice]
    n_units: int

    def unit_bytes(self, smap: StructureMap) -> np.ndarray:
        """Byte cost of each unit; a head carries its share of its kv group's bytes."""
        cost = np.zeros(self.n_units)
        for li, sl in self.heads.items():
            a = smap.layers[li].attention
            per = a.n_heads // a.n_kv_heads
            cost[sl] = smap.head_bytes(li) + smap.kv_group_bytes(li) / per
        for li, sl in self.channels.items():
            cost[sl] = smap.channel_bytes(li)
        return cost


def unit_layout(smap: StructureMap) -> UnitLayout:
    heads, channels, at = {}, {}, 0
    for li, layer in enumerate(smap.layers):
        if layer.attention is not None:
            heads[li] = slice(at, at + layer.attention.n_heads)
            at += layer.attention.n_heads
        if layer.ffn is not None:
            channels[li] = slice(at, at + layer.ffn.width)
            at += layer.ffn.width
    return UnitLayout(heads, channels, at)


def _input_col_norms2(module: torch.nn.Module, layout: str) -> torch.Tensor:
    """||W[:, c]||^2 for every input column c of a linear ([out, in] or Conv1D [in, out])."""
    w = module.weight.detach().float()
    return (w * w).sum(0) if layout == "out_in" else (w * w).sum(1)


def _energy_hook(store: dict, key, col_norm2: torch.Tensor):
    def hook(module, args):
        x = args[0].detach().float()
        mean_sq = (x * x).reshape(-1, x.shape[-1]).mean(0)  # E_t[x_c^2] over batch and tokens
        store[key] = mean_sq * col_norm2
    return hook


def energy_hooks(model, smap: StructureMap, li: int, store: dict) -> list:
    """Forward pre-hooks on layer li's o and down projections that put one forward's
    energies in store[("o", li)] / store[("down", li)]; the handles."""
    layer, handles = smap.layers[li], []
    a, f = layer.attention, layer.ffn
    with resident(model, li):  # the column norms read the layer's weights
        if a is not None:
            o = model.get_submodule(a.o)
            handles.append(o.register_forward_pre_hook(
                _energy_hook(store, ("o", li), _input_col_norms2(o, a.weight_layout))))
        if f is not None:
            down = model.get_submodule(f.down)
            handles.append(down.register_forward_pre_hook(
                _energy_hook(store, ("down", li), _input_col_norms2(down, f.weight_layout))))
    return handles


def layer_signature(smap: StructureMap, layout: UnitLayout, li: int, store: dict,
                    row: np.ndarray) -> None:
    """Fill layer li's slots of one prompt's signature row from its hooked energies; a
    layer's head + channel energies sum to 1."""
    parts = []
    if li in layout.heads:
        cols = store[("o", li)]
        parts.append((layout.heads[li], torch.stack(
            [cols[c].sum() for c in smap.layers[li].attention.o_cols])))
    if li in layout.channels:
        parts.append((layout.channels[li], store[("down", li)]))
    if parts:
        total = float(sum(e.sum() for _, e in parts)) or 1.0
        for sl, e in parts:
            row[sl] = e.double().numpy() / total


@torch.no_grad()
def prompt_signatures(model: torch.nn.Module, smap: StructureMap,
                      prompts: list[torch.Tensor], on_prompt=None) -> np.ndarray:
    """[P, N] per-prompt unit importances (one dense forward per prompt, [1, T] ids each).
    `on_prompt()` is called after each prompt (progress display)."""
    layout = unit_layout(smap)
    store: dict = {}
    handles = [h for li in range(smap.n_layers) for h in energy_hooks(model, smap, li, store)]
    sig = np.zeros((len(prompts), layout.n_units))
    try:
        for p, ids in enumerate(prompts):  # one at a time: no padding to get wrong
            store.clear()
            logits_of(model, ids.view(1, -1))
            for li in range(smap.n_layers):
                layer_signature(smap, layout, li, store, sig[p])
            if on_prompt is not None:
                on_prompt()
    finally:
        for h in handles:
            h.remove()
    return sig
