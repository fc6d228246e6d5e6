"""
CPU sparse GEMV kernels for per-token sparse decoding
=====================================================

At each decode step cheap measurements pick which inputs (or output rows) of a weight matrix a
token needs; a batch-1..16 GEMV is memory-bound, so its time is the bytes it reads. These
kernels read only the kept weights, in fp32 accumulation, near the machine's read bandwidth.
They are a C++/OpenMP library (``runtime/csrc/sparse_gemv.cpp``) compiled on first use with
``torch.utils.cpp_extension.load`` (ninja, ``-O3 -march=native -fopenmp``) into
``<cscompile cache>/torch_extensions/<name>``, the name carrying a fingerprint of the CPU, the
compiler flags and the source, so another CPU never reuses a binary built for this one. The
module includes no torch headers (the first build takes seconds, not a minute): its functions
take data pointers as ints (METH_FASTCALL, ~0.3 us a call) and the wrappers here check shapes,
dtypes and strides first; the same functions are exported as a plain C ABI (``csc_*``). When
it cannot be built, or ``CSCOMPILE_CPU_KERNELS=0``, every wrapper
computes the same result with its torch reference (one notice on stderr when a build fails).

Operators (x is float32 [B, K], B = 1..16 typical; all accumulate in fp32, return float32):

* ``dense_gemv(w, x, scale=None)``           x @ w.T -> [B, N]; w [N, K] row-major
* ``rows_gemv(w, x, idx, scale=None)``       x @ w[idx].T -> [B, m]; kept output rows (gate/up rows
                                             of kept FFN channels, lm_head candidate rows)
* ``gather_gemv(wt, x, idx, scale=None)``    x[:, idx] @ wt[idx] -> [B, N]; wt [K, N] input-major
                                             (TEAL's layout: input k's weights are row wt[k]);
                                             kept inputs of q/k/v/o/gate/up, or kept intermediate
                                             channels of the down projection (wd_t = W_down.T)
* ``ffn_sparse(wg, wu, wd_t, x, idx)``       Σ_{j∈idx} silu(wg[j]·x) (wu[j]·x) wd_t[j] -> [B, H];
                                             wg, wu, wd_t [I, H]; one pass, 3 rows per channel
* ``sketch_gemv(packed, scales, x, bits, group, k)``   x @ dequant(sketch).T -> [B, N] straight
                                             from runtime/pack.py's packed b-bit words (1..4 bits)
* ``select_topk(x, k, scale=None)``          batch-1 selection: (sorted int32 indices of the k
                                             largest |x| * scale, share of that score's energy
                                             they miss) — TEAL / WINA inputs
* ``rotate(x, perm, signs, block)``          the sketches' rotation of one row
                                             (blockdiag(H_b) (signs * x[perm]), fast Walsh-Hadamard)
* ``sketch_q8(planes, scales, x, bits, group, k)``  one row's sketch GEMV as int8 dot products:
                                             x quantized to int8 per group, the codes in
                                             ``sketch_planes(packed, bits, k)``'s layout (the same
                                             bits per weight; 2..4 bits, k % 64 == 0, group % 32
                                             == 0: ``planes_fit``); ~10x the float kernel's speed
* ``sketch_select(sg, su, xr, k)``           the FFN sketch op's batch-1 selection: the top k
                                             channels by |silu(ĝ) û| from two sketches
                                             (runtime.pertoken.Sketch, as planes) on a rotated
                                             row, and the share of that estimate's energy they miss
* ``rms_norm(x, w, eps)``, ``rope(x, cos, sin)``, ``attention_row(q, k, v, scale)``
                                             the rest of a batch-1 decode step (RMSNorm, rotate-
                                             half RoPE in place, one query row's grouped-query
                                             attention over its cache), one call each where
                                             torch runs 5-15 small ops (runtime/decode_step.py)
* ``read_bandwidth(buf)``                    sum of buf's bytes (a streaming read, used by
                                             benchmarks/cpu_kernels.py to measure bandwidth)

Weights are float32, bfloat16 or int8; int8 needs ``scale`` (float32, one per output: [N] for
dense / gather, [N] of the full matrix for rows_gemv, indexed by idx), which float weights may
also take. int4: dense / rows take ``runtime.pack.Q4`` row blocks [N, K] (fp16 scales and
minima inside, no ``scale``) and multiply them by x rounded to int8 per block of 32 (integer
dot products); gather takes the input-major copy ``runtime.pack.Q4Cols`` of the same numbers
(``gather_q4``, which can also map inputs to permuted rows); ``q4_gemv_reference`` is their
definition. ``idx`` is a 1-D int32 (or int64) tensor of kept indices (sorted unique in practice;
duplicates count twice, as in the reference), or None for all of them; an empty idx gives zeros
(gather / ffn) or a [B, 0] result (rows). Threads: ``torch.get_num_threads()`` (matrices under
64 KiB run on one). Every ``*_reference`` is the plain-torch definition the tests check against.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from .pack import Q4, Q4_BLOCK, Q4_GROUP, Q4Cols, sketch_gemv_reference, values_per_word

__all__ = [
    "available", "load_extension", "disabled",
    "dense_gemv", "rows_gemv", "gather_gemv", "gather_q4", "ffn_sparse", "sketch_gemv", "read_bandwidth",
    "read_rows", "read_rows_reference",
    "select_topk", "select_logits", "rotate", "sketch_select", "sketch_planes", "sketch_q8", "planes_fit",
    "dense_gemv_reference", "rows_gemv_reference", "gather_gemv_reference", "q4_gemv_reference",
    "ffn_sparse_reference", "sketch_gemv_reference", "read_bandwidth_reference",
    "select_topk_reference", "select_logits_reference", "rotate_reference", "sketch_select_reference",
    "quantize_x_reference", "sketch_q8_reference", "planes_codes",
    "rms_norm", "rope", "attention_row", "rms_norm_reference", "rope_reference",
    "attention_row_reference",
]

ENV = "CSCOMPILE_CPU_KERNELS"  # "0" forces the torch fallback
_ENV_KEY = ENV.encode()
SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_gemv.cpp"
ABI_VERSION = 5
FLAGS_NATIVE = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-DCSC_PYTHON_MODULE"]
FLAGS_PORTABLE = ["-O3", "-fopenmp", "-std=c++17", "-DCSC_PYTHON_MODULE"]  # if -march=native fails
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "path": None, "error": None}


# --------------------------------------------------------------------------- loading
def disabled() -> bool:
    """True when $CSCOMPILE_CPU_KERNELS is 0 / false / off / no (every op uses torch)."""
    # os.environ's own lookup costs ~1 us (it encodes the key); its bytes dict is the same data
    data = getattr(os.environ, "_data", None)
    if data is not None and isinstance(next(iter(data), b""), bytes):
        value = data.get(_ENV_KEY)
        if value is None:
            return False
        value = value.decode(errors="replace")
    else:  # pragma: no cover - not CPython on POSIX
        value = os.environ.get(ENV)
        if value is None:
            return False
    return value.strip().lower() in ("0", "false", "off", "no")


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the CPU's model and feature flags, plus the machine."""
    info = platform.machine()
    try:
        model = flags = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu model", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features", "isa") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
        info += "|" + model + "|" + flags
    except OSError:
        info += "|" + platform.processor()
    return info


