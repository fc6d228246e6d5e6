"""Triton backend: a class path's FFNs run the lowering's `ffn_decode` kernel at decode steps.

The class's compact model (`Session.compact_model`, weights already sliced to the kept heads
and channels) keeps its torch attention; each FFN module is swapped for `TritonFFN`, which
calls `cscompile.codegen.kernels.ffn_decode` (compact layout: every row of its sliced weights is
kept) whenever at most 16 rows come in — a decode step — and the original torch module
otherwise (prefill runs on the dense model anyway). The FFN is three quarters of SmolLM2's
prunable bytes, so it is where a bytes-bound decode step wins; the head-reduced q/k/v and o
kernels are not wired in yet (their projections run as torch GEMVs on the sliced weights).

On CPU the kernels only run under the Triton interpreter (TRITON_INTERPRET=1 before import),
which is how the tests check this backend against the torch one; it is far too slow to serve.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cscompile.errors import UserInputError
from cscompile.structure import StructureMap


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason): CUDA with triton importable, or the CPU interpreter when asked for."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not importable ({e})"
    if device.type == "cuda":
        return True, "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "interpreter"
    return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels in the slow CPU interpreter)"


class TritonFFN(nn.Module):
    """An FFN module whose decode rows go through `ffn_decode` on its (sliced) weights."""

    def __init__(self, original: nn.Module, model: nn.Module, info):
        super().__init__()
        self.original = original
        self.activation = info.activation

        def weight_oi(path):  # [out, in]; GPT-2 Conv1D stores [in, out]
            w = model.get_submodule(path).weight.detach()
            return w if info.weight_layout == "out_in" else w.t()

        def bias(path):
            b = getattr(model.get_submodule(path), "bias", None)
            return None if b is None else b.detach()

        up = weight_oi(info.up)
        self.register_buffer("w_up", up.contiguous(), persistent=False)
        self.register_buffer("w_gate", None if info.gate is None else
                             weight_oi(info.gate).contiguous(), persistent=False)
        # down is stored transposed [I, H]: channel j owns row j of all three matrices
        self.register_buffer("w_down_t", weight_oi(info.down).t().contiguous(), persistent=False)
        self.b_up = None if info.gate is not None else bias(info.up)
        self.b_down = None if info.gate is not None else bias(info.down)
        if info.gate is not None and (bias(info.up) is not None or bias(info.down) is not None
                                      or bias(info.gate) is not None):
            raise UserInputError("the Triton FFN kernel has no biases for gated FFNs")

    def forward(self, x, *args, **kwargs):
        from cscompile.codegen.kernels import MAX_DECODE_ROWS, ffn_decode

        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > MAX_DECODE_ROWS or self.w_up.shape[0] == 0:
            return self.original(x, *args, **kwargs)
        y = ffn_decode(flat, self.w_gate, self.w_up, self.w_down_t, None,
                       activation=self.activation, b_up=self.b_up, b_down=self.b_down)
        return y.view_as(x)


def use_triton_ffn(model: nn.Module, smap: StructureMap) -> int:
    """Swap every supported FFN of `model` (a compact class copy) for TritonFFN; returns how
    many were swapped (FFNs with an activation the kernels lack stay torch)."""
    from cscompile.codegen.kernels import ACTIVATIONS

    swapped = 0
    for layer in smap.layers:
        f = layer.ffn
        if f is None or f.activation not in ACTIVATIONS:
            continue
        try:
            original = model.get_submodule(f.module)
        except AttributeError:  # a dropped layer's FFN is gone
            continue
        parent_path, _, name = f.module.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, TritonFFN(original, model, f))
        swapped += 1
    return swapped
