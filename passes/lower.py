"""Lowering pass: class supports -> per-class Triton source files for the bundle.

Each class becomes a spec (model dims, activation, layout, tile, and per layer the kept FFN
channel count, FFN blocks and kept query heads / kv groups) from which
`cscompile.codegen.generate` writes one readable Triton file. The spec is stored in the
manifest next to the file's sha256: the runtime regenerates the source from the spec and refuses
to run a file that differs (bundles are data, not code).

Layers a class keeps nothing of in the FFN (0 channels) or drops entirely are left out of the
spec; the runtime serves them without a kernel.
"""

from __future__ import annotations


from cscompile.codegen.generate import generate_class_source, source_sha256, validate_class_spec
from cscompile.execute import Support
from cscompile.structure import StructureMap

KERNEL_ACTIVATIONS = {"silu", "gelu", "gelu_tanh", "relu"}


def class_spec(smap: StructureMap, support: Support, class_id, layout: str = "gather",
               dtype: str = "bfloat16", tile: int = 64) -> dict | None:
    """The codegen spec of one class, or None when the model has no kernel-shaped layers."""
    layers = [l for l in smap.layers if l.attention is not None and l.ffn is not None]
    if not layers or any(l.ffn.activation not in KERNEL_ACTIVATIONS for l in layers):
        return None
    a0, f0 = layers[0].attention, layers[0].ffn
    block = tile if tile in (16, 32, 64, 128) else 64
    entries = []
    for li in support.kept_layers(smap):
        layer = smap.layers[li]
        if layer.attention is None or layer.ffn is None:
            continue
        chans = support.channels.get(li, list(range(layer.ffn.width)))
        heads = sorted(support.heads.get(li, list(range(layer.attention.n_heads))))
        if not chans or not heads:
            continue
        entries.append({"layer": li, "ffn_channels": len(chans),
                        "ffn_blocks": len({c // block for c in chans}),
                        "q_heads": heads,
                        "kv_groups": sorted({layer.attention.kv_group_of(h) for h in heads})})
    if not entries:
        return None
    spec = {"class_id": class_id, "layout": layout, "dtype": dtype, "block_size": block,
            "activation": f0.activation, "gated": f0.gated,
            "model": {"hidden": smap.hidden_size, "intermediate": f0.width,
                      "n_heads": a0.n_heads, "n_kv": a0.n_kv_heads, "head_dim": a0.head_dim},
            "layers": entries}
    return validate_class_spec(spec)


def lower(smap: StructureMap, supports: list[Support], layout: str = "gather",
          dtype: str = "bfloat16", tile: int = 64) -> tuple[dict[str, str], list[dict | None]]:
    """Kernel files {bundle path: source} and per-class {spec, file, sha256} (None: no kernels)."""
    files, entries = {}, []
    for c, sup in enumerate(supports):
        spec = class_spec(smap, sup, c, layout, dtype, tile)
        if spec is None:
            entries.append(None)
            continue
        source = generate_class_source(spec)
        path = f"kernels/class_{c}.py"
        files[path] = source
        entries.append({"file": path, "sha256": source_sha256(source), "spec": spec})
    return files, entries


