"""The per-token path's decode steps on the CPU kernels (runtime.cpu_kernels).

`CpuWeights(model, smap, plan, dtype)` keeps, for the operators the plan uses, one copy of
each weight in the layout its kernel reads, in the bundle's storage dtype (bf16 for SmolLM2:
the fp32 the torch model computes in is exact for those values, so nothing is lost) or in
int8 with one scale per output (`--weights int8`: sparsity and quantization compose), or in
int4 (`--weights int4`): W's own blocks of 32 inputs with an fp16 scale and minimum
(runtime.pack.Q4 rows, Q4Cols input-major copies: a Q4_1 GGUF's numbers come back exactly)
and the lm_head in int8:

* q/k/v (input-sparse): one input-major matrix [hidden, q+k+v] per layer, so one pass over
  the kept inputs' rows computes all three projections (`gather_gemv`);
* o (input-sparse): W_o^T [o_in, hidden];
* FFN "sketch": gate and up row-major [width, hidden] (kept channels' rows), down transposed
  [width, hidden] (kept channels' columns as rows) — `ffn_sparse` fuses the three at batch 1
  with SiLU, `rows_gemv` + `gather_gemv` otherwise; FFN "teal": gate^T, up^T, down^T;
* lm_head "sketch": the rows of the exact head (`rows_gemv` on the candidates).
Selection happens in runtime.pertoken: at batch 1 on the C++ selection kernels (top-k, the
sketches' rotation and int8 sketch estimate, cpu_kernels), at batch > 1 in torch. These methods
take what it chose and read only the rows the union of the batch's masks keeps, each row's
output equal to its own masked product (rows outside its mask are zeroed in x).
Operators without a kernel here (cats, oracle, fixed — benchmarks only) run the torch path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_kernels as K
from .pack import Q4Cols, quantize_q4, quantize_q4_cols


class Q4Input(NamedTuple):
    """An input-major int4 copy and the row map its gathers pass (None: the identity)."""

    cols: Q4Cols
    rowmap: torch.Tensor | None

    @property
    def shape(self):
        return self.cols.shape


def _masked(x, keep, idx):
    """(x, idx) for gather_gemv: rows masked to their own inputs, idx the batch's union
    (keep=None: idx as given, None meaning every input)."""
    if keep is None:
        return x.float(), idx
    return (x * keep).float(), _union(keep)


_ALL = None  # gather_gemv's "every input"


def _union(keep: torch.Tensor) -> torch.Tensor:
    """int32 indices kept by any row of a bool mask [B, n]."""
    return keep.any(0).nonzero().view(-1).to(torch.int32)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row of W [N, K]: (q int8 [N, K], scale float32 [N]) with
    W ~= q * scale[:, None], scale = max|W[n]| / 127 (1 for an all-zero row)."""
    w = w.detach().float()
    s = w.abs().amax(1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s.contiguous()


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """What an int8 copy of W [N, K] multiplies by (the tests' reference weights)."""
    q, s = quantize_rows(w)
    return (q.float() * s[:, None]).to(w.dtype)


def _gather(wt, x, idx, scale=None):
    """K.gather_gemv, or its int4 form with the copy's row map."""
    if isinstance(wt, Q4Input):
        return K.gather_q4(wt.cols, x, idx, rowmap=wt.rowmap)
    return K.gather_gemv(wt, x, idx, scale=scale)


class CpuWeights:
    """The kernels' weight copies (see the module docstring). dtype torch.int8 stores every
    matrix as int8 with one fp32 scale per output (quantize_rows: the same numbers whatever
    layout a matrix is copied into), which halves the bytes of bf16 again; dtype "int4" stores
    the layers' matrices in W's own blocks of 32 inputs whatever the layout (0.625 bytes a
    weight) and the lm_head in int8."""

    def __init__(self, model, smap, plan: dict, dtype: torch.dtype | str,
                 ffn_perms: dict[int, torch.Tensor] | None = None):
        # ffn_perms[li][i]: the source channel of FFN channel i (the build permutes them): int4
        # keeps the down projection's source blocks through a row map
        self.dtype = dtype
        self.qkv_t, self.qkv_split, self.qkv_bias, self.o_t, self.o_bias = {}, {}, {}, {}, {}
        self.ffn: dict[int, dict] = {}
        for li, layer in enumerate(smap.layers):
            cfg = plan["layers"][li]
            a, f = layer.attention, layer.ffn
            # every layer, dense parts too: they run the same kernels on the storage dtype
            ws = [model.get_submodule(p) for p in (a.q, a.k, a.v)]
            self.qkv_t[li] = self._copy(torch.cat([m.weight.detach() for m in ws]), "t")
            self.qkv_split[li] = [m.weight.shape[0] for m in ws]
            if any(m.bias is not None for m in ws):
                self.qkv_bias[li] = torch.cat([
                    m.bias.detach().float() if m.bias is not None
                    else torch.zeros(m.weight.shape[0]) for m in ws])
            o = model.get_submodule(a.o)
            self.o_t[li] = self._copy(o.weight.detach(), "t")
            self.o_bias[li] = None if o.bias is None else o.bias.detach().float()
            op = cfg["ffn"]["op"]
            if op in ("sketch", "teal", "wina", "dense") and f.gated and _no_bias(model, f):
                g, u, d = (model.get_submodule(p).weight.detach() for p in (f.gate, f.up, f.down))
                perm = (ffn_perms or {}).get(li)
                d_t = self._copy(d, "t", perm)
                if op in ("sketch", "dense"):
                    self.ffn[li] = {"op": op, "g": self._copy(g, "rows"),
                                    "u": self._copy(u, "rows"), "d_t": d_t}
                else:
                    self.ffn[li] = {"op": op, "g_t": self._copy(g, "t"), "u_t": self._copy(u, "t"),
                                    "d_t": d_t}
        from .pertoken import output_head

        head = output_head(model).weight.detach()  # int4 models keep it at 8 bits, as GGUFs do
        self.head = quantize_rows(head) if dtype == "int4" else self._copy(head, "rows")

    def _copy(self, w: torch.Tensor, layout: str, perm: torch.Tensor | None = None):
        """(copy of W [N, K] in the kernel's layout, per-output scale or None): "rows" keeps
        W row-major, "t" stores W^T [K, N] (input-major). int4 keeps W's blocks of 32 inputs
        in both (Q4 rows, Q4Cols); with perm (W's input i is source input perm[i]) the
        input-major copy holds the source order and the kernel maps inputs through perm."""
        scale = None
        if self.dtype == "int4":
            if layout == "rows":
                return quantize_q4(w), None
            if perm is None:
                return Q4Input(quantize_q4_cols(w), None), None
            perm = perm.to(torch.int32).contiguous()
            return Q4Input(quantize_q4_cols(w[:, perm.argsort()]), perm), None
        if self.dtype == torch.int8:
            w, scale = quantize_rows(w)
        else:
            w = w.to(self.dtype)
        return (w.T if layout == "t" else w).contiguous(), scale

    # ------------------------------------------------------------------ operators
    def qkv(self, li: int, x: torch.Tensor, keep: torch.Tensor | None = None,
            idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[q, k, v] for rows x [B, H] keeping inputs `keep` [B, H] (or, for one row, the
        sorted int32 indices `idx`: the kernel gathers x[:, idx] itself)."""
        wt, s = self.qkv_t[li]
        y = _gather(wt, *_masked(x, keep, idx), scale=s)
        if li in self.qkv_bias:
            y = y + self.qkv_bias[li]
        return list(y.split(self.qkv_split[li], dim=-1))

    def o(self, li: int, x: torch.Tensor, keep: torch.Tensor | None = None,
          idx: torch.Tensor | None = None) -> torch.Tensor:
        wt, s = self.o_t[li]
        y = _gather(wt, *_masked(x, keep, idx), scale=s)
        return y if self.o_bias[li] is None else y + self.o_bias[li]

    def ffn_fused(self, li: int, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """SiLU FFN over kept channels idx (None: all): one pass over the three rows of each
        (ffn_sparse) for float weights; int8 / int4 have no fused kernel: rows, SiLU, gather."""
        (g, sg), (u, su), (d, sd) = (self.ffn[li][k] for k in ("g", "u", "d_t"))
        x = x.float()
        if self.dtype in (torch.float32, torch.bfloat16):
            return K.ffn_sparse(g, u, d, x, idx)
        return _gather(d, self._inter(li, x, idx, torch.nn.functional.silu), idx, sd)

    def _inter(self, li: int, x: torch.Tensor, idx: torch.Tensor | None, act) -> torch.Tensor:
        """act(gate(x)) * up(x) on channels idx (None: all) from the row-major copies, as a
        full-width [B, W] float32 with zeros elsewhere."""
        (g, sg), (u, su) = self.ffn[li]["g"], self.ffn[li]["u"]
        h_idx = act(K.rows_gemv(g, x, idx, sg)) * K.rows_gemv(u, x, idx, su)
        if idx is None:
            return h_idx
        h = torch.zeros(x.shape[0], g.shape[0], dtype=torch.float32)
        h[:, idx.long()] = h_idx
        return h

    def head_exact(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w, s = self.head
        return K.rows_gemv(w, h.float(), idx, s)

    def ffn_channels(self, li: int, x: torch.Tensor, cand: torch.Tensor, k: int, act,
                     silu: bool):
        """Sketch op: exact h on each row's candidate channels, the top k of them kept (all,
        when there are k), then down over the kept: (y [B, H], keep [B, W])."""
        d, sd = self.ffn[li]["d_t"]
        x = x.float()
        n_cand = int(cand[0].sum())
        if x.shape[0] == 1 and n_cand == k and silu:
            return self.ffn_fused(li, x, _union(cand)), cand
        h = self._inter(li, x, _union(cand), act) * cand
        keep = cand
        if n_cand > k:  # re-rank: keep each row's k largest exact |h| among its candidates
            from .pertoken import topk_mask

            keep = topk_mask(h.abs().masked_fill(~cand, -1.0), k)
            h = h * keep
        return _gather(d, h, _union(keep), sd), keep

    def gate_up(self, li: int, x: torch.Tensor, idx: torch.Tensor | None):
        """teal/wina op: (gate(x), up(x)) from the kept inputs idx (None: all) of rows x."""
        w = self.ffn[li]
        (g, sg), (u, su) = w["g_t"], w["u_t"]
        return _gather(g, x, idx, sg), _gather(u, x, idx, su)

    def ffn_inputs(self, li: int, x: torch.Tensor, x_keep: torch.Tensor | None, act):
        """teal/wina op, first half: h = act(gate(x_kept)) * up(x_kept) over every channel
        (x_keep None: every input)."""
        g, u = self.gate_up(li, *_masked(x, x_keep, _ALL))
        return act(g) * u

    def down(self, li: int, h: torch.Tensor, keep: torch.Tensor | None = None,
             idx: torch.Tensor | None = None) -> torch.Tensor:
        d, sd = self.ffn[li]["d_t"]
        return _gather(d, *_masked(h, keep, idx), scale=sd)

    def head_rows(self, h: torch.Tensor, cand: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
        """est with each row's candidates replaced by their exact logits."""
        idx = _union(cand)
        w, s = self.head
        exact = K.rows_gemv(w, h.float(), idx, s)
        out = est.clone()
        cols = idx.long()
        out[:, cols] = torch.where(cand[:, cols], exact, est[:, cols])
        return out


def _no_bias(model, f) -> bool:
    return all(getattr(model.get_submodule(p), "bias", None) is None
               for p in (f.gate, f.up, f.down))
