"""The router: fitted from arrays, exact array round-trip, early-exit routing."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from cscompile.passes.route import Router, fit_router, route, router_accuracy, router_cost


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _two_kinds(n=4, t=8):
    g = torch.Generator().manual_seed(0)
    low = [torch.randint(0, 20, (1, t), generator=g) for _ in range(n)]
    high = [torch.randint(100, 128, (1, t), generator=g) for _ in range(n)]
    return low + high, [0] * n + [1] * n


def test_router_separates_and_round_trips(tiny, tmp_path):
    loaded, smap = tiny("llama")
    prompts, labels = _two_kinds()
    router = fit_router(loaded.model, smap, prompts, labels, layer=1, dim=16, seed=0)
    assert router_accuracy(loaded.model, smap, router, prompts, labels) == 1.0
    save_file(router.to_arrays(), str(tmp_path / "router.safetensors"))
    back = Router.from_arrays(load_file(str(tmp_path / "router.safetensors")))
    assert back.layer == 1 and back.n_classes == 2
    for p in prompts:
        assert route(loaded.model, smap, back, p) == route(loaded.model, smap, router, p)
    # different seed, different projection (the seed is really used)
    other = fit_router(loaded.model, smap, prompts, labels, layer=1, dim=16, seed=1)
    assert not torch.equal(other.projection, router.projection)


def test_route_stops_after_its_layer(tiny):
    loaded, smap = tiny("llama")
    prompts, labels = _two_kinds(2)
    router = fit_router(loaded.model, smap, prompts, labels, layer=0, dim=8)
    calls = []
    last = loaded.model.get_submodule(smap.layers[2].module)
    h = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        route(loaded.model, smap, router, prompts[0])
    finally:
        h.remove()
    assert calls == []  # layers after the router's never ran
    cost = router_cost(loaded.model, smap, router, prompts, repeats=1)
    assert 0 < cost["overhead_fraction"] and cost["standalone_s"] > 0