def _build_name(flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (_cpu_fingerprint(), " ".join(flags), torch.__version__, sys.version,
                 SOURCE.read_bytes().hex()):
        h.update(part.encode())
        h.update(b"\0")
    return "cscompile_sparse_gemv_" + h.hexdigest()[:16]


def build_root() -> Path:
    """<cscompile cache root>/torch_extensions ($CSCOMPILE_CACHE or the user cache dir)."""
    from cscompile.models import cache_root

    return cache_root() / "torch_extensions"


_FUNCS = ("csc_rows", "csc_gather", "csc_ffn", "csc_sketch", "csc_read", "csc_read_rows", "csc_select",
          "csc_select_logits", "csc_rotate",
          "csc_sketch_select", "csc_sketch_q8", "csc_rmsnorm", "csc_rope", "csc_attention",
          "csc_abi_version", "csc_has_avx2")


def _bind(mod):
    """The built module (METH_FASTCALL functions taking ints / None; the C ABI, also exported
    as plain C symbols for ctypes, has the same argument order)."""
    missing = [f for f in _FUNCS if not hasattr(mod, f)]
    if missing:
        raise RuntimeError(f"extension lacks {', '.join(missing)}")
    if mod.csc_abi_version() != ABI_VERSION:
        raise RuntimeError(f"ABI version {mod.csc_abi_version()} != {ABI_VERSION}")
    return mod


def _self_check(lib) -> None:
    """A wrong binary (or a miscompile) must not silently give wrong numbers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 75, generator=g)
    x = torch.randn(3, 75, generator=g)
    y = torch.empty(3, 37)
    lib.csc_rows(0, w.data_ptr(), 37, 75, x.data_ptr(), 3, None, 37, None, y.data_ptr(), 2)
    if not torch.allclose(y, x @ w.T, rtol=1e-4, atol=1e-4):
        raise RuntimeError("self-check failed: dense_gemv disagrees with torch")


def load_extension(verbose: bool = False):
    """The compiled kernel module, or None when it is disabled or cannot be built.

    Builds once per process (thread-safe) and once per machine (cached on disk); a failed build
    prints one line on stderr and is not retried in this process."""
    if disabled():
        return None
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        errors = []
        for flags in (FLAGS_NATIVE, FLAGS_PORTABLE):
            try:
                from torch.utils.cpp_extension import load

                name = _build_name(flags)
                build_dir = build_root() / name
                build_dir.mkdir(parents=True, exist_ok=True)
                mod = load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                           is_python_module=True, verbose=verbose)
                lib = _bind(mod)
                _self_check(lib)
                _state.update(lib=lib, path=str(mod.__file__), error=None)
                break
            except Exception as e:  # noqa: BLE001 - any build / load failure means fallback
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        else:
            _state["error"] = "; ".join(errors)
            print(f"cscompile: CPU sparse kernels unavailable ({errors[-1]}); using the torch "
                  f"fallback", file=sys.stderr)
        _state["tried"] = True
        return _state["lib"]


def available() -> bool:
    """True when the compiled kernels are in use (built, loaded, and not disabled by the env)."""
    return load_extension() is not None


def _lib():
    if disabled():
        return None
    return _state["lib"] if _state["tried"] else load_extension()


# --------------------------------------------------------------------------- validation
def _check_cpu(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")


def _check_w(w: torch.Tensor, name: str, int8_ok: bool = True) -> None:
    _check_cpu(w, name)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    allowed = (torch.float32, torch.bfloat16, torch.int8) if int8_ok else (torch.float32, torch.bfloat16)
    if w.dtype not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(str(d) for d in allowed)}, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (copying weights per call defeats the kernel)")


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    _check_cpu(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, K], got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} inputs, the weights take {k}")
    return x if x.is_contiguous() else x.contiguous()


def _check_idx(idx, limit: int, what: str):
    if idx is None:
        return None
    _check_cpu(idx, "idx")
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 (or int64), got {idx.dtype}")
    if idx.dtype != torch.int32:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise ValueError(f"idx holds {what} outside [0, {limit})")
        idx = idx.to(torch.int32)
    return idx if idx.is_contiguous() else idx.contiguous()


def _check_scale(w: torch.Tensor, scale, n: int, name: str = "w"):
    if scale is None:
        if w.dtype == torch.int8:
            raise ValueError(f"int8 {name} needs scale (float32 [{n}], one per output)")
        return None
    _check_cpu(scale, "scale")
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.numel() != n:
        raise ValueError(f"scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    return scale if scale.is_contiguous() else scale.contiguous()


def _bad_idx(rc: int, idx: torch.Tensor, limit: int, what: str):
    i = rc - 1
    return ValueError(f"idx[{i}] = {int(idx[i])} is outside [0, {limit}) ({what})")


def _ref_idx(idx, limit: int, what: str):
    """The fallback's idx: int64, range-checked like the kernels (ValueError, not IndexError)."""
    if idx is None:
        return None
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        bad = int(((idx < 0) | (idx >= limit)).nonzero()[0, 0])
        raise ValueError(f"idx[{bad}] = {int(idx[bad])} is outside [0, {limit}) ({what})")
    return idx.long()


def _ptr(t):
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------- references
def dense_gemv_reference(w: torch.Tensor, x: torch.Tensor, scale=None) -> torch.Tensor:
    """x [B, K] @ w [N, K].T (* scale [N]) -> float32 [B, N]."""
    y = x.float() @ w.float().T
    return y * scale if scale is not None else y


def rows_gemv_reference(w: torch.Tensor, x: torch.Tensor, idx, scale=None) -> torch.Tensor:
    """x [B, K] @ w[idx].T (* scale[idx]) -> float32 [B, m]; idx None = all rows."""
    if idx is None:
        return dense_gemv_reference(w, x, scale)
    idx = idx.long()
    y = x.float() @ w[idx].float().T
    return y * scale[idx] if scale is not None else y


def gather_gemv_reference(wt: torch.Tensor, x: torch.Tensor, idx, scale=None) -> torch.Tensor:
    """x[:, idx] @ wt[idx] (* scale [N]) -> float32 [B, N]; wt [K, N]; idx None = all inputs."""
    if idx is None:
        y = x.float() @ wt.float()
    else:
        idx = idx.long()
        y = x.float()[:, idx] @ wt[idx].float()
    return y * scale if scale is not None else y


def ffn_sparse_reference(wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor, x: torch.Tensor,
                         idx) -> torch.Tensor:
    """Σ_{j∈idx} silu(wg[j]·x) (wu[j]·x) wd_t[j] -> float32 [B, H]; idx None = all channels."""
    if idx is not None:
        idx = idx.long()
        wg, wu, wd_t = wg[idx], wu[idx], wd_t[idx]
    x = x.float()
    h = F.silu(x @ wg.float().T) * (x @ wu.float().T)
    return h @ wd_t.float()


def select_topk_reference(x: torch.Tensor, k: int, scale=None) -> tuple[torch.Tensor, float]:
    """(sorted int32 indices of the k largest |x| * scale, share of sum(score^2) off them)."""
    score = x.reshape(-1).float().abs()
    if scale is not None:
        score = score * scale
    vals, idx = score.topk(k)
    total = float(score.double().pow(2).sum())
    missed = 1.0 - float(vals.double().pow(2).sum()) / max(total, 1e-30)
    return idx.sort().values.to(torch.int32), max(0.0, missed)


def select_logits_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(sorted int32 indices of the k largest logits x, softmax mass off them)."""
    x = x.reshape(-1).float()
    idx = x.topk(k).indices
    p = torch.softmax(x.double(), -1)
    return idx.sort().values.to(torch.int32), max(0.0, 1.0 - float(p[idx].sum()))


def rotate_reference(x: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, block: int):
    from .pertoken import hadamard

    y = x.reshape(-1).float()[perm.long()] * signs.float()
    return (y.view(-1, block) @ hadamard(block)).reshape(-1)


def quantize_x_reference(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] as sketch_q8 sees it: int8 per group of the last dimension (scale
    max|x| / 127, round half to even), dequantized to float32."""
    x = x.float()
    k = x.shape[-1]
    g = -(-k // group)
    xp = F.pad(x, (0, g * group - k)).reshape(*x.shape[:-1], g, group)
    s = xp.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xp * (1 / s)).clamp(-127, 127) * s
    return q.reshape(*x.shape[:-1], g * group)[..., :k]


def sketch_select_reference(sg, su, xr: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(top k channels by |silu(ĝ) û|, missed share); sg, su runtime.pertoken.Sketch, applied
    to xr quantized as sketch_q8 does."""
    x = quantize_x_reference(xr, su.group).view(1, -1)
    g = sketch_gemv_reference(sg.packed, sg.scales, x, sg.bits, sg.group, x.shape[1])
    u = sketch_gemv_reference(su.packed, su.scales, x, su.bits, su.group, x.shape[1])
    return select_topk_reference(F.silu(g) * u, k)


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * w / sqrt(mean(x^2) + eps) over the last dimension, float32 (LlamaRMSNorm)."""
    x = x.float()
    return w.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., d] with cos, sin [d] (transformers' apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def attention_row_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """One query row's attention: q [Hq, d] over k, v [Hkv, L, d] (GQA) -> float32 [Hq * d]."""
    d = k.shape[-1]
    o = F.scaled_dot_product_attention(q.float().view(1, -1, 1, d), k.float()[None],
                                       v.float()[None], scale=scale,
                                       enable_gqa=q.numel() // d != k.shape[0])
    return o.reshape(-1)


def read_bandwidth_reference(buf: torch.Tensor) -> int:
    """Sum of buf's bytes (as unsigned)."""
    return int(buf.contiguous().reshape(-1).view(torch.uint8).sum(dtype=torch.int64))


# --------------------------------------------------------------------------- wrappers
# Every wrapper first tries a fast path (a handful of attribute checks, ~1 us: these calls take
# 5-50 us at SmolLM2 sizes); anything unusual goes through the full validation, which raises the
# ValueErrors or, when the library is unavailable, computes the torch reference.
_F32, _I32 = torch.float32, torch.int32
_get_threads = torch.get_num_threads


def _idx_fast(idx) -> bool:
    return idx is None or (idx.dtype is _I32 and idx.dim() == 1 and idx.is_contiguous() and idx.is_cpu)


def _scale_fast(scale, code: int, n: int) -> bool:
    if scale is None:
        return code != 2
    return scale.dtype is _F32 and scale.is_contiguous() and scale.is_cpu and scale.numel() == n


def _fast(w, x, code) -> bool:
    ws, xs = w.shape, x.shape
    return (code is not None and len(ws) == 2 and len(xs) == 2 and x.dtype is _F32
            and w.is_contiguous() and x.is_contiguous() and w.is_cpu and x.is_cpu)


def _threads() -> int:
    return max(1, _get_threads())


def dense_gemv(w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] @ w [N, K].T (* scale [N]) -> float32 [B, N]; w float32 / bfloat16 / int8+scale."""
    if isinstance(w, (Q4, Q4Cols)):
        return _rows_q4(w, x, None, scale)
    lib = _lib()
    try:
        code = _DTYPES.get(w.dtype)
        fast = (lib is not None and _fast(w, x, code) and x.shape[1] == w.shape[1]
                and _scale_fast(scale, code, w.shape[0]))
    except AttributeError:
        fast = False
    if not fast:
        _check_w(w, "w")
        x = _check_x(x, w.shape[1])
        scale = _check_scale(w, scale, w.shape[0])
        if lib is None:
            return dense_gemv_reference(w, x, scale)
        code = _DTYPES[w.dtype]
    n, k = w.shape
    b = x.shape[0]
    y = torch.empty(b, n)
    lib.csc_rows(code, w.data_ptr(), n, k, x.data_ptr(), b, None, n,
                 None if scale is None else scale.data_ptr(), y.data_ptr(), _threads())
    return y


def rows_gemv(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] @ w[idx].T (* scale[idx]) -> float32 [B, m]; w [N, K] row-major, idx int32 [m]."""
    if isinstance(w, (Q4, Q4Cols)):
        return _rows_q4(w, x, idx, scale)
    lib = _lib()
    try:
        code = _DTYPES.get(w.dtype)
        fast = (lib is not None and _fast(w, x, code) and x.shape[1] == w.shape[1] and _idx_fast(idx)
                and _scale_fast(scale, code, w.shape[0]))
    except AttributeError:
        fast = False
    if not fast:
        _check_w(w, "w")
        x = _check_x(x, w.shape[1])
        scale = _check_scale(w, scale, w.shape[0])
        idx = _check_idx(idx, w.shape[0], "rows")
        if lib is None:
            return rows_gemv_reference(w, x, _ref_idx(idx, w.shape[0], "rows"), scale)
        code = _DTYPES[w.dtype]
    n, k = w.shape
    b = x.shape[0]
    m = n if idx is None else idx.shape[0]
    y = torch.empty(b, m)
    rc = lib.csc_rows(code, w.data_ptr(), n, k, x.data_ptr(), b, None if idx is None else idx.data_ptr(),
                      m, None if scale is None else scale.data_ptr(), y.data_ptr(), _threads())
    if rc:
        raise _bad_idx(rc, idx, n, "rows")
    return y


def gather_gemv(wt: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """x[:, idx] @ wt[idx] (* scale [N]) -> float32 [B, N]; wt [K, N] input-major, idx int32 [m]."""
    if isinstance(wt, (Q4, Q4Cols)):
        return gather_q4(wt, x, idx, scale=scale)
    lib = _lib()
    try:
        code = _DTYPES.get(wt.dtype)
        fast = (lib is not None and _fast(wt, x, code) and x.shape[1] == wt.shape[0] and _idx_fast(idx)
                and _scale_fast(scale, code, wt.shape[1]))
    except AttributeError:
        fast = False
    if not fast:
        _check_w(wt, "wt")
        x = _check_x(x, wt.shape[0])
        scale = _check_scale(wt, scale, wt.shape[1], "wt")
        idx = _check_idx(idx, wt.shape[0], "inputs")
        if lib is None:
            return gather_gemv_reference(wt, x, _ref_idx(idx, wt.shape[0], "inputs"), scale)
        code = _DTYPES[wt.dtype]
    k, n = wt.shape
    b = x.shape[0]
    m = k if idx is None else idx.shape[0]
    y = torch.empty(b, n)
    rc = lib.csc_gather(code, wt.data_ptr(), k, n, x.data_ptr(), b, None if idx is None else idx.data_ptr(),
                        m, None if scale is None else scale.data_ptr(), y.data_ptr(), _threads())
    if rc:
        raise _bad_idx(rc, idx, k, "inputs")
    return y


def q4_gemv_reference(kind: str, w, x: torch.Tensor, idx, rowmap=None) -> torch.Tensor:
    """What the int4 kernels compute: rows ("rows", w Q4 [N, K]) take x quantized to int8
    per block of 32 as llama.cpp's Q8_1 (integer dot products on the codes); gather
    ("gather", wt Q4Cols [K, N]) sums x times each kept input's dequantized row, the row of
    input k being rowmap[k] when given."""
    if kind == "rows":
        return rows_gemv_reference(w.dequantize(), quantize_x_reference(x, Q4_GROUP), idx)
    wt = w.dequantize()
    if rowmap is not None:
        wt = wt[rowmap.long()]
    return gather_gemv_reference(wt, x, idx)


def gather_q4(wt: Q4Cols, x: torch.Tensor, idx: torch.Tensor | None, rowmap=None,
              scale=None) -> torch.Tensor:
    """x[:, idx] @ W^T[rowmap[idx]] -> float32 [B, N] on an input-major int4 copy (Q4Cols);
    rowmap (int32 [K], a permutation: only its range is checked) stores input k at row
    rowmap[k], so a model whose inputs were permuted after quantization keeps its blocks."""
    if not isinstance(wt, Q4Cols):
        raise ValueError("an int4 gather takes the input-major copy (runtime.pack.Q4Cols, "
                         "quantize_q4_cols), not row blocks")
    if scale is not None:
        raise ValueError("int4 weights carry their own scales: pass scale=None")
    k, n = wt.shape
    nbn = -(-n // Q4_GROUP)
    for t, name in ((wt.codes, "codes"), (wt.scales, "scales")):
        _check_cpu(t, f"wt.{name}")
        if not t.is_contiguous():
            raise ValueError(f"int4 wt.{name} must be contiguous")
    if wt.codes.dtype != torch.uint8 or tuple(wt.codes.shape) != (k, nbn * 16) or \
            wt.scales.dtype != torch.float16 or \
            tuple(wt.scales.shape) != (-(-k // Q4_GROUP), 2, nbn * Q4_GROUP):
        raise ValueError(f"int4 columns must be codes uint8 [{k}, {nbn * 16}] and scales fp16 "
                         f"[{-(-k // Q4_GROUP)}, 2, {nbn * Q4_GROUP}]")
    x = _check_x(x, k)
    idx = _check_idx(idx, k, "inputs")
    if rowmap is not None:
        _check_cpu(rowmap, "rowmap")
        if rowmap.dtype != torch.int32 or rowmap.shape != (k,) or not rowmap.is_contiguous():
            raise ValueError(f"rowmap must be a contiguous int32 [{k}] (each input's row)")
    lib = _lib()
    if lib is None:
        if rowmap is not None and k and (int(rowmap.min()) < 0 or int(rowmap.max()) >= k):
            raise ValueError(f"rowmap holds rows outside [0, {k})")
        return q4_gemv_reference("gather", wt, x, _ref_idx(idx, k, "inputs"), rowmap)
    b = x.shape[0]
    m = k if idx is None else idx.shape[0]
    y = torch.empty(b, n)
    rc = lib.csc_gather_q4(wt.codes.data_ptr(), wt.scales.data_ptr(), k, n, x.data_ptr(), b,
                           None if idx is None else idx.data_ptr(), m,
                           None if rowmap is None else rowmap.data_ptr(), y.data_ptr(), _threads())
    if rc == -2:
        raise ValueError(f"rowmap holds rows outside [0, {k})")
    if rc:
        raise _bad_idx(rc, idx, k, "inputs")
    return y


def _rows_q4(w: Q4, x: torch.Tensor, idx, scale) -> torch.Tensor:
    """rows / dense on int4 row blocks: validated, then the kernel (dtype 3) or
    q4_gemv_reference."""
    if not isinstance(w, Q4):
        raise ValueError("int4 rows take row blocks (runtime.pack.Q4), not the input-major copy")
    if scale is not None:
        raise ValueError("int4 weights carry their own scales: pass scale=None")
    blocks = w.blocks
    _check_cpu(blocks, "w.blocks")
    r, c = w.shape
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous() or \
            blocks.shape[1] != -(-c // Q4_GROUP) * Q4_BLOCK:
        raise ValueError(f"int4 blocks must be contiguous uint8 [{r}, {-(-c // Q4_GROUP) * Q4_BLOCK}]"
                         f" for {c} columns, got {blocks.dtype} {tuple(blocks.shape)}")
    x = _check_x(x, c)
    idx = _check_idx(idx, r, "rows")
    lib = _lib()
    if lib is None:
        return q4_gemv_reference("rows", w, x, _ref_idx(idx, r, "rows"))
    b = x.shape[0]
    m = r if idx is None else idx.shape[0]
    y = torch.empty(b, m)
    rc = lib.csc_rows(3, blocks.data_ptr(), r, c, x.data_ptr(), b,
                      None if idx is None else idx.data_ptr(), m, None, y.data_ptr(), _threads())
    if rc:
        raise _bad_idx(rc, idx, r, "rows")
    return y


def ffn_sparse(wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor, x: torch.Tensor,
               idx: torch.Tensor | None) -> torch.Tensor:
    """Σ_{j∈idx} silu(wg[j]·x) (wu[j]·x) wd_t[j] -> float32 [B, H]; wg, wu, wd_t [I, H] (wd_t =
    W_down.T), float32 or bfloat16, one dtype; idx int32 [m] kept channels."""
    lib = _lib()
    try:
        code = _DTYPES.get(wg.dtype)
        fast = (lib is not None and code is not None and code != 2 and _fast(wg, x, code)
                and x.shape[1] == wg.shape[1] and _idx_fast(idx)
                and wu.dtype is wg.dtype and wd_t.dtype is wg.dtype and wu.shape == wg.shape
                and wd_t.shape == wg.shape and wu.is_contiguous() and wd_t.is_contiguous()
                and wu.is_cpu and wd_t.is_cpu)
    except AttributeError:
        fast = False
    if not fast:
        for t, name in ((wg, "wg"), (wu, "wu"), (wd_t, "wd_t")):
            _check_w(t, name, int8_ok=False)
        if wu.shape != wg.shape or wd_t.shape != wg.shape:
            raise ValueError(f"wg, wu, wd_t must share one [I, H] shape, got {tuple(wg.shape)}, "
                             f"{tuple(wu.shape)}, {tuple(wd_t.shape)}")
        if wu.dtype != wg.dtype or wd_t.dtype != wg.dtype:
            raise ValueError(f"wg, wu, wd_t must share one dtype, got {wg.dtype}, {wu.dtype}, {wd_t.dtype}")
        x = _check_x(x, wg.shape[1])
        idx = _check_idx(idx, wg.shape[0], "channels")
        if lib is None:
            return ffn_sparse_reference(wg, wu, wd_t, x, _ref_idx(idx, wg.shape[0], "channels"))
        code = _DTYPES[wg.dtype]
    i, h = wg.shape
    b = x.shape[0]
    m = i if idx is None else idx.shape[0]
    y = torch.empty(b, h)
    rc = lib.csc_ffn(code, wg.data_ptr(), wu.data_ptr(), wd_t.data_ptr(), i, h, x.data_ptr(), b,
                     None if idx is None else idx.data_ptr(), m, y.data_ptr(), _threads())
    if rc:
        raise _bad_idx(rc, idx, i, "channels")
    return y


def sketch_gemv(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int, group: int,
                k: int) -> torch.Tensor:
    """x [B, k] @ dequant(packed, scales).T -> float32 [B, N], read straight from runtime/pack.py's
    packed int32 words [N, ceil(k / (32 // bits))] and float16 scales [N, ceil(k / group)]."""
    bits, group, k = int(bits), int(group), int(k)
    vpw = values_per_word(bits)  # ValueError unless 1..4
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    _check_cpu(packed, "packed")
    _check_cpu(scales, "scales")
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 [N, words], got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    words, groups = -(-k // vpw), -(-k // group)
    if packed.shape[1] != words:
        raise ValueError(f"packed has {packed.shape[1]} words per row; {k} inputs at {bits} bits "
                         f"need {words}")
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must be float16 [{n}, {groups}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    x = _check_x(x, k)
    lib = _lib()
    if lib is None:
        return sketch_gemv_reference(packed, scales, x, bits, group, k)
    packed = packed.contiguous()
    scales = scales.contiguous()
    y = torch.empty(x.shape[0], n)
    lib.csc_sketch(bits, packed.data_ptr(), words, scales.data_ptr(), groups, x.data_ptr(),
                   x.shape[0], n, k, group, y.data_ptr(), _threads())
    return y


def _row(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    if x.dtype is not _F32 or not x.is_contiguous() or not x.is_cpu:
        x = x.float().contiguous().cpu()
    return x


def select_topk(x: torch.Tensor, k: int, scale: torch.Tensor | None = None):
    """One row x (any shape, numel n): (sorted int32 indices [k] of the k largest |x| * scale,
    share of sum(score^2) they miss), k <= n; scale float32 [n] or None."""
    lib = _lib()
    x = _row(x)
    n, k = x.numel(), int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if scale is not None and (scale.dtype is not _F32 or scale.numel() != n
                              or not scale.is_contiguous()):
        raise ValueError(f"scale must be contiguous float32 [{n}]")
    if lib is None:
        return select_topk_reference(x, k, scale)
    idx = torch.empty(k, dtype=_I32)
    missed = lib.csc_select(x.data_ptr(), n, _ptr(scale), k, idx.data_ptr())
    return idx, missed


def select_logits(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """One row of logits x (numel n >= 1): (sorted int32 indices [k] of its k largest values,
    ties to the lower index, the softmax mass off them), 0 <= k <= n."""
    lib = _lib()
    x = _row(x)
    n, k = x.numel(), int(k)
    if not 0 <= k <= n or n == 0:
        raise ValueError(f"k must be in [0, {n}] for {n} >= 1 logits, got {k}")
    if lib is None:
        return select_logits_reference(x, k)
    idx = torch.empty(k, dtype=_I32)
    return idx, lib.csc_select_logits(x.data_ptr(), n, k, idx.data_ptr())


def rotate(x: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """blockdiag(H_b / sqrt(b)) (signs * x[perm]) of one row -> float32 [n]; perm int32 [n]
    (a permutation), signs float32 [n], block a power of two dividing n."""
    lib = _lib()
    x = _row(x)
    n = x.numel()
    if perm.dtype is not _I32 or signs.dtype is not _F32 or perm.numel() != n or \
            signs.numel() != n or not (perm.is_contiguous() and signs.is_contiguous()):
        raise ValueError(f"perm must be int32 [{n}] and signs float32 [{n}], contiguous")
    if lib is None:
        return rotate_reference(x, perm, signs, block)
    y = torch.empty(n)
    rc = lib.csc_rotate(x.data_ptr(), n, perm.data_ptr(), signs.data_ptr(), int(block), y.data_ptr())
    if rc:
        raise ValueError(f"rotation block {block} must be a power of two dividing {n}" if rc < 0
                         else f"perm[{rc - 1}] is out of range")
    return y


def planes_fit(bits: int, group: int, k: int) -> bool:
    """Whether sketch_q8 runs this sketch shape (else the float kernel, sketch_gemv)."""
    return 2 <= bits <= 4 and k % 64 == 0 and group % 32 == 0


def sketch_planes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 [N, k / 64 * 8 * bits]: pack.py's words re-laid for sketch_q8 (see the kernel's
    comment), the same bits per weight."""
    from .pack import unpack_codes

    if not planes_fit(bits, 32, k):
        raise ValueError(f"planes need 2..4 bits and k % 64 == 0, got {bits} bits, k {k}")
    c = unpack_codes(packed, bits, k).to(torch.int32)
    n, s = c.shape[0], k // 64
    shifts = (2 * torch.arange(4, dtype=torch.int32)).view(2, 2, 1)  # 2(2j + h)

    def low_plane(two_bits):  # [n, s, 2 j, 2 h, 16 i] -> bytes [n, s, 16]
        return (two_bits.view(n, s, 2, 2, 16) << shifts).sum((2, 3))

    parts = [low_plane(c & 3)]
    if bits == 3:  # bit 2 of input 32j + 8q + r at bit 4j + q of byte r
        b2 = ((c >> 2) & 1).view(n, s, 2, 4, 8)
        parts.append((b2 << torch.arange(8, dtype=torch.int32).view(2, 4, 1)).sum((2, 3)))
    elif bits == 4:
        parts.append(low_plane((c >> 2) & 3))
    return torch.cat(parts, -1).to(torch.uint8).reshape(n, -1).contiguous()


def planes_codes(planes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """codes uint8 [N, k] back from sketch_planes' layout (its inverse)."""
    n, s = planes.shape[0], k // 64
    p = planes.view(n, s, 8 * bits).to(torch.int32)
    shifts = (2 * torch.arange(4, dtype=torch.int32)).view(2, 2, 1)

    def low(plane):  # bytes [n, s, 16] -> two-bit values [n, s, 64]
        return ((plane.view(n, s, 1, 1, 16) >> shifts) & 3).reshape(n, s, 64)

    c = low(p[..., :16])
    if bits == 3:
        bit2 = (p[..., 16:24].view(n, s, 1, 1, 8) >>
                torch.arange(8, dtype=torch.int32).view(2, 4, 1)) & 1
        c = c | (bit2.reshape(n, s, 64) << 2)
    elif bits == 4:
        c = c | (low(p[..., 16:32]) << 2)
    return c.reshape(n, k).to(torch.uint8)


def sketch_q8_reference(planes, scales, x, bits: int, group: int, k: int) -> torch.Tensor:
    """sketch_q8 in torch: the planes' codes dequantized, times x rounded as the kernel does."""
    from .pack import dequantize_codes

    w = dequantize_codes(planes_codes(planes, bits, k), scales, bits, group)
    return w @ quantize_x_reference(x.reshape(-1), group)


def sketch_q8(planes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int, group: int,
              k: int) -> torch.Tensor:
    """One row x [k] @ dequant(sketch).T -> float32 [N], x quantized to int8 per group; planes
    from sketch_planes. Reference: sketch_gemv_reference on quantize_x_reference(x)."""
    x = _row(x)
    n = planes.shape[0]
    groups = -(-k // group)
    if not planes_fit(bits, group, k) or x.numel() != k or planes.dtype != torch.uint8 or \
            tuple(planes.shape) != (n, k // 64 * 8 * bits) or scales.dtype != torch.float16 or \
            tuple(scales.shape) != (n, groups):
        raise ValueError(f"sketch_q8: planes uint8 [N, {k // 64 * 8 * bits}], scales fp16 "
                         f"[N, {groups}], x [{k}] needed (2..4 bits, k % 64, group % 32)")
    lib = _lib()
    if lib is None:
        return sketch_q8_reference(planes, scales, x, bits, group, k)
    y = torch.empty(n)
    lib.csc_sketch_q8(bits, planes.data_ptr(), n, k, scales.data_ptr(), groups, group,
                      x.data_ptr(), y.data_ptr(), _threads())
    return y


def sketch_select(sg, su, xr: torch.Tensor, k: int):
    """The FFN sketch op at batch 1: (sorted int32 indices of the k channels with the largest
    |silu(ĝ) û|, ĝ / û the gate / up sketches (runtime.pertoken.Sketch: packed codes, fp16
    scales, same bits and group) applied to the already rotated row xr, share of sum(est^2)
    they miss)."""
    lib = _lib()
    xr = _row(xr)
    n_out, words = su.packed.shape
    kin = xr.numel()
    if sg.packed.shape != su.packed.shape or sg.scales.shape != su.scales.shape or \
            (sg.bits, sg.group) != (su.bits, su.group):
        raise ValueError("gate and up sketches must share shapes, bits and group")
    if words != -(-kin // values_per_word(su.bits)) or not 0 <= int(k) <= n_out:
        raise ValueError(f"sketch of {words} words per row / k {k} do not fit {kin} inputs, "
                         f"{n_out} channels")
    if lib is None or not planes_fit(su.bits, su.group, kin):
        return sketch_select_reference(sg, su, xr, k)
    idx, est = torch.empty(int(k), dtype=_I32), torch.empty(n_out)
    missed = lib.csc_sketch_select(su.bits, sg.planes.data_ptr(), sg.scales.data_ptr(),
                                   su.planes.data_ptr(), su.scales.data_ptr(),
                                   su.scales.shape[1], xr.data_ptr(), n_out, kin, su.group, int(k),
                                   idx.data_ptr(), est.data_ptr(), _threads())
    return idx, missed


def read_bandwidth(buf: torch.Tensor) -> int:
    """Sum of buf's bytes, read once with every thread (time it to measure read bandwidth)."""
    _check_cpu(buf, "buf")
    if not buf.is_contiguous():
        raise ValueError("buf must be contiguous")
    lib = _lib()
    if lib is None:
        return read_bandwidth_reference(buf)
    return int(lib.csc_read(buf.data_ptr(), buf.numel() * buf.element_size(), _threads()))


def read_rows_reference(buf: torch.Tensor, idx: torch.Tensor) -> int:
    """Sum of the bytes of rows idx of buf [rows, row_bytes] (as unsigned)."""
    return read_bandwidth_reference(buf.view(torch.uint8)[idx.long()])


def read_rows(buf: torch.Tensor, idx: torch.Tensor) -> int:
    """Sum of the bytes of rows idx (int32) of buf [rows, row_bytes], row_bytes a multiple of
    64, read as the sparse kernels read kept rows (time it: the memory system's speed for that
    scattered pattern, no arithmetic)."""
    _check_cpu(buf, "buf")
    rows = buf.view(torch.uint8)
    if rows.dim() != 2 or not rows.is_contiguous() or rows.shape[1] % 64:
        raise ValueError("buf must be contiguous [rows, row_bytes], row_bytes a multiple of 64")
    idx = _check_idx(idx, rows.shape[0], "rows")
    lib = _lib()
    if lib is None:
        return read_rows_reference(rows, _ref_idx(idx, rows.shape[0], "rows"))
    total = lib.csc_read_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], idx.data_ptr(),
                              idx.numel(), _threads())
    if total < 0:
        raise ValueError(f"idx holds rows outside [0, {rows.shape[0]})")
    return int(total)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * w / sqrt(mean(x^2) + eps) over the last dimension -> float32, x's shape; w float32."""
    lib = _lib()
    n = x.shape[-1]
    if w.dtype is not _F32 or w.numel() != n or not w.is_contiguous():
        raise ValueError(f"w must be contiguous float32 [{n}]")
    if lib is None or x.dtype is not _F32 or not x.is_contiguous() or not x.is_cpu:
        return rms_norm_reference(x, w, eps)
    y = torch.empty_like(x)
    lib.csc_rmsnorm(x.data_ptr(), x.numel() // n, n, w.data_ptr(), float(eps), y.data_ptr())
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of every head of x [..., d] (one position: cos, sin float32 [d]); rotates
    x in place when it is contiguous float32 and returns it (else a rotated copy)."""
    lib = _lib()
    d = x.shape[-1]
    if cos.numel() != d or sin.numel() != d or d % 2:
        raise ValueError(f"cos and sin must have {d} (even) elements")
    if lib is None or x.dtype is not _F32 or not x.is_contiguous() or not x.is_cpu or \
            cos.dtype is not _F32 or sin.dtype is not _F32 or not cos.is_contiguous() or \
            not sin.is_contiguous():
        return rope_reference(x, cos.reshape(-1), sin.reshape(-1))
    lib.csc_rope(x.data_ptr(), x.numel() // d, d, cos.data_ptr(), sin.data_ptr())
    return x


def attention_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row's attention over its cache: q [Hq, d] (any shape, numel Hq * d), k, v
    [Hkv, L, d] with Hkv dividing Hq (grouped-query) -> float32 [Hq * d], heads in order."""
    lib = _lib()
    hkv, length, d = k.shape
    if v.shape != k.shape or q.numel() % (hkv * d):
        raise ValueError(f"k and v must be [Hkv, L, d] alike and q [Hq, {d}] with Hkv | Hq")
    fast = lib is not None and all(t.dtype is _F32 and t.is_contiguous() and t.is_cpu
                                   for t in (q, k, v))
    if not fast:
        return attention_row_reference(q, k, v, scale)
    o = torch.empty(q.numel())
    lib.csc_attention(q.data_ptr(), q.numel() // d, hkv, d, k.data_ptr(), v.data_ptr(), length,
                      float(scale), o.data_ptr(), _threads())
    return o
