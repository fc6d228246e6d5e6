"""The per-token Triton kernels (codegen/pertoken_kernels.py) against float64 torch references.

Without a GPU they run in Triton's interpreter (tests/conftest.py), in fp32, at small odd shapes
(K=130, N=77: every tile has a masked edge). Both compute paths are covered: B <= 2 rows
(broadcast multiply-reduce) and B = 3 (tl.dot, rows padded to 16), with and without split-K
atomics, plus empty and all-kept index lists. Outputs the wrappers allocate with torch.empty
are poisoned with NaN, so an element a kernel forgets to write fails. The `gpu` test checks
bf16 (and fp32 x with bf16 weights) on a CUDA device; it is skipped here.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from cscompile.codegen import pertoken_kernels as P
from cscompile.runtime import pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5  # fp32 kernel vs float64 reference, relative (Frobenius) error
K_IN, N_OUT = 130, 77
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def rel_err(got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == torch.float32
    got, ref = got.double().cpu(), ref.double().cpu()
    if ref.numel() == 0 or ref.abs().max() == 0:
        return got.abs().max().item() if got.numel() else 0.0
    return ((got - ref).norm() / ref.norm()).item()


def rand(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def kept(total, m, gen, shuffled=True):
    ids = torch.randperm(total, generator=gen)[:m]
    return (ids if shuffled else ids.sort().values).to(torch.int32).to(DEVICE)


# --------------------------------------------------------------------------- gather_gemv


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("m,blocks", [
    (50, {}),  # wrapper's own blocks
    (50, {"block_n": 32, "block_k": 16, "split": 3}),  # several N tiles, split-K atomics
    (K_IN, {"block_n": 64, "block_k": 32}),  # every input kept
    (1, {}),
])
def test_gather_gemv(poison, batch, m, blocks):
    gen = torch.Generator().manual_seed(batch * 1000 + m)
    wt, x = rand(K_IN, N_OUT, gen=gen), rand(batch, K_IN, gen=gen)
    idx = kept(K_IN, m, gen)
    y = P.gather_gemv(wt, x, idx, **blocks)
    ref = P.gather_gemv_reference(wt.double(), x.double(), idx)
    assert rel_err(y, ref) <= TOL
    # the reference is the definition: x[:, idx] @ wt[idx, :]
    il = idx.long()
    assert torch.allclose(ref, x.double()[:, il] @ wt.double()[il])


def test_gather_gemv_empty_idx():
    gen = torch.Generator().manual_seed(1)
    wt, x = rand(K_IN, N_OUT, gen=gen), rand(3, K_IN, gen=gen)
    y = P.gather_gemv(wt, x, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert y.shape == (3, N_OUT) and y.dtype == torch.float32 and not y.any()


# --------------------------------------------------------------------------- rows_gemv


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("m,blocks", [
    (40, {}),
    (40, {"block_m": 16, "block_k": 32, "split": 3}),  # several row tiles, split-K atomics
    (N_OUT, {"block_m": 32, "block_k": 64}),  # every row kept
    (1, {}),
])
def test_rows_gemv(poison, batch, m, blocks):
    gen = torch.Generator().manual_seed(batch * 1000 + m + 7)
    w, x = rand(N_OUT, K_IN, gen=gen), rand(batch, K_IN, gen=gen)
    idx = kept(N_OUT, m, gen)
    y = P.rows_gemv(w, x, idx, **blocks)
    ref = P.rows_gemv_reference(w.double(), x.double(), idx)
    assert y.shape == (batch, m) and rel_err(y, ref) <= TOL
    assert torch.allclose(ref, x.double() @ w.double()[idx.long()].T)


def test_rows_gemv_empty_idx():
    gen = torch.Generator().manual_seed(2)
    w, x = rand(N_OUT, K_IN, gen=gen), rand(1, K_IN, gen=gen)
    y = P.rows_gemv(w, x, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert y.shape == (1, 0) and y.dtype == torch.float32


# --------------------------------------------------------------------------- sketch_gemv


def sketch(n, k, bits, group, gen):
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).float()
    codes, scales = pack.quantize_codes(w, bits, group)
    return codes, scales, pack.pack_codes(codes, bits)


# groups: 32 is a multiple of 32 // b for b = 1, 2, 4 (one scale per word) but not for 3 bits
# (10 codes a word: two scales per word); 20 gives 2-scale words at 2 and 4 bits and one-scale
# ones at 3; 7 is smaller than every word (one scale per code)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("batch,group,blocks", [
    (1, 32, {}),
    (3, 32, {}),
    (2, 20, {"block_n": 16, "block_inputs": 64, "split": 2}),
    (3, 7, {"block_n": 16, "block_inputs": 64, "split": 2}),
])
def test_sketch_gemv(poison, bits, batch, group, blocks):
    gen = torch.Generator().manual_seed(bits * 100 + batch * 10 + group)
    codes, scales, packed = sketch(N_OUT, K_IN, bits, group, gen)
    x = rand(batch, K_IN, gen=gen)
    y = P.sketch_gemv(packed.to(DEVICE), scales.to(DEVICE), x, bits, group, K_IN, **blocks)
    w = pack.dequantize_codes(codes, scales, bits, group).double()
    ref = x.double().cpu() @ w.T
    assert y.shape == (batch, N_OUT) and rel_err(y, ref) <= TOL
    # and runtime/pack.py's own reference agrees (fp32)
    assert rel_err(pack.sketch_gemv_reference(packed, scales, x.cpu(), bits, group, K_IN),
                   ref) <= TOL


@pytest.mark.parametrize("bits", [1, 3])
def test_sketch_gemv_short_rows(bits):
    """k smaller than one word and than one group: a single masked word per row."""
    gen = torch.Generator().manual_seed(bits)
    codes, scales, packed = sketch(5, 7, bits, 64, gen)
    x = rand(1, 7, gen=gen)
    y = P.sketch_gemv(packed.to(DEVICE), scales.to(DEVICE), x, bits, 64, 7)
    ref = x.double().cpu() @ pack.dequantize_codes(codes, scales, bits, 64).double().T
    assert rel_err(y, ref) <= TOL


# --------------------------------------------------------------------------- ffn_sparse


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("m,blocks", [
    (33, {}),
    (33, {"block_j": 16, "block_h": 32}),  # several programs adding into y
    (N_OUT, {"block_j": 32, "block_h": 64}),  # every channel kept
    (1, {}),
])
def test_ffn_sparse(batch, m, blocks):
    gen = torch.Generator().manual_seed(batch * 1000 + m + 13)
    hidden, inter = K_IN, N_OUT
    wg, wu = (rand(inter, hidden, gen=gen, scale=hidden ** -0.5) for _ in range(2))
    wd_t = rand(inter, hidden, gen=gen, scale=inter ** -0.5)
    x = rand(batch, hidden, gen=gen, scale=2.0)
    idx = kept(inter, m, gen)
    y = P.ffn_sparse(wg, wu, wd_t, x, idx, **blocks)
    ref = P.ffn_sparse_reference(wg.double(), wu.double(), wd_t.double(), x.double(), idx)
    assert y.shape == (batch, hidden) and rel_err(y, ref) <= TOL
    # the same thing as the class-path reference (codegen/kernels.py) on the kept channels
    from cscompile.codegen.kernels import ffn_reference

    assert torch.allclose(ref, ffn_reference(x.double(), wg.double(), wu.double(),
                                             wd_t.double(), idx=idx.cpu()))


def test_ffn_sparse_empty_idx():
    gen = torch.Generator().manual_seed(3)
    w = [rand(N_OUT, K_IN, gen=gen) for _ in range(3)]
    y = P.ffn_sparse(*w, rand(2, K_IN, gen=gen), torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert y.shape == (2, K_IN) and y.dtype == torch.float32 and not y.any()


# --------------------------------------------------------------------------- CPU-backend API parity


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_scales_none_and_int64_idx(batch):
    """int8 weights with per-output scales, idx=None (all) and int64 idx, as runtime/cpu_kernels."""
    gen = torch.Generator().manual_seed(batch + 50)
    w = rand(N_OUT, K_IN, gen=gen)
    x = rand(batch, K_IN, gen=gen)
    q, scale = (t.to(DEVICE) for t in pack.quantize_int8(w.cpu(), dim=1))  # [77, 130], [77]
    # input-major copy wt = w.T [K=130, N=77], one scale per output column
    qt, scale_t = (t.to(DEVICE) for t in pack.quantize_int8(w.cpu().T.contiguous(), dim=0))
    rows = kept(N_OUT, 30, gen)
    for blocks in ({}, {"block_m": 16, "block_k": 32, "split": 3}):
        y = P.rows_gemv(q, x, rows.long(), scale, **blocks)
        assert rel_err(y, P.rows_gemv_reference(q.double(), x.double(), rows, scale)) <= TOL
    inputs = kept(K_IN, 40, gen)
    for blocks in ({}, {"block_n": 32, "block_k": 16, "split": 2}):
        y = P.gather_gemv(qt, x, inputs.long(), scale_t, **blocks)
        assert rel_err(y, P.gather_gemv_reference(qt.double(), x.double(), inputs,
                                                  scale_t)) <= TOL
    # idx=None: every input / row / channel
    y = P.gather_gemv(w.T.contiguous(), x, None)
    assert rel_err(y, x.double() @ w.double().T) <= TOL
    y = P.rows_gemv(w, x, None)
    assert rel_err(y, x.double() @ w.double().T) <= TOL
    y = P.dense_gemv(q, x, scale)
    assert rel_err(y, P.dense_gemv_reference(q.double(), x.double(), scale)) <= TOL
    assert rel_err(y, x.double() @ w.double().T) <= 2e-2  # int8 is close to the float weights
    wg, wu, wd_t = (rand(N_OUT, K_IN, gen=gen, scale=K_IN ** -0.5) for _ in range(3))
    y = P.ffn_sparse(wg, wu, wd_t, x, None)
    assert rel_err(y, P.ffn_sparse_reference(wg.double(), wu.double(), wd_t.double(),
                                             x.double(), None)) <= TOL


def test_references_match_the_cpu_backend():
    """Our references and runtime/cpu_kernels.py's define the same operators."""
    C = pytest.importorskip("cscompile.runtime.cpu_kernels")
    gen = torch.Generator().manual_seed(60)
    w, x = torch.randn(N_OUT, K_IN, generator=gen), torch.randn(2, K_IN, generator=gen)
    rows, inputs = kept(N_OUT, 20, gen).cpu(), kept(K_IN, 20, gen).cpu()
    scale = torch.rand(N_OUT, generator=gen) + 0.5
    wt = w.T.contiguous()
    xt = torch.randn(2, K_IN, generator=gen)
    pairs = [
        (P.rows_gemv_reference(w, x, rows, scale), C.rows_gemv_reference(w, x, rows, scale)),
        (P.gather_gemv_reference(wt, xt, inputs), C.gather_gemv_reference(wt, xt, inputs)),
        (P.dense_gemv_reference(w, x), C.dense_gemv_reference(w, x)),
        (P.ffn_sparse_reference(w, w, w, x, rows), C.ffn_sparse_reference(w, w, w, x, rows)),
    ]
    for got, ref in pairs:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- validation


