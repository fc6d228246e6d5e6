"""Layer-streamed calibration: a Hugging Face causal LM whose decoder layers are read from its
safetensors one at a time, with every prompt's activations flowing layer to layer (the pattern
of sequential pruning / quantization pipelines), so at most one decoder layer is resident.

`LayerStream(model_dir)` holds the embeddings, final norm and lm_head (a model built with zero
decoder layers) and the decoder layers as empty (meta) modules. `flow(prompts, on_layer)`
records what decoder layer 0 receives for each prompt (the model's own forward, stopped there:
the same hidden states, position embeddings and mask), then for each layer in turn loads its
weights, runs every prompt's hidden states through it and frees it again. A layer module runs
on the same inputs and weights as inside the whole model, so its outputs, and every statistic
taken from them, are bit-identical to the in-memory forward's.

`streamed_statistics` gives the build's per-layer statistics this way: prompt signatures
(passes.signature) and the router's pooled features (passes.route), equal bit for bit to the
in-memory passes (tests/test_stream.py). What still needs the whole model is listed in
results/distributed_build.md: tracing (torch.export) for the structure map, the allocation's
end-to-end KL measurements and decode checks, the input-sparsity thresholds and the bundle
writer, which takes every weight at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UnsupportedModelError


class _Stop(Exception):
    """Raised by the layer-0 hook once it has recorded that layer's inputs."""


class LayerStream:
    def __init__(self, model_dir, dtype: torch.dtype = torch.float32):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        self.dir = Path(model_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not (self.dir / "config.json").is_file() or not files:
            raise UnsupportedModelError(f"{model_dir}: layer streaming needs a Hugging Face "
                                        f"directory with config.json and .safetensors weights")
        self.dtype = dtype
        self.where = {}  # tensor name -> file
        for f in files:
            with safe_open(f, "pt") as st:
                self.where.update({k: f for k in st.keys()})
        config = AutoConfig.from_pretrained(self.dir)
        self.n_layers = config.num_hidden_layers
        with torch.device("meta"):  # the decoder layers' modules, without memory
            layers = AutoModelForCausalLM.from_config(config, dtype=dtype).model.layers
        shell = json.loads((self.dir / "config.json").read_text())
        shell["num_hidden_layers"] = 0
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "weights not used": the layers, on purpose
        try:
            config0 = type(config).from_dict(shell)
            self.model = AutoModelForCausalLM.from_pretrained(self.dir, config=config0,
                                                              dtype=dtype)
        finally:
            hf_logging.set_verbosity(level)
        self.model.eval()
        self.model.model.layers = layers
        self.model.config.num_hidden_layers = self.n_layers
        self.layers = layers

    def _layer_tensors(self, li: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        prefix = f"model.layers.{li}."
        names = [k for k in self.where if k.startswith(prefix)]
        if not names:
            raise UnsupportedModelError(f"{self.dir}: no tensors named {prefix}* (layer "
                                        f"streaming reads Llama-style layer names)")
        out = {}
        for f in sorted({self.where[k] for k in names}):
            with safe_open(f, "pt") as st:
                for k in names:
                    if self.where[k] == f:
                        out[k[len(prefix):]] = st.get_tensor(k).to(self.dtype)
        return out

    def load(self, li: int) -> torch.nn.Module:
        layer = self.layers[li]
        layer.to_empty(device="cpu")
        layer.load_state_dict(self._layer_tensors(li), strict=True)
        return layer

    def free(self, li: int) -> None:
        self.layers[li].to("meta")

    @torch.no_grad()
    def _layer0_inputs(self, ids: torch.Tensor) -> tuple[tuple, dict]:
        got = {}

        def hook(module, args, kwargs):
            got["call"] = (args, kwargs)
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=ids.view(1, -1), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return got["call"]

    @torch.no_grad()
    def flow(self, prompts: list[torch.Tensor], on_layer=None, on_output=None) -> None:
        """Every prompt through every decoder layer, layer-major. on_layer(li, module) is
        called with the loaded layer before its prompts run (to hook it) and returns the hook
        handles; on_output(li, p, hidden) sees prompt p's output of layer li."""
        calls = [self._layer0_inputs(ids) for ids in prompts]
        for li in range(self.n_layers):
            layer = self.load(li)
            handles = on_layer(li, layer) if on_layer else []
            try:
                for p, (args, kwargs) in enumerate(calls):
                    out = layer(*args, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
                    if on_output:
                        on_output(li, p, hidden)
                    calls[p] = ((hidden, *args[1:]), kwargs) if args else (
                        (), {**kwargs, "hidden_states": hidden})
            finally:
                for h in handles:
                    h.remove()
                self.free(li)


def streamed_statistics(model_dir, smap, prompts: list[torch.Tensor], router_layer: int,
                        on_layer_done=None) -> tuple[np.ndarray, torch.Tensor]:
    """(signatures [P, N], router features [P, hidden]) of `prompts`, layer-streamed; equal
    to passes.signature.prompt_signatures and passes.route.router_features on the whole model."""
    from .passes.signature import energy_hooks, layer_signature, unit_layout

    stream = LayerStream(model_dir)
    layout = unit_layout(smap)
    sig = np.zeros((len(prompts), layout.n_units))
    pooled = [None] * len(prompts)
    store: dict = {}

    def on_layer(li, layer):
        return energy_hooks(stream.model, smap, li, store)

    def on_output(li, p, hidden):
        layer_signature(smap, layout, li, store, sig[p])
        store.clear()
        if li == router_layer:
            pooled[p] = hidden.detach().float().mean(1)
        if on_layer_done and p == len(prompts) - 1:
            on_layer_done(li)

    stream.flow(prompts, on_layer, on_output)
    return sig, torch.cat(pooled) if prompts else torch.zeros(0, smap.hidden_size)
