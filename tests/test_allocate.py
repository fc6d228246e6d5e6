"""passes.allocate: the greedy path over (bytes, distortion) menus, budgets and KL targets."""
import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.passes.allocate import (_hull, _slope, decode_kl, greedy_path, plan_at_kl,
                                       plan_for_budget)
from cscompile.passes.sketch import sketch
from cscompile.runtime.pertoken import PerToken, dense_plan, plan_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(n=6, t=24, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (t,), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def stories_path(stories):
    loaded, smap = stories
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    path, report = greedy_path(loaded.model, smap, _prompts(), sk)
    return loaded, smap, sk, path, report


def test_hull_is_convex_and_pareto():
    pts = [("d", 100, 0.0), ("a", 80, 0.1), ("b", 60, 0.5), ("c", 50, 0.55), ("w", 70, 0.9),
           ("e", 20, 3.0)]
    hull = _hull(pts)
    assert [p[0] for p in hull] == ["d", "a", "c", "e"]  # w dominated, b above the chord a-c
    slopes = [_slope(a, b) for a, b in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)


def test_budget_one_is_dense_and_budgets_are_met(stories_path):
    loaded, smap, sk, path, report = stories_path
    plan, steps = plan_for_budget(path, 1.0)
    assert steps == 0 and plan == dense_plan(smap)
    pt = PerToken(loaded.model, smap, plan, sk)
    try:
        for budget in (0.9, 0.7, 0.5):
            plan, _ = plan_for_budget(path, budget)
            got = plan_bytes(plan, pt.shapes)
            assert got["fraction"] <= budget + 1e-9
        assert path.steps[0].part == "lm_head"  # the nearly free step comes first
        assert report["lm_head"]["choice"]["op"] == "sketch"
        with pytest.raises(UserInputError, match="below the sparsest plan"):
            plan_for_budget(path, 0.01)
    finally:
        pt.detach()


def test_path_round_trips_through_json_and_names_its_sketches(stories_path):
    import json

    from cscompile.passes.allocate import Path

    _, _, sk, path, _ = stories_path
    back = Path.from_json(json.loads(json.dumps(path.to_json())))
    assert back == path
    for budget in (0.8, 0.4):
        assert plan_for_budget(back, budget) == plan_for_budget(path, budget)
    parts = path.sketched_parts()
    assert "lm_head." in parts and all(any(k.startswith(p) for k in sk) for p in parts)
    sketched = {f"layers.{li}." for li, layer in enumerate(path.plan_after(len(path.steps))
                                                          ["layers"])
                if layer["ffn"]["op"] == "sketch"}
    assert sketched <= parts  # the sparsest plan's sketches, and any earlier prefix's


def test_kl_grows_as_the_budget_shrinks_and_max_kl_is_met(stories_path):
    loaded, smap, sk, path, _ = stories_path
    held = _prompts(4, 32, seed=1)
    pt = PerToken(loaded.model, smap, dense_plan(smap), sk)
    try:
        with torch.no_grad():
            kls = []
            for budget in (1.0, 0.7, 0.4):
                pt.configure(plan_for_budget(path, budget)[0])
                kls.append(decode_kl(loaded.model, pt, held)["kl"])
            assert kls[0] == 0.0 and kls[0] < kls[1] < kls[2]
            plan, steps, check = plan_at_kl(path, loaded.model, pt, held, max_kl=kls[1])
        assert check["kl"] <= kls[1] and steps > 0
        assert plan_bytes(plan, pt.shapes)["fraction"] < 1.0
        _, zero_steps, zero = plan_at_kl(path, loaded.model, pt, held, max_kl=0.0)
        assert zero_steps == 0 and zero["kl"] == 0.0
    finally:
        pt.detach()


def test_ffn_only_path_leaves_attention_and_head_dense(stories):
    loaded, smap = stories
    sk = sketch(loaded.model, smap, bits=3, seed=0)
    path, _ = greedy_path(loaded.model, smap, _prompts(3), sk, parts=("ffn",), head=False)
    plan, _ = plan_for_budget(path, 0.8)
    assert plan["lm_head"] == {"op": "dense"}
    assert all(layer["qkv"]["op"] == layer["o"]["op"] == "dense" for layer in plan["layers"])
    assert any(layer["ffn"]["op"] != "dense" for layer in plan["layers"])


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_other_architectures_allocate_and_decode(tiny, arch):
    loaded, smap = tiny(arch)
    model = loaded.model
    sk = sketch(model, smap, bits=3, seed=0)
    path, _ = greedy_path(model, smap, _prompts(3, 16, vocab=128), sk)
    plan, _ = plan_for_budget(path, 0.7)
    pt = PerToken(model, smap, plan, sk)
    try:
        assert pt.bytes()["fraction"] <= 0.7
        with torch.no_grad():
            check = decode_kl(model, pt, _prompts(2, 16, vocab=128, seed=3))
        assert check["kl"] > 0 and check["tokens"] == 16
    finally:
        pt.detach()
