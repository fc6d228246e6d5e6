"""passes/split.py and the runtime's total budget: the table measures what the runtime runs,
the split adds up to the budget and moves to the KV side as prompts grow, budget 1.0 is the
unreduced dense path, and bad budgets fail in one line."""
import json

import pytest
import torch
from click.testing import CliRunner

from cscompile.errors import UserInputError
from cscompile.passes.split import (CONTINUATION, KV_KEEPS, _kv_item, calibration_lengths,
                                    kv_curve)
from cscompile.runtime import load
from cscompile.runtime.kv_reduce import choose_split, kv_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play in the park "
        "with her dog Max. One day Max ran after a red ball and Lily ran after him. ") * 4


def _table(kv_scale=0.1, pp=1000, dense_w=1e6):
    """A synthetic table: weight KL grows as bytes fall, KV KL as keep falls and shrinks with
    length (long prompts are more redundant)."""
    weights = [{"budget": b, "bytes": b * dense_w, "kl": (1 - b) ** 2} for b in
               (1.0, 0.8, 0.6, 0.4)]
    kv = [{"length": n, "keep": k, "kl": kv_scale * (1 - k) * 256 / n}
          for n in (256, 512, 1024) for k in KV_KEEPS[1:]]
    return {"weights": weights, "kv": kv, "kv_position_bytes": pp,
            "dense_weight_bytes": dense_w}


# ----------------------------------------------------------------------------- choose_split
def test_budget_one_is_dense_weights_and_the_full_cache():
    for n in (0, 10, 5000):
        c = choose_split(_table(), 1.0, n)
        assert c["kv_keep"] == 1.0 and c["weight_budget"] == 1.0 and c["predicted_kl"] == 0


def test_split_adds_up_to_the_total_and_moves_to_kv_as_prompts_grow():
    t = _table()
    pp, dense_w = t["kv_position_bytes"], t["dense_weight_bytes"]
    keeps = []
    for n in (16, 256, 1024, 4096):
        c = choose_split(t, 0.6, n, new_tokens=20)
        total = c["weight_budget"] * dense_w + (c["kept_positions"] + 10) * pp
        assert total <= 0.6 * (dense_w + (n + 10) * pp) + 1e-6
        assert c["weight_budget"] <= 1.0
        keeps.append(c["kv_keep"])
    assert keeps[0] == 1.0 and keeps[-1] < 1.0  # KV bytes negligible, then worth cutting
    model_only = choose_split(t, 0.6, 256, new_tokens=20, kv_budget=1.0)
    joint = choose_split(t, 0.6, 256, new_tokens=20)
    assert joint["predicted_kl"] < model_only["predicted_kl"]
    assert joint["weight_budget"] > model_only["weight_budget"]
    assert choose_split(t, 0.6, 4096)["extrapolated"]  # beyond the longest calibrated length
    assert not choose_split(t, 0.6, 700)["extrapolated"]


def test_hand_set_kv_keep_leaves_the_rest_to_the_weights():
    t = _table()
    c = choose_split(t, 0.6, 1024, kv_budget=0.5)
    assert c["kv_keep"] == 0.5 and c["kept_positions"] == 512
    assert c["weight_budget"] == pytest.approx((0.6 * (1e6 + 1024e3) - 512e3) / 1e6)


def test_unreachable_budget_and_bad_values_fail_in_one_line():
    with pytest.raises(UserInputError, match="below what this bundle reaches"):
        choose_split(_table(), 0.2, 64)  # weights alone need 0.4 of dense
    for bad in (0, 1.5, -1):
        with pytest.raises(UserInputError, match="--budget"):
            choose_split(_table(), bad, 64)


def test_noisy_curves_are_made_monotone():
    t = _table()
    for r in t["kv"]:  # keep 0.35 measured (by noise) better than keep 0.5
        if r["keep"] == 0.35:
            r["kl"] = 0.0
    assert kv_kl(t, 0.35, 512)[0] >= kv_kl(t, 0.5, 512)[0] > 0
    t["weights"][2]["kl"] = 0.0  # 0.6 of the bytes measured better than 0.8
    c = choose_split(t, 0.6, 16, kv_budget=1.0)
    assert c["weight_kl"] >= (1 - 0.8) ** 2 - 1e-12


def test_calibration_lengths():
    assert calibration_lengths(100, None) == []
    assert calibration_lengths(128 + CONTINUATION, None) == [128]
    assert calibration_lengths(10_000, 512) == [128, 256]
    assert calibration_lengths(100_000, None)[-1] == 4096


# ----------------------------------------------------------------------------- the pass
@pytest.fixture(scope="module")
def stories_session(stories_dir):
    return load(str(stories_dir), backend="torch")


def test_kv_item_measures_the_runtimes_own_reduction(stories_session):
    """Each row of the KV curve is the runtime's reduce_prompt_cache followed by a forward
    at the true positions, compared with the full cache."""
    from transformers import DynamicCache

    from cscompile.runtime.kv_reduce import reduce_prompt_cache

    model = stories_session.model
    ids = torch.tensor(stories_session.tokenizer(TEXT)["input_ids"][:160])
    n = 128
    items = _kv_item(model, ids, n)
    assert set(items) == {"next", "recall"}
    assert all(len(v) == len(KV_KEEPS) and v[0] == (0.0, 1.0) for v in items.values())
    got = items["next"]
    pos = torch.arange(n, len(ids)).view(1, -1)
    logp = {}
    for keep in (1.0, 0.35):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:n].view(1, -1), cache=cache, use_cache=True)
            kept = reduce_prompt_cache(model, ids[:n].tolist(), cache, keep)
            assert kept == (n if keep == 1 else round(keep * n))
            logits = model(input_ids=ids[n:].view(1, -1), position_ids=pos, cache=cache,
                           use_cache=True).logits[0].double()
        logp[keep] = torch.log_softmax(logits, -1)
    kl = float((logp[1.0].exp() * (logp[1.0] - logp[0.35])).sum(-1).mean())
    assert kl > 0 and got[KV_KEEPS.index(0.35)][0] == pytest.approx(kl, rel=1e-6, abs=1e-9)


