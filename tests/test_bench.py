"""`cscompile bench` on a small stories260K bundle: rows for dense and every class with sane
statistics and roofline columns, a skipped class, JSON environment, bad input (exit 2)."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cscompile.bench import bench, run_bench
from cscompile.build import run_build

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
TINY = dict(batch_sizes=(1, 2), prompt_len=16, new_tokens=4, repeats=2, warmup=1, threads=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bundle"
    run_build(str(stories_dir), EXAMPLES, out, classes=2, progress=False)
    return out


def test_int8_and_int4_rows_read_their_bytes(bundle):
    from cscompile.runtime import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build here")
    rows = run_bench(bundle, classes="0", int8=True, int4=True, progress=False,
                     **{**TINY, "batch_sizes": (1,)})["rows"]
    by = {r["path"]: r for r in rows}
    full = by["dense (cpu kernels)"]
    # stories260K is stored in fp32: int8 + its scales is a bit over a quarter of it, int4
    # blocks (20 bytes per 32 weights) 0.156 of its matrices, plus what stays fp32
    for quant, lo, hi in (("int8", 0.25, 0.3), ("int4", 0.156, 0.2)):
        dense_q, pertoken_q = by[f"dense {quant} (cpu kernels)"], by[f"pertoken {quant} (cpu kernels)"]
        assert lo < dense_q["weight_bytes"] / full["weight_bytes"] < hi, quant
        assert pertoken_q["weight_bytes"] < dense_q["weight_bytes"]
        assert pertoken_q["density"] < by["pertoken (cpu kernels)"]["density"]
    assert by["dense int4 (cpu kernels)"]["weight_bytes"] < by["dense int8 (cpu kernels)"]["weight_bytes"]


def test_rows_for_dense_and_each_class(bundle):
    result = run_bench(bundle, **TINY)
    json.dumps(result)  # JSON-able as is
    rows = result["rows"]
    from cscompile.runtime import cpu_kernels

    pertoken = (["dense (cpu kernels)", "pertoken (cpu kernels)"]
                if cpu_kernels.available() else []) + ["pertoken (torch masks)"]
    assert [(r["batch"], r["path"]) for r in rows] == [
        (b, p) for b in (1, 2) for p in ["dense", "dense bf16", *pertoken, "class 0", "class 1"]]
    for r in rows:
        if r["path"] == "pertoken (cpu kernels)" and r["batch"] > 1:  # PerToken.step_mode
            assert r["density"] == 1 and r["bytes_ratio"] == 1 and r["class_id"] is None
        elif r["path"].startswith("pertoken"):  # the bundle's per-token path, at its budget
            assert r["bytes_ratio"] > 1 and r["density"] < 1 and r["class_id"] is None
        if r["path"] == "dense (cpu kernels)":  # the dense plan: every weight byte
            assert r["density"] == 1 and r["bytes_ratio"] == 1
    for r in rows:
        for key in ("prefill_ms", "decode_tok_s", "step_ms"):
            s = r[key]
            assert 0 < s["min"] <= s["median"] <= s["max"], (r["path"], key, s)
        assert r["prefill_on"] == ("dense" if r["class_id"] is None else "compact")
        # CPU: what the step streams over its time, against a read measured in the same run
        assert r["gbps"] > 0 and r["pct_bandwidth"] == pytest.approx(
            100 * r["gbps"] / result["read_bandwidth_GBps"]["1"])
        if r["class_id"] is not None and r["density"] < 1:
            assert r["bytes_ratio"] > 1 and r["bytes_ratio_storage"] > 1
            assert r["weight_bytes_fp32"] < rows[0]["weight_bytes_fp32"]
    assert any(r["class_id"] is not None and r["density"] < 1 for r in rows)
    v = result["versions"]
    assert v["torch"] and v["transformers"] and v["cscompile"] and "triton" in v
    assert result["hardware"]["torch_threads"] == 1 and result["date"].endswith("+00:00")
    assert {r["threads"] for r in rows} == {1}
    assert result["args"]["prompt_len"] == 16


def test_class_without_compact_model_is_skipped(bundle, monkeypatch):
    from cscompile.runtime.session import Session

    real = Session.compact_model
    monkeypatch.setattr(Session, "compact_model",
                        lambda self, c: None if c == 1 else real(self, c))
    rows = run_bench(bundle, classes="1", **{**TINY, "batch_sizes": (1,), "repeats": 1})["rows"]
    assert [r["path"] for r in rows if r["path"] in ("dense", "dense bf16")
            or r["path"].startswith("class")] == ["dense", "dense bf16", "class 1"]
    assert "no compact model" in rows[-1]["skipped"]


def test_cli_table_and_json(bundle, tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(bench, [str(bundle), "--classes", "0", "--batch-sizes", "1",
                                   "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
                                   "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "dense" in r.stdout and "class 0" in r.stdout and "pertoken" in r.stdout
    paths = [row["path"] for row in json.loads(out.read_text())["rows"]]
    assert paths[:2] == ["dense", "dense bf16"] and paths[-1] == "class 0"


@pytest.mark.parametrize("args, msg", [
    (["--classes", "7"], "out of range"),
    (["--classes", "a,b"], "comma-separated"),
    (["--batch-sizes", "0"], "batch size"),
    (["--new-tokens", "-1"], "new-tokens"),
])
def test_bad_input_is_one_line_exit_2(bundle, args, msg):
    r = CliRunner().invoke(bench, [str(bundle), *args])
    assert r.exit_code == 2 and msg in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_progress_forced_on_shows_paths_timed(bundle, monkeypatch, capsys):
    from cscompile.progress import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, "1")
    rows = run_bench(bundle, classes="0", **{**TINY, "batch_sizes": (1,), "repeats": 1,
                                             "warmup": 0, "new_tokens": 2})["rows"]
    err = capsys.readouterr().err
    assert f"{len(rows)}/{len(rows)} paths" in err and " left " in err


def test_missing_path_exit_2(tmp_path):
    r = CliRunner().invoke(bench, [str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")


def test_registered_in_main():
    from cscompile.cli import main

    assert main.commands.get("bench") is bench


def test_runtime_overhead_shares(bundle):
    from cscompile.bench import runtime_overhead

    o = runtime_overhead(str(bundle), prompt_len=16, new_tokens=4, repeats=1)
    assert set(o["runs"]) == {"masked", "masked+monitor", "compact"}
    assert o["route_ms"] > 0 and 0 < o["route_share"] < 1
    assert o["monitor_share"] < 1  # a share of the monitored step (may be ~0 or noisy-negative)
    assert len({r["class_id"] for r in o["runs"].values()}) == 1  # one prompt, one route


def test_thread_counts_are_timed_in_turn(bundle):
    result = run_bench(bundle, classes="0", **{**TINY, "batch_sizes": (1,), "repeats": 1,
                                              "threads": [1, 2]})
    by_threads = {}
    for r in result["rows"]:
        by_threads.setdefault(r["threads"], []).append(r["path"])
    assert set(by_threads) == {1, 2} and by_threads[1] == by_threads[2]
    assert all(r["speedup"] == 1.0 for r in result["rows"] if r["path"] == "dense")
