"""Lowering pass: class supports -> verified per-class Triton files that compute the reduced FFN."""
import numpy as np
import pytest
import torch

from cscompile.codegen.generate import load_class_module, source_sha256
from cscompile.errors import BundleError
from cscompile.execute import Support, random_support
from cscompile.passes.lower import class_spec, lower


def test_spec_mirrors_support(stories):
    _, smap = stories
    sup = random_support(smap, 0.5, np.random.default_rng(0), drop_layers=1)
    spec = class_spec(smap, sup, 0, layout="gather", dtype="float32", tile=64)
    kept = sup.kept_layers(smap)
    assert [e["layer"] for e in spec["layers"]] == kept
    for e in spec["layers"]:
        li = e["layer"]
        assert e["ffn_channels"] == len(sup.channels[li])
        assert e["q_heads"] == sorted(sup.heads[li])
        assert e["kv_groups"] == sorted({h // 2 for h in sup.heads[li]})
    assert spec["model"] == {"hidden": 64, "intermediate": 172, "n_heads": 8, "n_kv": 4, "head_dim": 8}


def test_lowered_kernel_computes_the_class_ffn(stories):
    """The generated file, loaded through verification, matches the sliced torch FFN."""
    loaded, smap = stories
    sup = random_support(smap, 0.5, np.random.default_rng(1))
    files, entries = lower(smap, [sup], layout="gather", dtype="float32", tile=64)
    entry = entries[0]
    module = load_class_module(files[entry["file"]], entry["sha256"], entry["spec"])
    li = 2
    mlp = loaded.model.model.layers[li].mlp
    w_g, w_u = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    w_dt = mlp.down_proj.weight.detach().t().contiguous()
    idx = torch.tensor(sup.channels[li], dtype=torch.int32)
    x = torch.randn(2, 64)
    y = module.ffn_decode_layer(li, x, w_g, w_u, w_dt, idx)
    mask = torch.zeros(172)
    mask[idx.long()] = 1
    ref = (torch.nn.functional.silu(x.double() @ w_g.double().T) * (x.double() @ w_u.double().T)
           * mask.double()) @ w_dt.double()
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-5)


def test_tampered_kernel_refused(stories):
    _, smap = stories
    files, entries = lower(smap, [Support.full(smap)], dtype="float32")
    entry = entries[0]
    bad = files[entry["file"]].replace("tl.store", "tl.store ", 1)
    with pytest.raises(BundleError):
        load_class_module(bad, source_sha256(bad), entry["spec"])


def test_no_kernels_for_unknown_activation(tiny):
    _, smap = tiny("llama")
    for layer in smap.layers:
        layer.ffn.activation = "unknown"
    try:
        assert class_spec(smap, Support.full(smap), 0) is None
    finally:
        for layer in smap.layers:
            layer.ffn.activation = "silu"
