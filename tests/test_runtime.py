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
    # static class paths only: these tests are about them (test_runtime_pertoken.py tests the
    # per-token path, the default of a bundle that has one)
    run_build(str(stories_dir), EXAMPLES, out, progress=False, pertoken=False)
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


def test_class_switching(session, monkeypatch):
    """Re-routing mid-decode: with the router agreeing nothing changes; a router that prefers
    another class after the prompt makes the path switch at the next check, and later steps run
    on that class (densities inside its support)."""
    prompt = PROMPTS[0]
    base = RefineConfig(every=1, widen_threshold=math.inf, inter_keep=0.5)
    plain = session.generate(prompt, max_new_tokens=N_NEW, refine=RefineConfig(
        every=1, widen_threshold=2.0, inter_keep=0.5))  # refines, never widens
    routed = plain.class_id
    other = next(c.id for c in session.classes if c.id != routed)
    real = session.router.classify
    calls = []

    def biased(feature):  # the prompt routes as usual, every later check prefers `other`
        calls.append(1)
        return real(feature) if len(calls) == 1 else torch.tensor([other])

    monkeypatch.setattr(session.router, "classify", biased)
    cfg = RefineConfig(every=1, widen_threshold=2.0, inter_keep=0.5, switch_every=4)
    r = session.generate(prompt, max_new_tokens=N_NEW, refine=cfg)
    switches = [x for x in r.refinements if x["action"] == "switch"]
    assert switches == [{"token": 4, "action": "switch", "from": routed, "to": other}]
    assert r.token_ids[:5] == plain.token_ids[:5]  # identical until the switch
    cap = session.classes[other].density
    assert all(d <= cap + 1e-9 for d in r.densities[4:])
    monkeypatch.setattr(session.router, "classify", real)
    same = session.generate(prompt, max_new_tokens=N_NEW, refine=RefineConfig(
        every=1, widen_threshold=2.0, inter_keep=0.5, switch_every=100))
    assert same.token_ids == plain.token_ids and base.switch_every == 0
    with pytest.raises(UserInputError, match="switch_every"):
        RefineConfig(switch_every=-1)


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


def _input_sparse_reference(session, prompt, n_new):
    """No-cache greedy reference of refine mode "input": every forward recomputes the whole
    sequence; FFN inputs below the bundle's thresholds are zeroed at generated positions only
    (the prompt is prefilled dense)."""
    smap, th = session.smap, session.input_sparsity["thresholds"]
    ids = session.tokenizer(prompt)["input_ids"]
    n_prompt, handles = len(ids), []

    def hook(t):
        def fn(m, args):
            x = args[0]
            keep = (x.abs() > t).to(x.dtype)
            keep[:, :n_prompt] = 1.0
            return (x * keep, *args[1:])
        return fn

    for li, layer in enumerate(smap.layers):
        f = layer.ffn
        for path in (f.gate, f.up):
            handles.append(session.model.get_submodule(path).register_forward_pre_hook(
                hook(th[f"{li}.hidden"])))
        handles.append(session.model.get_submodule(f.down).register_forward_pre_hook(
            hook(th[f"{li}.inter"])))
    try:
        with torch.no_grad():
            first = int(session.model(torch.tensor([ids])).logits[0, -1].argmax())
            out = [first]
            while len(out) < n_new:
                logits = session.model(torch.tensor([ids + out])).logits
                out.append(int(logits[0, -1].argmax()))
    finally:
        for h in handles:
            h.remove()
    return out


def test_input_sparsity_mode_equals_reference_and_reads_fewer_bytes(session):
    info = session.input_sparsity
    assert 0 < info["keep"] < 1 and len(info["thresholds"]) == 2 * session.smap.n_layers
    cfg = RefineConfig(every=1, widen_threshold=math.inf, mode="input")
    for prompt in PROMPTS[:2]:
        r = session.generate(prompt, max_new_tokens=N_NEW, refine=cfg)
        assert r.token_ids == _input_sparse_reference(session, prompt, len(r.token_ids))
        assert max(r.bytes_per_token) < session.smap.total_bytes
        assert len(r.refinements) == len(r.token_ids) - 1
        assert all(0 < e <= 1 for e in r.energy)
    dense = session.generate(PROMPTS[0], max_new_tokens=N_NEW, dense=True)
    widened = session.generate(PROMPTS[0], max_new_tokens=N_NEW,
                               refine=RefineConfig(widen_threshold=0.0, mode="input"))
    assert widened.token_ids == dense.token_ids  # threshold 0: every step recomputed dense
    saved, session.input_sparsity = session.input_sparsity, None
    try:
        with pytest.raises(UserInputError, match="rebuild"):
            session.generate(PROMPTS[0], max_new_tokens=4, refine=cfg)
    finally:
        session.input_sparsity = saved
    with pytest.raises(UserInputError, match="refine mode"):
        RefineConfig(mode="teal")


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
        load(bundle, backend="cuda-graphs")


