"""Per-class code generation: deterministic text, honest docstring, verified loading, and the
generated kernels matching the torch references (interpreter on CPU, fp32)."""
import copy
import os
import stat

import pytest
import torch

from cscompile.codegen import generate as G
from cscompile.codegen import kernels as K
from cscompile.errors import BundleError, UserInputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4

H, I, N_HEADS, N_KV, D = 96, 172, 8, 2, 16
TILES = {"decode_block_k": 64, "decode_block_h": 64, "prefill_block_h": 64}  # fast interpreter


def make_spec(layout="gather", gated=True, activation="silu", class_id="qa"):
    return {
        "class_id": class_id,
        "model": {"hidden": H, "intermediate": I, "n_heads": N_HEADS, "n_kv": N_KV, "head_dim": D},
        "activation": activation, "gated": gated, "layout": layout, "block_size": 32,
        "dtype": "float32",
        "layers": [  # deliberately out of order: the generator sorts them
            {"layer": 3, "ffn_channels": 50, "ffn_blocks": 2, "q_heads": [1, 6],
             "kv_groups": [0, 1]},
            {"layer": 0, "ffn_channels": 77, "ffn_blocks": 4, "q_heads": [0, 2, 3],
             "kv_groups": [0]},
        ],
        "tiles": dict(TILES),
    }


def rand(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float().to(DEVICE)


def rel_err(got, ref):
    assert got.shape == ref.shape
    return ((got.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def load(spec):
    src = G.generate_class_source(spec)
    return G.load_class_module(src, G.source_sha256(src), spec)


# --------------------------------------------------------------------------- source text


def test_source_is_deterministic_and_canonical():
    spec = make_spec()
    src = G.generate_class_source(spec)
    assert G.generate_class_source(copy.deepcopy(spec)) == src
    reordered = make_spec()
    reordered["layers"].reverse()
    assert G.generate_class_source(reordered) == src  # layer order does not matter
    other = make_spec()
    other["layers"][0]["ffn_channels"] = 51
    assert G.generate_class_source(other) != src


def test_docstring_states_layers_blocks_and_shapes():
    src = G.generate_class_source(make_spec())
    doc = src.split('"""')[1]
    for fact in ("class qa", "H=96", "I=172", "8 query heads", "2 kv heads", "D=16",
                 "SiLU", "gather", "float32", "BLOCK_N=32", "Serves 2 layer(s)",
                 "77/172", "50/172", "[1, 6]", "[0, 2, 3]", "x [M, 96]"):
        assert fact in doc, fact
    assert doc.index("    0 ") < doc.index("    3 ")  # layer table sorted by layer
    assert "LAYERS = (0, 3)" in src and "FFN_CHANNELS = (77, 50)" in src
    assert "Q_HEADS = (\n    (0, 2, 3),\n    (1, 6),\n)" in src
    compact = G.generate_class_source(make_spec("compact", gated=False, activation="gelu_tanh"))
    assert "compact" in compact.split('"""')[1] and "plain GELU (tanh approximation)" in compact


def test_generated_file_is_self_contained():
    src = G.generate_class_source(make_spec())
    assert "cscompile" not in src.split('"""', 2)[2].replace("cscompile.codegen.kernels", "")
    assert "@triton.jit\ndef _ffn_decode_kernel(" in src
    compile(src, "class.py", "exec")


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s["layers"][0].update(kv_groups=[0]), "kv groups"),  # head 6 needs group 1
    (lambda s: s["layers"][0].update(q_heads=[6, 1]), "sorted"),
    (lambda s: s["layers"][0].update(ffn_channels=173), "keeps 173"),
    (lambda s: s["layers"][1].update(layer=3), "repeat"),
    (lambda s: s.update(activation="tanh"), "activation"),
    (lambda s: s.update(block_size=48), "block_size"),
    (lambda s: s.update(class_id="../evil"), "class_id"),
    (lambda s: s["model"].update(n_kv=3), "multiple"),
    (lambda s: s.update(tiles={"decode_block_k": 24}), "power of two"),
    (lambda s: s.pop("layers"), "missing"),
])
def test_invalid_specs_are_refused(mutate, match):
    spec = make_spec()
    mutate(spec)
    with pytest.raises(UserInputError, match=match):
        G.generate_class_source(spec)


# --------------------------------------------------------------------------- verified loading


def test_tampered_or_mismatched_source_is_refused():
    spec = make_spec()
    src = G.generate_class_source(spec)
    sha = G.source_sha256(src)
    tampered = src.replace("y = x / (1.0 + tl.exp(-x))", "y = x")
    assert tampered != src
    with pytest.raises(BundleError, match="differs"):
        G.load_class_module(tampered, None, spec)
    with pytest.raises(BundleError, match="sha256"):
        G.load_class_module(tampered, sha, spec)
    with pytest.raises(BundleError, match="sha256"):
        G.load_class_module(src, "0" * 64, spec)
    other = make_spec()
    other["layers"][0]["q_heads"] = [1, 7]
    with pytest.raises(BundleError, match="differs"):  # source of another spec
        G.load_class_module(src, sha, other)
    bad = make_spec()
    bad["layout"] = "sparse"
    with pytest.raises(BundleError, match="regenerate"):
        G.load_class_module(src, sha, bad)


