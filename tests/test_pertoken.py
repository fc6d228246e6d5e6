"""runtime.pertoken: every operator against a hand-written reference, budget 1.0 is dense,
byte accounting adds up, on three architecture families (Llama, Qwen2, Gemma2)."""
import math

import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.passes.sketch import sketch
from cscompile.runtime.pack import dequantize_codes, packed_bytes, unpack_codes
from cscompile.runtime.pertoken import (PerToken, Rotation, dense_plan, hadamard, plan_bytes,
                                        topk_mask, uniform_plan)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GATED = ["llama", "qwen2", "gemma2"]


def _ids(vocab, n=2, t=12):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _full_keep_plans(smap, vocab):
    head = {"op": "sketch", "candidates": vocab}
    for ffn in ({"op": "sketch", "keep": 1.0, "cand": 1.0}, {"op": "teal", "keep": 1.0},
                {"op": "wina", "keep": 1.0, "x_keep": 1.0}, {"op": "cats", "keep": 1.0},
                {"op": "oracle", "keep": 1.0}):
        yield uniform_plan(smap, qkv={"op": "wina", "keep": 1.0}, o={"op": "teal", "keep": 1.0},
                           ffn=ffn, lm_head=head, group=16)


@pytest.mark.parametrize("arch", GATED)
def test_dense_plan_and_full_keep_equal_dense_exactly(tiny, arch):
    loaded, smap = tiny(arch)
    model = loaded.model
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        dense = model(ids).logits
        sk = sketch(model, smap, bits=3, group=16, seed=0)
        pt = PerToken(model, smap, dense_plan(smap, 3, 16), sk)
        try:
            pt.mode = "pertoken"
            assert torch.equal(model(ids).logits, dense)
            for plan in _full_keep_plans(smap, model.config.vocab_size):
                pt.configure(plan)
                assert torch.equal(model(ids).logits, dense), plan["layers"][0]["ffn"]
                assert all(float(v.max()) == 0.0 for v in pt.missed().values())
            pt.configure(uniform_plan(smap, ffn={"op": "sketch", "keep": 0.5}, group=16))
            pt.mode = "dense"  # the dense mode is the unmodified model whatever the plan
            assert torch.equal(model(ids).logits, dense)
        finally:
            pt.detach()
        assert torch.equal(model(ids).logits, dense)  # detached: the original modules again


def _rotation_matrix(rot: Rotation, n: int) -> torch.Tensor:
    return torch.stack([rot(e) for e in torch.eye(n)], 1)  # column j = R e_j


def test_rotation_is_orthogonal_and_block_hadamard():
    rot = Rotation.random(96, torch.Generator().manual_seed(0))
    assert rot.block == 32  # largest power of two <= 64 dividing 96
    r = _rotation_matrix(rot, 96)
    assert torch.allclose(r @ r.T, torch.eye(96), atol=1e-6)
    h = hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8), atol=1e-6)
    assert torch.equal(_rotation_matrix(Rotation.identity(96), 96), torch.eye(96))


def _ffn_io(model, smap, li, ids):
    """The FFN input of layer li for `ids` (captured on the dense model)."""
    got = {}
    mlp = model.get_submodule(smap.layers[li].ffn.module)
    h = mlp.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return got["x"], mlp


