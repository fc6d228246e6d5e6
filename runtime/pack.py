"""Weight storage formats shared by every backend (torch reference, CPU extension, Triton).

Low-bit sketch codes ("packed b-bit", b in 1..4): a matrix W [N, K] is stored as

* ``codes``  uint8 in [0, 2**b - 1], dequantized as ``scale * (code - (2**b - 1) / 2)``
  (a mid-rise uniform quantizer: 1 bit is sign * scale/2, no code means zero);
* ``scales`` float16 [N, ceil(K / group)], one per row and group of ``group`` inputs;
* ``packed`` int32 [N, ceil(K / vpw)] with vpw = 32 // b values per 32-bit word: input k of
  row n is bits ``(k % vpw) * b ... + b - 1`` of word ``packed[n, k // vpw]`` (low bits
  first). 3 bits pack 10 to a word (3.2 bits per weight), the rest pack exactly.

int8 storage: ``q`` int8 [N, K] with one float32 scale per output row, ``w ≈ scale[:, None] * q``
(for an input-major copy wT [K, N] the scale is per column, i.e. still per output).

int4 storage (``Q4``, llama.cpp's Q4_1 block): each stored row of C values is ceil(C / 32)
blocks of 20 bytes, an fp16 scale d, an fp16 minimum m and 16 bytes whose byte j holds value j
in its low nibble and value 16 + j in its high nibble as a code in [0, 15]; the value is
``d * code + m``. The blocks always run along W's inputs (its own blocks, as a GGUF stores
them: a Q4_1 source model comes back exactly). The input-major copy (``Q4Cols``) keeps them: ``codes`` uint8
[K, ceil(N / 32) * 16] (input k's codes for every output, 16 bytes per 32 outputs in the same
nibble order) and ``scales`` fp16 [ceil(K / 32), 2, Np] (per input group: d of every output,
then m), so a gather reads its kept inputs' codes plus one scale row per group touched.

These functions are the reference every kernel is checked against; they are plain torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # step search of quantize_codes, fractions of absmax


def values_per_word(bits: int) -> int:
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"sketch bits must be 1..4, got {bits}")
    return 32 // bits


def packed_bytes(n: int, k: int, bits: int, group: int) -> int:
    """Bytes one sketch of W [n, k] occupies (and a GEMV over it reads): words + fp16 scales."""
    return n * math.ceil(k / values_per_word(bits)) * 4 + n * math.ceil(k / group) * 2


def quantize_codes(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round W [N, K] to b-bit codes with an fp16 absmax-derived scale per (row, group).

    Each group's step is the one, among clipping the largest |w| to a fraction in CLIPS of
    it, with the least squared error (absmax alone is poor at 1-2 bits); returns
    (codes uint8 [N, K], scales fp16 [N, ceil(K/group)]). Zero-padded tail inputs count
    as zeros, which the padding makes them."""
    values_per_word(bits)
    n, k = w.shape
    g = math.ceil(k / group)
    wf = torch.nn.functional.pad(w.float(), (0, g * group - k)).view(n, g, group)
    half = (2 ** bits - 1) / 2
    amax = wf.abs().amax(-1).clamp_min(1e-12)
    best_err, scales = None, None
    for clip in CLIPS:
        s = (amax * clip / half).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
        sf = s.float().unsqueeze(-1)
        q = torch.clamp(torch.round(wf / sf + half), 0, 2 ** bits - 1)
        err = ((q - half) * sf - wf).pow(2).sum(-1)
        if best_err is None:
            best_err, scales = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scales = torch.where(better, s, scales)
    sf = scales.float().unsqueeze(-1)
    codes = torch.clamp(torch.round(wf / sf + half), 0, 2 ** bits - 1).to(torch.uint8)
    return codes.view(n, g * group)[:, :k].contiguous(), scales


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int,
                     group: int) -> torch.Tensor:
    """float32 [N, K] from codes uint8 [N, K] and scales [N, ceil(K / group)]."""
    n, k = codes.shape
    half = (2 ** bits - 1) / 2
    s = scales.float().repeat_interleave(group, dim=1)[:, :k]
    return (codes.float() - half) * s


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [N, ceil(K / vpw)] words from codes uint8 [N, K] (layout in the module doc)."""
    vpw = values_per_word(bits)
    n, k = codes.shape
    words = math.ceil(k / vpw)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, words * vpw - k)).view(n, words, vpw)
    shifts = torch.arange(vpw, dtype=torch.int64, device=codes.device) * bits
    packed = (c << shifts).sum(-1)  # < 2**32, fits int64 exactly
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # reinterpret as int32
    return packed.to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """codes uint8 [N, K] back from pack_codes' words."""
    vpw = values_per_word(bits)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(vpw, dtype=torch.int64, device=packed.device) * bits
    c = (p.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return c.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


def quantize_int8(w: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per output: W [N, K] -> (q [N, K], scale [N])
    with dim=1 (row-major weights); for an input-major copy wT [K, N] pass dim=0 (scale [N])."""
    amax = w.float().abs().amax(dim).clamp_min(1e-12)
    scale = amax / 127.0
    s = scale.unsqueeze(dim)
    q = torch.clamp(torch.round(w.float() / s), -127, 127).to(torch.int8)
    return q, scale


def sketch_gemv_reference(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
                          bits: int, group: int, k: int) -> torch.Tensor:
    """x [B, K] @ dequant(packed, scales).T -> [B, N] float32 (the sketch GEMV's reference)."""
    w = dequantize_codes(unpack_codes(packed, bits, k), scales, bits, group)
    return x.float() @ w.T


Q4_GROUP, Q4_BLOCK = 32, 20  # values per int4 block, its bytes (scale, minimum, 16 code bytes)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """[..., 16] code bytes -> int16 [..., 32] codes (low nibbles: values 0-15, high: 16-31)."""
    b = b.to(torch.int16)
    return torch.cat([b & 15, b >> 4], -1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int codes [..., 32] in [0, 15] -> uint8 [..., 16] (_unpack_nibbles' inverse)."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


@dataclass(frozen=True)
class Q4:
    """A matrix [rows, cols] in int4 blocks (the module doc): ``blocks`` uint8
    [rows, ceil(cols / 32) * 20]."""

    blocks: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale and minimum float16 [rows, blocks, 2], codes int16 [rows, blocks, 32])."""
        b = self.blocks.reshape(self.blocks.shape[0], -1, Q4_BLOCK)
        return b[..., :4].contiguous().view(torch.float16), _unpack_nibbles(b[..., 4:])

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: the values the int4 kernels multiply by."""
        dm, q = self.parts()
        dm = dm.float()
        w = q.float() * dm[..., :1] + dm[..., 1:]
        return w.reshape(w.shape[0], -1)[:, :self.cols].contiguous()


def quantize_q4(w: torch.Tensor) -> Q4:
    """W [rows, cols] -> Q4, per block of 32 values along a row: m = the block's minimum,
    d = (max - min) / 15 (both rounded to fp16 first), code = round((w - m) / d) clamped to
    [0, 15]; tail values past cols are zero padding."""
    w = w.detach().float()
    r, c = w.shape
    nb = -(-c // Q4_GROUP)
    wp = torch.zeros(r, nb * Q4_GROUP)
    wp[:, :c] = w
    g = wp.reshape(r, nb, Q4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    m = lo.to(torch.float16)
    d = ((hi - m.float()) / 15).to(torch.float16)
    df = d.float()
    inv = torch.where(df != 0, 1.0 / df, torch.zeros_like(df))
    q = torch.clamp(torch.round((g - m.float()) * inv), 0, 15).to(torch.int16)
    head = torch.cat([d, m], -1).view(torch.uint8).reshape(r, nb, 4)
    return Q4(torch.cat([head, _pack_nibbles(q)], -1).reshape(r, nb * Q4_BLOCK).contiguous(), c)


@dataclass(frozen=True)
class Q4Cols:
    """W^T [K, N] (input-major) in W's own int4 blocks (the module doc): ``codes`` uint8
    [K, ceil(N / 32) * 16], ``scales`` float16 [ceil(K / 32), 2, ceil(N / 32) * 32]."""

    codes: torch.Tensor
    scales: torch.Tensor
    cols: int  # N

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scales.numel()

    def dequantize(self) -> torch.Tensor:
        """float32 [K, N]: the values the int4 gather multiplies by."""
        k, n = self.shape
        q = _unpack_nibbles(self.codes.reshape(k, -1, 16)).reshape(k, -1).float()  # [K, Np]
        sc = self.scales.float().repeat_interleave(Q4_GROUP, 0)[:k]  # [K, 2, Np]
        return (q * sc[:, 0] + sc[:, 1])[:, :n].contiguous()


def quantize_q4_cols(w: torch.Tensor) -> Q4Cols:
    """W [N, K] -> its input-major int4 copy, holding exactly quantize_q4(W)'s numbers."""
    rows = quantize_q4(w)
    n, k = rows.shape
    nb, nbn = -(-k // Q4_GROUP), -(-n // Q4_GROUP)
    dm, q = rows.parts()
    ct = torch.zeros(k, nbn * Q4_GROUP, dtype=torch.int16)
    ct[:, :n] = q.reshape(n, nb * Q4_GROUP)[:, :k].T
    packed = _pack_nibbles(ct.reshape(k, nbn, Q4_GROUP)).reshape(k, nbn * 16)
    scales = torch.zeros(nb, 2, nbn * Q4_GROUP, dtype=torch.float16)
    scales[:, :, :n] = dm.permute(1, 2, 0)
    return Q4Cols(packed.contiguous(), scales.contiguous(), n)
