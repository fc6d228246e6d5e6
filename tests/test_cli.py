"""The command line end to end: build a bundle, inspect it, refuse tampering (one line, exit 2)."""
import json
import os
import subprocess
import sys

import pytest


def _cli(*args, cwd):
    env = dict(os.environ, CSCOMPILE_DEBUG="")
    return subprocess.run([sys.executable, "-m", "cscompile.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories_dir):
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("cli")
    calib = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
    out = tmp / "bundle"
    r = _cli("build", str(stories_dir), "--calib", str(calib), "-o", str(out), "--json", cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp, out, json.loads(r.stdout)


def test_build_report_and_inspect(built):
    tmp, out, report = built
    assert report["n_classes"] >= 2 and (out / "manifest.json").exists()
    r = _cli("inspect", str(out), cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "hashes verified" in r.stdout and "task classes" in r.stdout


def test_run_compare_prints_no_warning_line(built):
    """What a user sees from `run`: the two answers and the table on stdout, and not one
    third-party warning line on stderr (the dense and per-token paths both decode)."""
    import re

    tmp, out, _ = built
    r = _cli("run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "4",
             "--compare", cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "[dense model]" in r.stdout and "[per-token path]" in r.stdout
    assert [line for line in r.stderr.splitlines() if re.search("warn", line, re.I)] == []


def test_existing_output_refused(built, stories_dir):
    tmp, out, _ = built
    r = _cli("build", str(stories_dir), "--calib", "x.jsonl", "-o", str(out), cwd=tmp)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_malformed_calib_names_the_line(tmp_path, stories_dir):
    calib = tmp_path / "bad.jsonl"
    calib.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    r = _cli("build", str(stories_dir), "--calib", str(calib), "-o", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_tampered_bundle_refused(built, tmp_path):
    import shutil

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = _cli("inspect", str(copy), cwd=tmp_path)
    assert r.returncode == 2 and "sha256" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bundle_is_self_contained_with_verified_kernels(built):
    from cscompile.bundle import load_bundle
    from cscompile.codegen.generate import load_class_module

    _, out, _ = built
    bundle = load_bundle(out)
    man = bundle.manifest
    assert man["model_config"]["model_type"] == "llama"
    assert "tokenizer/tokenizer.json" in man["tokenizer_files"]
    for cls in man["classes"]:
        entry = cls["kernel"]
        module = load_class_module(bundle.text(entry["file"]), entry["sha256"], entry["spec"])
        assert hasattr(module, "ffn_decode_layer")


def test_inspect_bundle_plot(built, tmp_path):
    _, out, _ = built
    png = tmp_path / "heat.png"
    r = _cli("inspect", str(out), "--plot", str(png), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