def test_wrappers_reject_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    wt, w = rand(K_IN, N_OUT, gen=gen), rand(N_OUT, K_IN, gen=gen)
    x = rand(1, K_IN, gen=gen)
    ok_in, ok_rows = kept(K_IN, 5, gen), kept(N_OUT, 5, gen)
    with pytest.raises(ValueError, match="int32"):
        P.gather_gemv(wt, x, ok_in.float())
    with pytest.raises(ValueError, match="needs scale"):
        P.rows_gemv(w.to(torch.int8), x, ok_rows)
    with pytest.raises(ValueError, match=r"scale must be a float32 \[77\]"):
        P.rows_gemv(w, x, ok_rows, torch.ones(K_IN, device=DEVICE))
    with pytest.raises(ValueError, match="outside"):
        P.gather_gemv(wt, x, torch.tensor([0, K_IN], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="outside"):
        P.rows_gemv(w, x, torch.tensor([-1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="1 <= B <= 16"):
        P.gather_gemv(wt, rand(17, K_IN, gen=gen), ok_in)
    with pytest.raises(ValueError, match=r"\[B, 130\]"):
        P.rows_gemv(w, rand(1, K_IN + 1, gen=gen), ok_rows)
    with pytest.raises(ValueError, match="float32 or the weights"):
        P.rows_gemv(w.half(), x.double(), ok_rows)
    with pytest.raises(ValueError, match="contiguous"):
        P.rows_gemv(wt.T, x, ok_rows)
    with pytest.raises(ValueError, match="share one"):
        P.ffn_sparse(w, w, wt, x[:, :K_IN], ok_rows)
    _, scales, packed = sketch(N_OUT, K_IN, 3, 32, gen)
    with pytest.raises(ValueError, match="words per row"):
        P.sketch_gemv(packed.to(DEVICE), scales.to(DEVICE), x, 4, 32, K_IN)
    with pytest.raises(ValueError, match="scales must be"):
        P.sketch_gemv(packed.to(DEVICE), scales.to(DEVICE), x, 3, 64, K_IN)
    with pytest.raises(ValueError, match="bits must be 1..4"):
        P.sketch_gemv(packed.to(DEVICE), scales.to(DEVICE), x, 5, 32, K_IN)


# --------------------------------------------------------------------------- GPU compile (no GPU)

# Run in a fresh interpreter without TRITON_INTERPRET: lower each kernel variant the wrappers can
# launch through Triton's NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) for sm_90, with the
# pointer / divisible-by-16 specialisation a real launch gets. No driver or ptxas is needed (so
# register allocation and SASS are not checked). Uses Triton internals: skipped if they moved.
COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton._C.libtriton import ir
except Exception as e:  # pragma: no cover
    print("SKIP", repr(e)); sys.exit(0)
from cscompile.codegen import pertoken_kernels as P

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
DIV16 = {"N", "K", "H"}

def to_ptx(fn, types, consts):
    sig = dict(types, **{k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(types)
             if t.startswith("*") or n in DIV16}
    src = ASTSource(fn, sig, consts, attrs)
    opts = backend.parse_options({"num_warps": 4})
    ctx = ir.context(); ir.load_dialects(ctx); backend.load_dialects(ctx)
    mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                      backend.get_module_map(), ctx)
    stages, meta = {}, {}
    backend.add_stages(stages, opts, src.language)
    for name in ("ttir", "ttgir", "llir", "ptx"):
        mod = stages[name](mod, meta)
    assert ".entry" in mod
    return mod

I32 = "i32"
G = [("wt_ptr", "*{w}"), ("x_ptr", "*{x}"), ("idx_ptr", "*i32"), ("scale_ptr", "*fp32"),
     ("y_ptr", "*fp32"),
     ("B", I32), ("N", I32), ("K", I32), ("n_kept", I32), ("k_per_split", I32)]
R = [("w_ptr", "*{w}"), ("x_ptr", "*{x}"), ("idx_ptr", "*i32"), ("scale_ptr", "*fp32"),
     ("y_ptr", "*fp32"),
     ("B", I32), ("K", I32), ("n_kept", I32), ("k_per_split", I32)]
F = [("x_ptr", "*{x}"), ("wg_ptr", "*bf16"), ("wu_ptr", "*bf16"), ("wd_ptr", "*bf16"),
     ("idx_ptr", "*i32"), ("y_ptr", "*fp32"), ("B", I32), ("H", I32), ("n_kept", I32)]
S = [("packed_ptr", "*i32"), ("scales_ptr", "*fp16"), ("x_ptr", "*{x}"), ("y_ptr", "*fp32"),
     ("B", I32), ("N", I32), ("K", I32), ("N_WORDS", I32), ("N_GROUPS", I32),
     ("words_per_split", I32)]
def t(types, x, w="bf16"):
    return [(n, ty.format(x=x, w=w)) for n, ty in types]
NO_INT8 = dict(W_INT8=False, HAS_SCALE=False)

def sketch_job(bits, group, mode, dot):
    vpw = 32 // bits
    lanes = 1 << (vpw - 1).bit_length()
    bw = 1 << ((128 // lanes if dot else 256 // vpw) - 1).bit_length()
    return (P._sketch_gemv_kernel, t(S, "bf16"), dict(BITS=bits, VPW=vpw, LANES=lanes,
            GROUP=group, SCALE_MODE=mode, BLOCK_B=16 if dot else 1, BLOCK_N=16 if dot else 32,
            BLOCK_W=bw, USE_DOT=dot, EXACT=False, ATOMIC=True))

# one row (register FMAs, USE_DOT False) and padded rows (tl.dot) of every kernel, each
# weight kind (bf16; int8 + scales with half or fp32 x; fp32 exact) and all three sketch scale
# modes; about a second each
jobs = [
    (P._gather_gemv_kernel, t(G, "bf16"), dict(BLOCK_B=1, BLOCK_N=128, BLOCK_K=32,
     USE_DOT=False, EXACT=False, ATOMIC=True, **NO_INT8)),
    (P._gather_gemv_kernel, t(G, "bf16", "i8"), dict(BLOCK_B=16, BLOCK_N=128, BLOCK_K=32,
     USE_DOT=True, EXACT=False, W_INT8=True, HAS_SCALE=True, ATOMIC=False)),
    (P._rows_gemv_kernel, t(R, "fp32", "i8"), dict(BLOCK_B=1, BLOCK_M=16, BLOCK_K=128,
     USE_DOT=False, EXACT=True, W_INT8=True, HAS_SCALE=True, ATOMIC=False)),
    (P._rows_gemv_kernel, t(R, "bf16"), dict(BLOCK_B=16, BLOCK_M=16, BLOCK_K=64,
     USE_DOT=True, EXACT=False, ATOMIC=True, **NO_INT8)),
    (P._rows_gemv_kernel, t(R, "fp32", "fp32"), dict(BLOCK_B=16, BLOCK_M=16, BLOCK_K=64,
     USE_DOT=True, EXACT=True, ATOMIC=True, **NO_INT8)),
    (P._ffn_sparse_kernel, t(F, "bf16"), dict(BLOCK_B=1, BLOCK_J=4, BLOCK_H=128,
     USE_DOT=False, EXACT=False)),
    (P._ffn_sparse_kernel, t(F, "bf16"), dict(BLOCK_B=16, BLOCK_J=16, BLOCK_H=64,
     USE_DOT=True, EXACT=False)),
    sketch_job(3, 64, 1, False), sketch_job(4, 64, 0, True), sketch_job(2, 7, 2, False),
    sketch_job(3, 64, 1, True),
]
failed = []
for fn, types, consts in jobs:
    try:
        to_ptx(fn, types, consts)
    except Exception as e:
        failed.append(f"{fn.__name__} {consts}: {e!r}"[:3000])
print(f"{len(jobs) - len(failed)}/{len(jobs)} compiled")
print("\n".join(failed))
"""


def test_kernels_lower_to_ptx_for_sm90():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton's compiler internals differ: {out.stdout.strip()}")
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    done, total = first.split()[0].split("/")
    assert done == total, out.stdout[-6000:]


# --------------------------------------------------------------------------- benchmark script


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels_pertoken", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU: run the benchmark itself")
    bench = load_bench()
    assert bench.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    args = bench.parse_args(["--suite", "pertoken", "--batches", "1", "16", "--json", "x.json"])
    assert args.suite == ["pertoken"] and args.batches == [1, 16]
    assert bench.PERTOKEN_MODELS["SmolLM2-135M"]["matrices"]["lm_head"] == (49152, 576)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 2, 4, 16])
def test_gpu_bf16(batch):
    gen = torch.Generator().manual_seed(batch)
    bf = torch.bfloat16
    tol = 2e-2
    n, k = 1000, 1030  # odd sizes: masked edge tiles at GPU block sizes
    w = rand(n, k, gen=gen, dtype=bf)
    wt = w.T.contiguous()
    for x in (rand(batch, k, gen=gen, dtype=bf), rand(batch, k, gen=gen)):  # bf16 and fp32 x
        idx_in, idx_rows = kept(k, k // 3, gen), kept(n, n // 4, gen)
        y = P.gather_gemv(wt, x, idx_in)
        assert rel_err(y, P.gather_gemv_reference(wt.double(), x.double(), idx_in)) <= tol
        y = P.rows_gemv(w, x, idx_rows)
        assert rel_err(y, P.rows_gemv_reference(w.double(), x.double(), idx_rows)) <= tol
        for bits in (1, 2, 3, 4):
            codes, scales, packed = sketch(n, k, bits, 64, gen)
            y = P.sketch_gemv(packed.cuda(), scales.cuda(), x, bits, 64, k)
            ref = x.double().cpu() @ pack.dequantize_codes(codes, scales, bits, 64).double().T
            assert rel_err(y, ref) <= tol, bits
        hidden, inter = 576, 1536
        wg, wu = (rand(inter, hidden, gen=gen, scale=hidden ** -0.5, dtype=bf) for _ in range(2))
        wd_t = rand(inter, hidden, gen=gen, scale=inter ** -0.5, dtype=bf)
        xf = x[:, :hidden].contiguous()
        for m in (0, 1, 384, inter):
            idx = kept(inter, m, gen)
            y = P.ffn_sparse(wg, wu, wd_t, xf, idx)
            ref = P.ffn_sparse_reference(wg.double(), wu.double(), wd_t.double(), xf.double(),
                                         idx)
            assert (not y.any()) if m == 0 else rel_err(y, ref) <= tol
    # int8 weights with per-output scales, bf16 and fp32 x
    q, scale = (t.cuda() for t in pack.quantize_int8(w.float().cpu(), dim=1))
    rows = kept(n, 200, gen)
    for x in (rand(batch, k, gen=gen, dtype=bf), rand(batch, k, gen=gen)):
        y = P.rows_gemv(q, x, rows, scale)
        assert rel_err(y, P.rows_gemv_reference(q.double(), x.double(), rows, scale)) <= tol
        # wt = w.T [K=k, N=n] with one scale per output column
        qt, st = (t.cuda() for t in pack.quantize_int8(w.float().cpu().T.contiguous(), dim=0))
        idx = kept(k, 300, gen)
        y = P.gather_gemv(qt, x, idx, st)
        assert rel_err(y, P.gather_gemv_reference(qt.double(), x.double(), idx, st)) <= tol
    # a new kept count per token must not recompile (n_kept is not specialised on)
    kernel = P._gather_gemv_kernel
    if hasattr(kernel, "device_caches"):  # Triton 3.x's per-device compiled-kernel caches
        compiled = lambda: sum(len(c[0]) for c in kernel.device_caches.values())  # noqa: E731
        xg = rand(batch, k, gen=gen, dtype=bf)
        P.gather_gemv(wt, xg, kept(k, 300, gen), split=2)  # split fixed: always atomic
        before = compiled()
        for m in (257, 299, 333, 512, 1029):
            P.gather_gemv(wt, xg, kept(k, m, gen), split=2)
        assert compiled() == before
    # fp32 weights on the GPU: the exact (ieee) dot path
    w32, x32 = w.float(), rand(batch, k, gen=gen)
    idx = kept(n, 100, gen)
    assert rel_err(P.rows_gemv(w32, x32, idx),
                   P.rows_gemv_reference(w32.double(), x32.double(), idx)) <= 1e-4
