"""
Per-token sparse decode kernels
===============================

At each decode step cheap measurements pick, per token, which inputs (columns) or outputs (rows)
of a weight matrix it needs; these kernels then read only those weights. The kept set changes
every token, so it is always a RUNTIME int32 index list and its length is a runtime argument
that Triton does not specialise on: a new support never triggers a recompile (the existing
``codegen.kernels.ffn_decode`` bakes the kept count in as a constexpr, fine for a class path
but one compile per distinct count per token here, hence the separate ``ffn_sparse`` below).

Operators (same semantics and argument order as the CPU backend, runtime/cpu_kernels.py). Every
one takes x [B, K] with 1 <= B <= 16 rows, in float32 or in the weight's dtype, accumulates in
fp32 and returns a NEW float32 tensor. As on the CPU: idx is int32 (int64 is cast) or None for
all; gather_gemv / rows_gemv / dense_gemv also take int8 weights with ``scale`` (float32, one
per output of the full matrix: [N]), which float weights may take too; an empty idx gives zeros
(gather / ffn) or a [B, 0] result (rows). On top of the CPU backend, x may be fp16 / bf16.

* ``gather_gemv(wt, x, idx)``   y [B, N] = x[:, idx] @ wt[idx, :]. wt [K, N] is stored
  input-major (TEAL's column layout: one kept input owns one contiguous row of N weights).
  Programs tile N; each loops over its share of the kept inputs in BLOCK_K chunks, loading a
  [BLOCK_K, BLOCK_N] tile of gathered rows; the kept list is split over a second grid axis
  (split-K) whose partial sums meet in an fp32 buffer through atomic adds, so a short kept list
  or a narrow N still fills the GPU.
* ``rows_gemv(w, x, idx)``      y [B, m] = x @ w[idx].T with w [N, K] row-major: programs own
  BLOCK_M kept rows (each row contiguous), optionally split over K with atomics.
* ``sketch_gemv(packed, scales, x, bits, group, k)``   y [B, N] = x @ dequant(W).T straight from
  the packed words of runtime/pack.py (b = 1..4 bits, 32 // b codes per int32 word, low bits
  first; w = scale[n, k // group] * (code - (2^b - 1) / 2)). A tile loads [BLOCK_N, BLOCK_W]
  words once; codes come out of registers with shifts and masks. One row of x: the 32 // b
  lanes of a word are peeled off one at a time (unrolled), each times its input, and the scale
  is applied per word. Several rows: words expand to [BLOCK_N, BLOCK_W, LANES] codes (LANES =
  next power of two >= 32 // b; for 3 bits lanes 10..15 are dead and masked), are dequantised,
  flattened and fed to tl.dot. Scales: one per word when group % (32 // b) == 0; otherwise, for
  group >= 32 // b (3 bits with group 32/64/128), a word straddles at most two groups and each
  lane picks one of the word's two scales; smaller groups load one scale per code (correct,
  slower).
* ``ffn_sparse(wg, wu, wd_t, x, idx)``   y [B, H] = sum_{j in idx} silu(wg[j].x) (wu[j].x) wd_t[j]
  (SwiGLU over kept channels, wd_t = W_down^T [I, H], so channel j owns row j of all three).
  One program per BLOCK_J kept channels: gate/up dot products over H, silu in registers, then
  its slice of the down projection added into y with atomics.

Compute paths. One row (B = 1): fp32 multiply-adds into an elementwise register accumulator
in the weight tile's own layout, reduced once after the loop (no tensor cores, no padding, x and
weights at full precision). B >= 2: ``tl.dot`` with the rows padded to 16; for fp16/bf16
weights x (and the FFN's intermediate, and sketch_gemv's dequantised weights for half x) are
rounded to that half dtype for the tensor cores; fp32 operands use ``input_precision="ieee"``
(exact fp32). Either way the accumulator is fp32.

GPU status: every variant the wrappers launch lowers to PTX for sm_90 (checked without a GPU by
tests/test_pertoken_kernels.py); none has been run or timed on a GPU yet, so block sizes and
the split heuristic (about 2 programs per SM, and each split must read >= 8x the bytes it adds
atomically) are first guesses for `python benchmarks/kernels.py --suite pertoken` to tune.

Indices must lie in range; that is checked for CPU tensors only (checking a CUDA tensor would
synchronise every step). An empty index list returns zeros ([B, 0] for rows_gemv) without a
launch. Block sizes / split are picked per device by the wrappers and can be overridden.

``*_reference`` functions are the plain-torch semantics (float32 math, or float64 when given
float64 tensors) the tests compare against; sketch_gemv's is runtime/pack.py's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cscompile.runtime.pack import sketch_gemv_reference, values_per_word

__all__ = [
    "gather_gemv", "rows_gemv", "dense_gemv", "sketch_gemv", "ffn_sparse",
    "gather_gemv_reference", "rows_gemv_reference", "sketch_gemv_reference",
    "dense_gemv_reference", "ffn_sparse_reference", "MAX_ROWS",
]

MAX_ROWS = 16  # decode rows per call
DOT_MIN_ROWS = 2  # from this many rows on, tl.dot (rows padded to 16); one row: fp32 FMAs


# --------------------------------------------------------------------------- shared pieces


@triton.jit
def _dot(acc, xv, w, EXACT: tl.constexpr, W_INT8: tl.constexpr):
    """acc [BB, BN] (fp32) + xv [BB, BK] @ w [BK, BN] with tl.dot."""
    if EXACT:  # fp32 operands (or int8 weights with fp32 x): exact fp32 products (no TF32)
        acc = tl.dot(xv.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif W_INT8:  # int8 weights, half x: the codes are exact in fp16 / bf16
        acc = tl.dot(xv, w.to(xv.dtype), acc)
    else:  # half operands on tensor cores
        acc = tl.dot(xv.to(w.dtype), w, acc)
    return acc


@triton.jit
def _store_rows(y_ptr, acc, offs_b, offs_n, b_mask, n_mask, ld, ATOMIC: tl.constexpr):
    """Write (or atomically add) acc [BB, BN] into fp32 y[b, n] with row stride ld."""
    y_offs = offs_b[:, None].to(tl.int64) * ld + offs_n[None, :]
    y_mask = b_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask, sem="relaxed")
    else:
        tl.store(y_ptr + y_offs, acc, mask=y_mask)


# --------------------------------------------------------------------------- gather GEMV


@triton.jit(do_not_specialize=["n_kept", "k_per_split"])
def _gather_gemv_kernel(
    wt_ptr, x_ptr, idx_ptr, scale_ptr, y_ptr,  # wt [K, N], x [B, K], idx int32, scale [N]
    B, N, K, n_kept, k_per_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, EXACT: tl.constexpr, W_INT8: tl.constexpr, HAS_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Program (pid_n, pid_s): outputs pid_n*BLOCK_N.., kept entries pid_s*k_per_split.. ."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, n_kept)
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:  # one row: elementwise fp32 partial products, reduced once after the loop
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        kk = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
        w = tl.load(wt_ptr + kk[:, None] * N + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if USE_DOT:
            xv = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * K + kk[None, :],
                         mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _dot(acc, xv, w, EXACT, W_INT8)
        else:
            xv = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            acc2 += xv[:, None] * w.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    if HAS_SCALE:  # per-output scale (int8 weights): linear, so partial sums may take it
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    _store_rows(y_ptr, acc, offs_b, offs_n, b_mask, n_mask, N, ATOMIC)


# --------------------------------------------------------------------------- rows GEMV


@triton.jit(do_not_specialize=["n_kept"])
def _rows_gemv_kernel(
    w_ptr, x_ptr, idx_ptr, scale_ptr, y_ptr,  # w [N, K], x [B, K], idx int32, scale [N]
    B, K, n_kept, k_per_split,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, EXACT: tl.constexpr, W_INT8: tl.constexpr, HAS_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Program (pid_m, pid_s): kept rows pid_m*BLOCK_M.., inputs pid_s*k_per_split.. ."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_kept
    rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    else:  # one row: elementwise fp32 partial products, reduced once after the loop
        acc2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            xv = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * K + offs_k[None, :],
                         mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _dot(acc, xv, tl.trans(w), EXACT, W_INT8)
        else:
            # x broadcast to the weight tile's shape: loaded in w's own layout (L1 hits), so
            # no per-iteration layout conversion through shared memory
            xv = tl.load(x_ptr + (offs_k[None, :] + 0 * offs_m[:, None]),
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]
    if HAS_SCALE:  # the kept rows' own scales
        acc *= tl.load(scale_ptr + rows, mask=m_mask, other=0.0)[None, :]
    _store_rows(y_ptr, acc, offs_b, offs_m, b_mask, m_mask, n_kept, ATOMIC)


# --------------------------------------------------------------------------- sketch GEMV


@triton.jit
def _sketch_gemv_kernel(
    packed_ptr, scales_ptr, x_ptr, y_ptr,  # packed int32 [N, N_WORDS], scales [N, N_GROUPS]
    B, N, K, N_WORDS, N_GROUPS, words_per_split,
    BITS: tl.constexpr, VPW: tl.constexpr, LANES: tl.constexpr, GROUP: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0: one scale per word, 1: at most two per word, 2: per code
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    USE_DOT: tl.constexpr, EXACT: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Program (pid_n, pid_s): rows pid_n*BLOCK_N.., words pid_s*words_per_split.. .

    One row of x (USE_DOT False): every tensor is a [BLOCK_N, BLOCK_W] tile of words; the
    VPW codes of a word are peeled off one lane at a time (unrolled), each multiplied by its
    input, and the group scale is applied per word. Several rows (USE_DOT): the words are
    expanded to [BLOCK_N, BLOCK_W, LANES] codes, dequantised, flattened to [BLOCK_N, BK] and
    multiplied with tl.dot.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = ((1 << BITS) - 1) * 0.5

    w_start = pid_s * words_per_split
    w_end = tl.minimum(w_start + words_per_split, N_WORDS)
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(w_start, w_end, BLOCK_W):
        # per-word quantities are [1, BLOCK_W] tiles, so that they share the words' layout
        ow = w0 + tl.arange(0, BLOCK_W)[None, :]
        w_ok = ow < w_end
        nw_mask = n_mask[:, None] & w_ok
        words = tl.load(packed_ptr + rows[:, None] * N_WORDS + ow, mask=nw_mask,
                        other=0)  # [BN, BW] int32, each word read once
        first = ow * VPW  # first input of each word
        g_lo = first // GROUP
        if SCALE_MODE != 2:
            s_lo = tl.load(scales_ptr + rows[:, None] * N_GROUPS + g_lo, mask=nw_mask,
                           other=0.0).to(tl.float32)
        if SCALE_MODE == 1:  # group >= VPW: a word straddles at most two groups
            g_hi = tl.minimum((first + VPW - 1) // GROUP, N_GROUPS - 1)
            s_hi = tl.load(scales_ptr + rows[:, None] * N_GROUPS + g_hi, mask=nw_mask,
                           other=0.0).to(tl.float32)
        if USE_DOT:
            lane = tl.arange(0, LANES)[None, None, :]
            lane_ok = lane < VPW
            shifts = tl.where(lane_ok, lane * BITS, 0)  # dead lanes: no shift >= 32
            codes = (words[:, :, None] >> shifts) & CODE_MASK  # [BN, BW, LANES]
            k3 = first[:, :, None] + lane  # [1, BW, LANES] input of each code
            valid3 = w_ok[:, :, None] & lane_ok & (k3 < K)
            if SCALE_MODE == 0:  # group % VPW == 0: a word lies in one group
                s3 = s_lo[:, :, None]
            elif SCALE_MODE == 1:
                s3 = tl.where((k3 // GROUP) > g_lo[:, :, None], s_hi[:, :, None],
                              s_lo[:, :, None])
            else:  # tiny groups: one scale per code
                g3 = tl.minimum(k3 // GROUP, N_GROUPS - 1)
                s3 = tl.load(scales_ptr + rows[:, None, None] * N_GROUPS + g3,
                             mask=n_mask[:, None, None] & valid3, other=0.0).to(tl.float32)
            wq = tl.where(valid3, (codes.to(tl.float32) - HALF) * s3, 0.0)
            w2 = tl.reshape(wq, (BLOCK_N, BLOCK_W * LANES))  # [BN, BK], BK = BLOCK_W * LANES
            # the same flattening for x: element kk <-> (word kk // LANES, lane kk % LANES)
            kk = tl.arange(0, BLOCK_W * LANES)
            kk_word = w0 + kk // LANES
            kk_lane = kk % LANES
            xk = kk_word * VPW + kk_lane
            x_ok = (kk_word < w_end) & (kk_lane < VPW) & (xk < K)
            xv = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * K + xk[None, :],
                         mask=b_mask[:, None] & x_ok[None, :], other=0.0)
            if EXACT:
                acc = _dot(acc, xv, tl.trans(w2), EXACT, False)
            else:  # half x: dequantised weights rounded to x's dtype for the tensor cores
                acc = _dot(acc, xv, tl.trans(w2).to(x_ptr.dtype.element_ty), EXACT, False)
        else:
            t_lo = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            if SCALE_MODE == 1:
                t_hi = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            for lane in tl.static_range(VPW):
                kx = first + lane  # [1, BW]
                xl = tl.load(x_ptr + kx, mask=w_ok & (kx < K), other=0.0).to(tl.float32)
                c = ((words >> (lane * BITS)) & CODE_MASK).to(tl.float32) - HALF
                cx = c * xl
                if SCALE_MODE == 0:
                    t_lo += cx
                elif SCALE_MODE == 1:
                    hi = (kx // GROUP) > g_lo
                    t_lo += tl.where(hi, 0.0, cx)
                    t_hi += tl.where(hi, cx, 0.0)
                else:
                    g = tl.minimum(kx // GROUP, N_GROUPS - 1)
                    s = tl.load(scales_ptr + rows[:, None] * N_GROUPS + g,
                                mask=nw_mask & (kx < K), other=0.0).to(tl.float32)
                    t_lo += s * cx
            if SCALE_MODE == 0:
                acc2 += s_lo * t_lo
            elif SCALE_MODE == 1:
                acc2 += s_lo * t_lo + s_hi * t_hi
            else:
                acc2 += t_lo
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]
    _store_rows(y_ptr, acc, offs_b, offs_n, b_mask, n_mask, N, ATOMIC)


# --------------------------------------------------------------------------- sparse SwiGLU FFN


@triton.jit(do_not_specialize=["n_kept"])
def _ffn_sparse_kernel(
    x_ptr, wg_ptr, wu_ptr, wd_ptr, idx_ptr, y_ptr,  # w* [I, H], x [B, H], y fp32 [B, H] (zeroed)
    B, H, n_kept,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
    USE_DOT: tl.constexpr, EXACT: tl.constexpr,
):
    """One program: BLOCK_J kept channels. y += silu(x wg^T) * (x wu^T) @ wd_t[channels]."""
    pid = tl.program_id(0)
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < n_kept
    rows = tl.load(idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    x_rows = offs_b[:, None].to(tl.int64) * H

    if USE_DOT:
        acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    else:  # one row: elementwise fp32 partial products, reduced once after the loop
        acc_g2 = tl.zeros((BLOCK_J, BLOCK_H), dtype=tl.float32)
        acc_u2 = tl.zeros((BLOCK_J, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        w_offs = rows[:, None] * H + offs_h[None, :]
        w_mask = j_mask[:, None] & h_mask[None, :]
        wg = tl.load(wg_ptr + w_offs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + w_offs, mask=w_mask, other=0.0)
        if USE_DOT:
            xv = tl.load(x_ptr + x_rows + offs_h[None, :],
                         mask=b_mask[:, None] & h_mask[None, :], other=0.0)
            acc_g = _dot(acc_g, xv, tl.trans(wg), EXACT, False)
            acc_u = _dot(acc_u, xv, tl.trans(wu), EXACT, False)
        else:
            xv = tl.load(x_ptr + (offs_h[None, :] + 0 * offs_j[:, None]), mask=w_mask,
                         other=0.0).to(tl.float32)  # in the weights' layout, see rows_gemv
            acc_g2 += wg.to(tl.float32) * xv
            acc_u2 += wu.to(tl.float32) * xv
    # silu(g) = g / (1 + exp(-g)) (tl.exp: no libdevice); masked channels give exactly 0
    if USE_DOT:
        inter = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # [BB, BJ]
        inter = tl.where(j_mask[None, :], inter, 0.0)
    else:
        g1 = tl.sum(acc_g2, axis=1)
        inter1 = g1 / (1.0 + tl.exp(-g1)) * tl.sum(acc_u2, axis=1)  # [BJ]
        inter1 = tl.where(j_mask, inter1, 0.0)

    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        wd = tl.load(wd_ptr + rows[:, None] * H + offs_h[None, :],
                     mask=j_mask[:, None] & h_mask[None, :], other=0.0)
        if USE_DOT:
            part = _dot(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), inter, wd, EXACT, False)
            _store_rows(y_ptr, part, offs_b, offs_h, b_mask, h_mask, H, True)
        else:  # [1, BLOCK_H] kept in wd's layout: no layout change before the atomics
            part = tl.sum(inter1[:, None] * wd.to(tl.float32), axis=0, keep_dims=True)
            tl.atomic_add(y_ptr + offs_h[None, :], part, mask=h_mask[None, :], sem="relaxed")


# --------------------------------------------------------------------------- wrappers

_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(1, int(n))))
    return p if hi is None else min(p, hi)


HALF_DTYPES = (torch.float16, torch.bfloat16)
_ALL_IDS: dict = {}


def _check_x(x, k, w_dtype, device, name="x"):
    if not torch.is_tensor(x) or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS \
            or x.shape[1] != k:
        raise ValueError(f"{name} must be [B, {k}] with 1 <= B <= {MAX_ROWS}, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the weights on {device}")
    allowed = (torch.float32,) + (HALF_DTYPES if w_dtype == torch.int8 else (w_dtype,))
    if x.dtype not in allowed:
        raise ValueError(f"{name} is {x.dtype}; expected float32 or the weights' {w_dtype}")
    return x.contiguous()


def _check_weight(name, w, device=None, int8_ok=False):
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D tensor, got "
                         f"{tuple(w.shape) if torch.is_tensor(w) else type(w).__name__}")
    allowed = (torch.float32,) + HALF_DTYPES + ((torch.int8,) if int8_ok else ())
    if w.dtype not in allowed:
        raise ValueError(f"{name} is {w.dtype}; expected one of "
                         f"{', '.join(str(d).replace('torch.', '') for d in allowed)}")
    if device is not None and w.device != device:
        raise ValueError(f"{name} is on {w.device}, expected {device}")


def _check_idx(idx, n, device, what):
    """int32 contiguous kept ids on `device`; None = all n (a cached arange); int64 is cast."""
    if idx is None:
        key = (str(device), n)
        if key not in _ALL_IDS:
            _ALL_IDS[key] = torch.arange(n, device=device, dtype=torch.int32)
        return _ALL_IDS[key]
    if not torch.is_tensor(idx) or idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise ValueError(f"idx must be a 1-D int32 (or int64) tensor of kept {what}, got "
                         f"{(idx.dtype, tuple(idx.shape)) if torch.is_tensor(idx) else idx!r}")
    if idx.device != device:
        raise ValueError(f"idx is on {idx.device}, the weights on {device}")
    if device.type == "cpu" and idx.numel():  # a CUDA check would synchronise every step
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"idx holds {what} in [{lo}, {hi}], outside 0..{n - 1}")
    return idx.to(torch.int32).contiguous()


def _check_scale(w, scale, n, name):
    """float32 [n] per-output scale; int8 weights need one."""
    if scale is None:
        if w.dtype == torch.int8:
            raise ValueError(f"int8 {name} needs scale (float32 [{n}], one per output)")
        return None
    if not torch.is_tensor(scale) or scale.dtype != torch.float32 or scale.dim() != 1 \
            or scale.numel() != n or scale.device != w.device:
        raise ValueError(f"scale must be a float32 [{n}] tensor on {w.device}, got "
                         f"{(scale.dtype, tuple(scale.shape)) if torch.is_tensor(scale) else scale!r}")
    return scale.contiguous()


def _exact(w_dtype, x_dtype):
    """(EXACT, W_INT8): fp32 dot products unless a half dtype is there for the tensor cores."""
    if w_dtype == torch.int8:
        return x_dtype == torch.float32, True
    return w_dtype == torch.float32, False


def _paths(x, w_dtype):
    """(BLOCK_B, USE_DOT, EXACT, W_INT8) for x's row count and the dtypes."""
    b = x.shape[0]
    use_dot = b >= DOT_MIN_ROWS
    return ((_pow2(b, lo=16) if use_dot else 1), use_dot) + _exact(w_dtype, x.dtype)


