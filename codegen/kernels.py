"""
Reduced FFN and attention-projection kernels
============================================

Batch-1..16 decoding reads every weight byte once per token, so its speed is set by how many
bytes it reads. A class support keeps a subset of FFN channels and attention heads per layer;
these kernels read only the kept rows and nothing else.

Weight layout (HF Llama-like, nn.Linear [out, in]) and the transposes we store:

* FFN    gate W_g [I, H], up W_u [I, H], down stored TRANSPOSED W_dT [I, H], so that one
         channel j owns row j of all three matrices: keeping a channel = reading three rows.
         Plain (GPT-2 style) FFN: W_1 [I, H] (+ b_1 [I]) plays "up", W_2T [I, H] (+ b_2 [H]).
* Attn   W_q [n_heads*D, H], W_k / W_v [n_kv*D, H]; output projection stored TRANSPOSED
         W_oT [n_heads*D, H] so head h owns rows h*D .. h*D+D-1. Query head h belongs to kv
         group h // (n_heads // n_kv).

Two layouts:

* ``gather``  one dense copy of the weights plus a RUNTIME int32 index list of kept channels
              (or kept heads / kept channel blocks). Per-token supports use the same kernel.
* ``compact`` contiguous per-class copies holding only the kept rows: pass ``idx=None``.

Kernels (each one: a @triton.jit kernel plus a small Python wrapper below):

* ``ffn_decode``   y[B, H] = Σ_{j∈idx} act(W_g[j]·x) (W_u[j]·x) W_dT[j], B ≤ 16. One program per
                   BLOCK_K kept channels: gate/up GEMV over H in chunks, activation in registers,
                   then its slice of the down projection is added into y with atomic adds (a
                   split-K over the kept channels). Rows of x are padded to 16 for tl.dot.
* ``ffn_prefill``  T tokens, channels kept in BLOCK_N-aligned blocks given as a block-index list.
                   Two tiled GEMMs: inter = act(x W_g[kept]^T) * (x W_u[kept]^T), y = inter W_dT[kept].
* ``qkv_decode`` / ``qkv_prefill``   one launch projecting kept q heads and kept kv groups,
                   writing compact q [M, n_q*D], k / v [M, n_kv*D].
* ``o_proj_decode`` / ``o_proj_prefill``   y = Σ_i attn[:, i*D:(i+1)*D] W_oT[head_i*D : +D]
                   (decode splits the kept heads across programs and adds atomically).

Class constants (kept counts, shapes, block sizes, activation) are tl.constexpr: every class
and layer shape gets its own compiled specialisation; index lists stay runtime tensors.
All matmuls accumulate in fp32 (``input_precision="ieee"`` keeps fp32 inputs exact; fp16/bf16
inputs use tensor cores as usual). ``*_reference`` functions compute the same in plain torch on
sliced weights: the tests compare against them and the CPU runtime can use them directly.

The kernels and wrappers in ``PORTABLE`` only use torch, triton and tl, so codegen/generate.py
copies their source verbatim into each generated per-class file.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


# --------------------------------------------------------------------------- activations
# Written with tl.exp / tl.erf (no libdevice): the same code runs on GPU and in the interpreter.


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        y = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "gelu_tanh":
        # tanh(u) = 1 - 2 / (exp(2u) + 1); saturates cleanly to ±1 when exp over/underflows
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:  # relu
        y = tl.maximum(x, 0.0)
    return y


# --------------------------------------------------------------------------- decode FFN


@triton.jit
def _ffn_decode_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, w_down_t_ptr, b_up_ptr, idx_ptr, y_ptr,  # y: fp32 [B, H]
    B,
    HIDDEN: tl.constexpr, N_KEPT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One program: BLOCK_K kept channels, all B rows. y += act(gate) * up @ W_dT[channels]."""
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < N_KEPT
    if HAS_IDX:  # gather layout: kept channel ids are a runtime list
        rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    else:  # compact layout: the kept channels are the first N_KEPT rows
        rows = offs_k.to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B

    # 1) gate / up GEMV over H in chunks: [BLOCK_B, BLOCK_H] x [BLOCK_H, BLOCK_K]
    acc_up = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HIDDEN
        x = tl.load(x_ptr + offs_b[:, None] * HIDDEN + offs_h[None, :],
                    mask=b_mask[:, None] & h_mask[None, :], other=0.0)
        w_offs = rows[:, None] * HIDDEN + offs_h[None, :]
        w_mask = k_mask[:, None] & h_mask[None, :]
        w_up = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
        acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision="ieee")
        if GATED:
            w_gate = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
            acc_gate = tl.dot(x, tl.trans(w_gate), acc_gate, input_precision="ieee")
    if HAS_BIAS:
        acc_up += tl.load(b_up_ptr + rows, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        inter = _activation(acc_gate, ACTIVATION) * acc_up
    else:
        inter = _activation(acc_up, ACTIVATION)
    inter = inter.to(w_down_t_ptr.dtype.element_ty)

    # 2) this block's share of the down projection, summed across programs with atomics.
    # Masked-off channels load zero down rows, so they add nothing.
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HIDDEN
        w_down = tl.load(w_down_t_ptr + rows[:, None] * HIDDEN + offs_h[None, :],
                         mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        part = tl.dot(inter, w_down, input_precision="ieee")
        tl.atomic_add(y_ptr + offs_b[:, None] * HIDDEN + offs_h[None, :], part,
                      mask=b_mask[:, None] & h_mask[None, :], sem="relaxed")


# --------------------------------------------------------------------------- prefill FFN


@triton.jit
def _ffn_prefill_up_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, b_up_ptr, blocks_ptr, inter_ptr,  # inter: [T, N_BLOCKS*BLOCK_N]
    T,
    HIDDEN: tl.constexpr, N_CHANNELS: tl.constexpr, N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Tile (BLOCK_M tokens) x (kept block pid_n): inter = act(x W_g^T) * (x W_u^T)."""
    pid_m = tl.program_id(0)  # token tiles vary fastest: programs sharing a weight block run together
    pid_n = tl.program_id(1)
    block = tl.load(blocks_ptr + pid_n).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    rows = block * BLOCK_N + offs_n
    n_mask = rows < N_CHANNELS  # a partial last block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T

    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HIDDEN
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * HIDDEN + offs_h[None, :],
                    mask=m_mask[:, None] & h_mask[None, :], other=0.0)
        w_offs = rows[:, None] * HIDDEN + offs_h[None, :]
        w_mask = n_mask[:, None] & h_mask[None, :]
        w_up = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
        acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision="ieee")
        if GATED:
            w_gate = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
            acc_gate = tl.dot(x, tl.trans(w_gate), acc_gate, input_precision="ieee")
    if HAS_BIAS:
        acc_up += tl.load(b_up_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        inter = _activation(acc_gate, ACTIVATION) * acc_up
    else:
        inter = _activation(acc_up, ACTIVATION)
    inter = tl.where(n_mask[None, :], inter, 0.0)  # padding channels are exactly zero
    cols = pid_n * BLOCK_N + offs_n
    tl.store(inter_ptr + offs_m[:, None].to(tl.int64) * (N_BLOCKS * BLOCK_N) + cols[None, :],
             inter.to(inter_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _ffn_prefill_down_kernel(
    inter_ptr, w_down_t_ptr, b_down_ptr, blocks_ptr, y_ptr,
    T,
    HIDDEN: tl.constexpr, N_CHANNELS: tl.constexpr, N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Tile (BLOCK_M tokens) x (BLOCK_H outputs): y = inter @ W_dT[kept blocks]."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    offs_n = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for i in range(0, N_BLOCKS):
        block = tl.load(blocks_ptr + i).to(tl.int64)
        rows = block * BLOCK_N + offs_n
        a = tl.load(inter_ptr + offs_m[:, None].to(tl.int64) * (N_BLOCKS * BLOCK_N)
                    + (i * BLOCK_N + offs_n)[None, :], mask=m_mask[:, None], other=0.0)
        w = tl.load(w_down_t_ptr + rows[:, None] * HIDDEN + offs_h[None, :],
                    mask=(rows < N_CHANNELS)[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_down_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * HIDDEN + offs_h[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & h_mask[None, :])


# --------------------------------------------------------------------------- attention projections


@triton.jit
def _head_rows_tile(
    x_ptr, w_ptr, b_ptr, heads_ptr, out_ptr, slot, pid_m, pid_d, M,
    N_SLOTS: tl.constexpr, HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out[:, slot*D + d] = x @ W[head*D + d]^T for one BLOCK_D slice of one kept head."""
    head = tl.load(heads_ptr + slot).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = head * HEAD_DIM + offs_d
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HIDDEN
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * HIDDEN + offs_h[None, :],
                    mask=m_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptr + rows[:, None] * HIDDEN + offs_h[None, :],
                    mask=d_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cols = slot * HEAD_DIM + offs_d
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * (N_SLOTS * HEAD_DIM) + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _qkv_kernel(
    x_ptr, w_q_ptr, w_k_ptr, w_v_ptr, b_q_ptr, b_k_ptr, b_v_ptr, q_heads_ptr, kv_groups_ptr,
    q_ptr, k_ptr, v_ptr,
    M,
    HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, N_Q: tl.constexpr, N_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Grid axis 1 enumerates kept q heads, then kept k groups, then kept v groups: one launch."""
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    pid_d = tl.program_id(2)
    if slot < N_Q:
        _head_rows_tile(x_ptr, w_q_ptr, b_q_ptr, q_heads_ptr, q_ptr, slot, pid_m, pid_d, M,
                        N_Q, HIDDEN, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_H, HAS_BIAS)
    elif slot < N_Q + N_KV:
        _head_rows_tile(x_ptr, w_k_ptr, b_k_ptr, kv_groups_ptr, k_ptr, slot - N_Q, pid_m, pid_d, M,
                        N_KV, HIDDEN, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_H, HAS_BIAS)
    else:
        _head_rows_tile(x_ptr, w_v_ptr, b_v_ptr, kv_groups_ptr, v_ptr, slot - N_Q - N_KV, pid_m,
                        pid_d, M, N_KV, HIDDEN, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_H, HAS_BIAS)


@triton.jit
def _o_proj_kernel(
    a_ptr, w_o_t_ptr, b_ptr, heads_ptr, y_ptr,  # a: [M, N_Q*D] compact attention output
    M,
    HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, N_Q: tl.constexpr, HEADS_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Tile (BLOCK_M rows) x (BLOCK_H outputs) over HEADS_PER_SPLIT kept heads (split pid_s)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for j in range(0, HEADS_PER_SPLIT):
        i = pid_s * HEADS_PER_SPLIT + j  # position in the kept-head list
        valid = i < N_Q  # the last split may run past the list: load nothing there
        head = tl.load(heads_ptr + i, mask=valid, other=0).to(tl.int64)
        d_limit = HEAD_DIM * valid.to(tl.int32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d_limit
            a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * (N_Q * HEAD_DIM)
                        + (i * HEAD_DIM + offs_d)[None, :],
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(w_o_t_ptr + (head * HEAD_DIM + offs_d)[:, None] * HIDDEN + offs_h[None, :],
                        mask=d_mask[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision="ieee")
    y_offs = offs_m[:, None].to(tl.int64) * HIDDEN + offs_h[None, :]
    y_mask = m_mask[:, None] & h_mask[None, :]
    if ATOMIC:  # y is an fp32 buffer already holding the bias
        tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# --------------------------------------------------------------------------- wrappers

MAX_DECODE_ROWS = 16


def _dot_size(n):
    """Smallest power of two >= n and >= 16 (tl.dot's minimum tile side)."""
    return max(16, triton.next_power_of_2(int(n)))


def _check_rows(name, w, n_cols, dtype, device):
    if w.dim() != 2 or w.shape[1] != n_cols or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [rows, {n_cols}] matrix, got "
                         f"{tuple(w.shape)} (contiguous={w.is_contiguous()})")
    if w.dtype != dtype or w.device != device:
        raise ValueError(f"{name} is {w.dtype} on {w.device}, expected {dtype} on {device}")


def _check_index(name, idx, n_rows, device):
    if idx.dtype != torch.int32 or idx.dim() != 1 or idx.device != device:
        raise ValueError(f"{name} must be a 1-D int32 tensor on {device}, got "
                         f"{idx.dtype} {tuple(idx.shape)} on {idx.device}")
    if idx.numel() == 0 or idx.numel() > n_rows:
        raise ValueError(f"{name} has {idx.numel()} entries; expected 1..{n_rows}")


def ffn_decode(x, w_gate, w_up, w_down_t, idx=None, *, activation="silu", b_up=None,
               b_down=None, block_k=None, block_h=128):
    """Reduced FFN for B ≤ 16 decode rows.

    x [B, H]; w_gate, w_up, w_down_t [I, H] (w_gate=None: plain FFN act(x W_up^T + b_up) W_down_t
    + b_down); idx: int32 [K] kept channel ids (gather layout) or None (compact layout: all I rows
    are kept). Returns y [B, H] in x's dtype. block_k=None: 16 kept channels per program for
    small supports (more programs to fill the GPU), 32 from 8192 kept channels on.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if x.dim() != 2 or x.shape[0] > MAX_DECODE_ROWS:
        raise ValueError(f"ffn_decode takes x [B <= {MAX_DECODE_ROWS}, H], got {tuple(x.shape)}; "
                         "use ffn_prefill for more rows")
    gated = w_gate is not None
    if gated and (b_up is not None or b_down is not None):
        raise ValueError("biases are only supported for the plain (non-gated) FFN")
    x = x.contiguous()
    n_rows_b, hidden = x.shape
    for name, w in (("w_up", w_up), ("w_down_t", w_down_t)) + ((("w_gate", w_gate),) if gated else ()):
        _check_rows(name, w, hidden, x.dtype, x.device)
    if idx is not None:
        _check_index("idx", idx, w_up.shape[0], x.device)
    n_kept = w_up.shape[0] if idx is None else idx.numel()
    if block_k is None:
        block_k = 16 if n_kept < 8192 else 32
    # fp32 accumulator: the atomics of all programs meet here; b_down is its starting value
    if b_down is not None:
        y = b_down.float().expand(n_rows_b, hidden).contiguous()
    else:
        y = torch.zeros(n_rows_b, hidden, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n_kept, block_k),)
    _ffn_decode_kernel[grid](
        x, w_gate if gated else w_up, w_up, w_down_t, b_up if b_up is not None else w_up,
        idx if idx is not None else w_up, y,
        n_rows_b,
        HIDDEN=hidden, N_KEPT=n_kept,
        BLOCK_B=_dot_size(n_rows_b), BLOCK_K=block_k, BLOCK_H=block_h,
        ACTIVATION=activation, GATED=gated, HAS_IDX=idx is not None, HAS_BIAS=b_up is not None,
    )
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def ffn_prefill(x, w_gate, w_up, w_down_t, blocks=None, *, block_n=64, activation="silu",
                b_up=None, b_down=None, block_m=64, block_h=64):
    """Reduced FFN for T tokens with channels kept in block_n-aligned blocks.

    x [T, H]; w_gate, w_up, w_down_t [I, H] in the (possibly permuted) channel order the blocks
    refer to; blocks: int32 [NB] kept block ids (block b = channels b*block_n .. min(I, +block_n)),
    or None for all blocks (compact layout). w_gate=None: plain FFN with optional biases.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if block_n not in (16, 32, 64, 128):
        raise ValueError(f"block_n must be 16, 32, 64 or 128, got {block_n}")
    gated = w_gate is not None
    if gated and (b_up is not None or b_down is not None):
        raise ValueError("biases are only supported for the plain (non-gated) FFN")
    x = x.contiguous()
    n_tokens, hidden = x.shape
    for name, w in (("w_up", w_up), ("w_down_t", w_down_t)) + ((("w_gate", w_gate),) if gated else ()):
        _check_rows(name, w, hidden, x.dtype, x.device)
    n_channels = w_up.shape[0]
    if blocks is None:
        blocks = torch.arange(triton.cdiv(n_channels, block_n), device=x.device, dtype=torch.int32)
    _check_index("blocks", blocks, triton.cdiv(n_channels, block_n), x.device)
    n_blocks = blocks.numel()
    inter = torch.empty(n_tokens, n_blocks * block_n, device=x.device, dtype=x.dtype)
    y = torch.empty(n_tokens, hidden, device=x.device, dtype=x.dtype)
    _ffn_prefill_up_kernel[(triton.cdiv(n_tokens, block_m), n_blocks)](
        x, w_gate if gated else w_up, w_up, b_up if b_up is not None else w_up, blocks, inter,
        n_tokens,
        HIDDEN=hidden, N_CHANNELS=n_channels, N_BLOCKS=n_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h,
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b_up is not None,
    )
    _ffn_prefill_down_kernel[(triton.cdiv(n_tokens, block_m), triton.cdiv(hidden, block_h))](
        inter, w_down_t, b_down if b_down is not None else w_down_t, blocks, y,
        n_tokens,
        HIDDEN=hidden, N_CHANNELS=n_channels, N_BLOCKS=n_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, HAS_BIAS=b_down is not None,
    )
    return y


def _qkv(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, biases, block_m, block_d, block_h):
    x = x.contiguous()
    n_rows, hidden = x.shape
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_rows(name, w, hidden, x.dtype, x.device)
    if w_q.shape[0] % head_dim or w_k.shape != w_v.shape or w_k.shape[0] % head_dim:
        raise ValueError(f"w_q {tuple(w_q.shape)}, w_k {tuple(w_k.shape)}, w_v {tuple(w_v.shape)} "
                         f"do not split into heads of {head_dim}")
    _check_index("q_heads", q_heads, w_q.shape[0] // head_dim, x.device)
    _check_index("kv_groups", kv_groups, w_k.shape[0] // head_dim, x.device)
    n_q, n_kv = q_heads.numel(), kv_groups.numel()
    q = torch.empty(n_rows, n_q * head_dim, device=x.device, dtype=x.dtype)
    k = torch.empty(n_rows, n_kv * head_dim, device=x.device, dtype=x.dtype)
    v = torch.empty_like(k)
    has_bias = biases is not None
    b_q, b_k, b_v = biases if has_bias else (w_q, w_k, w_v)
    block_d = min(block_d, _dot_size(head_dim))
    grid = (triton.cdiv(n_rows, block_m), n_q + 2 * n_kv, triton.cdiv(head_dim, block_d))
    _qkv_kernel[grid](
        x, w_q, w_k, w_v, b_q, b_k, b_v, q_heads, kv_groups, q, k, v,
        n_rows,
        HIDDEN=hidden, HEAD_DIM=head_dim, N_Q=n_q, N_KV=n_kv,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_H=block_h, HAS_BIAS=has_bias,
    )
    return q, k, v


def qkv_decode(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, *, biases=None, block_d=32,
               block_h=128):
    """Kept-head q/k/v projections for B ≤ 16 rows: x [B, H] -> q [B, n_q*D], k, v [B, n_kv*D].

    q_heads: int32 kept query heads; kv_groups: int32 kept kv heads (they must contain the group
    h // (n_heads // n_kv) of every kept query head, see `required_kv_groups`); biases: optional
    (b_q, b_k, b_v). Compact layout: pass compact weights with q_heads/kv_groups = arange.
    """
    if x.dim() != 2 or x.shape[0] > MAX_DECODE_ROWS:
        raise ValueError(f"qkv_decode takes x [B <= {MAX_DECODE_ROWS}, H], got {tuple(x.shape)}")
    return _qkv(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, biases,
                _dot_size(x.shape[0]), block_d, block_h)


def qkv_prefill(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, *, biases=None, block_m=64,
                block_d=64, block_h=64):
    """As `qkv_decode` for T tokens (tiled GEMM): x [T, H]."""
    return _qkv(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, biases, block_m, block_d, block_h)


def _o_proj(attn, w_o_t, q_heads, head_dim, b_o, block_m, block_d, block_h, split):
    attn = attn.contiguous()
    n_rows = attn.shape[0]
    hidden = w_o_t.shape[1]
    _check_rows("w_o_t", w_o_t, hidden, attn.dtype, attn.device)
    if w_o_t.shape[0] % head_dim:
        raise ValueError(f"w_o_t {tuple(w_o_t.shape)} does not split into heads of {head_dim}")
    _check_index("q_heads", q_heads, w_o_t.shape[0] // head_dim, attn.device)
    n_q = q_heads.numel()
    if attn.dim() != 2 or attn.shape[1] != n_q * head_dim:
        raise ValueError(f"attn must be [M, {n_q}*{head_dim}], got {tuple(attn.shape)}")
    split = max(1, min(split, n_q))
    per_split = triton.cdiv(n_q, split)
    split = triton.cdiv(n_q, per_split)
    atomic = split > 1
    if atomic:  # fp32 buffer summed by atomics, starting from the bias
        y = (b_o.float().expand(n_rows, hidden).contiguous() if b_o is not None
             else torch.zeros(n_rows, hidden, device=attn.device, dtype=torch.float32))
    else:
        y = torch.empty(n_rows, hidden, device=attn.device, dtype=attn.dtype)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(hidden, block_h), split)
    _o_proj_kernel[grid](
        attn, w_o_t, b_o if b_o is not None else w_o_t, q_heads, y,
        n_rows,
        HIDDEN=hidden, HEAD_DIM=head_dim, N_Q=n_q, HEADS_PER_SPLIT=per_split,
        BLOCK_M=block_m, BLOCK_D=min(block_d, _dot_size(head_dim)), BLOCK_H=block_h,
        HAS_BIAS=b_o is not None, ATOMIC=atomic,
    )
    return y if y.dtype == attn.dtype else y.to(attn.dtype)


def o_proj_decode(attn, w_o_t, q_heads, head_dim, *, b_o=None, block_d=64, block_h=128, split=4):
    """Output projection over kept heads for B ≤ 16 rows.

    attn [B, n_q*D] (compact, kept heads in q_heads order); w_o_t [n_heads*D, H] = W_o^T;
    q_heads int32 [n_q]. The kept heads are split over `split` programs per output tile and
    summed with atomics, so small H still fills the GPU. Returns [B, H].
    """
    if attn.dim() != 2 or attn.shape[0] > MAX_DECODE_ROWS:
        raise ValueError(f"o_proj_decode takes attn [B <= {MAX_DECODE_ROWS}, n_q*D], "
                         f"got {tuple(attn.shape)}")
    return _o_proj(attn, w_o_t, q_heads, head_dim, b_o, _dot_size(attn.shape[0]), block_d,
                   block_h, split)


def o_proj_prefill(attn, w_o_t, q_heads, head_dim, *, b_o=None, block_m=64, block_d=64,
                   block_h=64):
    """As `o_proj_decode` for T tokens (tiled GEMM, no atomics)."""
    return _o_proj(attn, w_o_t, q_heads, head_dim, b_o, block_m, block_d, block_h, 1)


# Source objects generate.py copies verbatim into every per-class kernel file (in this order).
PORTABLE = (
    _activation, _ffn_decode_kernel, _ffn_prefill_up_kernel, _ffn_prefill_down_kernel,
    _head_rows_tile, _qkv_kernel, _o_proj_kernel,
    _dot_size, _check_rows, _check_index,
    ffn_decode, ffn_prefill, _qkv, qkv_decode, qkv_prefill, _o_proj, o_proj_decode, o_proj_prefill,
)
PORTABLE_CONSTANTS = {"ACTIVATIONS": ACTIVATIONS, "MAX_DECODE_ROWS": MAX_DECODE_ROWS}


# --------------------------------------------------------------------------- torch references


def apply_activation(x, activation):
    """The torch twin of `_activation`."""
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def expand_blocks(blocks, block_n, n_channels):
    """Kept block ids -> kept channel ids (long), dropping the padding of a partial last block."""
    blocks = torch.as_tensor(blocks).long().reshape(-1)
    channels = (blocks[:, None] * block_n + torch.arange(block_n, device=blocks.device)).reshape(-1)
    return channels[channels < n_channels]


def head_rows(heads, head_dim):
    """Kept head ids -> the weight rows they own (long)."""
    heads = torch.as_tensor(heads).long().reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def required_kv_groups(q_heads, n_heads, n_kv):
    """Sorted kv groups that the kept query heads read (GQA: head h uses group h // (n_heads/n_kv))."""
    per_group = n_heads // n_kv
    return sorted({int(h) // per_group for h in q_heads})


def ffn_reference(x, w_gate, w_up, w_down_t, idx=None, *, activation="silu", b_up=None,
                  b_down=None):
    """Torch FFN on the kept channel rows (idx=None: all rows). Same arguments as ffn_decode."""
    if idx is not None:
        idx = torch.as_tensor(idx, device=w_up.device).long()
        w_up, w_down_t = w_up[idx], w_down_t[idx]
        w_gate = w_gate[idx] if w_gate is not None else None
        b_up = b_up[idx] if b_up is not None else None
    up = x @ w_up.T
    if b_up is not None:
        up = up + b_up
    inter = apply_activation(x @ w_gate.T, activation) * up if w_gate is not None \
        else apply_activation(up, activation)
    y = inter @ w_down_t
    return y + b_down if b_down is not None else y


def ffn_prefill_reference(x, w_gate, w_up, w_down_t, blocks=None, *, block_n=64,
                          activation="silu", b_up=None, b_down=None):
    """Torch twin of ffn_prefill: kept blocks expanded to channels."""
    idx = None if blocks is None else expand_blocks(blocks.cpu(), block_n, w_up.shape[0])
    return ffn_reference(x, w_gate, w_up, w_down_t, idx, activation=activation, b_up=b_up,
                         b_down=b_down)


def qkv_reference(x, w_q, w_k, w_v, q_heads, kv_groups, head_dim, *, biases=None):
    """Torch q/k/v on the kept heads' rows: compact [M, n_q*D], [M, n_kv*D], [M, n_kv*D]."""
    q_rows, kv_rows = head_rows(q_heads, head_dim), head_rows(kv_groups, head_dim)
    outs = []
    for w, rows, b in zip((w_q, w_k, w_v), (q_rows, kv_rows, kv_rows), biases or (None,) * 3):
        rows = rows.to(w.device)
        out = x @ w[rows].T
        outs.append(out + b[rows] if b is not None else out)
    return tuple(outs)


def o_proj_reference(attn, w_o_t, q_heads, head_dim, *, b_o=None):
    """Torch output projection on the kept heads' rows of W_oT."""
    y = attn @ w_o_t[head_rows(q_heads, head_dim).to(w_o_t.device)]
    return y + b_o if b_o is not None else y
