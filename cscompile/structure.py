"""The StructureMap: a model's prunable units, the parameter slices they own, their cost.

Discovered from the exported graph by `cscompile.discover`; everything downstream (measurement,
recovery, constraints, lowering, runtime) speaks in these terms.

Units and the slices they own (rows/cols of nn.Linear-style [out, in] weights):
  * query head h of layer l: the q rows of head h (+ q bias) and the o-projection input columns
    of head h;
  * kv group g: the k and v rows of group g (+ biases); it is removable only with all its heads;
  * FFN channel j: gate row j and up row j (+ biases), down column j;
  * FFN block b: channels [b*tile, min((b+1)*tile, width)) — the last block may be partial;
  * layer l: the whole residual block (every parameter under the layer's module).
Heads, kv groups and FFN channels partition the prunable bytes: their bytes plus the unprunable
bytes (embeddings, norms, output biases, unidentified modules) equal the model's bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

UNIT_KINDS = ("head", "kv_group", "ffn_channel", "ffn_block", "layer")


@dataclass
class Slice:
    """Part of one parameter: `index` along dimension `dim` (None index = the whole tensor)."""

    param: str
    dim: int
    index: list[int] | None = None


@dataclass
class AttentionInfo:
    """One attention block as found in the graph."""

    module: str  # common module path of the projections, e.g. model.layers.3.self_attn
    q: str  # module paths of the projection modules (fused: q == k == v)
    k: str
    v: str
    o: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    # Output rows of the q/k/v projection weights per head (fused layouts interleave them).
    q_rows: list[list[int]]  # [n_heads][head_dim]
    k_rows: list[list[int]]  # [n_kv_heads][head_dim]
    v_rows: list[list[int]]
    o_cols: list[list[int]]  # o-projection input columns per query head
    weight_layout: str = "out_in"  # "in_out" for GPT-2 Conv1D

    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    def kv_group_of(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)


@dataclass
class FFNInfo:
    """One feed-forward block: act(gate) * up -> down (gated) or act(up) -> down (plain)."""

    module: str
    up: str
    down: str
    gate: str | None
    width: int
    activation: str  # silu | gelu | gelu_tanh | relu | unknown
    weight_layout: str = "out_in"

    @property
    def gated(self) -> bool:
        return self.gate is not None


@dataclass
class LayerInfo:
    index: int
    module: str
    attention: AttentionInfo | None
    ffn: FFNInfo | None
    param_bytes: int = 0  # every parameter under the layer module
    returns_tuple: bool = False  # the block's forward returns (hidden, ...) rather than hidden


@dataclass
class StructureMap:
    model_id: str
    architecture: str
    dtype: str
    total_bytes: int
    hidden_size: int
    layers: list[LayerInfo]
    # parameter name -> (shape, bytes per element); needed for byte accounting and slicing
    params: dict[str, tuple[list[int], int]]
    unidentified: list[str] = field(default_factory=list)  # modules left dense, with reason
    tile: int = 64

    # ----------------------------------------------------------------- parameter helpers
    def _param(self, module: str, name: str) -> str | None:
        key = f"{module}.{name}"
        return key if key in self.params else None

    def _row_bytes(self, param: str, dim: int) -> int:
        """Bytes of one slice of `param` along `dim` (one row for dim 0, one column for dim 1)."""
        shape, elsize = self.params[param]
        n = int(np.prod(shape)) // shape[dim]
        return n * elsize

    def _wdim(self, layout: str, role: str) -> int:
        """Dimension of a weight that indexes outputs (role='out') or inputs (role='in')."""
        out_dim = 0 if layout == "out_in" else 1
        return out_dim if role == "out" else 1 - out_dim

    # ----------------------------------------------------------------- unit slices and costs
    def head_slices(self, layer: int, head: int) -> list[Slice]:
        a = self.layers[layer].attention
        w = self._wdim(a.weight_layout, "out")
        slices = [Slice(f"{a.q}.weight", w, a.q_rows[head]),
                  Slice(f"{a.o}.weight", 1 - w, a.o_cols[head])]
        if (b := self._param(a.q, "bias")) is not None:
            slices.append(Slice(b, 0, a.q_rows[head]))
        return slices

    def kv_group_slices(self, layer: int, group: int) -> list[Slice]:
        a = self.layers[layer].attention
        w = self._wdim(a.weight_layout, "out")
        slices = []
        for mod, rows in ((a.k, a.k_rows[group]), (a.v, a.v_rows[group])):
            slices.append(Slice(f"{mod}.weight", w, rows))
            if (b := self._param(mod, "bias")) is not None:
                slices.append(Slice(b, 0, rows))
        return slices

    def channel_slices(self, layer: int, channels: list[int]) -> list[Slice]:
        f = self.layers[layer].ffn
        w = self._wdim(f.weight_layout, "out")
        slices = []
        for mod in (f.gate, f.up):
            if mod is None:
                continue
            slices.append(Slice(f"{mod}.weight", w, channels))
            if (b := self._param(mod, "bias")) is not None:
                slices.append(Slice(b, 0, channels))
        slices.append(Slice(f"{f.down}.weight", 1 - w, channels))
        return slices

    def slice_bytes(self, slices: list[Slice]) -> int:
        total = 0
        for s in slices:
            shape, elsize = self.params[s.param]
            if s.index is None:
                total += int(np.prod(shape)) * elsize
            else:
                total += len(s.index) * self._row_bytes(s.param, s.dim)
        return total

    def head_bytes(self, layer: int) -> int:
        return self.slice_bytes(self.head_slices(layer, 0))

    def kv_group_bytes(self, layer: int) -> int:
        return self.slice_bytes(self.kv_group_slices(layer, 0))

    def channel_bytes(self, layer: int) -> int:
        return self.slice_bytes(self.channel_slices(layer, [0]))

    def blocks(self, layer: int, tile: int | None = None) -> list[list[int]]:
        """FFN channel blocks of `tile` channels; the last one is partial when width % tile."""
        tile = tile or self.tile
        width = self.layers[layer].ffn.width
        return [list(range(s, min(s + tile, width))) for s in range(0, width, tile)]

    # ----------------------------------------------------------------- totals
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def prunable_bytes(self) -> int:
        """Bytes owned by heads, kv groups and FFN channels (the atomic units)."""
        total = 0
        for li, layer in enumerate(self.layers):
            if layer.attention is not None:
                a = layer.attention
                total += a.n_heads * self.head_bytes(li) + a.n_kv_heads * self.kv_group_bytes(li)
            if layer.ffn is not None:
                total += layer.ffn.width * self.channel_bytes(li)
        return total

    def unprunable_bytes(self) -> int:
        return self.total_bytes - self.prunable_bytes()

    # ----------------------------------------------------------------- unit listing
    def units(self, kinds=("head", "kv_group", "ffn_block", "layer"), tile: int | None = None):
        """Every unit of the requested kinds as plain dicts (kind, layer, index, slices, cost)."""
        tile = tile or self.tile
        out = []
        for li, layer in enumerate(self.layers):
            a, f = layer.attention, layer.ffn
            if a is not None and "head" in kinds:
                for h in range(a.n_heads):
                    out.append(self._unit("head", li, h, self.head_slices(li, h),
                                          kv_group=a.kv_group_of(h)))
            if a is not None and "kv_group" in kinds:
                per = a.n_heads // a.n_kv_heads
                for g in range(a.n_kv_heads):
                    out.append(self._unit("kv_group", li, g, self.kv_group_slices(li, g),
                                          heads=list(range(g * per, (g + 1) * per))))
            if f is not None and "ffn_channel" in kinds:
                for j in range(f.width):
                    out.append(self._unit("ffn_channel", li, j, self.channel_slices(li, [j])))
            if f is not None and "ffn_block" in kinds:
                for b, chans in enumerate(self.blocks(li, tile)):
                    out.append(self._unit("ffn_block", li, b, self.channel_slices(li, chans),
                                          channels=[chans[0], chans[-1] + 1]))
            if "layer" in kinds:
                out.append({"kind": "layer", "layer": li, "index": li, "module": layer.module,
                            "slices": [{"param": p, "dim": 0, "index": None}
                                       for p in self.params if p.startswith(layer.module + ".")],
                            "bytes": layer.param_bytes, "flops_per_token": 2 * layer.param_bytes
                            // max(1, self.elsize())})
        return out

    def _unit(self, kind, layer, index, slices, **extra):
        nbytes = self.slice_bytes(slices)
        return {"kind": kind, "layer": layer, "index": index, **extra,
                "slices": [asdict(s) for s in slices], "bytes": nbytes,
                # one multiply-add per weight element per token
                "flops_per_token": 2 * nbytes // max(1, self.elsize())}

    def elsize(self) -> int:
        return next(iter(self.params.values()))[1] if self.params else 4

    # ----------------------------------------------------------------- serialisation
    def summary_rows(self, tile: int | None = None) -> list[dict]:
        """One row per layer: heads, kv groups, FFN width/blocks and bytes (for tables)."""
        tile = tile or self.tile
        rows = []
        for li, layer in enumerate(self.layers):
            a, f = layer.attention, layer.ffn
            rows.append({
                "layer": li, "module": layer.module,
                "heads": a.n_heads if a else 0, "kv_groups": a.n_kv_heads if a else 0,
                "head_dim": a.head_dim if a else 0,
                "attn_bytes": (a.n_heads * self.head_bytes(li) + a.n_kv_heads * self.kv_group_bytes(li)) if a else 0,
                "ffn_width": f.width if f else 0, "ffn_blocks": len(self.blocks(li, tile)) if f else 0,
                "ffn_kind": (("gated-" if f.gated else "plain-") + f.activation) if f else "-",
                "ffn_bytes": f.width * self.channel_bytes(li) if f else 0,
                "layer_bytes": layer.param_bytes,
            })
        return rows

    def to_json(self, tile: int | None = None, channels: bool = False) -> dict:
        """JSON-safe dict. Heads, kv groups, blocks and layers are listed unit by unit; FFN
        channels are listed one by one only with channels=True (SmolLM2 has 46k of them) and
        otherwise as one rule per layer (same slices for every j, bytes each)."""
        tile = tile or self.tile
        kinds = ("head", "kv_group", "ffn_block", "layer") + (("ffn_channel",) if channels else ())
        channel_rules = []
        for li, layer in enumerate(self.layers):
            if layer.ffn is not None:
                channel_rules.append({
                    "layer": li, "count": layer.ffn.width, "bytes_each": self.channel_bytes(li),
                    "slices_of_channel_j": [{"param": s.param, "dim": s.dim, "index": "j"}
                                            for s in self.channel_slices(li, [0])]})
        return {
            "model_id": self.model_id, "architecture": self.architecture, "dtype": self.dtype,
            "hidden_size": self.hidden_size, "tile": tile,
            "total_bytes": self.total_bytes, "prunable_bytes": self.prunable_bytes(),
            "unprunable_bytes": self.unprunable_bytes(),
            "layers": [asdict(layer) for layer in self.layers],
            "params": {k: {"shape": v[0], "element_bytes": v[1]} for k, v in self.params.items()},
            "unidentified": self.unidentified,
            "units": self.units(kinds, tile),
            "ffn_channels": channel_rules,
        }

    @classmethod
    def from_json(cls, d: dict) -> "StructureMap":
        layers = []
        for ld in d["layers"]:
            att = AttentionInfo(**ld["attention"]) if ld["attention"] else None
            ffn = FFNInfo(**ld["ffn"]) if ld["ffn"] else None
            layers.append(LayerInfo(ld["index"], ld["module"], att, ffn, ld["param_bytes"],
                                    ld.get("returns_tuple", False)))
        params = {k: (list(v["shape"]), int(v["element_bytes"])) for k, v in d["params"].items()}
        return cls(d["model_id"], d["architecture"], d["dtype"], d["total_bytes"],
                   d["hidden_size"], layers, params, list(d.get("unidentified", [])),
                   d.get("tile", 64))