def test_load_imports_from_a_private_file_once():
    spec = make_spec(class_id="cache-test")
    module = load(spec)
    assert load(spec) is module
    assert module.CLASS_ID == "cache-test" and module.LAYERS == (0, 3)
    path = module.__file__
    assert open(path, encoding="utf-8").read() == G.generate_class_source(spec)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


# --------------------------------------------------------------------------- generated kernels


def test_gather_class_matches_reference():
    m = load(make_spec())
    gen = torch.Generator().manual_seed(0)
    wg, wu = rand(I, H, gen=gen, scale=H ** -0.5), rand(I, H, gen=gen, scale=H ** -0.5)
    wd = rand(I, H, gen=gen, scale=I ** -0.5)
    w64 = (wg.double(), wu.double(), wd.double())
    x = rand(3, H, gen=gen)
    idx = torch.randperm(I, generator=gen)[:77].sort().values.int().to(DEVICE)
    y = m.ffn_decode_layer(0, x, wg, wu, wd, idx)
    assert rel_err(y, K.ffn_reference(x.double(), *w64, idx=idx.cpu())) <= TOL

    blocks = torch.tensor([5, 1, 3, 0], dtype=torch.int32, device=DEVICE)  # 5 = partial block
    xt = rand(40, H, gen=gen)
    y = m.ffn_prefill_layer(0, xt, wg, wu, wd, blocks)
    ref = K.ffn_prefill_reference(xt.double(), *w64, blocks=blocks.cpu(), block_n=32)
    assert rel_err(y, ref) <= TOL

    wq, wk, wv = (rand(n * D, H, gen=gen, scale=H ** -0.5) for n in (N_HEADS, N_KV, N_KV))
    w_o_t = rand(N_HEADS * D, H, gen=gen, scale=0.1)
    for rows, qkv, o_proj in ((2, m.qkv_decode_layer, m.o_proj_decode_layer),
                              (40, m.qkv_prefill_layer, m.o_proj_prefill_layer)):
        x = rand(rows, H, gen=gen)
        q, k, v = qkv(3, x, wq, wk, wv)  # layer 3 keeps heads [1, 6], groups [0, 1]
        ref = K.qkv_reference(x.double(), wq.double(), wk.double(), wv.double(), [1, 6], [0, 1], D)
        for got, r in zip((q, k, v), ref):
            assert rel_err(got, r) <= TOL
        y = o_proj(3, q, w_o_t)
        assert rel_err(y, K.o_proj_reference(q.double(), w_o_t.double(), [1, 6], D)) <= TOL

    # per-token supports: runtime head lists of the class's length
    q, _, _ = m.qkv_decode_layer(3, x[:2], wq, wk, wv, q_heads=torch.tensor(
        [2, 3], dtype=torch.int32, device=DEVICE), kv_groups=torch.tensor(
        [0, 1], dtype=torch.int32, device=DEVICE))
    assert rel_err(q, x[:2].double() @ wq.double()[2 * D:4 * D].T) <= TOL


def test_compact_plain_class_matches_reference():
    m = load(make_spec("compact", gated=False, activation="gelu_tanh", class_id="plain"))
    gen = torch.Generator().manual_seed(1)
    w1 = rand(I, H, gen=gen, scale=H ** -0.5)
    w2t = rand(I, H, gen=gen, scale=I ** -0.5)
    b1, b2 = rand(I, gen=gen), rand(H, gen=gen)
    idx = torch.randperm(I, generator=gen)[:50].sort().values  # layer 3 keeps 50 channels
    c1, c2, cb1 = w1[idx].contiguous(), w2t[idx].contiguous(), b1[idx].contiguous()
    for x in (rand(4, H, gen=gen), rand(33, H, gen=gen)):
        ref = K.ffn_reference(x.double(), None, w1.double(), w2t.double(), idx=idx,
                              activation="gelu_tanh", b_up=b1.double(), b_down=b2.double())
        fn = m.ffn_decode_layer if x.shape[0] <= 16 else m.ffn_prefill_layer
        assert rel_err(fn(3, x, c1, c2, b_up=cb1, b_down=b2), ref) <= TOL

    wq, wk, wv = (rand(n * D, H, gen=gen, scale=H ** -0.5) for n in (N_HEADS, N_KV, N_KV))
    rows_q = K.head_rows([0, 2, 3], D)  # layer 0 keeps heads [0, 2, 3] and group [0]
    rows_kv = K.head_rows([0], D)
    x = rand(5, H, gen=gen)
    q, k, v = m.qkv_decode_layer(0, x, wq[rows_q].contiguous(), wk[rows_kv].contiguous(),
                                 wv[rows_kv].contiguous())
    ref = K.qkv_reference(x.double(), wq.double(), wk.double(), wv.double(), [0, 2, 3], [0], D)
    for got, r in zip((q, k, v), ref):
        assert rel_err(got, r) <= TOL


def test_entry_points_check_layer_and_counts():
    m = load(make_spec(class_id="checks"))
    gen = torch.Generator().manual_seed(2)
    w = [rand(I, H, gen=gen) for _ in range(3)]
    x = rand(2, H, gen=gen)
    with pytest.raises(ValueError, match="does not serve layer 1"):
        m.ffn_decode_layer(1, x, *w, torch.arange(77, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="needs 77"):
        m.ffn_decode_layer(0, x, *w, torch.arange(76, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="expected x"):
        m.ffn_decode_layer(0, x.double(), *w, torch.arange(77, dtype=torch.int32, device=DEVICE))
