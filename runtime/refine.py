"""Token-adaptive refinement of a class's FFN support during decode.

A class path fixes, per layer, the candidate FFN channels C_l. Every `every` decode steps the
runtime re-estimates the current token's support inside C_l, TEAL-style: keep the `inter_keep`
fraction of C_l with the largest |h_j|, where h is the down-projection input of this token.
Alongside it monitors how much of the token's FFN activity that support misses:

    on-support energy fraction  e_l = sum_{j in S_l} h_j^2 / sum_{all j} h_j^2

(the denominator needs the full intermediate, i.e. the gate/up rows of every channel: on the
torch backend it is computed anyway, and `measurement_bytes` charges those rows to the token).
If the worst layer misses too much, 1 - min_l e_l >= widen_threshold, the token is recomputed
on the dense model ("widen"). So widen_threshold=0 makes every refined token dense, and
widen_threshold=inf switches refinement off entirely (the static class path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cscompile.errors import UserInputError
from cscompile.structure import StructureMap


MODES = ("class", "input")


@dataclass(frozen=True)
class RefineConfig:
    every: int = 1  # refine on decode steps 0, every, 2*every, ...
    widen_threshold: float = 0.1  # widen to dense when off-support energy >= this
    inter_keep: float = 1.0  # fraction of the class's candidate channels a refined token keeps
    # "class": refine inside the class's channels (above); "input": every decode step runs the
    # dense weights with TEAL-like input sparsity (InputSparsity, thresholds from the bundle)
    mode: str = "class"
    # class mode: every `switch_every` decode steps re-route on the running mean of the router
    # feature over prompt + generated tokens and switch class when it changed (0 = never)
    switch_every: int = 0

    def __post_init__(self):
        if self.switch_every < 0:
            raise UserInputError(f"switch_every must be >= 0, got {self.switch_every}")
        if self.mode not in MODES:
            raise UserInputError(f"refine mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.every < 1:
            raise UserInputError(f"refine every must be >= 1 token, got {self.every}")
        if not self.widen_threshold >= 0:  # also refuses NaN
            raise UserInputError(f"widen threshold must be >= 0, got {self.widen_threshold}")
        if not 0 < self.inter_keep <= 1:
            raise UserInputError(f"inter_keep must be in (0, 1], got {self.inter_keep}")

    @property
    def active(self) -> bool:
        return self.mode == "input" or math.isfinite(self.widen_threshold)

    def refines_step(self, step: int) -> bool:
        return self.active and step % self.every == 0

    def widens(self, min_energy_fraction: float) -> bool:
        return 1.0 - min_energy_fraction >= self.widen_threshold


def teal_select(h: torch.Tensor, candidates: torch.Tensor, inter_keep: float) -> torch.Tensor:
    """0/1 mask [N, W]: per row of h [N, W], the top ceil(inter_keep*|C|) candidates by |h|."""
    n_cand = int(candidates.sum())
    k = max(1, math.ceil(inter_keep * n_cand))
    if k >= n_cand:
        return candidates.to(h.dtype).expand_as(h).clone()
    score = h.abs().masked_fill(~candidates, -1.0)  # never pick a non-candidate
    keep = torch.zeros_like(h)
    keep.scatter_(-1, score.topk(k, dim=-1).indices, 1.0)
    return keep


def energy_fraction(h: torch.Tensor, keep: torch.Tensor) -> float:
    """Smallest over rows of sum(h^2 on keep) / sum(h^2); 1.0 for an all-zero row."""
    sq = h.float().square()
    total = sq.sum(-1)
    on = (sq * keep.float()).sum(-1)
    frac = torch.where(total > 0, on / total.clamp_min(1e-30), torch.ones_like(total))
    return float(frac.min())


# ----------------------------------------------------------------------------- byte accounting
def gate_up_row_bytes(smap: StructureMap, li: int) -> int:
    """Bytes of channel j's gate and up rows (what computing h_j reads), without its down column."""
    f = smap.layers[li].ffn
    return smap.slice_bytes([s for s in smap.channel_slices(li, [0])
                             if s.param != f"{f.down}.weight"])