def test_kv_curve_covers_each_length_and_keep(stories_session):
    tok = stories_session.tokenizer
    prompts = [torch.tensor(tok(TEXT)["input_ids"]) for _ in range(3)]
    rows = kv_curve(stories_session.model, prompts, 512)
    lengths = calibration_lengths(sum(len(p) for p in prompts), 512)
    assert lengths and {(r["length"], r["keep"]) for r in rows} == \
        {(n, k) for n in lengths for k in KV_KEEPS}
    assert all(r["kl"] == 0 for r in rows if r["keep"] == 1.0)
    assert all(r["kl"] >= 0 and 0 <= r["top1"] <= 1 for r in rows)
    assert all(r["kl"] == max(r["kl_next"], r["kl_recall"]) for r in rows)
    # recalling a span of the prefix needs its positions: cutting most of them costs more
    # than predicting the text that follows
    low = [r for r in rows if r["keep"] == KV_KEEPS[-1]]
    assert sum(r["kl_recall"] for r in low) > sum(r["kl_next"] for r in low)


# ----------------------------------------------------------------------------- the runtime
@pytest.fixture(scope="module")
def bundle(pertoken_bundle):
    return pertoken_bundle


@pytest.fixture(scope="module")
def session(bundle):
    return load(bundle, backend="torch")


def test_bundle_stores_the_path_and_the_split_table(bundle, session):
    man = json.loads((bundle / "manifest.json").read_text())["pertoken"]
    report = json.loads((bundle / "report.json").read_text())["pertoken"]["split"]
    assert session.alloc_path is not None and session.split == man["split"]
    weights = man["split"]["weights"]
    assert weights[0]["budget"] == 1.0 and weights[0]["kl"] < 1e-9
    assert [w["bytes"] for w in weights] == sorted((w["bytes"] for w in weights), reverse=True)
    assert man["split"]["kv"] and man["total_budget"] == 0.6
    assert [r["prompt_tokens"] for r in report["by_prompt_length"]] == [128]  # context 512
    # the built plan is the path's plan at the build budget
    from cscompile.passes.allocate import plan_for_budget

    assert plan_for_budget(session.alloc_path, 0.6)[0] == man["plan"]


def test_runtime_budget_one_is_the_dense_unreduced_path(session):
    base = session.generate(TEXT, max_new_tokens=8, dense=True)
    got = session.generate(TEXT, max_new_tokens=8, budget=1.0)
    assert got.token_ids == base.token_ids and got.kv_positions is None
    assert got.split["kv_keep"] == 1.0 and got.split["weight_budget"] == 1.0


def test_runtime_budget_reads_at_most_the_total(session):
    built = session.pertoken.plan
    n_new = 8
    r = session.generate(TEXT, max_new_tokens=n_new, budget=0.5)
    assert session.pertoken.plan is built  # the call's plan is undone afterwards
    s = r.split
    pp, dense_w = session.split["kv_position_bytes"], session.split["dense_weight_bytes"]
    steps = len(r.bytes_per_token)
    kept = r.kv_positions if r.kv_positions is not None else r.prompt_tokens
    assert kept == s["kept_positions"]
    assert r.kv_bytes_per_token == [(kept + i + 1) * pp for i in range(steps)]
    read = sum(r.bytes_per_token) / steps + sum(r.kv_bytes_per_token) / steps
    dense = dense_w + (r.prompt_tokens + (steps + 1) / 2) * pp
    assert read <= 0.5 * dense * 1.01  # the mean answer length: new_tokens / 2 vs (steps+1)/2
    assert max(r.bytes_per_token) <= s["weight_budget"] * dense_w + 1


def test_runtime_budget_refusals(session, bundle):
    with pytest.raises(UserInputError, match="--budget"):
        session.generate(TEXT, max_new_tokens=4, budget=0.5, dense=True)
    saved = session.split
    session.split = None  # a bundle built before the split table
    try:
        with pytest.raises(UserInputError, match="rebuild"):
            session.generate(TEXT, max_new_tokens=4, budget=0.5)
    finally:
        session.split = saved


@pytest.mark.parametrize("args,msg", [
    (["--budget", "1.5"], "--budget must be in"),
    (["--budget", "x"], "--budget must be a number"),
    (["--budget", "0.5", "--dense"], "does not combine"),
    (["--budget", "0.5", "--compare"], "does not combine"),
])
def test_cli_budget_bad_values(bundle, args, msg):
    from cscompile.cli import main

    r = CliRunner().invoke(main, ["run", str(bundle), "--prompt", "Hi", *args])
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output


def test_cli_budget_prints_its_split(bundle):
    from cscompile.cli import main

    r = CliRunner().invoke(main, ["run", str(bundle), "--prompt", TEXT, "--budget", "0.5",
                                  "--max-new-tokens", "4", "--stats", "--backend", "torch"])
    assert r.exit_code == 0, r.output
    assert "total budget 0.5 split: weights" in r.output and "KV keep" in r.output
    assert "KV " in r.output and "MB/token" in r.output
