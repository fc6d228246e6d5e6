"""Per-token sparse execution: measure each token, recover its support, read only that.

A *plan* (JSON, in the bundle) gives every weight matrix a decode step reads an operator and a
sparsity; *sketches* (safetensors, in the bundle) hold the low-bit rotated copies some
operators measure with. `PerToken(model, smap, plan, sketches)` swaps the model's projection,
FFN and lm_head modules for ones that, while `mode == "pertoken"`, compute per position:

* attention inputs (`qkv`: one selection shared by q, k and v; `o`: the o-projection input):
    ``teal``   keep the ``keep`` fraction of inputs with the largest |x_i|;
    ``wina``   ... with the largest |x_i| * ||W[:, i]|| (column norms of the matrices it feeds);
  reads only the kept inputs' weight columns (input-major copies for the kernels).
* FFN (``act(gate) * up -> down``, or ``act(up) -> down`` for plain FFNs):
    ``sketch`` rotate x (random signs, permutation, block Hadamard), apply the b-bit sketches
               of gate and up, estimate every channel's |act(g) u|, take the top ``cand * keep``
               channels, compute those exactly and keep the top ``keep`` (CoSaMP-style
               re-rank; cand = 1 keeps the sketch's choice); reads the sketches + the kept
               channels' gate/up rows and down columns;
    ``teal``   keep ``x_keep`` of the gate/up inputs by |x|, then ``keep`` of the intermediate
               by |h| (TEAL); ``wina``: the same scored by |x| * column norms;
    ``cats``   gate in full, keep ``keep`` of the channels by |act(g)| (CATS);
    ``oracle`` the true top ``keep`` by |h| (reads the kept channels only — unrealisable,
               the reference); ``fixed``: a channel set given from outside (benchmarks).
* lm_head: ``sketch`` scores every vocabulary row with the sketch, computes exact logits on
  the top ``candidates`` and keeps the sketch's estimate elsewhere.
Every operator at full keep (``keep = 1``) or ``op = "dense"`` computes the dense output
exactly, and ``mode == "dense"`` (prefill) is the unmodified model.

The torch path computes exactly what the sparse kernels do, as masks over dense matrices
(the same numbers up to float reordering); every position is reduced, so a teacher-forced
forward measures the decode path's quality. Each call records the operator's own estimate of
what its support missed (`missed`): the off-support share of the scores' energy (inputs,
sketched intermediate) or, for the lm_head, the sketch's probability mass off the candidates.
Byte accounting (`plan_bytes`) charges each matrix the weight bytes its operator reads per
token in the storage dtype, measurement (sketch words and scales, column norms) included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cscompile.errors import BundleError, UserInputError
from cscompile.stream import resident, stream_of
from cscompile.structure import StructureMap

from .cpu_kernels import (planes_fit, quantize_x_reference, rotate, select_logits, select_topk,
                          sketch_gemv, sketch_planes, sketch_q8, sketch_select)
from .pack import dequantize_codes, packed_bytes, unpack_codes

INPUT_OPS = ("dense", "teal", "wina")
FFN_OPS = ("dense", "sketch", "teal", "wina", "cats", "oracle", "fixed")
HEAD_OPS = ("dense", "sketch")
PLAN_VERSION = 1
DENSE = {"op": "dense"}


# ----------------------------------------------------------------------------- plans
def dense_plan(smap: StructureMap, bits: int = 3, group: int = 64) -> dict:
    return {"version": PLAN_VERSION, "sketch": {"bits": bits, "group": group},
            "layers": [{"qkv": dict(DENSE), "o": dict(DENSE), "ffn": dict(DENSE)}
                       for _ in smap.layers],
            "lm_head": dict(DENSE)}


def uniform_plan(smap: StructureMap, qkv=None, o=None, ffn=None, lm_head=None, bits=3,
                 group=64) -> dict:
    """One config for every layer (the TEAL-like uniform baselines, tests)."""
    plan = dense_plan(smap, bits, group)
    for layer in plan["layers"]:
        for key, cfg in (("qkv", qkv), ("o", o), ("ffn", ffn)):
            if cfg:
                layer[key] = dict(cfg)
    if lm_head:
        plan["lm_head"] = dict(lm_head)
    return check_plan(plan, smap)


def check_plan(plan: dict, smap: StructureMap) -> dict:
    """Validate a plan (from a bundle or a caller); BundleError/UserInputError in one line."""
    err = BundleError
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise err(f"per-token plan: unknown version {plan.get('version') if isinstance(plan, dict) else plan!r}")
    layers = plan.get("layers")
    if not isinstance(layers, list) or len(layers) != smap.n_layers:
        raise err(f"per-token plan: expected {smap.n_layers} layers")
    sk = plan.get("sketch", {})
    if sk.get("bits") not in (1, 2, 3, 4) or not isinstance(sk.get("group"), int) or sk["group"] < 1:
        raise err(f"per-token plan: bad sketch settings {sk!r}")
    for li, layer in enumerate(layers):
        for key, ops in (("qkv", INPUT_OPS), ("o", INPUT_OPS), ("ffn", FFN_OPS)):
            _check_cfg(layer.get(key) if isinstance(layer, dict) else None, ops, f"layer {li} {key}")
    _check_cfg(plan.get("lm_head"), HEAD_OPS, "lm_head")
    return plan


def _check_cfg(cfg, ops, where):
    if not isinstance(cfg, dict) or cfg.get("op") not in ops:
        raise BundleError(f"per-token plan: {where}: op must be one of {', '.join(ops)}, "
                          f"got {cfg!r}")
    for key in ("keep", "x_keep"):
        v = cfg.get(key, 1.0)
        if not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise BundleError(f"per-token plan: {where}: {key} must be in (0, 1], got {v!r}")
    c = cfg.get("cand", 1.0)
    if not isinstance(c, (int, float)) or not c >= 1:
        raise BundleError(f"per-token plan: {where}: cand must be >= 1, got {c!r}")
    n = cfg.get("candidates", 1)
    if cfg["op"] == "sketch" and where == "lm_head" and (not isinstance(n, int) or n < 1):
        raise BundleError(f"per-token plan: lm_head candidates must be a positive int, got {n!r}")


def count(fraction: float, n: int) -> int:
    """Kept units out of n for a keep fraction (at least one, n at fraction 1)."""
    return max(1, min(n, int(round(fraction * n))))


# ----------------------------------------------------------------------------- shapes, bytes
@dataclass
class Shapes:
    """What byte accounting needs of a model: dims per layer, storage bytes per weight."""

    hidden: int
    vocab: int
    elsize: int  # storage bytes per weight element (2 for bf16)
    qkv_out: list[int]  # rows of q + k + v per layer
    o_in: list[int]
    ffn_width: list[int]
    gated: list[bool]
    other_bytes: int  # what every token reads besides the matrices: norms, biases, 1 embedding row
    # bytes per matrix element as the kernels store it (int8: 1 + its per-output fp32 scale,
    # at most 4 / hidden per element); 0: elsize
    matrix_elsize: float = 0.0
    # an input-major (gather) copy's bytes per kept element, and per element of the whole
    # matrix whatever it keeps (int4 columns: 0.5 for the codes, 0.125 for the group scales a
    # gather reads once per group, charged as if it touched every group); 0, 0: matrix_elsize
    gather_elsize: float = 0.0
    gather_fixed: float = 0.0
    head_elsize: float = 0.0  # the lm_head's bytes per element; 0: matrix_elsize

    @property
    def n_layers(self) -> int:
        return len(self.qkv_out)

    def int8(self) -> "Shapes":
        """The same model with its matrices stored as int8 + one fp32 scale per output."""
        return dataclasses.replace(self, matrix_elsize=1 + 4 / self.hidden)

    def int4(self) -> "Shapes":
        """The same model with its layer matrices in int4 blocks (runtime.pack.Q4 rows: 20
        bytes per 32 weights; Q4Cols gathers: 16 bytes of codes per 32 kept weights, 4 bytes of
        scale and minimum per 32 weights of the matrix) and its lm_head in int8 (a GGUF keeps
        it at 8 bits or more too). Padding to whole blocks is not counted."""
        from .pack import Q4_BLOCK, Q4_GROUP

        return dataclasses.replace(self, matrix_elsize=Q4_BLOCK / Q4_GROUP,
                                   gather_elsize=16 / Q4_GROUP, gather_fixed=4 / Q4_GROUP,
                                   head_elsize=1 + 4 / self.hidden)

    @classmethod
    def of(cls, model: nn.Module, smap: StructureMap, elsize: int | None = None) -> "Shapes":
        el = elsize or smap.elsize()
        qkv, o_in, width, gated = [], [], [], []
        other = 0
        for layer in smap.layers:
            a, f = layer.attention, layer.ffn
            qkv.append(sum(_weight(model, p).shape[0] for p in (a.q, a.k, a.v)))
            o_in.append(_weight(model, a.o).shape[1])
            width.append(f.width)
            gated.append(f.gated)
        head = output_head(model)
        mats = {id(m.weight) for m in _matrix_modules(model, smap)} | {id(head.weight)}
        emb = model.get_input_embeddings().weight
        for p in model.parameters():
            if id(p) in mats:
                continue
            if p is emb:
                other += emb.shape[1] * el  # one row per token
            else:
                other += p.numel() * el
        return cls(smap.hidden_size, head.weight.shape[0], el, qkv, o_in, width, gated, other)


def _weight(model, path):
    return model.get_submodule(path).weight


def _matrix_modules(model, smap):
    for layer in smap.layers:
        a, f = layer.attention, layer.ffn
        for p in (a.q, a.k, a.v, a.o, f.up, f.down) + ((f.gate,) if f.gate else ()):
            yield model.get_submodule(p)


def output_head(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserInputError("the per-token path needs a model with a linear output head")
    return head


def input_bytes(cfg: dict, n_in: int, n_out: int, el: float, fixed: float = 0.0) -> float:
    """Bytes an input-sparse matrix [n_out, n_in] reads per token under cfg (el per kept
    element, fixed per element of the whole matrix: Shapes.gather_*)."""
    if cfg["op"] == "dense":
        return n_in * n_out * (el + fixed)
    extra = n_in * 4 if cfg["op"] == "wina" else 0  # fp32 column norms
    return count(cfg.get("keep", 1.0), n_in) * n_out * el + n_in * n_out * fixed + extra


def ffn_bytes(cfg: dict, hidden: int, width: int, gated: bool, el: float, bits: int,
              group: int, gel: float | None = None, gfix: float = 0.0) -> float:
    """Bytes an FFN reads per token under cfg: gate / up rows at el per element, the
    input-major copies (down; all three for teal / wina) at gel per kept element + gfix per
    element (Shapes.gather_*; gel None: el)."""
    gel = el if gel is None else gel
    n_in_mats = 2 if gated else 1  # gate + up, or up alone
    row = hidden * el
    down = lambda kept: kept * hidden * gel + width * hidden * gfix  # noqa: E731
    op = cfg["op"]
    if op == "dense":
        return n_in_mats * width * row + down(width)
    k = count(cfg.get("keep", 1.0), width)
    if op == "sketch":
        cand = min(width, int(round(cfg.get("cand", 1.0) * k)))
        return n_in_mats * packed_bytes(width, hidden, bits, group) + cand * n_in_mats * row \
            + down(k)
    if op in ("teal", "wina"):
        xk = count(cfg.get("x_keep", 1.0), hidden)
        norms = (hidden + width) * 4 if op == "wina" else 0
        return n_in_mats * (xk * width * gel + hidden * width * gfix) + down(k) + norms
    if op == "cats":  # the gate (or up) in full, the rest on kept channels
        return width * row + k * n_in_mats * row
    return k * (n_in_mats + 1) * row  # oracle, fixed


def head_bytes(cfg: dict, hidden: int, vocab: int, el: int, bits: int, group: int) -> float:
    if cfg["op"] == "dense":
        return vocab * hidden * el
    n = min(vocab, int(cfg["candidates"]))
    return packed_bytes(vocab, hidden, bits, group) + n * hidden * el


def plan_bytes(plan: dict, shapes: Shapes) -> dict:
    """Weight bytes one token reads under `plan`, per part, and as a fraction of dense."""
    bits, group = plan["sketch"]["bits"], plan["sketch"]["group"]
    el = shapes.matrix_elsize or shapes.elsize
    gel, gfix = (shapes.gather_elsize or el), shapes.gather_fixed
    h = shapes.hidden
    parts = {"qkv": 0.0, "o": 0.0, "ffn": 0.0}
    dense = {"qkv": 0.0, "o": 0.0, "ffn": 0.0}
    for li, layer in enumerate(plan["layers"]):
        parts["qkv"] += input_bytes(layer["qkv"], h, shapes.qkv_out[li], gel, gfix)
        dense["qkv"] += input_bytes(DENSE, h, shapes.qkv_out[li], gel, gfix)
        parts["o"] += input_bytes(layer["o"], shapes.o_in[li], h, gel, gfix)
        dense["o"] += input_bytes(DENSE, shapes.o_in[li], h, gel, gfix)
        w, g = shapes.ffn_width[li], shapes.gated[li]
        parts["ffn"] += ffn_bytes(layer["ffn"], h, w, g, el, bits, group, gel, gfix)
        dense["ffn"] += ffn_bytes(DENSE, h, w, g, el, bits, group, gel, gfix)
    hel = shapes.head_elsize or el
    parts["lm_head"] = head_bytes(plan["lm_head"], h, shapes.vocab, hel, bits, group)
    dense["lm_head"] = head_bytes(DENSE, h, shapes.vocab, hel, bits, group)
    parts["other"] = dense["other"] = shapes.other_bytes
    total, dense_total = sum(parts.values()), sum(dense.values())
    return {"bytes": total, "dense_bytes": dense_total, "fraction": total / dense_total,
            "parts": parts, "dense_parts": dense,
            "ffn_fraction": parts["ffn"] / dense["ffn"],
            "lm_head_fraction": parts["lm_head"] / dense["lm_head"]}


# ----------------------------------------------------------------------------- rotation
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_block(hidden: int, cap: int = 64) -> int:
    """The largest power of two <= cap dividing `hidden` (1: no mixing possible)."""
    b = 1
    while b * 2 <= cap and hidden % (b * 2) == 0:
        b *= 2
    return b


class Rotation:
    """x -> blockdiag(H_b) (signs * x[perm]): orthogonal, O(hidden * b) to apply, no bytes."""

    def __init__(self, signs: torch.Tensor, perm: torch.Tensor, block: int):
        self.signs, self.perm, self.block = signs.float(), perm.long(), int(block)
        self.perm32 = self.perm.to(torch.int32)  # what the CPU kernel reads
        if self.block < 1 or len(perm) % self.block or self.block & (self.block - 1):
            raise BundleError(f"rotation block {block} does not tile hidden size {len(perm)}")
        self.h = hadamard(self.block)

    @classmethod
    def random(cls, hidden: int, generator: torch.Generator) -> "Rotation":
        signs = torch.randint(0, 2, (hidden,), generator=generator).float() * 2 - 1
        return cls(signs, torch.randperm(hidden, generator=generator).to(torch.int32),
                   hadamard_block(hidden))

    @classmethod
    def identity(cls, hidden: int) -> "Rotation":
        return cls(torch.ones(hidden), torch.arange(hidden, dtype=torch.int32), 1)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.rot.signs": self.signs.to(torch.int8),
                f"{prefix}.rot.perm": self.perm.to(torch.int32),
                f"{prefix}.rot.block": torch.tensor([self.block], dtype=torch.int32)}

    @classmethod
    def from_tensors(cls, t: dict, prefix: str) -> "Rotation":
        return cls(t[f"{prefix}.rot.signs"], t[f"{prefix}.rot.perm"],
                   int(t[f"{prefix}.rot.block"].reshape(-1)[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x[..., self.perm] * self.signs.to(x)
        shape = y.shape
        y = y.reshape(*shape[:-1], shape[-1] // self.block, self.block) @ self.h.to(x)
        return y.reshape(shape)


# ----------------------------------------------------------------------------- selection
def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of score along the last dimension."""
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def missed_share(score: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per position: share of sum(score^2) off the kept set (0 when nothing is missed)."""
    e = score.float().pow(2)
    total = e.sum(-1).clamp_min(1e-30)
    return (e * (~keep)).sum(-1) / total


class Sketch:
    """A b-bit rotated sketch of W [N, K]: est(x) ~= W x from rot(x) and dequantized codes."""

    ROWS = 4096  # rows dequantized and multiplied at a time (an lm_head has 49k-262k)

    def __init__(self, packed, scales, bits, group, k, rotation: Rotation,
                 keep_weight: bool = True):
        self.packed, self.scales, self.bits, self.group, self.k = packed, scales, bits, group, k
        self.rotation = rotation
        # keep_weight=False (a layer-streamed model): rows dequantized at each call, never
        # held; SmolLM2's sketches dequantized take 325 MB, as much as the weights they sketch.
        # Kept ones are made now, not inside a forward that torch.export may be tracing.
        self._weight = None
        self._weight = self.weight if keep_weight else None
        self._planes = None

    def _rows(self, i: int) -> torch.Tensor:
        """Dequantized rows [i, i + ROWS), float32 (elementwise: equal to a slice of the whole)."""
        if self._weight is not None:
            return self._weight[i:i + self.ROWS]
        return dequantize_codes(unpack_codes(self.packed[i:i + self.ROWS], self.bits, self.k),
                                self.scales[i:i + self.ROWS], self.bits, self.group)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized codes, float32 [N, K]."""
        if self._weight is not None:
            return self._weight
        n = self.packed.shape[0]
        w = torch.empty(n, self.k, dtype=torch.float32, device=self.packed.device)
        for i in range(0, n, self.ROWS):
            w[i:i + self.ROWS] = self._rows(i)
        return w

    @property
    def planes(self) -> torch.Tensor:
        """The codes in the int8 CPU kernel's layout (cpu_kernels.sketch_planes), made once."""
        if self._planes is None:
            self._planes = sketch_planes(self.packed, self.bits, self.k)
        return self._planes

    def __call__(self, x: torch.Tensor, packed_kernel: bool = False) -> torch.Tensor:
        """The estimate of W x from rot(x) rounded to int8 per group (what the CPU kernel
        multiplies; the rounding moves the estimate far less than the b-bit codes do).
        packed_kernel: read the packed codes (runtime.cpu_kernels), which is what the byte
        accounting charges, instead of the dequantized copy."""
        rot = self.rotation
        if packed_kernel:
            if x.numel() == x.shape[-1] and planes_fit(self.bits, self.group, self.k):
                xr = rotate(x, rot.perm32, rot.signs, rot.block)  # one row: int8 kernel
                return sketch_q8(self.planes, self.scales, xr, self.bits, self.group,
                                 self.k).view(*x.shape[:-1], -1)
            xr = quantize_x_reference(rot(x.float()), self.group).reshape(-1, x.shape[-1])
            y = sketch_gemv(self.packed, self.scales, xr, self.bits, self.group, x.shape[-1])
            return y.view(*x.shape[:-1], -1)
        if self._weight is not None and self._weight.device != x.device:
            self._weight = self._weight.to(x.device)
        xq = quantize_x_reference(rot(x.float()), self.group)
        n = self.packed.shape[0]
        if n <= self.ROWS:
            return xq @ self._rows(0).to(x.device).T
        # by blocks of rows, kept weights or not: the same products, so the same bits
        out = torch.empty(*xq.shape[:-1], n, dtype=xq.dtype, device=xq.device)
        for i in range(0, n, self.ROWS):
            out[..., i:i + self.ROWS] = xq @ self._rows(i).to(x.device).T
        return out


# ----------------------------------------------------------------------------- modules
class _Stats:
    """What the modules measured in the last forward: kept counts and missed shares per part."""

    def __init__(self):
        self.missed: dict[str, list[torch.Tensor]] = {}
        self.scalars: dict[str, float] = {}  # batch-1 kernels' figures: their running max

    def add(self, part: str, missed: torch.Tensor | float):
        if isinstance(missed, float):  # one position: no tensor per layer and part
            self.scalars[part] = max(missed, self.scalars.get(part, 0.0))
            return
        self.missed.setdefault(part, []).append(missed.detach().reshape(-1).float())

    def clear(self):
        self.missed.clear()
        self.scalars.clear()

    def worst(self) -> dict[str, torch.Tensor]:
        """Per part: per position, the worst (largest) missed share over the layers."""
        out = {k: torch.stack(v).amax(0) for k, v in self.missed.items() if v}
        for k, v in self.scalars.items():
            out[k] = torch.clamp(out[k], min=v) if k in out else torch.tensor([v])
        return out


_ALL = None  # "every index" for the CPU kernels
_DENSE = {"op": "dense"}  # what every part runs in mode "full"


def _decode_rows(x: torch.Tensor) -> bool:
    """A decode step's input, [B, 1, features]: what the CPU kernels run on."""
    return x.dim() == 3 and x.shape[1] == 1


class _InputSparse(nn.Module):
    """A linear layer whose input keeps the top `keep` of |x| (teal) or |x|*||W[:,i]|| (wina);
    q, k and v share one owner and hence one selection."""

    def __init__(self, linear: nn.Linear, owner, part: str, record: bool, slot: int = 0):
        super().__init__()
        # the original module is not registered: parameter names, state_dict keys and module
        # paths stay those of the model it replaces
        self.__dict__["linear"] = linear
        self.owner, self.part, self.record, self.slot = owner, part, record, slot
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        owner = self.owner
        mode = owner.rt.mode
        if mode == "dense":
            return self.linear(x)
        cfg = owner.cfg if mode == "pertoken" else _DENSE
        cpu = owner.rt.cpu
        on_kernels = cpu is not None and _decode_rows(x)
        if on_kernels and owner.last is not None and owner.last[0] is x:
            return owner.last[1][self.slot]  # k and v: computed with q in one pass
        if cfg["op"] == "dense":
            if not on_kernels:
                return self.linear(x)
            b = x.shape[0]  # a dense part of the plan: the same kernels, every input
            if self.part == "qkv":
                outs = [y.view(b, 1, -1) for y in cpu.qkv(owner.li, x.reshape(b, -1),
                                                           idx=_ALL)]
                owner.last = (x, outs)
                return outs[self.slot]
            return cpu.o(owner.li, x.reshape(b, -1), idx=_ALL).view(b, 1, -1)
        k = count(cfg.get("keep", 1.0), x.shape[-1])
        if on_kernels and x.shape[0] == 1:
            idx, missed = select_topk(x, k, owner.col_norms if cfg["op"] == "wina" else None)
            if self.record:
                owner.rt.stats.add(self.part, missed)
            flat = x.reshape(1, -1)
            if self.part == "qkv":
                outs = [y.view(1, 1, -1) for y in cpu.qkv(owner.li, flat, idx=idx)]
                owner.last = (x, outs)
                return outs[self.slot]
            return cpu.o(owner.li, flat, idx=idx).view(1, 1, -1)
        score = x.abs()
        if cfg["op"] == "wina":
            score = score * owner.col_norms.to(x)
        keep = topk_mask(score, k)
        if self.record:
            owner.rt.stats.add(self.part, missed_share(score, keep))
        if on_kernels:
            b = x.shape[0]
            flat, kf = x.reshape(b, -1), keep.reshape(b, -1)
            if self.part == "qkv":
                outs = [y.view(b, 1, -1) for y in cpu.qkv(owner.li, flat, kf)]
                owner.last = (x, outs)
                return outs[self.slot]
            return cpu.o(owner.li, flat, kf).view(b, 1, -1)
        return self.linear(x * keep)


class _InputOwner:
    def __init__(self, rt, cfg, weights: list[torch.Tensor], li: int):
        self.rt, self.cfg, self.li = rt, cfg, li
        self.col_norms = torch.cat([w.detach().float() for w in weights], 0).norm(dim=0)
        self.last = None  # (input, [q, k, v]) of the last fused CPU call


class _SparseFFN(nn.Module):
    """The FFN block under its plan config (see the module docstring)."""

    def __init__(self, mlp: nn.Module, rt, li: int, gate, up, down, act, cfg, sketches):
        super().__init__()
        for name, child in mlp.named_children():  # same module paths as the original FFN
            self.add_module(name, child)
        self.__dict__.update(mlp=mlp, gate=gate, up=up, down=down, act=act)  # unregistered
        self.rt, self.li, self.cfg = rt, li, cfg
        self.sketches = sketches  # (gate sketch | None, up sketch) or None
        self.silu = is_silu(act)  # the fused CPU kernel applies SiLU itself
        # gate and up sketches under one rotation (what passes.sketch writes): the batch-1
        # kernel rotates once for both
        self.shared_rotation = sketches is not None and sketches[0] is not None and all(
            torch.equal(getattr(sketches[0].rotation, a), getattr(sketches[1].rotation, a))
            for a in ("perm", "signs")) and sketches[0].rotation.block == sketches[1].rotation.block
        ws = [m.weight for m in (gate, up) if m is not None]
        self.in_norms = torch.cat([w.detach().float() for w in ws], 0).norm(dim=0)
        self.down_norms = down.weight.detach().float().norm(dim=0)
        self.fixed: torch.Tensor | None = None  # op "fixed": bool [width]

    def _teal_row(self, x, cpu, op: str, cfg: dict, k: int) -> torch.Tensor:
        """teal / wina at batch 1 on the selection kernels: the same supports as the torch
        branch below in 4-5 kernel calls instead of a dozen small torch ops, which cost more
        than the GEMVs at SmolLM2's sizes."""
        wina = op == "wina"
        flat = x.reshape(1, -1).float()
        kx = count(cfg.get("x_keep", 1.0), flat.shape[1])
        idx_x, missed_x = None, 0.0
        if kx < flat.shape[1]:
            idx_x, missed_x = select_topk(flat, kx, self.in_norms if wina else None)
        g, u = cpu.gate_up(self.li, flat, idx_x)
        h = self.act(g) * u
        idx_h, missed_h = select_topk(h, k, self.down_norms if wina else None)
        self.rt.stats.add("ffn", max(missed_x, missed_h))
        return cpu.down(self.li, h, idx=idx_h).view(1, 1, -1).to(x.dtype)

    def _inter(self, x):
        u = self.up(x)
        return self.act(self.gate(x)) * u if self.gate is not None else self.act(u)

    def forward(self, x):
        mode = self.rt.mode
        if mode == "dense":
            return self.mlp(x)
        cfg = self.cfg if mode == "pertoken" else _DENSE
        op = cfg["op"]
        if op == "dense":
            cpu = self.rt.cpu
            if cpu is not None and _decode_rows(x) and self.li in cpu.ffn:
                b, w = x.shape[0], cpu.ffn[self.li]
                if "g" in w and self.silu:
                    y = cpu.ffn_fused(self.li, x.reshape(b, -1), None)
                else:  # a teal/wina layer's input-major copies, every input and channel
                    flat = x.reshape(b, -1).float()
                    y = cpu.down(self.li, cpu.ffn_inputs(self.li, flat, None, self.act), None)
                return y.view(b, 1, -1).to(x.dtype)
            return self.mlp(x)
        width = self.down.weight.shape[1]
        k = count(cfg.get("keep", 1.0), width)
        cpu = self.rt.cpu if _decode_rows(x) and self.rt.cpu is not None and \
            self.li in self.rt.cpu.ffn else None
        if op in ("teal", "wina") and cpu is not None and x.shape[0] == 1:
            return self._teal_row(x, cpu, op, cfg, k)
        if op in ("teal", "wina"):
            score = x.abs() * (self.in_norms.to(x) if op == "wina" else 1)
            xk = topk_mask(score, count(cfg.get("x_keep", 1.0), x.shape[-1]))
            if cpu is not None:
                b = x.shape[0]
                h = cpu.ffn_inputs(self.li, x.reshape(b, -1), xk.reshape(b, -1), self.act)
            else:
                h = self._inter(x * xk)
            hs = h.abs() * (self.down_norms.to(h) if op == "wina" else 1)
            keep = topk_mask(hs, k)
            self.rt.stats.add("ffn", torch.maximum(missed_share(score, xk).reshape(-1),
                                                   missed_share(hs, keep).reshape(-1)))
            if cpu is not None:
                return cpu.down(self.li, h, keep).view(x.shape[0], 1, -1).to(x.dtype)
        elif op == "cats":
            first = self.gate if self.gate is not None else self.up
            a = self.act(first(x))
            keep = topk_mask(a.abs(), k)
            h = a * self.up(x) if self.gate is not None else a
            self.rt.stats.add("ffn", missed_share(a, keep))
        elif op == "sketch":
            sg, su = self.sketches
            packed = cpu is not None
            n_cand = min(width, int(round(cfg.get("cand", 1.0) * k)))
            if cpu is not None and x.shape[0] == 1 and n_cand == k and self.silu and \
                    self.shared_rotation:  # rotation, both sketches, top-k: 3 kernel calls
                rot = su.rotation
                idx, missed = sketch_select(sg, su, rotate(x, rot.perm32, rot.signs, rot.block),
                                            k)
                self.rt.stats.add("ffn", missed)
                return cpu.ffn_fused(self.li, x.reshape(1, -1), idx).view(1, 1, -1).to(x.dtype)
            ue = su(x, packed)
            est = self.act(sg(x, packed)) * ue if sg is not None else self.act(ue)
            cand = topk_mask(est.abs(), n_cand)
            if cpu is not None:
                b = x.shape[0]
                y, keep = cpu.ffn_channels(self.li, x.reshape(b, -1), cand.reshape(b, -1), k,
                                           self.act, self.silu)
                self.rt.stats.add("ffn", missed_share(est.reshape(b, -1), keep))
                return y.view(b, 1, -1).to(x.dtype)
            h = self._inter(x)
            keep = cand if n_cand == k else topk_mask(h.abs().masked_fill(~cand, -1.0), k)
            self.rt.stats.add("ffn", missed_share(est, keep))
        elif op == "oracle":
            h = self._inter(x)
            keep = topk_mask(h.abs(), k)
            self.rt.stats.add("ffn", missed_share(h, keep))
        else:  # fixed
            if self.fixed is None:
                raise UserInputError(f"layer {self.li}: op 'fixed' needs a channel set")
            h = self._inter(x)
            keep = self.fixed.to(h.device).expand_as(h)
            self.rt.stats.add("ffn", missed_share(h, keep))
        return self.down(h * keep)


class _SparseHead(nn.Module):
    """lm_head: exact logits on the sketch's top candidates, the sketch's estimate elsewhere."""

    def __init__(self, head: nn.Module, rt, sketch: Sketch | None):
        super().__init__()
        self.__dict__["head"] = head
        self.rt, self.sketch = rt, sketch
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)

    def forward(self, h):
        mode = self.rt.mode
        if mode == "dense":
            return self.head(h)
        cfg = self.rt.plan["lm_head"] if mode == "pertoken" else _DENSE
        if cfg["op"] == "dense":
            cpu = self.rt.cpu
            if cpu is not None and _decode_rows(h):
                b = h.shape[0]
                y = cpu.head_exact(h.reshape(b, -1), None)
                y = y if self.bias is None else y + self.bias.float()
                return y.view(b, 1, -1).to(h.dtype)
            return self.head(h)
        cpu = self.rt.cpu if _decode_rows(h) and self.rt.cpu is not None and \
            self.rt.cpu.head is not None else None
        est = self.sketch(h, cpu is not None)
        if self.bias is not None:
            est = est + self.bias.float()
        n = min(est.shape[-1], int(cfg["candidates"]))
        if cpu is not None and h.shape[0] == 1:
            out = est.reshape(-1)  # the sketch's own output: filled in place
            idx, missed = select_logits(out, n)
            self.rt.stats.add("lm_head", missed)
            exact = cpu.head_exact(h.reshape(1, -1), idx)[0]
            rows = idx.long()
            out[rows] = exact + self.bias.float()[rows] if self.bias is not None else exact
            return out.view(1, 1, -1).to(h.dtype)
        cand = topk_mask(est, n)
        p = torch.softmax(est.float(), -1)
        self.rt.stats.add("lm_head", (p * ~cand).sum(-1))
        if cpu is not None:
            b = h.shape[0]
            out = cpu.head_rows(h.reshape(b, -1), cand.reshape(b, -1), est.reshape(b, -1))
            if self.bias is not None:
                out = torch.where(cand.reshape(b, -1), out + self.bias.float(), out)
            return out.view(b, 1, -1).to(h.dtype)
        exact = self.head(h)
        return torch.where(cand, exact, est.to(exact.dtype))