def _int8_rows(x, group):
    """x rounded to int8 per group of its last dim (steps of max|x| / 127), as float."""
    xg = x.view(*x.shape[:-1], -1, group)
    step = xg.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xg / step) * step).view(x.shape)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_ffn_operators_match_a_reference(tiny, arch):
    loaded, smap = tiny(arch)
    model = loaded.model
    li, width = 1, smap.layers[1].ffn.width
    x, mlp = _ffn_io(model, smap, li, _ids(model.config.vocab_size))
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    act = mlp.act_fn
    g, u = x @ wg.T, x @ wu.T
    h = act(g) * u
    k = round(0.4 * width)

    def keep_top(score, n):
        idx = score.topk(n, -1).indices
        return torch.zeros_like(score).scatter_(-1, idx, 1.0)

    sk = sketch(model, smap, bits=3, group=16, seed=0)
    # the sketch's estimate, written out: rotate rows of W and x, round x to int8 per group
    # (max|x| / 127 steps: what the CPU kernel multiplies), dequantize the codes
    pre = f"layers.{li}"
    rot = Rotation.from_tensors(sk, f"{pre}.gate")
    rmat = _rotation_matrix(rot, x.shape[-1])
    deq = {r: dequantize_codes(unpack_codes(sk[f"{pre}.{r}.packed"], 3, x.shape[-1]),
                               sk[f"{pre}.{r}.scales"], 3, 16) for r in ("gate", "up")}
    xr = _int8_rows(x @ rmat.T, 16)
    est = act(xr @ deq["gate"].T) * (xr @ deq["up"].T)
    cand = keep_top(est.abs(), round(1.5 * k))
    rerank = keep_top(h.abs() * cand - (1 - cand), k)
    xk = keep_top(x.abs(), round(0.5 * x.shape[-1]))
    h_teal = act((x * xk) @ wg.T) * ((x * xk) @ wu.T)
    want = {
        "sketch": (keep_top(est.abs(), k) * h) @ wd.T,
        "sketch_rerank": (rerank * h) @ wd.T,
        "teal": (keep_top(h_teal.abs(), k) * h_teal) @ wd.T,
        "cats": (keep_top(act(g).abs(), k) * h) @ wd.T,
        "oracle": (keep_top(h.abs(), k) * h) @ wd.T,
    }
    cfgs = {"sketch": {"op": "sketch", "keep": 0.4}, "sketch_rerank": {"op": "sketch", "keep": 0.4,
                                                                      "cand": 1.5},
            "teal": {"op": "teal", "keep": 0.4, "x_keep": 0.5}, "cats": {"op": "cats", "keep": 0.4},
            "oracle": {"op": "oracle", "keep": 0.4}}
    pt = PerToken(model, smap, dense_plan(smap, 3, 16), sk)
    try:
        pt.mode = "pertoken"
        ffn = pt.parts[li]["ffn"]
        for name, cfg in cfgs.items():
            ffn.cfg = cfg
            with torch.no_grad():
                got = ffn(x)
            assert torch.allclose(got, want[name], atol=1e-5, rtol=1e-4), name
    finally:
        pt.detach()


def test_input_operators_and_head_match_a_reference(tiny):
    loaded, smap = tiny("llama")
    model = loaded.model
    a = smap.layers[0].attention
    q = model.get_submodule(a.q)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    sk = sketch(model, smap, bits=4, group=16, seed=0)
    pt = PerToken(model, smap, uniform_plan(smap, qkv={"op": "wina", "keep": 0.25},
                                            lm_head={"op": "sketch", "candidates": 10},
                                            bits=4, group=16), sk)
    try:
        pt.mode = "pertoken"
        norms = torch.cat([model.get_submodule(p).weight for p in (a.q, a.k, a.v)]).norm(dim=0)
        keep = topk_mask(x.abs() * norms, 16)
        with torch.no_grad():
            assert torch.allclose(model.get_submodule(a.q)(x), q(x * keep), atol=1e-6)
            head = pt.head
            w = head.head.weight
            rot = Rotation.from_tensors(sk, "lm_head")
            deq = dequantize_codes(unpack_codes(sk["lm_head.packed"], 4, 64), sk["lm_head.scales"],
                                   4, 16)
            est = _int8_rows(rot(x), 16) @ deq.T
            cand = topk_mask(est, 10)
            want = torch.where(cand, x @ w.T, est)
            assert torch.allclose(head(x), want, atol=1e-5)
            assert (head(x).argmax(-1) == (x @ w.T).argmax(-1)).float().mean() >= 2 / 3
    finally:
        pt.detach()


