"""Every reduced kernel against a float64 torch reference on the sliced weights.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), in fp32 with large blocks so
it stays fast. Outputs the wrappers allocate are poisoned with NaN, so any element a kernel
forgets to write fails the comparison. GPU-only tests (fp16/bf16) are marked `gpu`.
"""
import pytest
import torch

from cscompile.codegen import kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # fp32 vs float64, relative (Frobenius) error
BIG = {"block_h": 64}  # large blocks: few programs, a fast interpreter


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    assert torch.empty(3).isnan().all()  # the poison really is in place


def rel_err(got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def rand(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def kept_ids(n_total, n_kept, gen):
    return torch.randperm(n_total, generator=gen)[:n_kept].sort().values.to(torch.int32).to(DEVICE)


def ffn_weights(hidden, inter, gen, gated=True, bias=False):
    s = hidden ** -0.5
    w = {"w_gate": rand(inter, hidden, gen=gen, scale=s) if gated else None,
         "w_up": rand(inter, hidden, gen=gen, scale=s),
         "w_down_t": rand(inter, hidden, gen=gen, scale=inter ** -0.5)}
    if bias:
        w["b_up"], w["b_down"] = rand(inter, gen=gen), rand(hidden, gen=gen)
    return w


def as64(d):
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- decode FFN


@pytest.mark.parametrize("hidden,inter,batch,n_kept,activation", [
    (64, 172, 1, 77, "silu"),  # 77 = 64 + a partial block
    (96, 172, 5, 172, "gelu_tanh"),  # H not a power of two, every channel kept
    (96, 200, 16, 33, "gelu"),
    (64, 172, 3, 1, "relu"),  # a single kept channel
])
def test_ffn_decode_gather_matches_reference(poison, hidden, inter, batch, n_kept, activation):
    gen = torch.Generator().manual_seed(hidden * inter + batch)
    w = ffn_weights(hidden, inter, gen)
    x = rand(batch, hidden, gen=gen)
    idx = kept_ids(inter, n_kept, gen)
    y = K.ffn_decode(x, **w, idx=idx, activation=activation, block_k=64, **BIG)
    ref = K.ffn_reference(x.double(), **as64(w), idx=idx.cpu(), activation=activation)
    assert y.dtype == x.dtype and rel_err(y, ref) <= TOL


def test_ffn_decode_reads_only_kept_channels(poison):
    """NaN in every dropped channel's rows must not reach the output."""
    gen = torch.Generator().manual_seed(1)
    w = ffn_weights(64, 172, gen)
    idx = kept_ids(172, 90, gen)
    dropped = torch.ones(172, dtype=torch.bool, device=DEVICE)
    dropped[idx.long()] = False
    for t in w.values():
        t[dropped] = float("nan")
    x = rand(2, 64, gen=gen)
    y = K.ffn_decode(x, **w, idx=idx, block_k=64, **BIG)
    ref = K.ffn_reference(x.double(), **as64(w), idx=idx.cpu())
    assert rel_err(y, ref) <= TOL


def test_ffn_decode_compact_layout(poison):
    gen = torch.Generator().manual_seed(2)
    w = ffn_weights(96, 172, gen)
    idx = kept_ids(172, 100, gen)
    compact = {k: v[idx.long()].contiguous() for k, v in w.items()}
    x = rand(4, 96, gen=gen)
    y = K.ffn_decode(x, **compact, activation="silu", block_k=64, **BIG)
    ref = K.ffn_reference(x.double(), **as64(w), idx=idx.cpu())
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_ffn_decode_plain_ffn_with_biases(poison, activation):
    gen = torch.Generator().manual_seed(3)
    w = ffn_weights(96, 172, gen, gated=False, bias=True)
    idx = kept_ids(172, 70, gen)
    x = rand(3, 96, gen=gen)
    y = K.ffn_decode(x, **w, idx=idx, activation=activation, block_k=64, **BIG)
    ref = K.ffn_reference(x.double(), **as64(w), idx=idx.cpu(), activation=activation)
    assert rel_err(y, ref) <= TOL


# --------------------------------------------------------------------------- prefill FFN


@pytest.mark.parametrize("hidden,n_tokens,block_n,activation,gated", [
    (64, 37, 32, "silu", True),
    (96, 70, 64, "gelu", True),  # two token tiles, the second partial
    (96, 9, 128, "gelu_tanh", False),
    (64, 20, 16, "relu", False),
])
def test_ffn_prefill_matches_reference(poison, hidden, n_tokens, block_n, activation, gated):
    inter = 172  # never a multiple of block_n: the last block is partial
    gen = torch.Generator().manual_seed(hidden + block_n)
    w = ffn_weights(hidden, inter, gen, gated=gated, bias=not gated)
    perm = torch.randperm(inter, generator=gen).to(DEVICE)  # a permuted channel order
    w = {k: (v[perm].contiguous() if k != "b_down" and v is not None else v) for k, v in w.items()}
    n_blocks = -(-inter // block_n)
    blocks = torch.randperm(n_blocks, generator=gen)[: max(2, n_blocks // 2)]
    blocks[0] = n_blocks - 1  # always keep the partial last block
    blocks = blocks.to(torch.int32).to(DEVICE)
    x = rand(n_tokens, hidden, gen=gen)
    y = K.ffn_prefill(x, **w, blocks=blocks, block_n=block_n, activation=activation,
                      block_m=64, **BIG)
    ref = K.ffn_prefill_reference(x.double(), **as64(w), blocks=blocks.cpu(), block_n=block_n,
                                  activation=activation)
    assert rel_err(y, ref) <= TOL


def test_ffn_prefill_compact_all_blocks(poison):
    gen = torch.Generator().manual_seed(5)
    w = ffn_weights(64, 100, gen)  # compact: 100 kept rows, blocks of 64 -> 2, the last partial
    x = rand(30, 64, gen=gen)
    y = K.ffn_prefill(x, **w, block_n=64, block_m=64, **BIG)
    ref = K.ffn_reference(x.double(), **as64(w))
    assert rel_err(y, ref) <= TOL


def test_expand_blocks_drops_padding():
    assert K.expand_blocks([2, 0], 4, 10).tolist() == [8, 9, 0, 1, 2, 3]


# --------------------------------------------------------------------------- attention


def attn_weights(hidden, n_heads, n_kv, head_dim, gen, bias=False):
    s = hidden ** -0.5
    w = {"w_q": rand(n_heads * head_dim, hidden, gen=gen, scale=s),
         "w_k": rand(n_kv * head_dim, hidden, gen=gen, scale=s),
         "w_v": rand(n_kv * head_dim, hidden, gen=gen, scale=s)}
    biases = tuple(rand(t.shape[0], gen=gen) for t in w.values()) if bias else None
    return w, biases


@pytest.mark.parametrize("phase,rows,head_dim,q_heads,bias", [
    ("decode", 1, 16, [1, 3, 6], False),
    ("decode", 16, 24, [0, 5], True),  # head_dim not a power of two
    ("prefill", 37, 8, [2, 3, 4, 7], False),  # head_dim below tl.dot's 16
    ("prefill", 70, 32, list(range(8)), True),
])
def test_qkv_matches_reference(poison, phase, rows, head_dim, q_heads, bias):
    hidden, n_heads, n_kv = 96, 8, 2
    gen = torch.Generator().manual_seed(rows + head_dim)
    w, biases = attn_weights(hidden, n_heads, n_kv, head_dim, gen, bias)
    kv = K.required_kv_groups(q_heads, n_heads, n_kv)
    qh = torch.tensor(q_heads, dtype=torch.int32, device=DEVICE)
    kg = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    x = rand(rows, hidden, gen=gen)
    fn = K.qkv_decode if phase == "decode" else K.qkv_prefill
    got = fn(x, **w, q_heads=qh, kv_groups=kg, head_dim=head_dim, biases=biases, **BIG)
    ref = K.qkv_reference(x.double(), **as64(w), q_heads=q_heads, kv_groups=kv,
                          head_dim=head_dim,
                          biases=tuple(b.double() for b in biases) if bias else None)
    assert got[0].shape == (rows, len(q_heads) * head_dim)
    assert got[1].shape == (rows, len(kv) * head_dim)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= TOL


def test_required_kv_groups_follows_gqa():
    assert K.required_kv_groups([0, 1, 5, 7], n_heads=8, n_kv=2) == [0, 1]
    assert K.required_kv_groups([2, 3], n_heads=8, n_kv=4) == [1]
    assert K.required_kv_groups([2, 3], n_heads=4, n_kv=4) == [2, 3]


@pytest.mark.parametrize("phase,rows,head_dim,q_heads,split,bias", [
    ("decode", 1, 16, [1, 3, 6], 2, False),  # 3 heads over 2 splits: the last runs past the list
    ("decode", 16, 24, [0, 2, 4, 5, 7], 4, True),
    ("decode", 4, 8, [6], 1, False),
    ("prefill", 70, 32, [0, 1, 7], 1, True),
])
def test_o_proj_matches_reference(poison, phase, rows, head_dim, q_heads, split, bias):
    hidden, n_heads = 96, 8
    gen = torch.Generator().manual_seed(rows * head_dim)
    w_o_t = rand(n_heads * head_dim, hidden, gen=gen, scale=(n_heads * head_dim) ** -0.5)
    b_o = rand(hidden, gen=gen) if bias else None
    attn = rand(rows, len(q_heads) * head_dim, gen=gen)
    qh = torch.tensor(q_heads, dtype=torch.int32, device=DEVICE)
    if phase == "decode":
        y = K.o_proj_decode(attn, w_o_t, qh, head_dim, b_o=b_o, split=split, **BIG)
    else:
        y = K.o_proj_prefill(attn, w_o_t, qh, head_dim, b_o=b_o, **BIG)
    ref = K.o_proj_reference(attn.double(), w_o_t.double(), q_heads, head_dim,
                             b_o=b_o.double() if bias else None)
    assert rel_err(y, ref) <= TOL


# --------------------------------------------------------------------------- argument checks


def test_wrappers_refuse_bad_arguments():
    gen = torch.Generator().manual_seed(7)
    w = ffn_weights(64, 100, gen)
    x = rand(2, 64, gen=gen)
    with pytest.raises(ValueError, match="int32"):
        K.ffn_decode(x, **w, idx=torch.arange(10, device=DEVICE))  # int64 index
    with pytest.raises(ValueError, match="ffn_prefill"):
        K.ffn_decode(rand(17, 64, gen=gen), **w)  # more rows than decode takes
    with pytest.raises(ValueError, match="contiguous"):
        K.ffn_decode(x, w["w_gate"], w["w_up"].T.contiguous().T, w["w_down_t"])
    with pytest.raises(ValueError, match="activation"):
        K.ffn_decode(x, **w, activation="tanh")
    with pytest.raises(ValueError, match="biases"):
        K.ffn_decode(x, **w, b_down=rand(64, gen=gen))
    with pytest.raises(ValueError, match="block_n"):
        K.ffn_prefill(x, **w, block_n=48)


# --------------------------------------------------------------------------- GPU (fp16 / bf16)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TOL = 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_ffn_decode_half(dtype, batch):
    gen = torch.Generator().manual_seed(11)
    w = {k: v.to(dtype) for k, v in ffn_weights(1024, 2816, gen).items()}
    idx = kept_ids(2816, 1500, gen)
    x = rand(batch, 1024, gen=gen, dtype=dtype)
    y = K.ffn_decode(x, **w, idx=idx)
    ref = K.ffn_reference(x.double(), **as64(w), idx=idx)
    assert y.dtype == dtype and rel_err(y, ref) <= GPU_TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_ffn_prefill_half(dtype):
    gen = torch.Generator().manual_seed(12)
    w = {k: v.to(dtype) for k, v in ffn_weights(1024, 2800, gen).items()}  # partial last block
    blocks = kept_ids(-(-2800 // 64), 30, gen)
    blocks[-1] = 2800 // 64
    x = rand(300, 1024, gen=gen, dtype=dtype)
    y = K.ffn_prefill(x, **w, blocks=blocks, block_n=64)
    ref = K.ffn_prefill_reference(x.double(), **as64(w), blocks=blocks, block_n=64)
    assert rel_err(y, ref) <= GPU_TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_attention_half(dtype):
    gen = torch.Generator().manual_seed(13)
    hidden, n_heads, n_kv, head_dim = 1024, 16, 4, 64
    w, _ = attn_weights(hidden, n_heads, n_kv, head_dim, gen)
    w = {k: v.to(dtype) for k, v in w.items()}
    q_heads = [0, 1, 2, 5, 9, 10, 15]
    kv = K.required_kv_groups(q_heads, n_heads, n_kv)
    qh = torch.tensor(q_heads, dtype=torch.int32, device=DEVICE)
    kg = torch.tensor(kv, dtype=torch.int32, device=DEVICE)
    w_o_t = rand(n_heads * head_dim, hidden, gen=gen, scale=0.03, dtype=dtype)
    for rows, qkv, o_proj in ((4, K.qkv_decode, K.o_proj_decode),
                              (200, K.qkv_prefill, K.o_proj_prefill)):
        x = rand(rows, hidden, gen=gen, dtype=dtype)
        got = qkv(x, **w, q_heads=qh, kv_groups=kg, head_dim=head_dim)
        ref = K.qkv_reference(x.double(), **as64(w), q_heads=q_heads, kv_groups=kv,
                              head_dim=head_dim)
        for g, r in zip(got, ref):
            assert rel_err(g, r) <= GPU_TOL
        attn = got[0]
        y = o_proj(attn, w_o_t, qh, head_dim)
        assert rel_err(y, K.o_proj_reference(attn.double(), w_o_t.double(), q_heads,
                                             head_dim)) <= GPU_TOL


# --------------------------------------------------------------------------- benchmark script


def test_benchmark_script_cpu_check(tmp_path, monkeypatch, capsys):
    """benchmarks/kernels.py --cpu-check runs every kernel through the script's own code path."""
    import importlib.util
    import json
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("the CPU check runs in the interpreter; on a GPU run the benchmark itself")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() sets it; restore afterwards
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-check", "--json", str(out)]) == 0
    assert "cpu check passed" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} >= {
        ("ffn", "triton gather"), ("ffn", "triton compact"), ("qkv", "triton gather"),
        ("o_proj", "triton compact")}
    ffn_gather = next(r for r in rows if r["op"] == "ffn" and r["impl"] == "triton gather")
    assert ffn_gather["ceiling"] == pytest.approx(2.0, rel=0.01)  # 50% of the channels kept
