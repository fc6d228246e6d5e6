"""Prompt signatures: per-layer normalised unit energies read from one dense pass."""
import numpy as np
import pytest
import torch

from cscompile.passes.signature import prompt_signatures, unit_layout


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(n=3, t=9, vocab=96):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, t), generator=g) for _ in range(n)]


def test_shape_and_per_layer_normalisation(tiny):
    loaded, smap = tiny("llama")
    sig = prompt_signatures(loaded.model, smap, _prompts())
    layout = unit_layout(smap)
    assert sig.shape == (3, layout.n_units) == (3, 3 * (4 + 96))
    assert (sig >= 0).all()
    for li in range(smap.n_layers):
        total = sig[:, layout.heads[li]].sum(1) + sig[:, layout.channels[li]].sum(1)
        # per-layer shares of a float32 signature: their sum is 1 up to float32 rounding of
        # ~100 terms, not to float64's 1e-9
        np.testing.assert_allclose(total, 1.0, rtol=8 * np.finfo(np.float32).eps)
    assert np.abs(sig[0] - sig[1]).max() > 1e-4  # different prompts, different signatures


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # [out, in] and Conv1D [in, out] weights
def test_removed_units_score_zero(tiny, arch):
    """Zeroing a channel's down column or a head's o columns makes its importance exactly 0."""
    import copy

    loaded, smap = tiny(arch)
    model = copy.deepcopy(loaded.model)
    layer = smap.layers[1]
    f, a = layer.ffn, layer.attention
    with torch.no_grad():
        down = model.get_submodule(f.down).weight
        o = model.get_submodule(a.o).weight
        if f.weight_layout == "out_in":
            down[:, 5] = 0
            o[:, a.o_cols[2]] = 0
        else:  # GPT-2 Conv1D stores [in, out]
            down[5, :] = 0
            o[a.o_cols[2], :] = 0
    layout = unit_layout(smap)
    sig = prompt_signatures(model, smap, _prompts(2))
    assert (sig[:, layout.channels[1]][:, 5] == 0).all()
    assert (sig[:, layout.heads[1]][:, 2] == 0).all()
    assert (sig[:, layout.channels[1]] > 0).sum() > f.width // 2


def test_energy_matches_direct_computation(tiny):
    """Channel score ∝ E_t[h_j^2]·||W_down[:, j]||^2, checked against a captured activation."""
    loaded, smap = tiny("llama")
    f = smap.layers[0].ffn
    got = {}
    down = loaded.model.get_submodule(f.down)
    h = down.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach()))
    ids = _prompts(1)
    try:
        sig = prompt_signatures(loaded.model, smap, ids)
    finally:
        h.remove()
    energy = ((got["x"] ** 2).mean((0, 1)) * (down.weight ** 2).sum(0)).detach()
    ratio = sig[0, unit_layout(smap).channels[0]] / energy.double().numpy()
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # same per-layer normaliser
