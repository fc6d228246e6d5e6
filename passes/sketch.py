"""Sketch pass: low-bit, randomly rotated copies of the matrices whose outputs select supports.

`sketch(model, smap, bits, group, seed)` returns the tensors the per-token path measures
with (runtime.pertoken): per layer one random rotation R (signs, permutation; the block
Hadamard is implied by the hidden size) shared by the FFN's gate and up, their rows rotated
(W R^T, so that (W R^T)(R x) = W x) and quantized to `bits` bits with an fp16 scale per
`group` inputs (runtime.pack); the same for the lm_head rows on the final hidden state. The
rotation spreads outlier weights over a block, which is what makes 2-3 bits usable
(measured: `benchmarks/pertoken_quality.py`, rotation on/off).
"""

from __future__ import annotations

import torch

from cscompile.runtime.pack import pack_codes, quantize_codes
from cscompile.runtime.pertoken import Rotation, output_head
from cscompile.stream import resident
from cscompile.structure import StructureMap


ROWS = 4096  # rows rotated and quantized at a time: an lm_head's transients stay small


def _quantized(w: torch.Tensor, rot: Rotation, bits: int, group: int, prefix: str) -> dict:
    packed, scales = [], []
    for i in range(0, w.shape[0], ROWS):
        codes, s = quantize_codes(rot(w[i:i + ROWS].detach().float()), bits, group)
        packed.append(pack_codes(codes, bits))
        scales.append(s)
    return {f"{prefix}.packed": torch.cat(packed), f"{prefix}.scales": torch.cat(scales),
            **rot.tensors(prefix)}


@torch.no_grad()
def sketch(model, smap: StructureMap, bits: int = 3, group: int = 64, seed: int = 0,
           rotate: bool = True, ffn_layers=None, lm_head: bool = True) -> dict[str, torch.Tensor]:
    """Sketch tensors for the FFNs of `ffn_layers` (default: every layer) and the lm_head."""
    gen = torch.Generator().manual_seed(seed)
    hidden = smap.hidden_size

    def rotation():
        return Rotation.random(hidden, gen) if rotate else Rotation.identity(hidden)

    out: dict[str, torch.Tensor] = {}
    layers = range(smap.n_layers) if ffn_layers is None else ffn_layers
    for li in layers:
        f = smap.layers[li].ffn
        rot = rotation()
        with resident(model, li):
            for role, path in (("gate", f.gate), ("up", f.up)):
                if path:
                    w = model.get_submodule(path).weight
                    out.update(_quantized(w, rot, bits, group, f"layers.{li}.{role}"))
    if lm_head:
        out.update(_quantized(output_head(model).weight, rotation(), bits, group, "lm_head"))
    return out
