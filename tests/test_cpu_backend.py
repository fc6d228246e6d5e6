"""runtime.cpu_backend: the per-token path's decode steps on the CPU kernels equal the torch
masks (batch 1 fast path and batched union path), for every operator with a kernel."""
import pytest
import torch
from transformers import DynamicCache

from cscompile.compat import cache_kwargs
from cscompile.passes.sketch import sketch
from cscompile.runtime import cpu_kernels
from cscompile.runtime.pertoken import PerToken, uniform_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PLANS = {
    "sketch": dict(qkv={"op": "teal", "keep": 0.5}, o={"op": "wina", "keep": 0.5},
                   ffn={"op": "sketch", "keep": 0.5}, lm_head={"op": "sketch", "candidates": 64}),
    "rerank": dict(qkv={"op": "wina", "keep": 0.6}, o={"op": "teal", "keep": 0.4},
                   ffn={"op": "sketch", "keep": 0.4, "cand": 1.5},
                   lm_head={"op": "sketch", "candidates": 16}),
    "teal": dict(ffn={"op": "teal", "keep": 0.5, "x_keep": 0.6}),
    "wina": dict(ffn={"op": "wina", "keep": 0.7}),  # every input: no input selection
}


def _decode(model, smap, plan, sk, backend, ids, prefix, mode="pertoken", weights=None):
    pt = PerToken(model, smap, plan, sk, backend=backend, weights=weights)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            pt.mode = "dense"
            model(input_ids=ids[:, :prefix], **cache_kwargs(model, cache), use_cache=True)
            pt.mode = mode
            steps = [model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache),
                           use_cache=True).logits for t in range(prefix, ids.shape[1])]
        return torch.cat(steps, 1), {k: v.clone() for k, v in pt.missed().items()}
    finally:
        pt.detach()


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_kernels_equal_torch_masks(stories, name, batch):
    loaded, smap = stories
    model = loaded.model
    sk = sketch(model, smap, bits=3, seed=0)
    plan = uniform_plan(smap, **PLANS[name])
    ids = torch.randint(0, 512, (batch, 16), generator=torch.Generator().manual_seed(batch))
    ref, ref_missed = _decode(model, smap, plan, sk, "torch", ids, 10)
    got, got_missed = _decode(model, smap, plan, sk, "cpu", ids, 10)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for part in ref_missed:
        assert torch.allclose(got_missed[part].reshape(-1), ref_missed[part].reshape(-1),
                              atol=1e-5), part


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_weights_compute_the_dequantized_model(stories, name, batch):
    """weights="int8": every kernel reads int8 + per-output scales, i.e. computes the model
    whose matrices are quantize_rows' dequantized values, on the same supports."""
    import copy

    from cscompile.runtime.cpu_backend import dequantized

    loaded, smap = stories
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(dequantized(m.weight))
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    plan = uniform_plan(smap, **PLANS[name])
    ids = torch.randint(0, 512, (batch, 16), generator=torch.Generator().manual_seed(batch))
    ref, _ = _decode(model, smap, plan, sk, "torch", ids, 10, mode="full" if batch > 1 else
                     "pertoken")
    got, _ = _decode(model, smap, plan, sk, "cpu", ids, 10, weights="int8",
                     mode="full" if batch > 1 else "pertoken")
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    pt = PerToken(model, smap, plan, sk, backend="cpu", weights="int8")
    pt.detach()
    bf16 = PerToken(model, smap, plan, sk, backend="cpu")
    bf16.detach()
    # charged int8 + one fp32 scale per output instead of the storage dtype
    from cscompile.runtime.pertoken import dense_plan, plan_bytes

    dense8, dense = (plan_bytes(dense_plan(smap), p.shapes)["parts"] for p in (pt, bf16))
    for part in ("qkv", "o", "ffn", "lm_head"):
        assert dense8[part] / dense[part] == pytest.approx((1 + 4 / smap.hidden_size)
                                                           / bf16.shapes.elsize)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("batch", [1, 3])
