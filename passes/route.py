"""The router: picks a class for a prompt from a cheap measurement taken during prefill.

Feature = the hidden state leaving an early layer (default layer 2), mean-pooled over the
prompt's tokens, projected by a fixed seeded Gaussian matrix to `dim`, centred and
L2-normalised. Class = nearest class centroid in that space. The router is plain arrays
(safetensors, no pickle). Standalone `route` stops the forward right after the chosen layer,
so routing a prompt costs only the first layers of a prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from cscompile.errors import BuildError, UserInputError
from cscompile.frontend import logits_of
from cscompile.structure import StructureMap


@dataclass
class Router:
    layer: int
    projection: torch.Tensor  # [hidden, dim]
    center: torch.Tensor  # [dim]
    centroids: torch.Tensor  # [k, dim], unit-norm rows

    @property
    def n_classes(self) -> int:
        return self.centroids.shape[0]

    def to_arrays(self) -> dict[str, torch.Tensor]:
        return {"layer": torch.tensor([self.layer], dtype=torch.int64),
                "projection": self.projection.contiguous(), "center": self.center.contiguous(),
                "centroids": self.centroids.contiguous()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> "Router":
        missing = {"layer", "projection", "center", "centroids"} - set(arrays)
        if missing:
            raise UserInputError(f"router arrays lack {sorted(missing)}")
        return cls(int(arrays["layer"][0]), arrays["projection"].float(),
                   arrays["center"].float(), arrays["centroids"].float())

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, hidden] mean-pooled states -> [B, dim] centred unit vectors."""
        z = pooled.float() @ self.projection - self.center
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return (self.embed(pooled) @ self.centroids.T).argmax(-1)


class _Stop(Exception):
    """Raised by the capture hook to end a forward once the routing layer has run."""


def _capture(model, smap: StructureMap, layer: int, ids: torch.Tensor, stop: bool) -> torch.Tensor:
    """Mean-pooled [1, hidden] output of `layer` on a [1, T] prompt."""
    got = {}

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        got["pooled"] = h.detach().float().mean(1)
        if stop:
            raise _Stop

    handle = model.get_submodule(smap.layers[layer].module).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits_of(model, ids.view(1, -1))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "pooled" not in got:
        raise BuildError(f"routing layer {layer} ({smap.layers[layer].module}) never ran")
    return got["pooled"]


def default_layer(smap: StructureMap) -> int:
    return min(2, smap.n_layers - 1)


def router_features(model, smap, prompts: list[torch.Tensor], layer: int) -> torch.Tensor:
    return torch.cat([_capture(model, smap, layer, ids, stop=True) for ids in prompts])


def fit_router(model, smap: StructureMap, prompts: list[torch.Tensor], labels,
               layer: int | None = None, dim: int = 64, seed: int = 0) -> Router:
    """Nearest-centroid router fitted to the build's class labels of `prompts`."""
    layer = default_layer(smap) if layer is None else layer
    if not 0 <= layer < smap.n_layers:
        raise UserInputError(f"router layer {layer} out of range (model has {smap.n_layers})")
    return fit_router_features(router_features(model, smap, prompts, layer), labels, layer,
                               dim, seed)


def fit_router_features(pooled: torch.Tensor, labels, layer: int, dim: int = 64,
                        seed: int = 0) -> Router:
    """The router from already captured [P, hidden] pooled features."""
    labels = np.asarray(labels)
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(pooled.shape[1], dim, generator=gen) / dim ** 0.5
    router = Router(layer, projection, (pooled.float() @ projection).mean(0), torch.zeros(0, dim))
    e = router.embed(pooled)
    cents = torch.stack([e[torch.as_tensor(labels == c)].mean(0) for c in range(labels.max() + 1)])
    router.centroids = cents / cents.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return router


def route(model, smap: StructureMap, router: Router, input_ids: torch.Tensor) -> int:
    """Class id for one prompt; runs the model only up to the router's layer."""
    return int(router.classify(_capture(model, smap, router.layer, input_ids, stop=True))[0])


def router_accuracy(model, smap, router: Router, prompts, labels) -> float | None:
    if not len(prompts):
        return None
    got = [route(model, smap, router, ids) for ids in prompts]
    return float(np.mean(np.asarray(got) == np.asarray(labels)))


def router_cost(model, smap, router: Router, prompts: list[torch.Tensor], repeats: int = 3) -> dict:
    """Routing cost relative to a full prefill (seconds summed over `prompts`, best of repeats).

    overhead_fraction: pooling + projection + nearest centroid, the work routing adds to a
    prefill that runs anyway; standalone_fraction: `route` alone (layers 0..layer + that work).
    """
    def best(fn, items):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in items:
                fn(x)
            times.append(time.perf_counter() - t0)
        return min(times)

    hidden = router.projection.shape[0]
    states = [torch.randn(1, ids.shape[-1], hidden) for ids in prompts]  # stand-in layer outputs
    with torch.no_grad():
        prefill = best(lambda ids: logits_of(model, ids.view(1, -1)), prompts)
        standalone = best(lambda ids: route(model, smap, router, ids), prompts)
        overhead = best(lambda h: router.classify(h.mean(1)), states)
    return {"prefill_s": prefill, "standalone_s": standalone, "overhead_s": overhead,
            "overhead_fraction": overhead / prefill, "standalone_fraction": standalone / prefill}
