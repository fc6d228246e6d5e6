"""The runtime's default path on a real stories260K bundle: the per-token path, decoded with a
KV cache, equals its teacher-forced reference; batches equal single prompts; stats; CLI."""
import json

import pytest
import torch
from click.testing import CliRunner

from cscompile.compat import cache_kwargs
from cscompile.errors import UserInputError
from cscompile.runtime import load
from cscompile.runtime.cli_run import run

PROMPTS = ["Once upon a time, a little fox", "Tom has 12 apples", "Lily and Tom went"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(pertoken_bundle):
    return pertoken_bundle


@pytest.fixture(scope="module")
def session(bundle):
    return load(bundle)


def test_default_path_is_pertoken_at_the_built_budget(session, bundle):
    r = session.generate(PROMPTS[0], max_new_tokens=12)
    assert r.path == "pertoken" and len(r.missed) == len(r.densities) == 11
    report = json.loads((bundle / "report.json").read_text())["pertoken"]
    assert report["fraction"] <= 0.6 and r.densities[0] == pytest.approx(report["fraction"])
    assert all(0 <= m["ffn"] < 1 and 0 <= m["lm_head"] < 1 for m in r.missed)
    assert any(m["ffn"] > 0 for m in r.missed)  # a real reduction misses something
    assert session.generate(PROMPTS[0], max_new_tokens=12, path="static").path == "class"
    assert not session.pertoken.attached  # other paths never see the swapped modules


def test_cached_decode_equals_teacher_forced_reference(session):
    """Greedy decode step by step with the cache == one per-token forward over the generated
    tokens on the dense prompt cache (every position's support depends on itself only)."""
    from transformers import DynamicCache

    r = session.generate(PROMPTS[0], max_new_tokens=16)
    model, pt = session.model, session.pertoken
    ids = torch.tensor([session.tokenizer(PROMPTS[0])["input_ids"]])
    gen = torch.tensor([r.token_ids])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
        pt.attach()
        pt.mode = "pertoken"
        try:
            logits = model(input_ids=gen[:, :-1], **cache_kwargs(model, cache),
                           use_cache=True).logits[0]
        finally:
            pt.mode = "dense"
            pt.detach()
    want = [int(first.argmax())] + logits.argmax(-1).tolist()
    assert r.token_ids == want


def test_dense_path_is_the_dense_model(session, stories_dir):
    dense = load(stories_dir).generate(PROMPTS[1], max_new_tokens=12)
    got = session.generate(PROMPTS[1], max_new_tokens=12, path="dense")
    assert got.token_ids == dense.token_ids and got.path == "dense"


def test_batch_equals_single_prompt_on_torch_masks(bundle):
    """The torch backend's batched step: each row's own support (masks), so a batch decodes
    what the rows decode alone."""
    session = load(bundle, backend="torch")
    single = [session.generate(p, max_new_tokens=10) for p in PROMPTS]
    batch = session.generate_batch(PROMPTS, batch_size=3, max_new_tokens=10)
    assert [b.batch_size for b in batch] == [3, 3, 3]
    for a, b in zip(single, batch):
        assert a.token_ids == b.token_ids and a.path == b.path == "pertoken"
        assert [m["ffn"] for m in a.missed] == pytest.approx([m["ffn"] for m in b.missed],
                                                             abs=1e-5)


def test_cpu_batch_steps_read_every_weight(session, stories_dir):
    """The CPU backend's steps of several rows run every weight (PerToken.step_mode): the
    rows decode the dense model's tokens and are charged dense bytes."""
    if session.pertoken.cpu is None:
        pytest.skip("the CPU kernels did not build here")
    dense = load(stories_dir)
    want = [dense.generate(p, max_new_tokens=10).token_ids for p in PROMPTS]
    batch = session.generate_batch(PROMPTS, batch_size=3, max_new_tokens=10)
    assert [b.batch_size for b in batch] == [3, 3, 3]
    full = session.pertoken.bytes(3)
    assert full["fraction"] == 1.0 and session.pertoken.bytes(1)["fraction"] <= 0.6
    for b, w in zip(batch, want):
        assert b.token_ids == w and b.path == "pertoken"
        assert set(b.densities) == {1.0} and set(b.bytes_per_token) == {round(full["bytes"])}
        assert all(m == {} for m in b.missed)  # nothing selected, nothing missed


def test_bad_paths_refused(session, stories_dir):
    with pytest.raises(UserInputError, match="path must be one of"):
        session.generate("x", path="fast")
    with pytest.raises(UserInputError, match="no per-token plan"):
        load(stories_dir).generate("x", path="pertoken")


def test_decode_emits_no_library_warnings(session):
    """Every path calls transformers through its current cache API: nothing deprecated."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for path in ("pertoken", "static", "dense"):
            session.generate(PROMPTS[0], max_new_tokens=3, path=path)
    assert [f"{w.category.__name__}: {w.message}" for w in seen] == []


def test_cli_compare_answers_dense_and_per_token_side_by_side(session, bundle):
    res = CliRunner().invoke(run, [str(bundle), "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                                   "--compare"])
    assert res.exit_code == 0, res.output
    dense = session.generate(PROMPTS[0], max_new_tokens=8, path="dense")
    sparse = session.generate(PROMPTS[0], max_new_tokens=8)
    assert f"[dense model]\n{dense.text}\n[per-token path]\n{sparse.text}\n" in res.stdout
    assert "decode tok/s" in res.stdout and "weight MB / token" in res.stdout
    row = next(line for line in res.stdout.splitlines() if "per-token path " in line)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    of_dense = mean(sparse.bytes_per_token) / mean(dense.bytes_per_token)
    assert of_dense < 1 and f"{of_dense:.3f}" in row
    same = next((i for i, (a, b) in enumerate(zip(sparse.token_ids, dense.token_ids)) if a != b),
                len(dense.token_ids))
    assert f"{same}/{len(dense.token_ids)}" in row
    assert "x the dense decode speed" in res.stdout


@pytest.mark.parametrize("args, msg", [(["--input", "x.jsonl"], "--compare picks the paths"),
                                       (["--prompt", "x", "--path", "static"], "--compare picks"),
                                       (["--prompt", "x", "--dense"], "--compare picks"),
                                       (["--prompt", "x"], "needs a bundle")])
def test_cli_compare_refuses_what_it_cannot_compare(bundle, stories_dir, args, msg):
    target = str(stories_dir) if msg == "needs a bundle" else str(bundle)
    res = CliRunner().invoke(run, [target, "--compare", *args])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and msg in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_stats_line_reports_missed_energy(bundle):
    res = CliRunner().invoke(run, [str(bundle), "--prompt", PROMPTS[2], "--max-new-tokens", "6",
                                   "--stats"])
    assert res.exit_code == 0, res.output
    assert "per-token path" in res.stderr and "missed (mean/worst step)" in res.stderr
    res = CliRunner().invoke(run, [str(bundle), "--prompt", "x", "--path", "nope"])
    assert res.exit_code == 2


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cli_quantized_weights(bundle, stories_dir, quant):
    """run --weights int8 / int4: the per-token path on quantized kernel copies, charged
    their bytes; int4's input-major down copies keep the source blocks through the build's
    FFN channel permutation."""
    from cscompile.runtime import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build here")
    res = CliRunner().invoke(run, [str(bundle), "--prompt", PROMPTS[0], "--max-new-tokens", "6",
                                   "--weights", quant, "--stats"])
    assert res.exit_code == 0, res.output
    session = load(bundle, weights=quant)
    rq = session.generate(PROMPTS[0], max_new_tokens=6)
    assert rq.text in res.stdout and "per-token path" in res.stderr
    r = load(bundle).generate(PROMPTS[0], max_new_tokens=6)
    # stories260K is stored in fp32; sketches and norms keep their own size
    assert max(rq.bytes_per_token) < 0.4 * min(r.bytes_per_token)
    if quant == "int4":
        from safetensors.torch import load_file

        classes = load_file(str(bundle / "classes.safetensors"))
        cpu = session.pertoken.cpu
        for li, ffn in cpu.ffn.items():
            assert torch.equal(ffn["d_t"][0].rowmap, classes[f"perm.layer{li}"].to(torch.int32))
    for target, extra in ((stories_dir, []), (bundle, ["--backend", "torch"])):
        res = CliRunner().invoke(run, [str(target), "--prompt", "x", "--weights", quant, *extra])
        assert res.exit_code == 2 and res.stderr.startswith("error: ") and quant in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
