"""`cscompile eval` on stories260K: dense rows are exact, baselines are charged equal bytes, the
bundle path at full density equals dense, build rows are left out, refinement extremes, CLI."""
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cscompile.build import run_build
from cscompile.cli import main
from cscompile.evaluate import run_eval, write_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(rows=2, windows=2, window=64, gen_tokens=4, calib_rows=2, progress=False)


@pytest.fixture(scope="module")
def data(shared_dir, tmp_path_factory):
    """A small folder of task folders: one multiple-choice set, one generative set, WikiText."""
    root = tmp_path_factory.mktemp("evaldata")
    for name in ("piqa", "gsm8k"):
        (root / name).mkdir()
        lines = (shared_dir / "data" / name / "data.jsonl").read_text().splitlines()[:20]
        (root / name / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "wikitext2").mkdir()
    shutil.copy(shared_dir / "data" / "wikitext2" / "wiki.test.raw", root / "wikitext2")
    return root


@pytest.fixture(scope="module")
def model_report(stories_dir, data):
    return run_eval(str(stories_dir), data, densities=(0.75, 0.5), **SMALL)


def test_dense_row_is_exact_and_baselines_pay_equal_bytes(model_report):
    sets = model_report["sets"]
    assert {s["kind"] for s in sets.values()} == {"mc", "gen", "lm"}
    for s in sets.values():
        dense = s["methods"]["dense"]
        assert dense["bytes"] == 1.0
        if s["kind"] == "mc":
            assert dense["agree"] == 1.0
        else:
            assert dense["kl"] == 0.0 and dense["top1"] == 1.0
        # magnitude, wanda, griffin, teal and random at one FFN density read the same bytes;
        # cats computes the gate fully, so it is charged more
        for d in ("0.75", "0.50"):
            equal = {s["methods"][f"{m}@{d}"]["bytes"] for m in ("magnitude", "wanda", "griffin", "random")}
            assert max(equal) - min(equal) < 1e-9 and max(equal) < 1.0
            assert s["methods"][f"cats@{d}"]["bytes"] > max(equal)
    wiki = sets["wikitext2"]["methods"]
    assert wiki["random@0.50"]["kl"] > wiki["teal@0.50"]["kl"] > 0  # distortion is measured
    assert wiki["random@0.50"]["ppl"] > wiki["dense"]["ppl"]
    assert model_report["checks"]["full_path_equals_dense"] is True


def test_report_files_and_plot(model_report, tmp_path):
    paths = write_report(model_report, tmp_path, "eval")
    assert [p.name for p in paths] == ["eval.json", "eval.md", "eval.png"]
    md = (tmp_path / "eval.md").read_text()
    assert "| dense | 1.000 |" in md and "teal@0.50" in md
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == "stories260K"


def test_bundle_at_full_density_equals_dense(stories_dir, data, tmp_path):
    out = tmp_path / "b"
    run_build(str(stories_dir), EXAMPLES, out, density=1.0, progress=False)
    report = run_eval(str(out), data, methods=["magnitude"], **SMALL)
    for s in report["sets"].values():
        dense, bundle = s["methods"]["dense"], s["methods"]["bundle"]
        if s["kind"] == "lm":
            assert bundle["kl"] == 0.0 and bundle["top1"] == 1.0 and bundle["ppl"] == dense["ppl"]
        elif s["kind"] == "gen":
            assert bundle["kl"] == 0.0 and bundle["top1"] == 1.0
        else:
            assert bundle["acc_norm"] == dense["acc_norm"] and bundle["agree"] == 1.0


@pytest.fixture(scope="module")
def bundle(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evb") / "bundle"
    run_build(str(stories_dir), EXAMPLES, out, progress=False)
    return out


def test_refinement_extremes_and_build_rows_left_out(bundle, tmp_path):
    from cscompile.runtime.refine import RefineConfig

    # the bundle's own calibration file: its build rows must never be evaluated
    data = tmp_path / "calib"
    data.mkdir()
    shutil.copy(EXAMPLES, data / "data.jsonl")
    always = run_eval(str(bundle), data, methods=["random"], refine=RefineConfig(1, 0.0, 1.0), **SMALL)
    s = always["sets"]["calib"]
    assert s["skipped_build_rows"] > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert s["skipped_build_rows"] == manifest["calibration"]["n_build"]
    refined, static = s["methods"]["bundle+refine(w=0,k=1)"], s["methods"]["bundle"]
    assert refined["kl"] == 0.0 and refined["top1"] == 1.0  # threshold 0: every token dense
    assert refined["bytes"] > 1.0 > static["bytes"]  # ... and it paid for the attempt too
    never = run_eval(str(bundle), data, methods=["random"], refine=RefineConfig(1, math.inf, 1.0), **SMALL)
    m = never["sets"]["calib"]["methods"]
    assert m["bundle+refine(w=inf,k=1)"]["kl"] == m["bundle"]["kl"] > 0
    # the runtime's input-sparsity path, calibrated at build to the classes' FFN bytes
    assert 0 < m["bundle+input"]["kl"] and abs(m["bundle+input"]["bytes"] - m["bundle"]["bytes"]) < 0.1
    # baselines at the bundle's bytes
    assert abs(m["random@%.2f" % never["args"]["densities"][0]]["bytes"] - m["bundle"]["bytes"]) < 0.02


def test_cli_eval_writes_tables_and_refuses_bad_input(stories_dir, data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(stories_dir), "--data", str(data / "gsm8k"), "--rows", "1",
                               "--gen-tokens", "2", "--calib-rows", "1", "--methods", "wanda",
                               "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "| wanda@0.50 |" in res.output and (tmp_path / "out" / "eval_stories260K.md").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{not json\n')
    res = runner.invoke(main, ["eval", str(stories_dir), "--data", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output
    res = runner.invoke(main, ["eval", str(stories_dir), "--data", str(data), "--methods", "nope"])
    assert res.exit_code == 2 and "unknown methods" in res.output
    res = runner.invoke(main, ["eval", str(stories_dir)])
    assert res.exit_code == 2 and "--data" in res.output


def test_dense_only(stories_dir, data):
    report = run_eval(str(stories_dir), data / "piqa", methods=["none"], **SMALL)
    assert [m["key"] for m in report["methods"]] == ["dense"]
    assert report["sets"]["piqa"]["methods"]["dense"]["agree"] == 1.0


def test_progress_forced_on_shows_rows_done_and_time_left(stories_dir, data, monkeypatch, capsys):
    from cscompile.progress import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, "1")
    report = run_eval(str(stories_dir), data / "piqa", methods=["random"], **{**SMALL, "progress": True})
    rows = report["sets"]["piqa"]["rows"]
    err = capsys.readouterr().err
    assert f"{rows}/{rows} rows" in err and "1/1 methods" in err and " left " in err
