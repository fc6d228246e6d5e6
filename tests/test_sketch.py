"""passes.sketch: rotated low-bit sketches, deterministic, and better with the rotation."""
import pytest
import torch

from cscompile.passes.sketch import sketch
from cscompile.runtime.pack import dequantize_codes, unpack_codes
from cscompile.runtime.pertoken import Rotation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _estimate_error(model, smap, sk, li, bits, x):
    w = model.get_submodule(smap.layers[li].ffn.up).weight
    rot = Rotation.from_tensors(sk, f"layers.{li}.up")
    deq = dequantize_codes(unpack_codes(sk[f"layers.{li}.up.packed"], bits, w.shape[1]),
                           sk[f"layers.{li}.up.scales"], bits, 64)
    exact = x @ w.detach().T
    return float((rot(x) @ deq.T - exact).norm() / exact.norm())


def test_shapes_determinism_and_bits(stories):
    loaded, smap = stories
    model = loaded.model
    a = sketch(model, smap, bits=3, seed=0)
    b = sketch(model, smap, bits=3, seed=0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(a) >= {"lm_head.packed", "lm_head.scales", "layers.0.gate.packed",
                      "layers.4.up.rot.perm"}
    assert a["layers.0.gate.packed"].shape == (172, 7)  # 64 inputs, 10 codes a word
    assert a["layers.0.gate.rot.block"].item() == 64
    c = sketch(model, smap, bits=3, seed=1)
    assert not torch.equal(a["layers.0.gate.rot.perm"], c["layers.0.gate.rot.perm"])
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    errors = [_estimate_error(model, smap, sketch(model, smap, bits=b, seed=0), 2, b, x)
              for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.15


def test_rotation_off_is_identity(stories):
    loaded, smap = stories
    sk = sketch(loaded.model, smap, bits=2, seed=0, rotate=False, ffn_layers=[0], lm_head=False)
    assert set(k.split(".")[1] for k in sk) == {"0"}
    assert sk["layers.0.up.rot.block"].item() == 1
    assert torch.equal(sk["layers.0.up.rot.perm"], torch.arange(64, dtype=torch.int32))
