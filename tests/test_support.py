"""Support selection: densities, per-token hooks, the activation sketch, quality, validation."""
import json

import numpy as np
import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.frontend import logits_of
from cscompile.metrics import compare_to_dense
from cscompile.passes.support import activation_energy, estimate_support

STATIC = ["magnitude", "random", "wanda", "activation", "griffin"]
PER_TOKEN = ["teal", "cats", "oracle"]


@pytest.fixture(scope="module")
def prompts(stories, shared_dir):
    """12 lambada passages as stories260K prompts of 64 tokens: 8 calibration, 4 held out."""
    loaded, _ = stories
    rows = [json.loads(line)["prompt"] for line in
            (shared_dir / "data" / "lambada" / "data.jsonl").read_text().splitlines()[:40]]
    ids = [loaded.tokenizer(r)["input_ids"] for r in rows]
    ids = [torch.tensor([i[:64]]) for i in ids if len(i) >= 64][:12]
    assert len(ids) == 12
    return ids[:8], ids[8:]


def _logits(model, ids, apply=None):
    with torch.no_grad():
        if apply is None:
            return logits_of(model, ids)
        with apply(model):
            return logits_of(model, ids)


# ----------------------------------------------------------------------------- static supports
@pytest.mark.parametrize("method", STATIC)
def test_static_support_has_exact_counts(stories, prompts, method):
    loaded, smap = stories
    calib, held = prompts
    est = estimate_support(loaded.model, smap, held[:1], 0.5, method=method, heads_keep=6,
                           calib_prompts=calib)
    assert est.kind == ("per_prompt" if method == "griffin" else "static")
    for li, layer in enumerate(smap.layers):
        chans = est.support.channels[li]
        assert len(chans) == round(0.5 * layer.ffn.width) == len(set(chans))
        assert len(est.support.heads[li]) == 6
    assert est.bytes_fraction == pytest.approx(86 / 172)
    assert est.forwards == {"magnitude": 0, "random": 0, "griffin": 1}.get(method, len(calib))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "random"])
def test_block_granularity_keeps_whole_tiles(stories, prompts, method):
    loaded, smap = stories
    est = estimate_support(loaded.model, smap, prompts[0], 0.5, method=method, granularity="block",
                           tile=16)
    for li in range(smap.n_layers):
        blocks = smap.blocks(li, 16)  # 10 full tiles of 16 and a partial one of 12
        kept = set(est.support.channels[li])
        whole = [b for b in blocks if set(b) <= kept]
        assert sum(len(b) for b in whole) == len(kept)  # nothing but whole blocks
        assert len(whole) == round(0.5 * 172 / 16)


def test_global_allocation_uses_the_budget_unevenly(stories, prompts):
    loaded, smap = stories
    est = estimate_support(loaded.model, smap, None, 0.5, method="magnitude", allocation="global")
    counts = [len(est.support.channels[li]) for li in range(smap.n_layers)]
    assert sum(counts) == round(0.5 * 172 * smap.n_layers)
    assert min(counts) >= 1 and len(set(counts)) > 1  # layers get different shares
    blocks = estimate_support(loaded.model, smap, None, 0.5, method="magnitude",
                              allocation="global", granularity="block", tile=16)
    kept = [set(blocks.support.channels[li]) for li in range(smap.n_layers)]
    for li, k in enumerate(kept):
        assert k and sum(len(b) for b in smap.blocks(li, 16) if set(b) <= k) == len(k)
    assert abs(sum(map(len, kept)) - 0.5 * 172 * smap.n_layers) <= 8  # within half a tile


