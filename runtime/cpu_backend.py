"""The per-token path's decode steps on the CPU kernels (runtime.cpu_kernels).

`CpuWeights(model, smap, plan, dtype)` keeps, for the operators the plan uses, one copy of
each weight in the layout its kernel reads, in the bundle's storage dtype (bf16 for SmolLM2:
the fp32 the torch model computes in is exact for those values, so nothing is lost):

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

import torch

from . import cpu_kernels as K


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


class CpuWeights:
    def __init__(self, model, smap, plan: dict, dtype: torch.dtype):
        self.dtype = dtype
        self.qkv_t, self.qkv_split, self.qkv_bias, self.o_t, self.o_bias = {}, {}, {}, {}, {}
        self.ffn: dict[int, dict] = {}
        for li, layer in enumerate(smap.layers):
            cfg = plan["layers"][li]
            a, f = layer.attention, layer.ffn
            # every layer, dense parts too: they run the same kernels on the storage dtype
            ws = [model.get_submodule(p) for p in (a.q, a.k, a.v)]
            self.qkv_t[li] = self._copy(torch.cat([m.weight.detach() for m in ws]).T)
            self.qkv_split[li] = [m.weight.shape[0] for m in ws]
            if any(m.bias is not None for m in ws):
                self.qkv_bias[li] = torch.cat([
                    m.bias.detach().float() if m.bias is not None
                    else torch.zeros(m.weight.shape[0]) for m in ws])
            o = model.get_submodule(a.o)
            self.o_t[li] = self._copy(o.weight.detach().T)
            self.o_bias[li] = None if o.bias is None else o.bias.detach().float()
            op = cfg["ffn"]["op"]
            if op in ("sketch", "teal", "wina", "dense") and f.gated and _no_bias(model, f):
                g, u, d = (model.get_submodule(p).weight.detach() for p in (f.gate, f.up, f.down))
                if op in ("sketch", "dense"):
                    self.ffn[li] = {"op": op, "g": self._copy(g), "u": self._copy(u),
                                    "d_t": self._copy(d.T)}
                else:
                    self.ffn[li] = {"op": op, "g_t": self._copy(g.T), "u_t": self._copy(u.T),
                                    "d_t": self._copy(d.T)}
        from .pertoken import output_head

        self.head = self._copy(output_head(model).weight.detach())

    def _copy(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.dtype).contiguous()

    # ------------------------------------------------------------------ operators
    def qkv(self, li: int, x: torch.Tensor, keep: torch.Tensor | None = None,
            idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[q, k, v] for rows x [B, H] keeping inputs `keep` [B, H] (or, for one row, the
        sorted int32 indices `idx`: the kernel gathers x[:, idx] itself)."""
        y = K.gather_gemv(self.qkv_t[li], *_masked(x, keep, idx))
        if li in self.qkv_bias:
            y = y + self.qkv_bias[li]
        return list(y.split(self.qkv_split[li], dim=-1))

    def o(self, li: int, x: torch.Tensor, keep: torch.Tensor | None = None,
          idx: torch.Tensor | None = None) -> torch.Tensor:
        y = K.gather_gemv(self.o_t[li], *_masked(x, keep, idx))
        return y if self.o_bias[li] is None else y + self.o_bias[li]

    def ffn_fused(self, li: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One row, SiLU: the three rows of each kept channel in one pass (ffn_sparse)."""
        w = self.ffn[li]
        return K.ffn_sparse(w["g"], w["u"], w["d_t"], x.float(), idx)

    def head_exact(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return K.rows_gemv(self.head, h.float(), idx)

    def ffn_channels(self, li: int, x: torch.Tensor, cand: torch.Tensor, k: int, act,
                     silu: bool):
        """Sketch op: exact h on each row's candidate channels, the top k of them kept (all,
        when there are k), then down over the kept: (y [B, H], keep [B, W])."""
        w = self.ffn[li]
        x = x.float()
        n_cand = int(cand[0].sum())
        if x.shape[0] == 1 and n_cand == k and silu:
            return K.ffn_sparse(w["g"], w["u"], w["d_t"], x, _union(cand)), cand
        idx = _union(cand)
        h_idx = act(K.rows_gemv(w["g"], x, idx)) * K.rows_gemv(w["u"], x, idx)
        h = torch.zeros(x.shape[0], cand.shape[1], dtype=torch.float32)
        h[:, idx.long()] = h_idx
        h = h * cand
        keep = cand
        if n_cand > k:  # re-rank: keep each row's k largest exact |h| among its candidates
            from .pertoken import topk_mask

            keep = topk_mask(h.abs().masked_fill(~cand, -1.0), k)
            h = h * keep
        return K.gather_gemv(w["d_t"], h, _union(keep)), keep

    def ffn_inputs(self, li: int, x: torch.Tensor, x_keep: torch.Tensor | None, act):
        """teal/wina op, first half: h = act(gate(x_kept)) * up(x_kept) over every channel
        (x_keep None: every input)."""
        w = self.ffn[li]
        xm, idx = _masked(x, x_keep, _ALL)
        return act(K.gather_gemv(w["g_t"], xm, idx)) * K.gather_gemv(w["u_t"], xm, idx)

    def down(self, li: int, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return K.gather_gemv(self.ffn[li]["d_t"], *_masked(h, keep, _ALL))

    def head_rows(self, h: torch.Tensor, cand: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
        """est with each row's candidates replaced by their exact logits."""
        idx = _union(cand)
        exact = K.rows_gemv(self.head, h.float(), idx)
        out = est.clone()
        cols = idx.long()
        out[:, cols] = torch.where(cand[:, cols], exact, est[:, cols])
        return out


def _no_bias(model, f) -> bool:
    return all(getattr(model.get_submodule(p), "bias", None) is None
               for p in (f.gate, f.up, f.down))