def _split_for(base_programs, n_chunks, atomic_ok, device, split):
    """Programs along the reduction axis: enough to fill the GPU, never a useless one."""
    if split is None:
        if device.type != "cuda":
            return 1
        target = 2 * _sm_count(device)
        split = min(n_chunks, atomic_ok, triton.cdiv(target, max(1, base_programs)))
    return max(1, min(int(split), n_chunks))


def _num_warps(device, num_warps):
    return 4 if num_warps is None else int(num_warps)


def gather_gemv(wt, x, idx, scale=None, *, block_n=None, block_k=None, split=None,
                num_warps=None):
    """x[:, idx] @ wt[idx, :] (* scale) -> float32 [B, N].

    wt [K, N] input-major weights (float32 / float16 / bfloat16, or int8 with `scale`),
    contiguous; x [B, K] float32 or wt's dtype (any half dtype for int8), 1 <= B <= 16; idx int32
    (or int64) [m] kept inputs (0 <= idx < K, any order, m may be 0) or None for all K; scale
    float32 [N] per output. split: programs along the kept list (atomic fp32 partial sums);
    None picks one.
    """
    _check_weight("wt", wt, int8_ok=True)
    k, n = wt.shape
    x = _check_x(x, k, wt.dtype, wt.device)
    idx = _check_idx(idx, k, wt.device, "inputs")
    scale = _check_scale(wt, scale, n, "wt")
    b, m = x.shape[0], idx.numel()
    if m == 0 or n == 0:
        return torch.zeros(b, n, device=wt.device, dtype=torch.float32)
    block_b, use_dot, exact, w_int8 = _paths(x, wt.dtype)
    cuda = wt.device.type == "cuda"
    if block_n is None:
        block_n = _pow2(n, lo=16, hi=128 if cuda else 256)
    if block_k is None:
        block_k = 32 if cuda else _pow2(m, lo=16, hi=128)
    n_blocks = triton.cdiv(n, block_n)
    chunks = triton.cdiv(m, block_k)
    # split only while each split still reads >= 8x the bytes it adds atomically
    atomic_ok = max(1, (m * wt.element_size()) // (8 * 4 * b))
    split = _split_for(n_blocks, chunks, atomic_ok, wt.device, split)
    k_per_split = triton.cdiv(chunks, split) * block_k
    split = triton.cdiv(m, k_per_split)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(b, n, device=wt.device, dtype=torch.float32)
    _gather_gemv_kernel[(n_blocks, split)](
        wt, x, idx, scale if scale is not None else y, y, b, n, k, m, k_per_split,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, EXACT=exact,
        W_INT8=w_int8, HAS_SCALE=scale is not None, ATOMIC=atomic,
        num_warps=_num_warps(wt.device, num_warps),
    )
    return y


def rows_gemv(w, x, idx, scale=None, *, block_m=None, block_k=None, split=None, num_warps=None):
    """x @ w[idx].T (* scale[idx]) -> float32 [B, m] (column i is kept row idx[i]).

    w [N, K] row-major (nn.Linear) weights (float32 / float16 / bfloat16, or int8 with
    `scale`); x [B, K] float32 or w's dtype (any half dtype for int8), 1 <= B <= 16; idx int32
    (or int64) [m] kept output rows (0 <= idx < N, any order, m may be 0) or None for all N;
    scale float32 [N] of the full matrix. split: programs along K (atomic fp32 partial sums);
    None picks one.
    """
    _check_weight("w", w, int8_ok=True)
    n, k = w.shape
    x = _check_x(x, k, w.dtype, w.device)
    idx = _check_idx(idx, n, w.device, "rows")
    scale = _check_scale(w, scale, n, "w")
    b, m = x.shape[0], idx.numel()
    if m == 0 or k == 0:
        return torch.zeros(b, m, device=w.device, dtype=torch.float32)
    block_b, use_dot, exact, w_int8 = _paths(x, w.dtype)
    cuda = w.device.type == "cuda"
    if block_m is None:
        block_m = 16 if cuda or use_dot else _pow2(m, lo=16, hi=64)
    if block_k is None:
        block_k = (64 if use_dot else 128) if cuda else _pow2(k, lo=16, hi=256)
    m_blocks = triton.cdiv(m, block_m)
    chunks = triton.cdiv(k, block_k)
    atomic_ok = max(1, (k * w.element_size()) // (8 * 4 * b))
    split = _split_for(m_blocks, chunks, atomic_ok, w.device, split)
    k_per_split = triton.cdiv(chunks, split) * block_k
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(b, m, device=w.device, dtype=torch.float32)
    _rows_gemv_kernel[(m_blocks, split)](
        w, x, idx, scale if scale is not None else y, y, b, k, m, k_per_split,
        BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_K=block_k, USE_DOT=use_dot, EXACT=exact,
        W_INT8=w_int8, HAS_SCALE=scale is not None, ATOMIC=atomic,
        num_warps=_num_warps(w.device, num_warps),
    )
    return y


def dense_gemv(w, x, scale=None, **blocks):
    """x @ w.T (* scale) -> float32 [B, N]: rows_gemv over every row (the CPU backend's twin)."""
    return rows_gemv(w, x, None, scale, **blocks)


def sketch_gemv(packed, scales, x, bits, group, k, *, block_n=None, block_inputs=None,
                split=None, num_warps=None):
    """x @ dequant(packed, scales).T -> float32 [B, N], decoding the packed words in registers.

    packed int32 [N, ceil(k / (32 // bits))] and scales (fp16, or any float) [N, ceil(k / group)]
    as runtime/pack.py writes them; x [B, k] float32 or float16 / bfloat16, 1 <= B <= 16.
    block_inputs: codes per tile along k (rounded to whole words); split: programs along k.
    """
    vpw = values_per_word(bits)
    group, k = int(group), int(k)
    if group < 1 or k < 1:
        raise ValueError(f"group and k must be positive, got group={group}, k={k}")
    if not torch.is_tensor(packed) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError("packed must be a 2-D int32 tensor of code words")
    n, n_words = packed.shape
    n_groups = math.ceil(k / group)
    if n_words != math.ceil(k / vpw):
        raise ValueError(f"packed has {n_words} words per row; {bits}-bit codes of k={k} inputs "
                         f"need {math.ceil(k / vpw)}")
    if not torch.is_tensor(scales) or tuple(scales.shape) != (n, n_groups) \
            or not scales.is_floating_point():
        raise ValueError(f"scales must be a float [{n}, {n_groups}] tensor (group {group}), got "
                         f"{tuple(scales.shape) if torch.is_tensor(scales) else scales!r}")
    if scales.device != packed.device:
        raise ValueError(f"scales is on {scales.device}, packed on {packed.device}")
    if not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor, got "
                         f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    x = _check_x(x, k, x.dtype, packed.device)
    packed, scales = packed.contiguous(), scales.contiguous()
    b = x.shape[0]
    if n == 0:
        return torch.zeros(b, 0, device=x.device, dtype=torch.float32)
    use_dot = b >= 2  # the register path here is for a single row
    block_b = _pow2(b, lo=16) if use_dot else 1
    exact = x.dtype == torch.float32
    lanes = _pow2(vpw)
    cuda = x.device.type == "cuda"
    if block_n is None:
        block_n = (16 if use_dot else 32) if cuda else _pow2(n, lo=16, hi=64)
    if block_inputs is None:
        block_inputs = (128 if use_dot else 256) if cuda else 512
    # words per tile: the dot path pads each word to `lanes` codes, the register path does not
    block_w = _pow2(max(1, block_inputs // (lanes if use_dot else vpw)), hi=_pow2(n_words))
    if use_dot and block_w * lanes < 16:  # tl.dot needs K >= 16
        block_w = _pow2(triton.cdiv(16, lanes))
    scale_mode = 0 if group % vpw == 0 else (1 if group >= vpw else 2)
    n_blocks = triton.cdiv(n, block_n)
    chunks = triton.cdiv(n_words, block_w)
    atomic_ok = max(1, (n_words * 4) // (8 * 4 * b))
    split = _split_for(n_blocks, chunks, atomic_ok, x.device, split)
    words_per_split = triton.cdiv(chunks, split) * block_w
    split = triton.cdiv(n_words, words_per_split)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(b, n, device=x.device, dtype=torch.float32)
    _sketch_gemv_kernel[(n_blocks, split)](
        packed, scales, x, y, b, n, k, n_words, n_groups, words_per_split,
        BITS=bits, VPW=vpw, LANES=lanes, GROUP=group, SCALE_MODE=scale_mode,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_W=block_w,
        USE_DOT=use_dot, EXACT=exact, ATOMIC=atomic, num_warps=_num_warps(x.device, num_warps),
    )
    return y


def ffn_sparse(wg, wu, wd_t, x, idx, *, block_j=None, block_h=None, num_warps=None):
    """SwiGLU FFN over kept channels -> float32 [B, H].

    wg, wu [I, H] gate / up (nn.Linear layout), wd_t [I, H] = W_down^T, one dtype, contiguous;
    x [B, H] float32 or their dtype, 1 <= B <= 16; idx int32 [m] kept channels (0 <= idx < I,
    any order, m may be 0; int64 is cast, None = all I): y = sum_j silu(wg[j].x) (wu[j].x) wd_t[j].
    """
    for name, w in (("wg", wg), ("wu", wu), ("wd_t", wd_t)):
        _check_weight(name, w, wg.device if torch.is_tensor(wg) else None)
    if wu.shape != wg.shape or wd_t.shape != wg.shape or len({wg.dtype, wu.dtype, wd_t.dtype}) > 1:
        raise ValueError(f"wg {tuple(wg.shape)} {wg.dtype}, wu {tuple(wu.shape)} {wu.dtype} and "
                         f"wd_t {tuple(wd_t.shape)} {wd_t.dtype} must share one [I, H] shape "
                         "and dtype")
    inter, hidden = wg.shape
    x = _check_x(x, hidden, wg.dtype, wg.device)
    idx = _check_idx(idx, inter, wg.device, "channels")
    b, m = x.shape[0], idx.numel()
    y = torch.zeros(b, hidden, device=wg.device, dtype=torch.float32)
    if m == 0 or hidden == 0:
        return y
    block_b, use_dot, exact, _ = _paths(x, wg.dtype)
    cuda = wg.device.type == "cuda"
    if block_j is None:
        if use_dot:
            block_j = 16
        elif cuda:  # about 2 programs per SM, 4..16 channels each
            block_j = _pow2(m // (2 * _sm_count(wg.device)), lo=4, hi=16)
        else:
            block_j = _pow2(m, lo=16, hi=64)
    if block_h is None:
        block_h = (64 if use_dot else 128) if cuda else _pow2(hidden, lo=16, hi=256)
    _ffn_sparse_kernel[(triton.cdiv(m, block_j),)](
        x, wg, wu, wd_t, idx, y, b, hidden, m,
        BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_H=block_h, USE_DOT=use_dot, EXACT=exact,
        num_warps=_num_warps(wg.device, num_warps),
    )
    return y


# --------------------------------------------------------------------------- torch references


def _ref_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _ref_ids(idx, n, device):
    return torch.arange(n, device=device) if idx is None else \
        torch.as_tensor(idx, device=device).long()


def gather_gemv_reference(wt, x, idx, scale=None):
    """x[:, idx] @ wt[idx, :] (* scale) in float32 (float64 if given float64) -> [B, N]."""
    dt = _ref_dtype(wt, x)
    i = _ref_ids(idx, wt.shape[0], wt.device)
    y = x.to(dt)[:, i] @ wt.to(dt)[i, :]
    return y if scale is None else y * scale.to(dt)


def rows_gemv_reference(w, x, idx, scale=None):
    """x @ w[idx].T (* scale[idx]) in float32 (float64 if given float64) -> [B, m]."""
    dt = _ref_dtype(w, x)
    i = _ref_ids(idx, w.shape[0], w.device)
    y = x.to(dt) @ w.to(dt)[i].T
    return y if scale is None else y * scale.to(dt)[i]


def dense_gemv_reference(w, x, scale=None):
    """x @ w.T (* scale) in float32 (float64 if given float64) -> [B, N]."""
    return rows_gemv_reference(w, x, None, scale)


def ffn_sparse_reference(wg, wu, wd_t, x, idx):
    """sum_{j in idx} silu(wg[j].x) (wu[j].x) wd_t[j] in float32 (float64 if given) -> [B, H]."""
    dt = _ref_dtype(wg, x)
    i = _ref_ids(idx, wg.shape[0], wg.device)
    xf = x.to(dt)
    h = F.silu(xf @ wg.to(dt)[i].T) * (xf @ wu.to(dt)[i].T)
    return h @ wd_t.to(dt)[i]
