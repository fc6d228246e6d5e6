"""The runtime on a real stories260K bundle: cached class-path decoding equals a no-cache
reference, dense decoding equals HF generate, refinement extremes, sampling, bad input, CLI."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cscompile.build import run_build
from cscompile.errors import BundleError, UserInputError
from cscompile.runtime import RefineConfig, load
from cscompile.runtime.cli_run import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
PROMPTS = ["Once upon a time, a little fox", "Tom has 12 apples and buys 7 more.",
           "Write a Python function that"]
N_NEW = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "bundle"
    run_build(str(stories_dir), EXAMPLES, out, progress=False)
    return out


@pytest.fixture(scope="module")
def session(bundle):
    return load(bundle)


# ----------------------------------------------------------------------------- reference
def _reference_greedy(session, prompt, n_new, plan, inter_keep=1.0):
    """Greedy decoding with NO KV cache: the whole sequence is recomputed every step on the
    dense model, prompt positions dense and generated position P+k on plan[k]: "class" (the
    class support), "keep" (top inter_keep of the class channels by |h|) or "dense"."""
    model, smap = session.model, session.smap
    ids = list(session.tokenizer(prompt)["input_ids"])
    p = len(ids)
    sup = None
    hooks = []

    def modes(t):  # mode of each position of a length-t sequence
        return ["dense"] * p + [plan[k] for k in range(t - p)]

    def o_hook(li):
        a = smap.layers[li].attention
        cols = torch.zeros(sum(len(c) for c in a.o_cols))
        for h in sup.heads.get(li, range(a.n_heads)):
            cols[a.o_cols[h]] = 1

        def hook(m, args):
            x = args[0].clone()
            for t, mode in enumerate(modes(x.shape[1])):
                if mode != "dense":
                    x[0, t] *= cols
            return (x,)
        return hook

    def down_hook(li):
        width = smap.layers[li].ffn.width
        cand = torch.zeros(width, dtype=torch.bool)
        cand[sup.channels.get(li, range(width))] = True

        def hook(m, args):
            h = args[0].clone()
            for t, mode in enumerate(modes(h.shape[1])):
                if mode == "class":
                    h[0, t] *= cand
                elif mode == "keep":
                    k = math.ceil(inter_keep * int(cand.sum()))
                    top = (h[0, t].abs() * cand - (~cand).float()).topk(k).indices
                    keep = torch.zeros(width)
                    keep[top] = 1
                    h[0, t] *= keep
            return (h,)
        return hook

    out = []
    with torch.no_grad():
        cls = session.router.classify(_pooled(session, ids))
        sup = session.classes[int(cls[0])].support
        assert sup.layers is None  # the reference does not model dropped layers
        for li, layer in enumerate(smap.layers):
            hooks.append(model.get_submodule(layer.attention.o).register_forward_pre_hook(
                o_hook(li)))
            hooks.append(model.get_submodule(layer.ffn.down).register_forward_pre_hook(
                down_hook(li)))
        try:
            for _ in range(n_new):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                ids.append(tok)
                if tok == session.tokenizer.eos_token_id:
                    break
        finally:
            for h in hooks:
                h.remove()
    return out


def _pooled(session, ids):
    from cscompile.passes.route import _capture

    return _capture(session.model, session.smap, session.router.layer, torch.tensor([ids]),
                    stop=True)


def _plan(result, n, refine=None):
    """Per decode step: the mode the runtime used (from its refinement log)."""
    actions = {x["token"] - 1: x["action"] for x in result.refinements}
    return [{"widen": "dense", "keep": "keep"}.get(actions.get(k), "class") for k in range(n)]


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def masked_session(bundle):
    return load(bundle, execution="masked")


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("execution", ["compact", "masked"])
def test_cached_class_path_equals_no_cache_reference(session, masked_session, prompt,
                                                     execution):
    s = session if execution == "compact" else masked_session
    r = s.generate(prompt, max_new_tokens=N_NEW)
    assert r.path == "class" and r.class_id is not None and not r.refinements
    assert (s._compact.get(r.class_id) is not None) == (execution == "compact")
    assert all((e is None) == (execution == "compact") for e in r.energy)
    assert r.densities == [pytest.approx(session.classes[r.class_id].density)] * len(r.densities)
    assert r.token_ids == _reference_greedy(session, prompt, N_NEW, _plan(r, N_NEW))
    dense = session.generate(prompt, max_new_tokens=N_NEW, dense=True)
    assert r.token_ids != dense.token_ids  # the class path really is a different model


def test_refined_path_equals_reference_with_same_decisions(session):
    prompt = PROMPTS[0]
    cfg = RefineConfig(every=2, widen_threshold=0.6, inter_keep=0.5)
    r = session.generate(prompt, max_new_tokens=N_NEW, refine=cfg)
    actions = [x["action"] for x in r.refinements]
    assert [x["token"] for x in r.refinements] == list(range(1, len(r.token_ids), 2))
    assert "keep" in actions  # the test needs both kinds of decision
    assert "widen" in actions
    plan = _plan(r, N_NEW)
    assert r.token_ids == _reference_greedy(session, prompt, N_NEW, plan, inter_keep=0.5)
    for x in r.refinements:
        assert (x["action"] == "widen") == (1 - x["energy"] >= 0.6)
        if x["action"] == "keep":  # half the class's channels, same heads
            assert x["density"] < session.classes[r.class_id].density
    smap = session.smap
    for k, (d, b) in enumerate(zip(r.densities, r.bytes_per_token)):
        support_bytes = smap.unprunable_bytes() + d * smap.prunable_bytes()
        if plan[k] == "keep":  # the energy monitor's gate/up rows are charged to the token
            assert b > support_bytes + 1
        elif plan[k] == "dense":  # the refined pass, then the dense recomputation
            assert b > smap.total_bytes
        else:
            assert b == pytest.approx(support_bytes)


def test_widen_threshold_zero_is_dense(session):
    for prompt in PROMPTS[:2]:
        dense = session.generate(prompt, max_new_tokens=N_NEW, dense=True)
        r = session.generate(prompt, max_new_tokens=N_NEW,
                             refine=RefineConfig(every=1, widen_threshold=0.0))
        assert r.token_ids == dense.token_ids
        assert {x["action"] for x in r.refinements} == {"widen"}
        assert len(r.refinements) == len(r.token_ids) - 1


def test_widen_threshold_inf_is_static_class_path(session):
    static = session.generate(PROMPTS[1], max_new_tokens=N_NEW)
    r = session.generate(PROMPTS[1], max_new_tokens=N_NEW,
                         refine=RefineConfig(every=1, widen_threshold=math.inf, inter_keep=0.5))
    assert r.token_ids == static.token_ids and r.refinements == []


def test_dense_equals_hf_generate(session, stories_dir):
    from cscompile.frontend import load_model

    original = load_model(stories_dir).model  # un-permuted source weights
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([session.tokenizer(prompt)["input_ids"]])
        r = session.generate(prompt, max_new_tokens=N_NEW, dense=True)
        for model in (session.model, original):
            ref = model.generate(ids, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
            assert r.token_ids == ref[0, ids.shape[1]:].tolist()
        assert r.densities == [1.0] * (len(r.token_ids) - 1)


def test_sampling_is_seeded(session):
    a = session.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=1.0, seed=7)
    b = session.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=1.0, seed=7)
    c = session.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=1.0, seed=8)
    greedy = session.generate(PROMPTS[0], max_new_tokens=N_NEW)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids
    tiny_p = session.generate(PROMPTS[0], max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6,
                              seed=8)  # the nucleus is the top token alone
    assert tiny_p.token_ids == greedy.token_ids


def test_streamed_text_is_the_result_text(session):
    pieces = []
    r = session.generate(PROMPTS[0], max_new_tokens=N_NEW, stream=pieces.append)
    assert "".join(pieces) == r.text and len(pieces) > 1


def test_plain_model_runs_dense(stories_dir, session):
    plain = load(stories_dir)
    assert not plain.is_bundle
    r = plain.generate(PROMPTS[0], max_new_tokens=N_NEW)
    assert r.class_id is None and r.path == "dense"
    assert r.token_ids == session.generate(PROMPTS[0], max_new_tokens=N_NEW,
                                           dense=True).token_ids


def test_bad_input_refused(session, bundle, tmp_path):
    with pytest.raises(UserInputError, match="empty prompt"):
        session.generate("   ")
    with pytest.raises(UserInputError, match="context"):
        session.generate("Once upon a time " * 200)
    with pytest.raises(UserInputError):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json missing"):
        load(tmp_path / "empty")
    bad = _tampered(bundle, tmp_path)
    with pytest.raises(BundleError, match="sha256"):
        load(bad)
    with pytest.raises(UserInputError, match="backend"):
        load(bundle, backend="triton")


def _tampered(bundle, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "router.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "router.safetensors").write_bytes(bytes(data))
    return bad


# ----------------------------------------------------------------------------- CLI
def test_cli_prompt_streams_the_answer(session, bundle):
    r = CliRunner().invoke(run, [str(bundle), "--prompt", PROMPTS[0], "--max-new-tokens",
                                 str(N_NEW), "--stats"])
    assert r.exit_code == 0, r.output
    assert r.stdout == session.generate(PROMPTS[0], max_new_tokens=N_NEW).text + "\n"
    assert "class" in r.stderr and "tok/s" in r.stderr


def test_cli_batch_writes_one_line_per_prompt(bundle, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                           for i, p in enumerate(PROMPTS)))
    r = CliRunner().invoke(run, [str(bundle), "--input", str(inp), "--output", str(out),
                                 "--max-new-tokens", "8", "--refine-every", "2",
                                 "--widen-threshold", "0.2"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["text"] and row["class_id"] is not None and row["tokens_per_s"] > 0
        assert len(row["densities"]) == len(row["token_ids"]) - 1
        assert row["refinements"] and {"token", "action", "energy"} <= set(row["refinements"][0])


def test_cli_stdin_prompts(bundle):
    r = CliRunner().invoke(run, [str(bundle), "--max-new-tokens", "4", "--dense"],
                           input=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize("case", ["missing", "tampered", "empty_prompt", "long_prompt"])
def test_cli_bad_input_exits_2_with_one_line(case, bundle, tmp_path):
    target, prompt = str(bundle), PROMPTS[0]
    if case == "missing":
        target = str(tmp_path / "no-such-bundle")
    elif case == "tampered":
        target = str(_tampered(bundle, tmp_path))
    elif case == "empty_prompt":
        prompt = ""
    else:
        prompt = "Once upon a time " * 200
    r = CliRunner().invoke(run, [target, "--prompt", prompt, "--max-new-tokens", "2"])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
