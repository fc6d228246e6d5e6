"""runtime/kv_reduce.py and the runtime's kv budget: 1.0 is the unreduced path exactly, dropped
positions are never read, byte accounting adds up, bad --kv-budget values fail in one line."""
import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.runtime.kv_reduce import (decode_bytes, keep_positions, kv_bytes,
                                         kv_position_bytes, reduce_cache, reduce_prompt_cache)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play in the park "
        "with her dog Max. One day Max ran after a red ball and Lily ran after him. ") * 2


@pytest.fixture(scope="module")
def session(stories_dir):
    from cscompile.runtime import load

    return load(str(stories_dir), backend="torch")


def _prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
    return cache, out.logits[0, -1]


def test_keep_positions_sinks_recent_and_top_scores():
    scores = torch.zeros(100)
    scores[[10, 50, 51]] = torch.tensor([3.0, 2.0, 1.0])
    keep = keep_positions(scores, 0.4, sinks=4, recent=32)  # 40 positions: 36 forced + 4
    assert len(keep) == 40 and torch.equal(keep, torch.sort(keep).values)
    assert set(range(4)) | set(range(68, 100)) | {10, 50, 51} <= set(keep.tolist())
    assert 67 in keep.tolist()  # the last free slot: a tie at 0, the later position wins
    assert torch.equal(keep_positions(scores, 1.0), torch.arange(100))
    assert keep_positions(scores, 0.05, sinks=4, recent=32).tolist() == [0, 1, 2, 3, 99]
    for bad in (0, 1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(UserInputError, match="kv budget"):
            keep_positions(scores, bad)


def test_kv_budget_one_is_the_unreduced_path_exactly(session):
    ids = session.tokenizer(TEXT)["input_ids"]
    cache, _ = _prefill(session.model, torch.tensor([ids]))
    before = [(layer.keys, layer.values) for layer in cache.layers]
    assert reduce_prompt_cache(session.model, ids, cache, 1.0) == len(ids)
    assert all(layer.keys is k and layer.values is v
               for layer, (k, v) in zip(cache.layers, before))  # not even a copy
    from cscompile.runtime.decode_step import decode_logits
    from cscompile.runtime.generate import _options, _prefill as runtime_prefill

    steps = []
    for kv in (None, 1.0):  # the runtime's prefill without and with kv_budget 1.0
        opts = _options(session, 4, 0.0, 1.0, None, None, **({} if kv is None else
                                                              {"kv_budget": kv}))
        pre = runtime_prefill(session, ids, opts)
        assert pre.kv_positions is None and pre.positions(1, "cpu") is None
        with torch.no_grad():
            steps.append(decode_logits(session.model, torch.tensor([[5]]), pre.cache))
    assert torch.equal(steps[0], steps[1])  # bit-identical logits
    plain = session.generate(TEXT, max_new_tokens=12)
    full = session.generate(TEXT, max_new_tokens=12, kv_budget=1.0)
    assert full.token_ids == plain.token_ids and full.kv_positions is None
    half = session.generate(TEXT, max_new_tokens=12, kv_budget=0.5)
    assert half.kv_positions == round(0.5 * len(ids)) and half.prompt_tokens == len(ids)
    batch = session.generate_batch([TEXT, TEXT[:120]], batch_size=2, max_new_tokens=6,
                                   kv_budget=0.5)
    assert batch[0].token_ids == half.token_ids[:6]  # rows with reduced caches decode alone


def test_dropped_positions_are_never_read(session, stories):
    """Poison the dropped positions' K/V with NaN before the reduction: every decode step's
    logits stay those of the clean reduced cache (both decode loops)."""
    from cscompile.passes.token_importance import token_importance
    from cscompile.runtime.decode_step import decode_logits

    from cscompile.runtime.generate import pertoken_logits
    from cscompile.runtime.pertoken import PerToken, uniform_plan

    model = session.model
    smap = stories[1]  # the same architecture's map (a plain-model session has none)
    plan = uniform_plan(smap, qkv={"op": "teal", "keep": 0.5}, ffn={"op": "teal", "keep": 0.5})
    pt = PerToken(model, smap, plan)
    pt.detach()  # attached only inside its steps, as the runtime does
    ids = torch.tensor([session.tokenizer(TEXT)["input_ids"]])
    n = ids.shape[1]
    scores = token_importance(model, ids, "snapkv")
    keep = keep_positions(scores, 0.5)
    dropped = torch.tensor([p for p in range(n) if p not in set(keep.tolist())])
    assert len(dropped) > 0
    outs = []
    for poison in (False, True):
        cache, last = _prefill(model, ids)
        if poison:
            for layer in cache.layers:
                layer.keys[..., dropped, :] = float("nan")
                layer.values[..., dropped, :] = float("nan")
        reduce_cache(cache, keep)
        assert all(layer.keys.shape[-2] == len(keep) for layer in cache.layers)
        token, logits = int(last.argmax()), []
        with torch.no_grad():
            for step in range(6):
                pos = torch.tensor([[n + step]])
                step_in = torch.tensor([[token]])
                if step % 3 == 0:
                    out = decode_logits(model, step_in, cache, position_ids=pos)[0, -1]
                elif step % 3 == 1:
                    out = model(input_ids=step_in, position_ids=pos, cache=cache,
                                use_cache=True).logits[0, -1]
                else:  # the per-token path's step (torch masks)
                    out = pertoken_logits(pt, model, step_in, cache, positions=pos)[0, -1]
                logits.append(out)
                token = int(out.argmax())
        outs.append(torch.stack(logits))
    pt.remove()
    assert torch.isfinite(outs[1]).all()
    assert torch.equal(outs[0], outs[1])


def test_byte_accounting_adds_up(stories):
    from cscompile.runtime.pertoken import Shapes, dense_plan, plan_bytes, uniform_plan

    loaded, smap = stories
    model, cfg = loaded.model, loaded.model.config
    shapes = Shapes.of(model, smap)
    per = kv_position_bytes(model, smap)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert per == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * shapes.elsize
    assert kv_bytes(100, per) == 100 * per
    plan = uniform_plan(smap, ffn={"op": "teal", "keep": 0.5})
    got = decode_bytes(plan, shapes, 37, per)
    assert got["weight_bytes"] == plan_bytes(plan, shapes)["bytes"]
    assert got["total_bytes"] == got["weight_bytes"] + 37 * per
    dense = decode_bytes(dense_plan(smap), shapes, 100, per)
    assert dense["weight_bytes"] == dense["dense_weight_bytes"] > got["weight_bytes"]
    with pytest.raises(UserInputError):
        kv_bytes(-1, per)


def _cli(*args):
    """`cscompile run` in process (a subprocess per value would spend seconds importing)."""
    from click.testing import CliRunner

    from cscompile.cli import main

    return CliRunner().invoke(main, ["run", *args])


def test_cli_kv_budget(stories_dir):
    for bad in ("0", "1.5", "abc", "nan"):
        r = _cli(str(stories_dir), "--prompt", "Once upon a time", "--kv-budget", bad)
        assert r.exit_code != 0, bad
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "kv" in lines[0], r.stderr
    r = _cli(str(stories_dir), "--prompt", TEXT, "--max-new-tokens", "4", "--kv-budget", "0.5",
             "--stats")
    assert r.exit_code == 0, r.stderr
    assert "KV kept 60/120 prompt positions" in r.stderr


# ----------------------------------------------------------------------------- prompt dropping
def test_early_exit_scorer_at_every_layer_is_the_model(session):
    from cscompile.passes.token_importance import early_exit_logits, selfinfo_scores

    model = session.model
    ids = torch.tensor([session.tokenizer(TEXT)["input_ids"]])
    n = model.config.num_hidden_layers
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        assert torch.allclose(early_exit_logits(model, ids, n), full, atol=1e-5)
        part = early_exit_logits(model, ids, 1)
        assert not torch.allclose(part, full, atol=1e-3)  # one layer is not the model
        assert torch.equal(selfinfo_scores(model, ids, layers=1), selfinfo_scores(model, ids, part))
    assert len(model.model.layers) == model.config.num_hidden_layers == n  # restored
    with pytest.raises(UserInputError, match="scorer layers"):
        early_exit_logits(model, ids, n + 1)


def test_prompt_keep_drops_tokens_before_the_prefill(session):
    from cscompile.runtime.generate import _decode_one, _options, _Path, _prefill
    from cscompile.runtime.kv_reduce import RECENT, SINKS, drop_prompt_tokens
    from cscompile.runtime.pertoken import count

    ids = session.tokenizer(TEXT)["input_ids"]
    assert drop_prompt_tokens(session.model, ids, 1.0) is ids
    short = drop_prompt_tokens(session.model, ids, 0.5)
    assert len(short) == count(0.5, len(ids))
    assert short[:SINKS] == ids[:SINKS] and short[-RECENT:] == ids[-RECENT:]
    it = iter(ids)  # a subsequence: order kept
    assert all(any(t == u for u in it) for t in short)
    same = session.generate(TEXT, max_new_tokens=6, prompt_keep=1.0)
    assert same.token_ids == session.generate(TEXT, max_new_tokens=6).token_ids
    assert same.prompt_kept is None
    got = session.generate(TEXT, max_new_tokens=6, prompt_keep=0.5)
    assert got.prompt_tokens == len(ids) and got.prompt_kept == len(short)
    opts = _options(session, 6, 0.0, 1.0, None, None)  # the kept tokens as the whole prompt
    pre = _prefill(session, short, opts)
    ref = _decode_one(session, pre, _Path(session, pre.class_id, "dense", None), opts, None)
    assert got.token_ids == ref.token_ids


def test_cli_prompt_keep(stories_dir):
    for bad in ("0", "2", "x"):
        r = _cli(str(stories_dir), "--prompt", "Once upon a time", "--prompt-keep", bad)
        assert r.exit_code != 0, bad
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "prompt" in lines[0]
    r = _cli(str(stories_dir), "--prompt", TEXT, "--max-new-tokens", "4", "--prompt-keep",
             "0.5", "--stats")
    assert r.exit_code == 0, r.stderr
    assert "prompt tokens prefilled 60/120" in r.stderr