def refined_support_bytes(smap: StructureMap, attn_bytes: int, kept_layers: list[int],
                          kept_channels: dict[int, int]) -> int:
    """Prunable bytes of a refined support: the class's attention units + the kept channels."""
    return attn_bytes + sum(kept_channels.get(li, smap.layers[li].ffn.width)
                            * smap.channel_bytes(li)
                            for li in kept_layers if smap.layers[li].ffn is not None)


def measurement_bytes(smap: StructureMap, kept_layers: list[int],
                      kept_channels: dict[int, int]) -> int:
    """Extra bytes the energy monitor reads: gate/up rows of every channel a layer dropped."""
    return sum((smap.layers[li].ffn.width - kept_channels.get(li, smap.layers[li].ffn.width))
               * gate_up_row_bytes(smap, li)
               for li in kept_layers if smap.layers[li].ffn is not None)


# ----------------------------------------------------------------------------- input sparsity
class InputSparsity:
    """TEAL-like per-token input sparsity on the dense weights: each FFN's input entries with
    |x| below the layer's threshold are zeroed before gate/up (so their weight columns need not
    be read), and so are the intermediate's before down. Thresholds come from the bundle
    (manifest "input_sparsity", calibrated at build to the mean class's FFN bytes).

    While `on`, every forward is sparsified; the hooks count kept entries of the last position
    and the on-support energy of each intermediate (what the runtime monitors and logs)."""

    def __init__(self, model, smap: StructureMap, thresholds: dict):
        self.smap, self.on = smap, False
        self.kept_hidden: dict[int, torch.Tensor] = {}  # per position: kept input entries
        self.kept_inter: dict[int, torch.Tensor] = {}  # per position: kept intermediate entries
        self.energy: dict[int, float] = {}  # last position: on-support intermediate energy
        self._handles = []
        for li, layer in enumerate(smap.layers):
            f = layer.ffn
            if f is None or f"{li}.hidden" not in thresholds:
                continue
            hidden, inter = float(thresholds[f"{li}.hidden"]), float(thresholds[f"{li}.inter"])
            for path in {f.up, f.gate} - {None}:
                self._handles.append(model.get_submodule(path).register_forward_pre_hook(
                    self._hook(li, hidden, self.kept_hidden)))
            self._handles.append(model.get_submodule(f.down).register_forward_pre_hook(
                self._hook(li, inter, self.kept_inter, energy=True)))

    def _hook(self, li, threshold, counts, energy=False):
        def hook(module, args):
            if not self.on:
                return None
            x = args[0]
            keep = (x.abs() > threshold).to(x.dtype)
            counts[li] = keep.reshape(-1, keep.shape[-1]).sum(-1).double().cpu()
            if energy:
                self.energy[li] = energy_fraction(x[..., -1, :].reshape(1, -1),
                                                  keep[..., -1, :].reshape(1, -1))
            return (x * keep, *args[1:])
        return hook

    def position_bytes(self) -> torch.Tensor:
        """Weight bytes each position of the last forward read: everything but the FFN weight
        columns its zeroed inputs let it skip (gate/up columns, down rows)."""
        smap, hidden = self.smap, self.smap.hidden_size
        total = None
        for li, kept in self.kept_inter.items():
            f = smap.layers[li].ffn
            gate_up = gate_up_row_bytes(smap, li)  # one channel's gate+up rows
            down = smap.channel_bytes(li) - gate_up  # one channel's down column
            kept_h = self.kept_hidden.get(li, torch.full_like(kept, hidden))
            skipped = (f.width - kept) * down + (hidden - kept_h) * (gate_up * f.width / hidden)
            total = skipped if total is None else total + skipped
        return smap.total_bytes - (total if total is not None else torch.zeros(1))

    def step_bytes(self) -> int:
        """Bytes the last position (a decode step) read."""
        return int(round(float(self.position_bytes()[-1])))

    def remove(self):
        for h in self._handles:
            h.remove()