def test_triton_backend_equals_torch_compact(bundle, session, monkeypatch):
    """The class path with FFNs on the ffn_decode kernel (Triton interpreter on CPU) decodes the
    same greedy tokens as the torch compact path; the kernel really ran."""
    import os

    from cscompile.codegen import kernels
    from cscompile.runtime.triton_backend import TritonFFN

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    calls = []
    real = kernels.ffn_decode
    monkeypatch.setattr(kernels, "ffn_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    tri = load(bundle, backend="triton")
    assert tri.backend == "triton"
    for prompt in PROMPTS[:2]:
        a = tri.generate(prompt, max_new_tokens=8)
        b = session.generate(prompt, max_new_tokens=8)
        assert a.class_id == b.class_id and a.token_ids == b.token_ids
    model = tri.compact_model(a.class_id)
    assert any(isinstance(m, TritonFFN) for m in model.modules()) and calls
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="backend triton cannot run here"):
            load(bundle, backend="triton")
        # auto never picks the interpreter: the CPU kernels, or torch where they cannot build
        from cscompile.runtime import cpu_kernels

        assert load(bundle).backend == ("cpu" if cpu_kernels.available() else "torch")


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
                                 "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["text"] and row["class_id"] is not None and row["tokens_per_s"] > 0
        assert len(row["densities"]) == len(row["token_ids"]) - 1
        assert row["path"] == "class" and row["refinements"] == []


def test_cli_stdin_prompts(bundle):
    r = CliRunner().invoke(run, [str(bundle), "--max-new-tokens", "4", "--dense"],
                           input=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize("terminal", [True, False])
def test_cli_says_it_reads_stdin_only_at_a_terminal(bundle, monkeypatch, terminal):
    from cscompile.runtime import cli_run

    monkeypatch.setattr(cli_run, "_stdin_is_terminal", lambda: terminal)
    r = CliRunner().invoke(run, [str(bundle), "--max-new-tokens", "2"], input="")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ([cli_run.STDIN_HINT] if terminal else [])
    assert r.stdout == ""


def test_cli_hides_third_party_warnings_unless_verbose(bundle, monkeypatch):
    import warnings

    from transformers.utils import logging as hf_logging

    from cscompile.runtime.session import Session

    real = Session.generate

    def generate_with_a_library_warning(self, *args, **kwargs):
        warnings.warn("`past_key_values` is deprecated", FutureWarning)  # as transformers did
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Session, "generate", generate_with_a_library_warning)
    args = [str(bundle), "--prompt", PROMPTS[0], "--max-new-tokens", "2"]
    level = hf_logging.get_verbosity()
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            r = CliRunner().invoke(run, args + (["--verbose"] if verbose else []))
        assert r.exit_code == 0, r.output
        shown = [str(w.message) for w in seen if "past_key_values" in str(w.message)]
        assert bool(shown) == verbose
        assert hf_logging.get_verbosity() == level  # restored after the command


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


# ----------------------------------------------------------------------------- batches
# different lengths; on the stories260K bundle they route to several classes, some shared
BATCH = ["Once upon a time, a little fox", "Tom has 12 apples and buys 7 more.", "The dog",
         "Write a Python function that", "Lily went to the park and saw a big red ball",
         "Sara reads 15 pages a day. How many pages does she read in 6 days?"]


