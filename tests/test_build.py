"""`run_build` end to end on stories260K: a verified, deterministic bundle; clean refusals."""
import json
from pathlib import Path

import pytest
import torch

from cscompile.build import run_build
from cscompile.bundle import load_bundle
from cscompile.calib import prompt_hash
from cscompile.errors import UserInputError
from cscompile.execute import Support
from cscompile.frontend import load_model, logits_of


pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """The first 12 example prompts (3 per task), a duplicate line and an over-long story."""
    lines = EXAMPLES.read_text().splitlines()[:12]
    long = json.dumps({"prompt": "Once upon a time " * 200, "task": "story"})
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(lines + [lines[0], long]) + "\n")
    return path


@pytest.fixture(scope="module")
def build_run(stories_dir, calib, tmp_path_factory):
    """(bundle, report, stderr) of one build with progress forced on, drawn as a user at a
    terminal would see it."""
    import contextlib
    import io

    from cscompile.progress import FORCE_ENV

    out = tmp_path_factory.mktemp("b") / "bundle"
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setenv(FORCE_ENV, "1")
        report = run_build(str(stories_dir), calib, out, density=0.5, layout="compact", seed=3)
    return out, report, stderr.getvalue()


@pytest.fixture(scope="module")
def built(build_run):
    return build_run[:2]


def test_build_shows_progress(build_run):
    """Bars with done / total, elapsed and time left for the long phases; a line per phase."""
    out, _, err = build_run
    man = load_bundle(out).manifest
    cal = man["calibration"]
    prompts = cal["n_build"] + cal["n_held_out"]
    assert f"{prompts}/{prompts} prompts" in err and " left " in err
    parts = 3 * len(man["structure"]["layers"])  # q/k/v, o and FFN inputs of every layer
    assert f"{parts}/{parts} parts" in err
    assert f"✓ signatures of {cal['n_build']} build + {cal['n_held_out']} held-out prompts" in err


def test_bundle_verifies_and_describes_classes(built, stories_dir):
    out, report = built
    b = load_bundle(out)
    m = b.manifest
    assert m["source"]["model_id"] == "stories260K" and len(m["source"]["weight_hash"]) == 64
    assert m["refinement"] == {"enabled": False} and m["build_args"]["seed"] == 3
    assert len(m["calibration"]["build_prompt_hashes"]) == 10  # 13 unique, 3 held out
    rows = [json.loads(l)["prompt"] for l in EXAMPLES.read_text().splitlines()[:12]]
    assert set(m["calibration"]["build_prompt_hashes"]) <= {prompt_hash(p) for p in rows} | {
        prompt_hash("Once upon a time " * 200)}
    assert any("duplicate" in w for w in report["warnings"])
    assert any("line 14" in w and "truncated" in w for w in report["warnings"])
    assert report["n_classes"] == len(m["classes"]) >= 2
    tables = b.tensors("classes.safetensors")
    for c in m["classes"]:
        assert abs(c["density"] - 0.5) <= 0.05
        sup = Support.from_json(c["support"])
        for li, chans in sup.channels.items():
            assert tables[f"class{c['id']}.layer{li}.channels"].tolist() == chans
            assert len(chans) % 64 == 0 or len(chans) == 172
        for li, heads in sup.heads.items():
            assert tables[f"class{c['id']}.layer{li}.heads"].dtype == torch.int32
        assert b.has(f"classes/c{c['id']}.safetensors")
    assert 0.0 <= report["router"]["held_out_accuracy"] <= 1.0
    assert report["timing"]["build_s"] > 0 and "timing" not in b.report


def test_bundle_weights_reproduce_the_source_model(built, stories_dir):
    """The stored (channel-permuted) weights are an exact re-parameterisation of the source."""
    out, _ = built
    b = load_bundle(out)
    src = load_model(stories_dir)
    ids = torch.tensor([[1, 403, 407, 261, 378, 10, 20]])
    with torch.no_grad():
        dense = logits_of(src.model, ids)
    state = b.tensors("weights.safetensors")
    for alias, stored in b.manifest["tied_weights"].items():
        state[alias] = state[stored]
    src.model.load_state_dict(state)
    with torch.no_grad():
        diff = (logits_of(src.model, ids) - dense).abs().max().item()
    # fp32 sums over channels in a new order: equal up to rounding (logits here reach ~15)
    assert diff <= 1e-5 * max(1.0, dense.abs().max().item()), diff


def test_rebuild_is_byte_identical(built, stories_dir, calib, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    run_build(str(stories_dir), calib, again, density=0.5, layout="compact", seed=3,
              progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_refuses_existing_output(built, stories_dir, calib):
    out, _ = built
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UserInputError, match="exists"):
        run_build(str(stories_dir), calib, out, progress=False)
    assert (out / "manifest.json").read_bytes() == before


def test_malformed_jsonl_names_line_and_writes_nothing(stories_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match="line 3"):
        run_build(str(stories_dir), bad, out, progress=False)
    assert list(tmp_path.iterdir()) == [bad]


def test_too_few_prompts(stories_dir, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n{"prompt": "c"}\n')
    with pytest.raises(UserInputError, match="at least 4"):
        run_build(str(stories_dir), few, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weights_stored_in_source_dtype_with_tied_weights_once(stories_dir, calib, tmp_path,
                                                               monkeypatch):
    """A bf16 source (like SmolLM2) is stored as bf16, and casting must not undo the
    de-duplication of tied embeddings."""
    import cscompile.build as build_mod

    def load_as_bf16_source(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded.storage_dtype = torch.bfloat16
        return loaded

    monkeypatch.setattr(build_mod, "load_model", load_as_bf16_source)
    out = tmp_path / "bundle"
    run_build(str(stories_dir), calib, out, density=0.5, seed=0, progress=False)
    b = load_bundle(out)
    weights = b.tensors("weights.safetensors")
    assert b.manifest["weights_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    assert b.manifest["tied_weights"] == {"model.embed_tokens.weight": "lm_head.weight"} or \
        b.manifest["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    n_params = sum(p.numel() for p in load_model(stories_dir).model.parameters())
    assert sum(t.numel() for t in weights.values()) == n_params  # the tied matrix once


def test_build_options_kv_groups_uniform_skip_layers(stories_dir, calib, tmp_path):
    out = tmp_path / "bundle"
    report = run_build(str(stories_dir), calib, out, density=0.6, seed=0, progress=False,
                       allocation="uniform", kv_groups=True, skip_layers=1, tile=4)
    b = load_bundle(out)
    assert len(report["skipped_layers"]) == 1 and len(report["layer_skip_kl"]) == 5
    skipped = report["skipped_layers"][0]
    # the layer whose removal alone costs least was dropped, in every class
    assert report["layer_skip_kl"][skipped] == min(report["layer_skip_kl"])
    for cls in b.manifest["classes"]:
        sup = Support.from_json(cls["support"])
        assert skipped not in sup.layers
        for heads in sup.heads.values():
            assert all((h ^ 1) in heads for h in heads)  # kv groups of 2 heads kept whole
    with pytest.raises(UserInputError):
        run_build(str(stories_dir), calib, tmp_path / "b2", skip_layers=5, progress=False)