def test_magnitude_needs_no_data_and_scores_weights(stories):
    loaded, smap = stories
    est = estimate_support(loaded.model, smap, None, 0.25, method="magnitude", heads_keep=3)
    assert est.forwards == 0
    f, a = smap.layers[2].ffn, smap.layers[2].attention
    w = {n: loaded.model.get_submodule(p).weight for n, p in
         (("gate", f.gate), ("up", f.up), ("down", f.down), ("o", a.o))}
    want = w["gate"].norm(dim=1) * w["up"].norm(dim=1) * w["down"].norm(dim=0)
    assert np.allclose(est.scores["channels"][2], want.detach().numpy(), rtol=1e-5)
    top = sorted(torch.topk(want, 43).indices.tolist())
    assert est.support.channels[2] == top
    head_norms = [w["o"][:, cols].norm().item() for cols in a.o_cols]
    assert est.support.heads[2] == sorted(np.argsort(head_norms)[::-1][:3].tolist())


# ----------------------------------------------------------------------------- per-token hooks
@pytest.mark.parametrize("method", PER_TOKEN)
def test_per_token_full_density_is_dense_and_half_changes_output(stories, prompts, method):
    loaded, smap = stories
    calib, held = prompts
    dense = _logits(loaded.model, held[0])
    full = estimate_support(loaded.model, smap, calib, 1.0, method=method)
    assert torch.equal(_logits(loaded.model, held[0], full.apply), dense)
    half = estimate_support(loaded.model, smap, calib, 0.5, method=method)
    assert (_logits(loaded.model, held[0], half.apply) - dense).abs().max() > 1e-2
    assert half.kind == "per_token" and half.support.channels == {}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "toy"])
@pytest.mark.parametrize("method", PER_TOKEN)
def test_per_token_batch_equals_row_by_row(tiny, arch, method):
    loaded, smap = tiny(arch)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 96, (1, 16), generator=g) for _ in range(4)]
    est = estimate_support(loaded.model, smap, calib, 0.5, method=method, heads_keep=2)
    batch = torch.randint(0, 96, (3, 12), generator=g)
    together = _logits(loaded.model, batch, est.apply)
    for b in range(3):
        alone = _logits(loaded.model, batch[b:b + 1], est.apply)
        assert torch.allclose(together[b], alone[0], atol=1e-5)
    assert not torch.allclose(together, _logits(loaded.model, batch), atol=1e-3)


def _down_input_density(model, smap, ids, apply):
    """Fraction of nonzero down-projection inputs seen after apply's own hooks ran."""
    seen = []
    with torch.no_grad(), apply(model):
        hooks = [model.get_submodule(l.ffn.down).register_forward_pre_hook(
            lambda m, a: seen.append((a[0] != 0).float().mean().item())) for l in smap.layers]
        try:
            logits_of(model, ids)
        finally:
            for h in hooks:
                h.remove()
    return float(np.mean(seen))


def test_teal_thresholds_hit_target_density_and_bytes(stories, prompts):
    loaded, smap = stories
    calib, held = prompts
    est = estimate_support(loaded.model, smap, calib, 0.5, method="teal", inter_keep=0.3,
                           hidden_keep=0.6)
    assert est.bytes_fraction == pytest.approx((2 * 0.6 + 0.3) / 3)
    got = np.mean([_down_input_density(loaded.model, smap, ids, est.apply) for ids in held])
    assert abs(got - 0.3) < 0.08  # calibrated quantiles carry over to held-out prompts
    dense = _logits(loaded.model, held[0])
    exact = estimate_support(loaded.model, smap, calib, 0.5, method="teal", hidden_keep=1.0,
                             inter_keep=1.0)
    assert torch.equal(_logits(loaded.model, held[0], exact.apply), dense)


def test_oracle_keeps_top_k_per_token_and_cats_bytes(stories, prompts):
    loaded, smap = stories
    est = estimate_support(loaded.model, smap, None, 0.25, method="oracle")
    got = _down_input_density(loaded.model, smap, prompts[1][0], est.apply)
    assert got == pytest.approx(43 / 172, abs=1e-6)
    assert est.bytes_fraction == pytest.approx((2 + 0.25) / 3)
    cats = estimate_support(loaded.model, smap, prompts[0], 0.25, method="cats")
    assert cats.bytes_fraction == pytest.approx((1 + 2 * 0.25) / 3)  # gate is read in full


