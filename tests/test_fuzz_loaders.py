"""Fuzzed loaders: every parser of outside input ends in a valid result or a one-line CsError.

Short, derandomized hypothesis budgets over the targets of tests/fuzz_targets.py (the same ones
`benchmarks/fuzz_loaders.py` runs with >= 10,000 inputs), a check that the harness itself
catches each kind of contract violation, and CLI runs: bad input gives exactly one stderr line
`error: ...` and exit code 2, no traceback, nothing written.
"""
import builtins
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_targets as F  # noqa: E402

from cscompile.errors import BundleError, UserInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# examples per target: enough to reach every branch of each generator, small enough for CI
BUDGET = {"calib_jsonl": 60, "model_source": 40, "manifest_bytes": 40, "manifest_json": 40,
          "safetensors_header": 40, "bundle_layout": 40, "kernel_source": 8, "model_hf_dir": 25,
          "model_gguf": 30, "model_pt": 40, "model_pt2": 8}
# targets whose generators produce inputs that load (model_source names no real model;
# manifest_bytes accepts only the mutations that happen to change nothing)
CAN_BE_VALID = set(BUDGET) - {"model_source", "manifest_bytes"}  # bytes: any change is refused


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    F.quiet()


@pytest.mark.parametrize("name", list(F.TARGETS))
def test_target_never_crashes(name, tmp_path):
    target = F.TARGETS[name]
    if "stories" in target.needs and not F.STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is absent")
    tally = F.Tally()

    @settings(max_examples=BUDGET[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def check(example):
        outcome = F.run_one(target, example, tmp_path)
        tally.add(outcome)
        assert outcome.kind != "crash", f"{name}: {outcome.detail}"

    check()
    assert tally.errors > 0, f"{name}: the generator never produced a refused input"
    if name in CAN_BE_VALID:
        assert tally.valid > 0, f"{name}: the generator never produced a loadable input"
    assert list(tmp_path.iterdir()) == []  # every sandbox removed


# ---------------------------------------------------------------------------- the harness itself


class _Probe(F.Target):
    def __init__(self, action):
        super().__init__("probe", None)
        self.action = action

    def run(self, example, case):
        (case / "input").write_text("x")
        F.ready()
        self.action(case)


def _raise(exc):
    def act(case):
        raise exc
    return act


def _sleep(case):
    time.sleep(5)


@pytest.mark.parametrize("action, expected", [
    (lambda case: None, "valid"),
    (_raise(UserInputError("one clear line")), "error"),
    (_raise(BundleError("bundle refused")), "error"),
    (_raise(ValueError("boom")), "crash"),
    (_raise(UserInputError("two\nlines")), "crash"),
    (_raise(F.ContractViolation("accepted tampering")), "crash"),
    (lambda case: (case / "written").write_text("x"), "crash"),
    (lambda case: (case / "input").write_text("changed!"), "crash"),
    (lambda case: setattr(builtins, F.MARKER_ATTR, True), "crash"),
    (_sleep, "crash"),
])
def test_harness_classifies_outcomes(action, expected, tmp_path):
    outcome = F.run_one(_Probe(action), None, tmp_path, timeout_s=1)
    assert outcome.kind == expected, outcome
    assert not hasattr(builtins, F.MARKER_ATTR)


def test_harness_reports_its_own_failures(tmp_path):
    class Broken(F.Target):
        def run(self, example, case):
            raise OSError("could not even write the input")

    outcome = F.run_one(Broken("broken", None), None, tmp_path)
    assert outcome.kind == "crash" and "harness" in outcome.detail


def test_mutators_change_inputs():
    data = b'{"a": [1, 2, 3]}'
    assert F.mutate_bytes(data, [("flip", 3, 1)]) != data
    assert F.mutate_bytes(data, [("truncate", 4, 0)]) == data[:4]
    assert F.mutate_json({"a": {"b": 1}}, [([0, 0], "replace", "x")]) == {"a": {"b": "x"}}
    assert F.mutate_json({"a": 1}, [([0], "delete", None)]) == {}


# ---------------------------------------------------------------------------- CLI: one line, exit 2


def _cli(*args, cwd):
    env = dict(os.environ, CSCOMPILE_DEBUG="", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "cscompile.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def _assert_one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]


def test_cli_build_bad_calibration(tmp_path, stories_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "n": ' + "1" * 5000 + "}\n")
    r = _cli("build", str(stories_dir), "--calib", str(bad), "-o", str(tmp_path / "out"),
             cwd=tmp_path)
    _assert_one_error_line(r)
    assert "line 2" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def _cli_in_process(*args):
    """The click command in this process (CliRunner): same friendly_errors path, no startup."""
    from click.testing import CliRunner

    from cscompile.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _assert_one_error_line_in_process(r):
    assert r.exit_code == 2, (r.exit_code, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]


def test_cli_run_tampered_manifest(tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(F.tiny_bundle(), bundle)
    data = bytearray((bundle / "manifest.json").read_bytes())
    pos = data.index(b'"density": 0.5') + len(b'"density": 0.')
    data[pos] = ord("9")  # still valid JSON, a different number: only the seal notices
    (bundle / "manifest.json").write_bytes(bytes(data))
    r = _cli_in_process("run", str(bundle), "--prompt", "hi")
    _assert_one_error_line_in_process(r)
    assert "manifest.json was modified" in r.stderr


def test_cli_inspect_pt2_with_pickle_payload(tmp_path):
    """A .pt2 whose sample inputs are a pickle that would write a file: refused, never run."""
    import io
    import zipfile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    with zipfile.ZipFile(io.BytesIO(F.tiny_pt2())) as z:
        members = {n: z.read(n) for n in z.namelist()}
    prefix = sorted(members)[0].split("/")[0]
    members[f"{prefix}/data/sample_inputs/model.pt"] = pickle.dumps(Evil())
    (tmp_path / "model.pt2").write_bytes(F._rezip(members))
    r = _cli("inspect", "model.pt2", cwd=tmp_path)
    _assert_one_error_line(r)
    assert "pickled objects" in r.stderr and "--trust-pickle" in r.stderr
    assert not marker.exists()


def test_cli_inspect_garbled_hf_config(tmp_path, stories_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in stories_dir.iterdir():
        if f.is_file():
            os.link(f, model / f.name)
    cfg = json.loads((stories_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 4000  # would construct 4000 layers before failing
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(cfg))
    r = _cli_in_process("inspect", str(model))
    _assert_one_error_line_in_process(r)
    assert "num_hidden_layers" in r.stderr


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_cli_path_too_long(command):
    """An OSError from the environment (ENAMETOOLONG here) is one line and exit 2 too."""
    args = [command, "x" * 5000] + (["--prompt", "hi"] if command == "run" else [])
    r = _cli_in_process(*args)
    _assert_one_error_line_in_process(r)
    assert len(r.stderr) < 1200