def _chunk_sizes(keys, batch_size):
    """Per row: the size of the chunk it decodes in, grouping rows by path key in input
    order (what generate_batch promises)."""
    sizes, groups = [0] * len(keys), {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for rows in groups.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            for i in chunk:
                sizes[i] = len(chunk)
    return sizes


def _same_row(a, b):
    """b (from a batch) is a's single-prompt result, timings and batch size aside."""
    assert b.token_ids == a.token_ids and b.text == a.text
    for f in ("prompt_tokens", "class_id", "path", "densities", "bytes_per_token",
              "refinements", "finish_reason"):
        assert getattr(b, f) == getattr(a, f), f
    assert b.energy == pytest.approx(a.energy, abs=1e-6) if a.energy and a.energy[0] is not None \
        else b.energy == a.energy


@pytest.mark.parametrize("case", ["compact", "masked", "dense"])
def test_batch_equals_single_prompt_generate(session, masked_session, case):
    s = masked_session if case == "masked" else session
    kw = {"dense": True} if case == "dense" else {}
    single = [s.generate(p, max_new_tokens=N_NEW, **kw) for p in BATCH]
    calls = []  # (model, input shape) of every forward
    models = {"dense": s.model, **{c: m for c, m in s._compact.items() if m is not None}}
    hooks = [m.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: calls.append((name, kwargs["input_ids"].shape)),
        with_kwargs=True) for name, m in models.items()]
    try:
        batch = s.generate_batch(BATCH, batch_size=2, max_new_tokens=N_NEW, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert len(batch) == len(BATCH)
    for a, b in zip(single, batch):  # input order, row by row
        _same_row(a, b)
    keys = [("dense",) if case == "dense" else ("class", r.class_id) for r in single]
    assert [r.batch_size for r in batch] == _chunk_sizes(keys, 2)
    assert len({r.class_id for r in single}) > 1 and max(r.batch_size for r in batch) == 2
    assert all(r.decode_s > 0 for r in batch)
    chunks = sum(1 for r in batch if r.batch_size == 2) // 2
    # the dense model runs the prefills, one per prompt; each decode step of a 2-row chunk is
    # one forward, on the dense model (masked, dense) or on the class's reduced copy (compact)
    assert [name for name, shape in calls if shape[1] > 1] == ["dense"] * len(BATCH)
    steps2 = [name for name, shape in calls if shape == (2, 1)]
    assert len(steps2) == chunks * (N_NEW - 1)
    assert all((name != "dense") == (case == "compact") for name in steps2)


def test_batch_row_finishing_early_keeps_the_others(session):
    ids = session.tokenizer("Once upon a time " * 200)["input_ids"]
    near_ctx = session.tokenizer.decode(ids[1:session.context_length - 6])
    prompts = ["The dog", near_ctx, BATCH[0]]
    single = [session.generate(p, max_new_tokens=N_NEW, dense=True) for p in prompts]
    assert [r.finish_reason for r in single] == ["length", "context", "length"]
    batch = session.generate_batch(prompts, batch_size=3, max_new_tokens=N_NEW, dense=True)
    for a, b in zip(single, batch):
        _same_row(a, b)
    assert [r.batch_size for r in batch] == [3, 3, 3]


def test_batch_size_one_is_generate(session):
    single = [session.generate(p, max_new_tokens=N_NEW) for p in BATCH[:3]]
    batch = session.generate_batch(BATCH[:3], batch_size=1, max_new_tokens=N_NEW)
    for a, b in zip(single, batch):
        _same_row(a, b)
        assert a.batch_size == b.batch_size == 1


def test_batch_sampling_is_per_row_seeded(session):
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, seed=7, dense=True)
    single = [session.generate(p, **kw) for p in BATCH[:3]]
    batch = session.generate_batch(BATCH[:3], batch_size=3, **kw)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.batch_size for r in batch] == [3, 3, 3]


def test_refined_batch_falls_back_to_per_row(session):
    cfg = RefineConfig(every=2, widen_threshold=0.6, inter_keep=0.5)
    single = [session.generate(p, max_new_tokens=N_NEW, refine=cfg) for p in BATCH[:4]]
    batch = session.generate_batch(BATCH[:4], batch_size=4, max_new_tokens=N_NEW, refine=cfg)
    assert any(r.refinements for r in single)
    for a, b in zip(single, batch):
        _same_row(a, b)
        assert b.batch_size == 1  # decoded alone
    dense = session.generate_batch(BATCH[:2], batch_size=2, max_new_tokens=4, refine=cfg,
                                   dense=True)  # refinement never touches the dense path
    assert [r.batch_size for r in dense] == [2, 2] and not any(r.refinements for r in dense)


def test_batch_bad_input_refused(session):
    with pytest.raises(UserInputError, match="prompt 1: empty prompt"):
        session.generate_batch([BATCH[0], "  "])
    with pytest.raises(UserInputError, match="batch_size"):
        session.generate_batch(BATCH[:2], batch_size=0)
    with pytest.raises(UserInputError, match="list of prompts"):
        session.generate_batch(BATCH[0])
    assert session.generate_batch([]) == []


def test_cli_batch_size_keeps_one_line_per_prompt_in_order(session, bundle, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = BATCH[:4]
    inp.write_text("".join(json.dumps({"prompt": p, "id": 10 + i}) + "\n"
                           for i, p in enumerate(prompts)))
    r = CliRunner().invoke(run, [str(bundle), "--input", str(inp), "--output", str(out),
                                 "--max-new-tokens", "8", "--batch-size", "2", "--stats"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [10, 11, 12, 13]
    assert [row["prompt"] for row in rows] == prompts
    for p, row in zip(prompts, rows):
        assert row["token_ids"] == session.generate(p, max_new_tokens=8).token_ids
    keys = [("class", row["class_id"]) for row in rows]
    assert [row["batch_size"] for row in rows] == _chunk_sizes(keys, 2)
    assert len(r.stderr.strip().splitlines()) == 4 and "batch" in r.stderr
    r = CliRunner().invoke(run, [str(bundle), "--prompt", "x", "--batch-size", "2"])
    assert r.exit_code == 2 and "--batch-size needs --input" in r.stderr


def test_batch_finished_row_stays_inside_learned_positions(tiny, char_tokenizer):
    """A row stopped by the context keeps computing in its chunk; with learned position
    embeddings (gpt2, 128 positions) its positions must not run past the table."""
    from cscompile.runtime import Session

    s = Session(tiny("gpt2")[0].model, char_tokenizer())
    prompts = ["x" * 120, "hello world", "abc"]
    single = [s.generate(p, max_new_tokens=12) for p in prompts]
    assert single[0].finish_reason == "context"
    batch = s.generate_batch(prompts, batch_size=3, max_new_tokens=12)
    for a, b in zip(single, batch):
        _same_row(a, b)
    assert [r.batch_size for r in batch] == [3, 3, 3] and {r.path for r in batch} == {"dense"}
