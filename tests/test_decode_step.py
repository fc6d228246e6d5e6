"""runtime.decode_step: the plain decode loop equals the Hugging Face forward (logits and the
cache it leaves), unpadded and left-padded, on the families it claims; others are refused."""
import pytest
import torch
from transformers import DynamicCache

from cscompile.compat import cache_kwargs
from cscompile.runtime import cpu_kernels
from cscompile.runtime.decode_step import decode_logits, supports

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prefill(model, ids, mask=None):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    return cache


def _models(tiny, stories):
    return [tiny("llama")[0].model, tiny("qwen2")[0].model, stories[0].model]


def _steps_equal_hf(model, batch: int, seed: int, cache_atol: float, **kw):
    """Four decode_logits(**kw) steps after an 8-token prefill give the HF forward's logits,
    and the caches they leave agree within cache_atol."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 12),
                        generator=torch.Generator().manual_seed(seed))
    ref_cache, our_cache = _prefill(model, ids[:, :8]), _prefill(model, ids[:, :8])
    for t in range(8, 12):
        step = ids[:, t:t + 1]
        with torch.no_grad():
            want = model(input_ids=step, **cache_kwargs(model, ref_cache), use_cache=True).logits
        got = decode_logits(model, step, our_cache, **kw)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    for a, b in zip(ref_cache.layers, our_cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=cache_atol), (a.keys - b.keys).abs().max()
        assert torch.allclose(a.values, b.values, atol=cache_atol)


def test_equals_hf_forward_over_several_steps(tiny, stories):
    for model in _models(tiny, stories):
        assert supports(model), model.config.model_type
        _steps_equal_hf(model, batch=2, seed=0, cache_atol=1e-6)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
def test_batch1_kernel_step_equals_hf_forward(tiny, stories, monkeypatch):
    """kernels=True: one row's norms, RoPE and attention on runtime.cpu_kernels, same logits
    and cache as the HF forward (and the kernels are what ran). The kernels' norm sums in
    another order: the cache agrees to float rounding."""
    calls = []
    real = cpu_kernels.attention_row
    monkeypatch.setattr(cpu_kernels, "attention_row",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for model in _models(tiny, stories):
        _steps_equal_hf(model, batch=1, seed=2, cache_atol=1e-5, kernels=True)
    assert len(calls) == 4 * sum(len(m.model.layers) for m in _models(tiny, stories))


def test_left_padded_rows_equal_hf_with_the_same_mask(tiny):
    model = tiny("llama")[0].model
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is a shorter prompt, left-padded
    ref_cache, our_cache = _prefill(model, ids, mask), _prefill(model, ids, mask)
    for t in range(3):
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        step = torch.tensor([[5 + t], [9 + t]])
        with torch.no_grad():
            want = model(input_ids=step, attention_mask=mask, position_ids=pos,
                         **cache_kwargs(model, ref_cache), use_cache=True).logits
        got = decode_logits(model, step, our_cache, mask, pos)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_padding_is_hidden(tiny):
    """Other tokens under row 1's padding give row 1 the same logits."""
    model = tiny("llama")[0].model
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[1, :4] = (other[1, :4] + 7) % 128
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    step_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
    pos = step_mask.sum(-1, keepdim=True) - 1
    step = torch.tensor([[5], [9]])
    a = decode_logits(model, step, _prefill(model, ids, mask), step_mask, pos)
    b = decode_logits(model, step, _prefill(model, other, mask), step_mask, pos)
    assert torch.allclose(a[1], b[1], atol=1e-5)
    unmasked = decode_logits(model, step, _prefill(model, other, mask))
    assert not torch.allclose(unmasked[1], b[1], atol=1e-3)  # without the mask it would differ


def test_other_families_are_not_claimed(tiny):
    for arch in ("gpt2", "gpt_neox", "gemma2", "toy"):
        assert not supports(tiny(arch)[0].model), arch
