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

These functions are the reference every kernel is checked against; they are plain torch.
"""

from __future__ import annotations

import math

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