# ----------------------------------------------------------------------------- activation sketch
def test_count_sketch_approximates_exact_energies(stories, prompts):
    loaded, smap = stories
    calib, _ = prompts
    exact, heads, n = activation_energy(loaded.model, smap, calib, exact=True)
    assert n == len(calib) and set(heads) == set(range(smap.n_layers))

    def agreement(width, depth):
        sketch, _, _ = activation_energy(loaded.model, smap, calib, sketch_width=width,
                                         sketch_depth=depth)
        overlaps, errors = [], []
        for li, e in exact.items():
            e, s = e.numpy(), sketch[li].numpy()
            top_e, top_s = set(np.argsort(-e)[:86]), set(np.argsort(-s)[:86])
            overlaps.append(len(top_e & top_s) / 86)
            errors.append(np.abs(e - s).sum() / e.sum())
        return min(overlaps), max(errors)

    overlap, error = agreement(344, 9)
    assert overlap >= 0.9 and error <= 0.1
    small_overlap, small_error = agreement(32, 3)  # a tiny sketch is visibly worse
    assert small_error > 2 * error and small_overlap < overlap


# ----------------------------------------------------------------------------- quality
def test_data_methods_beat_random_at_half_density(stories, prompts):
    loaded, smap = stories
    calib, held = prompts

    def held_out_kl(method):
        est = estimate_support(loaded.model, smap, calib, 0.5, method=method)
        return np.mean([compare_to_dense(_logits(loaded.model, ids),
                                         _logits(loaded.model, ids, est.apply), 32)["kl"]
                        for ids in held])

    random_kl = np.mean([held_out_kl("random")])
    for method in ("wanda", "activation", "oracle"):
        assert held_out_kl(method) < 0.8 * random_kl, method


def test_cs_selects_from_measurements(stories, prompts):
    loaded, smap = stories
    est = estimate_support(loaded.model, smap, prompts[1][:1], 0.5, method="cs",
                           granularity="block", tile=32, budget=24, batch_size=24)
    assert est.kind == "per_prompt" and est.forwards == 25  # 24 masks and the dense pass
    for li in range(smap.n_layers):
        kept = set(est.support.channels[li])
        whole = [b for b in smap.blocks(li, 32) if set(b) <= kept]  # 5 tiles of 32, 1 of 12
        assert len(whole) == 3 and sum(map(len, whole)) == len(kept)
    with pytest.raises(UserInputError, match="no options"):
        estimate_support(loaded.model, smap, prompts[1][:1], 0.5, method="cs", bogus=1)


# ----------------------------------------------------------------------------- validation
def test_invalid_inputs_are_user_errors(stories, prompts):
    loaded, smap = stories
    calib, _ = prompts
    bad = [
        (dict(prompts=[], method="wanda"), "empty list"),
        (dict(prompts=[torch.zeros(1, 600, dtype=torch.long)], method="wanda"), "context of 512"),
        (dict(density=0.0), r"density must be a number in \(0, 1\]"),
        (dict(density=1.5), r"density must be a number in \(0, 1\]"),
        (dict(method="sparsegpt"), "unknown support method 'sparsegpt'"),
        (dict(granularity="row"), "granularity"),
        (dict(heads_keep=9), r"heads_keep must be an integer in \[1, 8\]"),
        (dict(prompts=None, method="griffin"), "needs prompts"),
        (dict(method="teal", inter_keep=0), "inter_keep"),
        (dict(method="magnitude", foo=1), "takes no options"),
    ]
    for kwargs, message in bad:
        args = dict(prompts=calib, density=0.5, method="magnitude") | kwargs
        with pytest.raises(UserInputError, match=message):
            estimate_support(loaded.model, smap, args.pop("prompts"), args.pop("density"),
                             **args)