def test_byte_accounting_adds_up(tiny):
    loaded, smap = tiny("llama")
    model = loaded.model
    sk = sketch(model, smap, bits=3, group=16, seed=0)
    pt = PerToken(model, smap, dense_plan(smap, 3, 16), sk)
    pt.detach()
    dense = pt.bytes()
    el, h, w, v = 4, 64, 96, 128  # fp32 weights; hidden, FFN width, vocab of the tiny llama
    params = sum(p.numel() for p in model.parameters()) * el
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    assert dense["fraction"] == 1.0
    assert dense["bytes"] == params - emb.numel() * el * (0 if tied else 1) + h * el - (
        emb.numel() * el if tied else 0) + (v * h * el if tied else 0)
    assert sum(dense["parts"].values()) == dense["bytes"]
    plan = uniform_plan(smap, qkv={"op": "teal", "keep": 0.5}, o={"op": "teal", "keep": 0.25},
                        ffn={"op": "sketch", "keep": 0.5, "cand": 1.5},
                        lm_head={"op": "sketch", "candidates": 16}, group=16)
    got = plan_bytes(plan, pt.shapes)
    n_layers = smap.n_layers
    qkv_rows = 64 + 32 + 32  # q 4 heads x 16, k and v 2 kv heads x 16
    assert got["parts"]["qkv"] == n_layers * 32 * qkv_rows * el
    assert got["parts"]["o"] == n_layers * 16 * h * el
    assert got["parts"]["ffn"] == n_layers * (2 * packed_bytes(w, h, 3, 16) + 72 * 2 * h * el
                                              + 48 * h * el)
    assert got["parts"]["lm_head"] == packed_bytes(v, h, 3, 16) + 16 * h * el
    assert math.isclose(got["fraction"], got["bytes"] / dense["bytes"])
    # the bundle's sketch tensors are what the accounting charges
    words = sk["layers.0.gate.packed"].numel() * 4 + sk["layers.0.gate.scales"].numel() * 2
    assert words == packed_bytes(w, h, 3, 16)


def test_unsupported_layouts_refused(tiny):
    loaded, smap = tiny("gpt_neox")  # fused query_key_value
    with pytest.raises(UserInputError, match="separate q/k/v"):
        PerToken(loaded.model, smap, dense_plan(smap))


def test_missed_share_grows_as_keep_shrinks(stories):
    loaded, smap = stories
    model = loaded.model
    ids = _ids(512, 1, 24)
    sk = sketch(model, smap, bits=3, seed=0)
    pt = PerToken(model, smap, dense_plan(smap), sk)
    try:
        pt.mode = "pertoken"
        means = []
        for keep in (0.8, 0.5, 0.2):
            pt.configure(uniform_plan(smap, ffn={"op": "sketch", "keep": keep}))
            pt.stats.clear()
            with torch.no_grad():
                model(ids)
            means.append(float(pt.missed()["ffn"].mean()))
        assert 0 < means[0] < means[1] < means[2] < 1
    finally:
        pt.detach()


@pytest.mark.slow
def test_smollm2_sketch_path_stays_close_to_dense(smollm2, shared_dir):
    """On the real model: a 3-bit sketch (rotated or not) picking half the FFN channels per
    token, and 256 lm_head candidates, keep decode-time KL small and greedy tokens mostly
    unchanged. (Whether the rotation helps is a benchmark question: at 3 bits its gain is
    within the noise of two windows; results/pertoken_quality_smollm2-135m.md.)"""
    from cscompile.passes.allocate import decode_kl
    from cscompile.metrics import wikitext_windows

    loaded, smap = smollm2
    model = loaded.model
    windows = wikitext_windows(loaded.tokenizer, shared_dir / "data/wikitext2/wiki.test.raw",
                               n_windows=2, window=128, seed=5)
    prompts = [w for w in windows]
    results = {}
    for name, rotate, head in (("rotated", True, False), ("plain", False, False),
                               ("rotated+head", True, True)):
        sk = sketch(model, smap, bits=3, seed=0, rotate=rotate, lm_head=head)
        plan = uniform_plan(smap, ffn={"op": "sketch", "keep": 0.5},
                            lm_head={"op": "sketch", "candidates": 256} if head else None)
        pt = PerToken(model, smap, plan, sk, elsize=2)
        try:
            with torch.no_grad():
                results[name] = decode_kl(model, pt, prompts)
            nb = pt.bytes()
            assert 0.5 < nb["ffn_fraction"] < 0.65
            assert nb["lm_head_fraction"] < 0.25 if head else nb["lm_head_fraction"] == 1.0
        finally:
            pt.detach()
    for name in ("rotated", "plain"):
        assert results[name]["kl"] < 0.25 and results[name]["top1"] > 0.75, results
    assert results["rotated+head"]["top1"] > results["rotated"]["top1"] - 0.03, results
    assert results["rotated+head"]["kl"] < results["rotated"]["kl"] + 0.1, results
