"""ONNX export (cscompile export) and the onnxruntime backend, on stories260K and a tiny Qwen2
bundle: onnxruntime's logits equal torch's for prefill and 16 decode steps of every exported
path, greedy tokens are identical, exports are deterministic and sealed, bad input is one line.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cscompile.build import run_build
from cscompile.cli import main
from cscompile.compat import cache_kwargs
from cscompile.export_onnx import MASKED, export_session
from cscompile.runtime import load
from cscompile.runtime import onnx_backend as ob

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
PROMPT = "Once upon a time, a little fox"
STEPS = 16
TOL = 1e-4  # fp32: graph and eager differ by float reordering only

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_qwen2(folder: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Qwen2 (q/k/v biases, untied head) with stories260K's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module", params=["stories260K", "qwen2"])
def case(request, stories_dir, tmp_path_factory):
    """(torch session, export dir, bundle, export report): the bundle's every path, its static
    path for the class the test prompt routes to."""
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    model = stories_dir if request.param == "stories260K" else _tiny_qwen2(root / "model",
                                                                           stories_dir)
    bundle = root / "bundle"
    run_build(str(model), EXAMPLES, bundle, progress=False, budget=0.6, classes=2, seed=0)
    session = load(bundle, backend="torch", device="cpu")
    routed = session.generate(PROMPT, max_new_tokens=1, path="static").class_id
    # one directory with every path (the step graph once), the routed class only: exports
    # cost ~10 s a graph here, and they are the bulk of this file's time
    report = export_session(session, root / "all", "all", routed)
    return session, root / "all", bundle, report


def _torch_steps(session, kind: str, ids: list[int]):
    """(class id, logits per step, greedy tokens): the runtime's own torch path — dense
    prefill, then STEPS greedy steps on the dense model, the class's reduced copy on the sliced
    cache, or the per-token modules (runtime.generate's functions)."""
    from cscompile.runtime.generate import _options, _prefill, pertoken_logits, slice_cache

    model, smap = session.model, session.smap
    with torch.no_grad():
        pre = _prefill(session, ids, _options(session, STEPS, 0.0, 1.0, None, None))
        class_id, cache, step_model = pre.class_id, pre.cache, model
        if kind == "static":
            step_model = session.compact_model(class_id)
            cache = slice_cache(cache, model, smap, session.classes[class_id].support)
        logits, tokens = [pre.logits], []
        for _ in range(STEPS):
            tokens.append(int(logits[-1].argmax()))
            t = torch.tensor([[tokens[-1]]])
            if kind == "pertoken":
                logits.append(pertoken_logits(session.pertoken, model, t, cache)[0, -1])
            else:
                logits.append(step_model(input_ids=t, **cache_kwargs(step_model, cache),
                                         use_cache=True).logits[0, -1])
    return class_id, [x.float().numpy() for x in logits], tokens


def _ort_steps(session, kind: str, ids: list[int], tokens: list[int]):
    """The same on the exported graphs, fed the torch path's tokens."""
    step, entry = ob.paths_of(session).graph(kind, "step")
    out = ob.run_step(step, entry, np.array([ids], dtype=np.int64), ob.empty_past(entry))
    past = ob.presents(out, entry)
    class_id = int(session.router.classify(torch.from_numpy(out["router_feature"]))[0])
    if kind == "static":
        past = ob.slice_past(session, past, class_id)
    dec, dec_entry = ob.decode_graph(session, kind, class_id)
    logits = [out["logits"][0]]
    for tok in tokens:
        out = ob.run_step(dec, dec_entry, np.array([[tok]], dtype=np.int64), past)
        past = ob.presents(out, dec_entry)
        logits.append(out["logits"][0])
    return class_id, logits


@pytest.mark.parametrize("kind", ["dense", "static", "pertoken"])
def test_onnxruntime_logits_equal_torch(case, kind):
    session, export, _, _ = case
    ids = list(session.tokenizer(PROMPT)["input_ids"])
    ob.use_export(session, export)
    try:
        cls, ref, tokens = _torch_steps(session, kind, ids)
        cls_ort, got = _ort_steps(session, kind, ids, tokens)
    finally:
        session.onnx = None
    assert cls_ort == cls
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ref, got)]
    print(f"\n{session.model.config.model_type} {kind}: max |diff| prefill {diffs[0]:.2e}, "
          f"{STEPS} decode steps {max(diffs[1:]):.2e} (logits up to "
          f"{max(float(np.abs(r).max()) for r in ref):.1f})")
    assert len(got) == STEPS + 1 and max(diffs) <= TOL
    # greedy: every step's argmax on onnxruntime is the token torch chose
    assert [int(g.argmax()) for g in got[:-1]] == tokens