def is_silu(act) -> bool:
    """Whether `act` computes SiLU (what the fused CPU FFN kernel applies): probed on a grid,
    since each library has its own SiLU class (transformers' SiLUActivation, nn.SiLU, ...)."""
    t = torch.linspace(-12.0, 12.0, 97)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(t), F.silu(t), rtol=1e-6, atol=1e-7))
    except Exception:  # an activation that does not take a plain tensor is not SiLU
        return False


class PerToken:
    """The per-token path installed on a Hugging Face causal LM (see the module docstring).

    mode "dense" leaves every swapped module computing what the original did (prefill, the
    dense baseline); mode "pertoken" applies the plan at every position of every forward;
    mode "full" runs every part at full support on the same kernels and decode loop (the
    CPU backend's batch > 1 steps, `step_mode`).
    """

    def __init__(self, model: nn.Module, smap: StructureMap, plan: dict,
                 sketches: dict[str, torch.Tensor] | None = None, elsize: int | None = None,
                 backend: str = "torch", weights: str | None = None,
                 ffn_perms: dict[int, torch.Tensor] | None = None):
        check_plan(plan, smap)
        self.model, self.smap, self.plan = model, smap, plan
        self.mode = "dense"
        self.cpu = None  # runtime.cpu_backend.CpuWeights: decode steps on the CPU kernels
        self.ffn_perms = ffn_perms  # the build's FFN channel permutation (int4 keeps blocks)
        self.stats = _Stats()
        self.shapes = Shapes.of(model, smap, elsize)
        if weights not in (None, "int8", "int4"):
            raise UserInputError(f"per-token weights must be int8, int4 or the storage dtype, "
                                 f"got {weights!r}")
        if weights is not None and backend != "cpu":
            raise UserInputError(f"{weights} weights run on the CPU backend only (--backend cpu)")
        # (parent's child dict, name, original, ours): swapping is one dict store per module,
        # since attach/detach run around every decode step
        self._swaps: list[tuple[dict, str, nn.Module, nn.Module]] = []
        self.attached = False
        self.parts: list[dict] = []  # per layer: "qkv" / "o" owners and the "ffn" module
        self._install(sketches or {})
        if backend == "cpu":
            from .cpu_backend import CpuWeights

            dtype = {4: torch.float32, 2: torch.bfloat16}.get(self.shapes.elsize, torch.float32)
            if weights == "int8":
                dtype, self.shapes = torch.int8, self.shapes.int8()
            elif weights == "int4":
                dtype, self.shapes = "int4", self.shapes.int4()
            self.cpu = CpuWeights(model, smap, plan, dtype, ffn_perms)
        elif backend != "torch":
            raise UserInputError(f"per-token backend must be torch or cpu, got {backend!r}")

    # ------------------------------------------------------------------ install / remove
    def _swap(self, path: str, new: nn.Module):
        parent, _, name = path.rpartition(".")
        children = (self.model.get_submodule(parent) if parent else self.model)._modules
        self._swaps.append((children, name, children[name], new))
        children[name] = new
        self.attached = True

    def _sketch(self, sketches, prefix: str, k: int):
        bits, group = self.plan["sketch"]["bits"], self.plan["sketch"]["group"]
        try:
            rot = Rotation.from_tensors(sketches, prefix)
            packed, scales = sketches[f"{prefix}.packed"], sketches[f"{prefix}.scales"]
        except KeyError as e:
            raise BundleError(f"per-token plan needs sketch tensor {e.args[0]}, missing") from None
        n = packed.shape[0]
        if packed.shape != (n, math.ceil(k / (32 // bits))) or \
                tuple(scales.shape) != (n, math.ceil(k / group)):
            raise BundleError(f"sketch {prefix}: shapes {tuple(packed.shape)} / "
                              f"{tuple(scales.shape)} do not fit {bits} bits, group {group}, "
                              f"{k} inputs")
        return Sketch(packed, scales, bits, group, k, rot,
                      keep_weight=stream_of(self.model) is None)

    def _install(self, sketches):
        model = self.model
        for li, layer in enumerate(self.smap.layers):
            with resident(model, li):  # a streamed layer: its weights, for the norms
                self._install_layer(sketches, li, layer)
        head = output_head(model)
        head_sketch = None
        if self.plan["lm_head"]["op"] == "sketch" or "lm_head.packed" in sketches:
            head_sketch = self._sketch(sketches, "lm_head", head.weight.shape[1])
        path = next(n for n, m in model.named_modules() if m is head)
        self._swap(path, _SparseHead(head, self, head_sketch))

    def _install_layer(self, sketches, li: int, layer):
        model = self.model
        a, f = layer.attention, layer.ffn
        cfg = self.plan["layers"][li]
        if a.fused_qkv or a.weight_layout != "out_in" or f.weight_layout != "out_in":
            raise UserInputError(f"layer {li}: the per-token path needs separate q/k/v "
                                 f"nn.Linear projections ([out, in] weights)")
        q, k, v, o = (model.get_submodule(p) for p in (a.q, a.k, a.v, a.o))
        qkv_owner = _InputOwner(self, cfg["qkv"], [q.weight, k.weight, v.weight], li)
        for slot, (p, m) in enumerate(((a.q, q), (a.k, k), (a.v, v))):
            self._swap(p, _InputSparse(m, qkv_owner, "qkv", slot == 0, slot))
        self._swap(a.o, _InputSparse(o, _InputOwner(self, cfg["o"], [o.weight], li), "o", True))
        mlp = model.get_submodule(f.module)
        gate = model.get_submodule(f.gate) if f.gate else None
        up, down = model.get_submodule(f.up), model.get_submodule(f.down)
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
        if act is None:
            raise UserInputError(f"layer {li}: FFN module {f.module} has no act_fn")
        sk = None
        if cfg["ffn"]["op"] == "sketch" or f"layers.{li}.up.packed" in sketches:
            h = self.smap.hidden_size
            sk = (self._sketch(sketches, f"layers.{li}.gate", h) if gate is not None else None,
                  self._sketch(sketches, f"layers.{li}.up", h))
        ffn = _SparseFFN(mlp, self, li, gate, up, down, act, cfg["ffn"], sk)
        self.parts.append({"qkv": qkv_owner, "o": self._owner_of(a.o), "ffn": ffn})
        self._swap(f.module, ffn)

    def _owner_of(self, path: str):
        return self.model.get_submodule(path).owner

    def configure(self, plan: dict):
        """Switch to another plan over the same sketches (allocation search, benchmarks)."""
        check_plan(plan, self.smap)
        for li, parts in enumerate(self.parts):
            for key in ("qkv", "o", "ffn"):
                cfg = plan["layers"][li][key]
                if key == "ffn" and cfg["op"] == "sketch" and parts["ffn"].sketches is None:
                    raise UserInputError(f"layer {li}: no FFN sketch for op 'sketch'")
                parts[key].cfg = cfg
        if plan["lm_head"]["op"] == "sketch" and self.head.sketch is None:
            raise UserInputError("no lm_head sketch for op 'sketch'")
        self.plan = plan
        if self.cpu is not None:  # the kernels' weight layouts follow the plan's operators
            from .cpu_backend import CpuWeights

            self.cpu = CpuWeights(self.model, self.smap, plan, self.cpu.dtype, self.ffn_perms)

    @property
    def head(self) -> "_SparseHead":
        return next(ours for *_, ours in self._swaps if isinstance(ours, _SparseHead))

    def detach(self):
        """Put the original modules back (the model is exactly the dense model again)."""
        for children, name, original, _ in reversed(self._swaps):
            children[name] = original
        self.attached = False

    remove = detach

    def attach(self):
        """Swap this path's modules in again (after detach)."""
        if not self.attached:
            for children, name, _, ours in self._swaps:
                children[name] = ours
            self.attached = True

    def step_mode(self, rows: int, mode: str = "pertoken") -> str:
        """The mode a decode step of `rows` rows runs in. On the CPU backend a step of several
        rows reads every weight ("full"): the union of their supports keeps 96% of SmolLM2's
        FFN channels and 99% of its projection inputs at 4 rows and all of them at 16 (the
        demo plan, README), so selecting would save no reads, only cost time (slower than
        dense kernels at batch 4 and 16, results/bench_pertoken_smollm2_cpu*.json)."""
        return "full" if mode == "pertoken" and rows > 1 and self.cpu is not None else mode

    # ------------------------------------------------------------------ accounting
    def bytes(self, rows: int = 1) -> dict:
        """Weight bytes one decode step of `rows` rows reads (once, for all its rows): the
        plan's, or every weight where `step_mode` says so."""
        full = self.step_mode(rows) == "full"
        return plan_bytes(dense_plan(self.smap) if full else self.plan, self.shapes)

    def missed(self) -> dict[str, torch.Tensor]:
        """Per part (qkv, o, ffn, lm_head), per position of the last forward: the worst layer's
        estimate of what the support missed."""
        return self.stats.worst()


@dataclass
class Calibrated:
    """What `passes.allocate` hands to the bundle: the plan, sketches and its report."""

    plan: dict
    sketches: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)
