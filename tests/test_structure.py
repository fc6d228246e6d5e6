"""Structure discovery from the exported graph (cscompile.discover -> StructureMap)."""
import json

import pytest
import torch

from cscompile.structure import StructureMap


def test_discovers_every_architecture(tiny, arch, tiny_expected):
    _, smap = tiny(arch)
    heads, kv, head_dim, gated, act = tiny_expected[arch]
    assert smap.n_layers == 3
    assert smap.unidentified == []
    for layer in smap.layers:
        a, f = layer.attention, layer.ffn
        assert (a.n_heads, a.n_kv_heads, a.head_dim) == (heads, kv, head_dim)
        assert (f.gated, f.activation) == (gated, act)
        # every projection row and o column belongs to exactly one head
        assert sorted(r for rows in a.q_rows for r in rows) == sorted(set(r for rows in a.q_rows for r in rows))
        assert sorted(c for cols in a.o_cols for c in cols) == list(range(heads * head_dim))


def _param_bytes(model, names):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in names)


def test_bytes_partition(tiny, arch):
    """Heads + kv groups + channels own exactly the attention/FFN weights (minus output
    biases); everything else is unprunable — computed independently from the parameters."""
    loaded, smap = tiny(arch)
    model = loaded.model
    owned = set()
    for layer in smap.layers:
        a, f = layer.attention, layer.ffn
        for mod in {a.q, a.k, a.v, a.o, f.up, f.down} | ({f.gate} if f.gate else set()):
            for n, _ in model.get_submodule(mod).named_parameters():
                owned.add(f"{mod}.{n}")
        owned.discard(f"{a.o}.bias")
        owned.discard(f"{f.down}.bias")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert smap.total_bytes == total
    assert smap.prunable_bytes() == _param_bytes(model, owned)
    units = smap.units(("head", "kv_group", "ffn_channel"))
    assert sum(u["bytes"] for u in units) + smap.unprunable_bytes() == total


def test_blocks_have_partial_last_block(stories):
    _, smap = stories
    blocks = smap.blocks(0, tile=64)
    assert [len(b) for b in blocks] == [64, 64, 44]  # width 172
    assert [len(b) for b in smap.blocks(0, tile=128)] == [128, 44]
    units = smap.units(("ffn_block",), tile=64)
    assert len(units) == 5 * 3 and units[2]["channels"] == [128, 172]


def test_json_round_trip(stories):
    _, smap = stories
    d = smap.to_json()
    text = json.dumps(d)
    back = StructureMap.from_json(json.loads(text))
    assert back.to_json() == d
    kinds = {u["kind"] for u in d["units"]}
    assert kinds == {"head", "kv_group", "ffn_block", "layer"}
    assert len(d["ffn_channels"]) == 5 and d["ffn_channels"][0]["count"] == 172
    with_channels = smap.to_json(channels=True)
    assert sum(u["kind"] == "ffn_channel" for u in with_channels["units"]) == 5 * 172


@pytest.mark.slow
def test_smollm2_structure(smollm2):
    loaded, smap = smollm2
    assert smap.n_layers == 30 and smap.unidentified == []
    for layer in smap.layers:
        a, f = layer.attention, layer.ffn
        assert (a.n_heads, a.n_kv_heads, a.head_dim) == (9, 3, 64)
        assert (f.width, f.gated, f.activation) == (1536, True, "silu")
        assert len(smap.blocks(layer.index)) == 24
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert smap.dtype == "bfloat16"
    assert smap.total_bytes == 2 * n_params  # stored as bf16
    units = smap.units(("head", "kv_group", "ffn_channel"))
    assert sum(u["bytes"] for u in units) + smap.unprunable_bytes() == smap.total_bytes
    # per layer: 9 heads x (64 q rows + 64 o cols) x 576 + 3 groups x 2 x 64 x 576 + 1536 x 3 x 576
    per_layer = (9 * 128 * 576 + 3 * 128 * 576 + 1536 * 3 * 576) * 2
    assert smap.prunable_bytes() == 30 * per_layer