def test_int4_weights_compute_their_reference(stories, name, batch, monkeypatch):
    """weights="int4": the decode on the kernels equals the same decode on their definition
    (cpu_kernels.q4_gemv_reference, kernels off), stays near the fp32 model's, and is charged
    20 bytes per 32 weights of the layers' matrices."""
    from cscompile.runtime.pertoken import dense_plan, plan_bytes

    loaded, smap = stories
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    plan = uniform_plan(smap, **PLANS[name])
    ids = torch.randint(0, 512, (batch, 16), generator=torch.Generator().manual_seed(batch))
    mode = "full" if batch > 1 else "pertoken"
    got, _ = _decode(loaded.model, smap, plan, sk, "cpu", ids, 10, weights="int4", mode=mode)
    fp32, _ = _decode(loaded.model, smap, plan, sk, "torch", ids, 10, mode=mode)
    monkeypatch.setenv("CSCOMPILE_CPU_KERNELS", "0")
    ref, _ = _decode(loaded.model, smap, plan, sk, "cpu", ids, 10, weights="int4", mode=mode)
    # equal up to summation order, which can flip a near-tie of a top-k selection: a few
    # 1e-3 of the logits' norm at most, where a wrong layout or scale is ~1
    assert float((got - ref).norm() / ref.norm()) < 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    rel = float((got - fp32).norm() / fp32.norm())
    assert rel < 0.15, rel  # 4-bit noise, not a wrong layout (that is ~1)
    pt4 = PerToken(loaded.model, smap, plan, sk, backend="cpu", weights="int4")
    pt4.detach()
    ptf = PerToken(loaded.model, smap, plan, sk, backend="cpu")
    ptf.detach()
    dense4, dense = (plan_bytes(dense_plan(smap), p.shapes)["parts"] for p in (pt4, ptf))
    for part in ("qkv", "o", "ffn"):
        assert dense4[part] / dense[part] == pytest.approx(20 / 32 / ptf.shapes.elsize)
    # the lm_head stays at 8 bits (+ one fp32 scale per row)
    assert dense4["lm_head"] / dense["lm_head"] == pytest.approx(
        (1 + 4 / smap.hidden_size) / ptf.shapes.elsize)


def test_int8_weights_need_the_cpu_backend(stories):
    from cscompile.errors import UserInputError

    loaded, smap = stories
    with pytest.raises(UserInputError, match="CPU backend"):
        PerToken(loaded.model, smap, uniform_plan(smap), {}, weights="int8")
    with pytest.raises(UserInputError, match="int8, int4"):
        PerToken(loaded.model, smap, uniform_plan(smap), {}, backend="cpu", weights="int2")
    with pytest.raises(UserInputError, match="CPU backend"):
        PerToken(loaded.model, smap, uniform_plan(smap), {}, weights="int4")


def test_fallback_when_kernels_are_off(stories, monkeypatch):
    """CSCOMPILE_CPU_KERNELS=0: same wrappers, torch references, same numbers."""
    loaded, smap = stories
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    plan = uniform_plan(smap, **PLANS["sketch"])
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    want, _ = _decode(loaded.model, smap, plan, sk, "torch", ids, 8)
    monkeypatch.setenv("CSCOMPILE_CPU_KERNELS", "0")
    got, _ = _decode(loaded.model, smap, plan, sk, "cpu", ids, 8)
    assert torch.allclose(got, want, atol=1e-4)


def test_silu_is_recognised_whatever_its_class():
    from torch import nn
    from transformers.activations import ACT2FN

    from cscompile.runtime.pertoken import is_silu

    assert is_silu(nn.SiLU()) and is_silu(ACT2FN["silu"]) and is_silu(torch.nn.functional.silu)
    assert not is_silu(ACT2FN["gelu_pytorch_tanh"]) and not is_silu(nn.ReLU())


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
def test_batch1_sketch_ffn_takes_the_fused_kernel(stories, monkeypatch):
    """A real model's FFN (transformers' own SiLU class) decodes on the one-pass kernel."""
    from cscompile.runtime import cpu_backend

    loaded, smap = stories
    calls = []
    real = cpu_backend.K.ffn_sparse
    monkeypatch.setattr(cpu_backend.K, "ffn_sparse",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    plan = uniform_plan(smap, **PLANS["sketch"])
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    _decode(loaded.model, smap, plan, sk, "cpu", ids, 8)
    assert len(calls) == 4 * len(smap.layers)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("name", ["sketch", "teal"])
def test_full_mode_is_the_dense_model_on_the_kernels(stories, name):
    """Mode "full" (bench's dense row): every weight, whatever layout the plan's operators
    left the kernels; equal to the dense model."""
    loaded, smap = stories
    model = loaded.model
    sk = sketch(model, smap, bits=3, seed=0)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    got, missed = _decode(model, smap, uniform_plan(smap, **PLANS[name]), sk, "cpu", ids, 8,
                          mode="full")
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, 8:]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert not missed  # nothing selected, nothing missed