@pytest.mark.parametrize("kind", ["dense", "static", "pertoken"])
def test_greedy_generate_identical(case, kind):
    session, export, bundle, _ = case
    want = session.generate(PROMPT, max_new_tokens=STEPS + 1, path=kind)
    ort = load(bundle, backend="onnxruntime")
    ob.use_export(ort, export)
    got = ort.generate(PROMPT, max_new_tokens=STEPS + 1, path=kind)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert (got.path, got.class_id, got.finish_reason) == (want.path, want.class_id,
                                                            want.finish_reason)
    assert got.bytes_per_token == want.bytes_per_token
    if kind == "pertoken":  # the graph outputs the runtime's own missed estimates
        assert len(got.missed) == len(want.missed) > 0
        for a, b in zip(got.missed, want.missed):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_export_is_sealed_and_labelled(case):
    session, export, bundle, report = case
    man = json.loads((export / "manifest.json").read_text())
    files = {p.name for p in export.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == files and man["opset"] == 18 and man["kind"] == \
        "cscompile-onnx-export"
    cls = man["classes"][0]
    assert man["paths"] == ["dense", "static", "pertoken"]
    assert set(man["graphs"]) == {"step", f"class_{cls}", "pertoken"}
    assert (export / "step.onnx.data").read_bytes()[:9] == b"cscompile"  # never pickle-like
    g = report["graphs"]
    # the class graph is physically reduced: fewer weight bytes than the dense step
    assert g[f"class_{cls}"]["data_bytes"] < g["step"]["data_bytes"]
    assert all(c["max_abs_diff_logits"] <= TOL for gr in g.values() for c in gr["check"].values())
    assert report["pertoken"]["execution"] == MASKED and "reads every weight byte" in MASKED
    assert "TopK" in g["pertoken"]["op_types"] and "TopK" not in g["step"]["op_types"]
    assert g["pertoken"]["outputs"][-1].startswith("missed.")
    shown = CliRunner().invoke(main, ["inspect", str(export)])
    assert shown.exit_code == 0 and "hashes verified" in shown.stdout, shown.output


def test_cli_export_json_is_deterministic(case, tmp_path):
    """Another export (the CLI's, --path dense) writes the same step graph, byte for byte."""
    session, export, bundle, _ = case
    if session.model.config.model_type != "qwen2":
        pytest.skip("one CLI export (the smaller model) is enough")
    r = CliRunner().invoke(main, ["export", str(bundle), "-o", str(tmp_path / "d"),
                                  "--path", "dense", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["paths"] == ["dense"] and set(report["graphs"]) == {"step"}
    assert report["graphs"]["step"]["opsets"] == {"ai.onnx": 18}
    for name in ("step.onnx", "step.onnx.data"):
        assert (tmp_path / "d" / name).read_bytes() == (export / name).read_bytes()
    # an export of one path does not run another
    _one_line_error(CliRunner().invoke(main, ["run", str(bundle), "--prompt", PROMPT,
                                              "--backend", "onnxruntime", "--onnx",
                                              str(tmp_path / "d"), "--path", "static"]),
                    "holds the dense path, not static")


def _one_line_error(result, *fragments):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        result.output
    assert all(f in lines[0] for f in fragments), lines[0]


def test_bad_input_is_one_line(case, tmp_path):
    session, export, bundle, _ = case
    run = CliRunner().invoke
    _one_line_error(run(main, ["export", str(bundle), "-o", str(tmp_path / "a"),
                               "--path", "static", "--class", "7"]), "unknown class 7")
    _one_line_error(run(main, ["export", str(bundle), "-o", str(tmp_path / "a"),
                               "--path", "sparse"]), "--path must be one of")
    _one_line_error(run(main, ["export", str(bundle), "-o", str(tmp_path / "a"),
                               "--path", "dense", "--class", "0"]), "--class")
    _one_line_error(run(main, ["export", str(bundle), "-o", str(tmp_path / "a"),
                               "--format", "tflite"]), "--format")
    _one_line_error(run(main, ["export", str(tmp_path), "-o", str(tmp_path / "a")]),
                    "not a bundle")
    _one_line_error(run(main, ["export", str(bundle), "-o", str(export)]), "exists")
    # a corrupt export is refused before it runs
    bad = tmp_path / "corrupt"
    shutil.copytree(export, bad)
    data = next(bad.glob("class_*.onnx.data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    args = ["run", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "3"]
    _one_line_error(run(main, args + ["--backend", "onnxruntime", "--onnx", str(bad)]),
                    "ONNX export", "modified")
    _one_line_error(run(main, args + ["--onnx", str(export)]), "--backend onnxruntime")


def test_cli_run_on_onnxruntime(case):
    session, export, bundle, _ = case
    args = ["run", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "8", "--path", "pertoken"]
    want = CliRunner().invoke(main, args + ["--backend", "torch"])
    got = CliRunner().invoke(main, args + ["--backend", "onnxruntime", "--onnx", str(export)])
    assert got.exit_code == 0 and want.exit_code == 0, got.output
    assert got.stdout == want.stdout


def test_cache_entry_is_verified_and_reexported(case, tmp_path, monkeypatch):
    """run --backend onnxruntime exports into the cache once; a cached entry that fails its
    hashes is exported again (export_session stubbed: it copies a good export)."""
    session, export, bundle, _ = case
    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path))
    calls = []

    def fake_export(sess, out, path, classes=None, force=False):
        calls.append(path)
        if Path(out).exists():
            shutil.rmtree(out)
        shutil.copytree(export, out)

    monkeypatch.setattr("cscompile.export_onnx.export_session", fake_export)
    first = ob.ensure_export(session, "pertoken", note=lambda text: None)
    again = ob.ensure_export(session, "pertoken", note=lambda text: None)
    assert calls == ["pertoken"] and first.path == again.path
    assert ob.ensure_export(session, "dense", note=lambda text: None).path == first.path
    (first.path / "pertoken.onnx").write_bytes(b"\x08 not the graph")
    ob.ensure_export(session, "pertoken", note=lambda text: None)
    assert calls == ["pertoken", "pertoken"]


def test_bench_rows_on_onnxruntime(case, tmp_path, monkeypatch):
    """cscompile bench --onnxruntime's rows (export stubbed with the fixture's): dense, the
    class and the per-token graph at batch 1, a skipped row at batch 2."""
    session, export, _, _ = case
    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr("cscompile.export_onnx.export_session",
                        lambda sess, out, path, classes=None, force=False:
                        shutil.copytree(export, out))
    cls = json.loads((export / "manifest.json").read_text())["classes"]
    ids = torch.tensor([session.tokenizer(PROMPT)["input_ids"]])
    dense = {"path": "dense", "batch": 1, "threads": torch.get_num_threads(),
             "decode_tok_s": {"median": 10.0}}
    rows = ob.bench_rows(session, {1: ids, 2: ids.repeat(2, 1)}, [None], [1, 2], cls, 3, 1, 0,
                         [dense])
    one = [r for r in rows if r["batch"] == 1]
    assert [r["path"] for r in one] == ["dense (onnxruntime)", f"class {cls[0]} (onnxruntime)",
                                        "pertoken (onnxruntime, masks)"]
    assert all(r["decode_tok_s"]["median"] > 0 and r["prefill_ms"]["median"] > 0 and
               r["speedup"] == pytest.approx(r["decode_tok_s"]["median"] / 10.0) for r in one)
    assert one[1]["weight_bytes"] < one[0]["weight_bytes"]
    assert one[2]["weight_bytes_fp32"] > one[0]["weight_bytes_fp32"]  # masks: every byte + sketches
    assert all("skipped" in r for r in rows if r["batch"] == 2)
    assert session.onnx is None
