"""The CPU sparse GEMV kernels (runtime/cpu_kernels.py) against their torch references.

Each op in fp32 and bf16 (int8 with per-output scales, int4 blocks, sketch codes at 1..4 bits), odd sizes,
batch 1 / 3 / 16, empty idx, idx = all and idx = None, on 1 and 2 threads (the "big" shapes are
above the 64 KiB under which a call runs on one thread, so the 2-thread split is exercised), and
the torch fallback forced by CSCOMPILE_CPU_KERNELS=0. Outputs the wrappers allocate are
poisoned with NaN, so any element a kernel forgets to write fails the comparison.

The first test run on a machine builds the extension (seconds; cached in the cscompile cache).
"""
import shutil
from pathlib import Path

import pytest
import torch

from cscompile.runtime import cpu_kernels as C
from cscompile.runtime import pack

TOL = 2e-6  # relative (Frobenius) error vs the fp32 torch reference: summation order only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (N, K): odd sizes, sizes that are no multiple of 8, and one big enough for 2 threads
SHAPES = [(77, 130), (5, 3), (517, 130)]
BIG = [(517, 130)]
BATCHES = [1, 3, 16]


@pytest.fixture(autouse=True)
def _poisoned(poison):
    """Every test here runs with conftest's NaN-filled torch.empty."""


class threads:
    """Run the kernels on n threads inside the block (inputs are made outside it, on 1)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@pytest.fixture(autouse=True)
def one_thread():
    """Inputs and references on one thread (the shared 2-core machine is noisy)."""
    with threads(1):
        yield


def with_threads(shapes, big):
    """(shape, threads) cases: every shape on 1 thread, the big ones (over the 64 KiB under
    which a call stays on one thread) also on 2."""
    return [pytest.param(sh, 1, id=f"{sh}-1t") for sh in shapes] + [
        pytest.param(sh, 2, id=f"{sh}-2t") for sh in shapes if sh in big]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == torch.float32
    assert not got.isnan().any(), "unwritten (NaN) outputs"
    denom = ref.double().norm().item()
    diff = (got.double() - ref.double()).norm().item()
    return diff / denom if denom > 0 else diff


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def kept(n, frac, g):
    m = int(round(n * frac))
    return torch.randperm(n, generator=g)[:m].sort().values.to(torch.int32)


# --------------------------------------------------------------------------- the build
def test_extension_builds_here():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the torch fallback is the expected path")
    if C.disabled():
        pytest.skip(f"{C.ENV}=0: the torch fallback is forced")
    assert C.available(), f"extension did not build: {C._state['error']}"
    assert C.load_extension().csc_abi_version() == C.ABI_VERSION
    path = Path(C._state["path"])  # <cache root>/torch_extensions/<name keyed by CPU+flags+source>/
    assert path.parent.parent.name == "torch_extensions"
    assert path.parent.name == C._build_name(C.FLAGS_NATIVE)


def test_build_name_keys_cpu_flags_and_source(monkeypatch):
    a = C._build_name(C.FLAGS_NATIVE)
    assert a != C._build_name(C.FLAGS_PORTABLE)
    monkeypatch.setattr(C, "_cpu_fingerprint", lambda: "another cpu")
    assert C._build_name(C.FLAGS_NATIVE) != a


# --------------------------------------------------------------------------- dense / rows
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("shape,nt", with_threads(SHAPES, BIG))
@pytest.mark.parametrize("batch", BATCHES)
def test_dense_and_rows(dname, shape, nt, batch):
    g = gen(1)
    n, k = shape
    w = torch.randn(n, k, generator=g).to(DTYPES[dname])
    x = torch.randn(batch, k, generator=g)
    idxs = (kept(n, 0.5, g), kept(n, 0.25, g), torch.arange(n, dtype=torch.int32), None)
    with threads(nt):
        dense = C.dense_gemv(w, x)
        rows = [C.rows_gemv(w, x, idx) for idx in idxs]
        empty = C.rows_gemv(w, x, torch.zeros(0, dtype=torch.int32))
    assert rel_err(dense, C.dense_gemv_reference(w, x)) < TOL
    for idx, got in zip(idxs, rows):
        assert rel_err(got, C.rows_gemv_reference(w, x, idx)) < TOL
    assert empty.shape == (batch, 0)


@pytest.mark.parametrize("shape,nt", with_threads(SHAPES, BIG))
@pytest.mark.parametrize("batch", BATCHES)
def test_int8_dense_rows_gather(shape, nt, batch):
    g = gen(2)
    n, k = shape
    w = torch.randn(n, k, generator=g)
    x = torch.randn(batch, k, generator=g)
    q, s = pack.quantize_int8(w)
    idx = kept(n, 0.5, g)
    qt, st = pack.quantize_int8(w.T.contiguous(), dim=0)  # input-major [K, N], scale per output
    idks = (kept(k, 0.5, g), None)
    with threads(nt):
        dense = C.dense_gemv(q, x, s)
        rows = C.rows_gemv(q, x, idx, s)
        gathers = [C.gather_gemv(qt, x, idk, st) for idk in idks]
    assert rel_err(dense, C.dense_gemv_reference(q, x, s)) < TOL
    assert rel_err(dense, x @ w.T) < 0.02  # and int8 is close to the weights
    assert rel_err(rows, C.rows_gemv_reference(q, x, idx, s)) < TOL
    for idk, got in zip(idks, gathers):
        assert rel_err(got, C.gather_gemv_reference(qt, x, idk, st)) < TOL


Q4_SHAPES = SHAPES + [(1031, 300)]  # 1031 x 300 in int4 is over 64 KiB: 2 threads split it


@pytest.mark.parametrize("shape,nt", with_threads(Q4_SHAPES, [(1031, 300)]))
@pytest.mark.parametrize("batch", BATCHES + [2, 5])
def test_int4_dense_rows_gather(shape, nt, batch):
    """W's own int4 blocks (partial last blocks included): rows on x rounded to int8 per block,
    the input-major gather (also through a row map) on x itself, each equal to
    q4_gemv_reference; both layouts hold the same numbers, close to the float weights."""
    g = gen(4)
    n, k = shape
    w = torch.randn(n, k, generator=g)
    x = torch.randn(batch, k, generator=g)
    q, qc = pack.quantize_q4(w), pack.quantize_q4_cols(w)
    assert torch.equal(qc.dequantize(), q.dequantize().T)
    perm = torch.randperm(k, generator=g).to(torch.int32)
    qp = pack.quantize_q4_cols(w[:, perm.argsort()])  # inputs permuted after quantization
    idx, idks = kept(n, 0.5, g), (kept(k, 0.5, g), None, torch.zeros(0, dtype=torch.int32))
    with threads(nt):
        dense = C.dense_gemv(q, x)
        rows = C.rows_gemv(q, x, idx)
        gathers = [C.gather_gemv(qc, x, idk) for idk in idks]
        mapped = C.gather_q4(qp, x[:, perm.argsort()], idks[0], rowmap=perm)
    assert rel_err(dense, C.q4_gemv_reference("rows", q, x, None)) < TOL
    assert rel_err(rows, C.q4_gemv_reference("rows", q, x, idx)) < TOL
    for idk, got in zip(idks, gathers):
        ref = C.q4_gemv_reference("gather", qc, x, idk)
        assert (got == 0).all() if idk is not None and not idk.numel() else rel_err(got, ref) < TOL
    assert rel_err(mapped, C.q4_gemv_reference("gather", qp, x[:, perm.argsort()], idks[0], perm)) < TOL
    if k >= 32:
        assert rel_err(dense, x @ w.T) < 0.15  # and 4 bits stay near the weights


def test_int4_blocks_round_trip_and_bound_the_error():
    g = gen(5)
    w = torch.randn(9, 70, generator=g) * torch.logspace(-3, 1, 70)  # blocks of mixed scales
    q = pack.quantize_q4(w)
    assert q.blocks.dtype == torch.uint8 and q.blocks.shape == (9, 3 * 20) and q.shape == (9, 70)
    dq = q.dequantize()
    assert torch.equal(pack.quantize_q4(dq).dequantize(), dq)  # its own values are exact
    blocks = torch.nn.functional.pad(w, (0, 26)).reshape(9, 3, 32)  # tail padded with zeros
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    half_step = (step / 2).expand(-1, -1, 32).reshape(9, 96)[:, :70]
    assert ((w - dq).abs() <= half_step * 1.01 + w.abs() * 2e-3).all()  # + fp16 scale / min
    assert torch.equal(pack.quantize_q4(torch.zeros(2, 40)).dequantize(), torch.zeros(2, 40))


def test_int4_arguments_are_checked():
    w = torch.randn(8, 40)
    q, qc = pack.quantize_q4(w), pack.quantize_q4_cols(w)
    with pytest.raises(ValueError, match="own scales"):
        C.rows_gemv(q, torch.randn(1, 40), None, torch.ones(8))
    with pytest.raises(ValueError, match="inputs"):
        C.rows_gemv(q, torch.randn(1, 41), None)
    with pytest.raises(ValueError, match="outside"):
        C.rows_gemv(q, torch.randn(1, 40), torch.tensor([8], dtype=torch.int32))
    with pytest.raises(ValueError, match="int4 blocks"):
        C.rows_gemv(pack.Q4(q.blocks[:, :-1].contiguous(), 40), torch.randn(1, 40), None)
    with pytest.raises(ValueError, match="input-major"):
        C.gather_gemv(q, torch.randn(1, 40), None)
    with pytest.raises(ValueError, match="row blocks"):
        C.rows_gemv(qc, torch.randn(1, 40), None)
    with pytest.raises(ValueError, match="rowmap must be"):
        C.gather_q4(qc, torch.randn(1, 40), None, rowmap=torch.zeros(40, dtype=torch.int64))
    with pytest.raises(ValueError, match="rowmap holds rows outside"):
        C.gather_q4(qc, torch.randn(1, 40), None, rowmap=torch.full((40,), 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        C.gather_gemv(qc, torch.randn(1, 40), torch.tensor([40], dtype=torch.int32))


def test_float_weights_take_a_scale_too():
    g = gen(3)
    w, x, s = torch.randn(33, 40, generator=g), torch.randn(2, 40, generator=g), torch.rand(33, generator=g)
    assert rel_err(C.dense_gemv(w, x, s), (x @ w.T) * s) < TOL


# --------------------------------------------------------------------------- gather
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("shape,nt", with_threads(SHAPES, BIG))
@pytest.mark.parametrize("batch", BATCHES)
def test_gather(dname, shape, nt, batch):
    g = gen(4)
    n, k = shape
    wt = torch.randn(k, n, generator=g).to(DTYPES[dname])  # input-major [K, N]
    x = torch.randn(batch, k, generator=g)
    idxs = (kept(k, 0.5, g), kept(k, 0.25, g), torch.arange(k, dtype=torch.int32), None)
    with threads(nt):
        got = [C.gather_gemv(wt, x, idx) for idx in idxs]
        y = C.gather_gemv(wt, x, torch.zeros(0, dtype=torch.int32))
    for idx, gy in zip(idxs, got):
        assert rel_err(gy, C.gather_gemv_reference(wt, x, idx)) < TOL
    assert y.shape == (batch, n) and (y == 0).all()
    # the gather equals the dense GEMV on the zeroed-input x (what it replaces)
    idx = kept(k, 0.5, g)
    xz = torch.zeros_like(x)
    xz[:, idx.long()] = x[:, idx.long()]
    assert rel_err(C.gather_gemv(wt, x, idx), xz @ wt.float()) < 1e-5


# --------------------------------------------------------------------------- fused FFN
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("shape,nt", with_threads([(77, 130), (7, 5), (257, 130)], [(257, 130)]))
@pytest.mark.parametrize("batch", BATCHES)
def test_ffn_sparse(dname, shape, nt, batch):
    g = gen(5)
    inter, h = shape
    dt = DTYPES[dname]
    wg, wu, wd_t = (torch.randn(inter, h, generator=g).div(h ** 0.5).to(dt) for _ in range(3))
    x = torch.randn(batch, h, generator=g)
    idxs = (kept(inter, 0.5, g), kept(inter, 0.25, g), torch.arange(inter, dtype=torch.int32),
            None, kept(inter, 1 / inter, g))
    with threads(nt):
        got = [C.ffn_sparse(wg, wu, wd_t, x, idx) for idx in idxs]
        y = C.ffn_sparse(wg, wu, wd_t, x, torch.zeros(0, dtype=torch.int32))
    for idx, gy in zip(idxs, got):
        assert rel_err(gy, C.ffn_sparse_reference(wg, wu, wd_t, x, idx)) < 4 * TOL
    assert y.shape == (batch, h) and (y == 0).all()


# --------------------------------------------------------------------------- sketch
SKETCH_SHAPES = [(77, 130, 32), (9, 576, 64), (13, 100, 20), (10, 40, 8), (6, 7, 128), (2600, 130, 64)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,nt", with_threads(SKETCH_SHAPES, [(2600, 130, 64)]))
def test_sketch(bits, shape, nt):
    g = gen(6)
    n, k, group = shape
    w = torch.randn(n, k, generator=g)
    codes, scales = pack.quantize_codes(w, bits, group)
    packed = pack.pack_codes(codes, bits)
    xs = [torch.randn(batch, k, generator=g) for batch in (1, 2, 3, 16)]
    with threads(nt):
        got = [C.sketch_gemv(packed, scales, x, bits, group, k) for x in xs]
    for x, gy in zip(xs, got):
        assert rel_err(gy, pack.sketch_gemv_reference(packed, scales, x, bits, group, k)) < TOL


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize("n,k", [(576, 403), (1536, 614), (7, 7), (5, 0), (49152, 2048)])
def test_select_topk(n, k):
    g = gen(9)
    x = torch.randn(n, generator=g)
    scale = torch.rand(n, generator=g) + 0.5
    for s in (None, scale):
        idx, missed = C.select_topk(x, k, s)
        ref_idx, ref_missed = C.select_topk_reference(x, k, s)
        assert idx.dtype == torch.int32 and torch.equal(idx, ref_idx)
        assert abs(missed - ref_missed) < 1e-9 and 0.0 <= missed <= 1.0
        score = x.abs() * (1 if s is None else s)
        if 0 < k < n:  # every kept score >= every dropped one
            off = torch.ones(n, dtype=torch.bool)
            off[idx.long()] = False
            assert score[idx.long()].min() >= score[off].max()


@pytest.mark.parametrize("n,k", [(49152, 2048), (100, 1), (7, 7), (5, 0)])
def test_select_logits(n, k):
    x = torch.randn(n, generator=gen(11)) * 4 - 1  # logits of both signs
    idx, missed = C.select_logits(x, k)
    ref_idx, ref_missed = C.select_logits_reference(x, k)
    assert idx.dtype == torch.int32 and torch.equal(idx, ref_idx)
    assert abs(missed - ref_missed) < 1e-9 and 0.0 <= missed <= 1.0
    ties = torch.tensor([-2.0, 1.0, -0.0, 0.0, 1.0, -2.0, 1.0])  # -0.0 < 0.0 as keys
    assert C.select_logits(ties, 2)[0].tolist() == [1, 4]
    assert C.select_logits(ties, 4)[0].tolist() == [1, 3, 4, 6]


@pytest.mark.parametrize("n,k", [(576, 403), (64, 1), (64, 63), (9, 9)])
def test_select_topk_breaks_ties_by_the_lower_index(n, k):
    x = torch.randint(-3, 4, (n,), generator=gen(10)).float()  # many equal scores, zeros too
    want = sorted(range(n), key=lambda i: (-abs(float(x[i])), i))[:k]
    idx, _ = C.select_topk(x, k)
    assert idx.tolist() == sorted(want)


@pytest.mark.parametrize("n,block", [(576, 64), (64, 64), (96, 32), (12, 4), (5, 1)])
def test_rotate_equals_the_rotation(n, block):
    from cscompile.runtime.pertoken import Rotation

    g = gen(10)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    rot = Rotation(signs, torch.randperm(n, generator=g).to(torch.int32), block)
    x = torch.randn(n, generator=g)
    got = C.rotate(x, rot.perm32, rot.signs, rot.block)
    assert torch.allclose(got, rot(x), atol=1e-5)
    assert torch.allclose(C.rotate_reference(x, rot.perm32, rot.signs, block), rot(x), atol=1e-6)
    assert torch.allclose(got.norm(), x.norm(), rtol=1e-5)  # orthogonal


# --------------------------------------------------------------------------- decode loop
@pytest.mark.parametrize("rows,n", [(1, 576), (3, 130), (1, 5)])
def test_rms_norm_equals_llama_rmsnorm(rows, n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = gen(20)
    norm = LlamaRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, 1, n, generator=g) * 3
    want = norm(x).detach()
    assert rel_err(C.rms_norm(x, norm.weight.detach(), 1e-5), want) < TOL
    assert rel_err(C.rms_norm_reference(x, norm.weight.detach(), 1e-5), want) < TOL


@pytest.mark.parametrize("heads,d", [(9, 64), (3, 64), (2, 6)])
def test_rope_equals_transformers_rotary(heads, d):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = gen(21)
    q = torch.randn(1, heads, 1, d, generator=g)
    theta = torch.rand(d // 2, generator=g) * 7
    cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    want, _ = apply_rotary_pos_emb(q, q, cos.view(1, 1, d), sin.view(1, 1, d))
    got = C.rope(q.clone(), cos, sin)
    assert rel_err(got, want) < TOL
    buf = q.clone()
    assert C.rope(buf, cos, sin) is buf  # rotated in place
    assert rel_err(C.rope(q.transpose(1, 3).contiguous().transpose(1, 3), cos, sin), want) < TOL


@pytest.mark.parametrize("hq,hkv,length,d", [(9, 3, 128, 64), (4, 4, 1, 8), (6, 2, 300, 12)])
@pytest.mark.parametrize("nt", [1, 2])
def test_attention_row_equals_sdpa(hq, hkv, length, d, nt):
    g = gen(22)
    q = torch.randn(hq, d, generator=g)
    k, v = (torch.randn(hkv, length, d, generator=g) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, hq, 1, d), k[None], v[None], scale=d ** -0.5, enable_gqa=hq != hkv).reshape(-1)
    with threads(nt):
        got = C.attention_row(q, k, v, d ** -0.5)
    assert rel_err(got, want) < 1e-5
    assert rel_err(C.attention_row_reference(q, k, v, d ** -0.5), want) < TOL
    assert rel_err(C.attention_row(q, k.transpose(1, 2).contiguous().transpose(1, 2), v,
                                   d ** -0.5), want) < 1e-5  # strided cache: the reference


def test_decode_loop_kernels_check_their_arguments():
    with pytest.raises(ValueError, match="float32"):
        C.rms_norm(torch.randn(4), torch.randn(5), 1e-5)
    with pytest.raises(ValueError, match="even"):
        C.rope(torch.randn(3, 5), torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="Hkv"):
        C.attention_row(torch.randn(5, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8), 1.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sketch_select(bits):
    from cscompile.runtime.pertoken import Rotation, Sketch

    g = gen(11)
    width, hidden, group = 1536, 576, 64
    rot = Rotation.random(hidden, g)
    sk = []
    for _ in range(2):
        codes, scales = pack.quantize_codes(rot(torch.randn(width, hidden, generator=g)), bits,
                                            group)
        sk.append(Sketch(pack.pack_codes(codes, bits), scales, bits, group, hidden, rot))
    xr = rot(torch.randn(hidden, generator=g))
    for k in (614, width, 1):
        idx, missed = C.sketch_select(sk[0], sk[1], xr, k)
        ref_idx, ref_missed = C.sketch_select_reference(sk[0], sk[1], xr, k)
        # the same channels up to float ties at the boundary (a different summation order)
        assert len(set(idx.tolist()) ^ set(ref_idx.tolist())) <= 2
        assert abs(missed - ref_missed) < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,nt", with_threads([(1536, 576, 64), (37, 128, 32), (9, 192, 128),
                                                   (5, 64, 64)], [(1536, 576, 64)]))
def test_sketch_q8(bits, shape, nt):
    """The int8-activation sketch GEMV: planes round-trip the codes; the kernel equals its
    reference (x rounded to int8 per group) and stays within ~1% of the float sketch."""
    g = gen(12)
    n, k, group = shape
    codes, scales = pack.quantize_codes(torch.randn(n, k, generator=g), bits, group)
    packed = pack.pack_codes(codes, bits)
    planes = C.sketch_planes(packed, bits, k)
    assert planes.dtype == torch.uint8 and planes.numel() == n * k * bits // 8  # same bits
    assert torch.equal(C.planes_codes(planes, bits, k), codes)
    x = torch.randn(k, generator=g)
    with threads(nt):
        got = C.sketch_q8(planes, scales, x, bits, group, k)
    assert rel_err(got, C.sketch_q8_reference(planes, scales, x, bits, group, k)) < TOL
    exact = pack.sketch_gemv_reference(packed, scales, x.view(1, -1), bits, group, k)[0]
    assert rel_err(got, exact) < 0.02


def test_selection_arguments_checked():
    with pytest.raises(ValueError, match="k must be"):
        C.select_topk(torch.randn(8), 9)
    with pytest.raises(ValueError, match="scale"):
        C.select_topk(torch.randn(8), 3, torch.ones(7))
    with pytest.raises(ValueError, match="power of two"):
        C.rotate(torch.randn(12), torch.arange(12, dtype=torch.int32), torch.ones(12), 8)
    with pytest.raises(ValueError, match="perm"):
        C.rotate(torch.randn(12), torch.arange(12), torch.ones(12), 4)  # int64 perm


# --------------------------------------------------------------------------- bandwidth
@pytest.mark.parametrize("nt", [1, 2])
def test_read_bandwidth_sums_bytes(nt):
    g = gen(7)
    for n in (0, 1, 63, 64, 1000, 3 * 2**20 + 5):
        buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        with threads(nt):
            got = C.read_bandwidth(buf)
        assert got == C.read_bandwidth_reference(buf) == int(buf.long().sum())
    b16 = torch.randn(70001, generator=g).bfloat16()
    with threads(nt):
        got = C.read_bandwidth(b16)
    assert got == C.read_bandwidth_reference(b16)


# --------------------------------------------------------------------------- validation
def test_bad_arguments_raise_value_errors():
    w = torch.randn(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="float32"):
        C.dense_gemv(w, x.double())
    with pytest.raises(ValueError, match="inputs"):
        C.dense_gemv(w, torch.randn(2, 15))
    with pytest.raises(ValueError, match="one of"):
        C.dense_gemv(w.half(), x)
    with pytest.raises(ValueError, match="contiguous"):
        C.dense_gemv(torch.randn(16, 8).T, x)
    with pytest.raises(ValueError, match="needs scale"):
        C.dense_gemv(w.to(torch.int8), x)
    with pytest.raises(ValueError, match="scale must be"):
        C.dense_gemv(w.to(torch.int8), x, torch.ones(7))
    with pytest.raises(ValueError, match="outside"):
        C.rows_gemv(w, x, torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        C.gather_gemv(w, torch.randn(2, 8), torch.tensor([-1], dtype=torch.int32))  # wt [8, 16]
    with pytest.raises(ValueError, match="outside"):
        C.rows_gemv(w, x, torch.tensor([9]))  # int64 idx is checked too
    with pytest.raises(ValueError, match="1-D"):
        C.rows_gemv(w, x, torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int8"):
        C.ffn_sparse(w.to(torch.int8), w.to(torch.int8), w.to(torch.int8), x, None)
    with pytest.raises(ValueError, match="share one dtype"):
        C.ffn_sparse(w, w.bfloat16(), w, x, None)
    codes, scales = pack.quantize_codes(w, 2, 8)
    packed = pack.pack_codes(codes, 2)
    with pytest.raises(ValueError, match="bits"):
        C.sketch_gemv(packed, scales, x, 5, 8, 16)
    with pytest.raises(ValueError, match="words"):
        C.sketch_gemv(packed, scales, x, 4, 8, 16)
    with pytest.raises(ValueError, match="scales must be"):
        C.sketch_gemv(packed, scales.float(), x, 2, 8, 16)
    assert rel_err(C.rows_gemv(w, x, torch.tensor([3, 1])), x @ w[[3, 1]].T) < TOL  # int64 ok


# --------------------------------------------------------------------------- fallback
def test_read_rows():
    g = gen(12)
    buf = torch.randint(0, 256, (300, 192), dtype=torch.uint8, generator=g)
    for idx in (kept(300, 0.3, g), torch.arange(300, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)):
        assert C.read_rows(buf, idx) == C.read_rows_reference(buf, idx)
    assert C.read_rows(buf.view(torch.bfloat16), kept(300, 0.5, g)) > 0  # any dtype: its bytes
    with pytest.raises(ValueError, match="multiple of 64"):
        C.read_rows(buf[:, :100].contiguous(), kept(300, 0.5, g))
    with pytest.raises(ValueError, match="outside"):
        C.read_rows(buf, torch.tensor([0, 300], dtype=torch.int32))


def test_fallback_env_gives_the_same_results(monkeypatch):
    g = gen(8)
    w = torch.randn(77, 130, generator=g).bfloat16()
    x = torch.randn(3, 130, generator=g)
    idx = kept(77, 0.5, g)
    idk = kept(130, 0.5, g)
    wt = w.T.contiguous()
    wg, wu, wd_t = (torch.randn(77, 130, generator=g).bfloat16() for _ in range(3))
    codes, scales = pack.quantize_codes(w.float(), 3, 32)
    packed = pack.pack_codes(codes, 3)
    buf = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g)
    perm = torch.randperm(128, generator=g).to(torch.int32)
    codes128, scales128 = pack.quantize_codes(w.float()[:, :128], 3, 32)
    planes = C.sketch_planes(pack.pack_codes(codes128, 3), 3, 128)
    qa, ka, va = torch.randn(4, 16, generator=g), *torch.randn(2, 2, 5, 16, generator=g)
    q4, q4c = pack.quantize_q4(w.float()), pack.quantize_q4_cols(w.float())

    def run():
        return [C.dense_gemv(w, x), C.rows_gemv(w, x, idx), C.gather_gemv(wt, x, idk),
                C.ffn_sparse(wg, wu, wd_t, x, idx), C.sketch_gemv(packed, scales, x, 3, 32, 130),
                torch.tensor(C.read_bandwidth(buf)), C.select_topk(x[0], 50)[0],
                C.rotate(x[0, :128], perm, torch.ones(128), 32),
                C.sketch_q8(planes, scales128, x[0, :128], 3, 32, 128),
                C.rms_norm(x, x[0], 1e-5), C.rope(x.clone(), x[0, :130], x[1, :130]),
                C.attention_row(qa, ka, va, 0.25), C.rows_gemv(q4, x, idx),
                C.gather_gemv(q4c, x, idk), C.select_logits(x[1], 20)[0]]

    compiled = run()
    monkeypatch.setenv(C.ENV, "0")
    assert C.disabled() and not C.available()
    fallback = run()
    refs = [C.dense_gemv_reference(w, x), C.rows_gemv_reference(w, x, idx),
            C.gather_gemv_reference(wt, x, idk), C.ffn_sparse_reference(wg, wu, wd_t, x, idx),
            C.sketch_gemv_reference(packed, scales, x, 3, 32, 130), torch.tensor(C.read_bandwidth_reference(buf)),
            C.select_topk_reference(x[0], 50)[0], C.rotate_reference(x[0, :128], perm, torch.ones(128), 32),
            C.sketch_q8_reference(planes, scales128, x[0, :128], 3, 32, 128),
            C.rms_norm_reference(x, x[0], 1e-5), C.rope_reference(x, x[0, :130], x[1, :130]),
            C.attention_row_reference(qa, ka, va, 0.25), C.q4_gemv_reference("rows", q4, x, idx),
            C.q4_gemv_reference("gather", q4c, x, idk), C.select_logits_reference(x[1], 20)[0]]
    for a, b, r in zip(compiled, fallback, refs):
        assert torch.equal(b, r)  # the fallback IS the reference
        if a.is_floating_point():
            assert rel_err(a, r) < 4 * TOL
        else:
            assert torch.equal(a, r)
    with pytest.raises(ValueError, match="outside"):  # the fallback validates like the kernels
        C.rows_gemv(w, x, torch.tensor([77], dtype=torch.int32))
