"""Builds on several ranks (cscompile.distributed) and layer-streamed (cscompile.stream):
byte-identical to one in-memory process; a rank that dies ends the build with one line and no
bundle; bad --workers values are refused."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cscompile.build import run_build
from cscompile.distributed import FAIL_ENV, RankGroup, parse_workers
from cscompile.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
# --max-kl: the allocation's captures, menus, sensitivities and head choice, then a bisection
# of sharded decode-KL checks, all reduced across ranks
BUILD = {"density": 0.5, "seed": 1, "max_kl": 0.05, "progress": False}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """The first 12 example prompts (3 per task): 10 build, 2 held out; 3 allocation chunks."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(EXAMPLES.read_text().splitlines()[:12]) + "\n")
    return path


def _digests(bundle: Path) -> dict[str, str]:
    return {str(f.relative_to(bundle)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(bundle.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def one_rank(stories_dir, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "bundle"
    return out, run_build(str(stories_dir), calib, out, **BUILD)


def test_two_ranks_write_the_one_rank_bundle(one_rank, stories_dir, calib, tmp_path):
    out1, report1 = one_rank
    out2 = tmp_path / "bundle"
    report2 = run_build(str(stories_dir), calib, out2, workers=2, **BUILD)
    assert report2["timing"]["ranks"] == 2 and len(report2["timing"]["rank_peak_rss_mb"]) == 2
    assert report1["pertoken"]["steps"] > 0  # the allocation did leave dense: a real check
    assert _digests(out2) == _digests(out1)
    assert (out2 / "manifest.json").read_bytes() == (out1 / "manifest.json").read_bytes()
    assert {k: v for k, v in report2.items() if k not in ("timing", "bundle")} == \
        {k: v for k, v in report1.items() if k not in ("timing", "bundle")}


@pytest.mark.parametrize("workers", [1, 2])
def test_layer_streamed_builds_write_the_in_memory_bundle(one_rank, stories_dir, calib, tmp_path,
                                                         workers):
    """--stream on 1 and 2 ranks: decoder layers read one at a time by every forward, the
    same bytes in every file."""
    out1, report1 = one_rank
    out = tmp_path / "bundle"
    report = run_build(str(stories_dir), calib, out, workers=workers, stream=True, **BUILD)
    assert report["timing"]["streamed"] and report["timing"]["layer_reads"] > 0
    assert report1["timing"]["layer_reads"] is None
    assert _digests(out) == _digests(out1)


def test_a_rank_dying_fails_the_build_with_one_line(stories_dir, calib, tmp_path):
    out = tmp_path / "bundle"
    env = {**os.environ, FAIL_ENV: "1:per-token operator menus", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cscompile.cli", "build", str(stories_dir),
                           "--calib", str(calib), "-o", str(out), "--workers", "2", "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: build rank 1 of 2 died (exit code 3) during 'per-token operator "
                     "menus on 10 prompts'; no bundle written"], proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # no bundle, no temp dir


def test_a_rank_failing_after_its_work_is_done_does_not_fail_the_build(
        one_rank, stories_dir, calib, tmp_path, monkeypatch):
    """Past the last collective, a rank's exit status is only its teardown (gloo can abort
    there): the bundle is written and whole, so the build succeeds."""
    monkeypatch.setenv(FAIL_ENV, "0:teardown")
    out = tmp_path / "bundle"
    report = run_build(str(stories_dir), calib, out, workers=2, **BUILD)
    assert report["timing"]["ranks"] == 2
    assert _digests(out) == _digests(one_rank[0])


def test_an_input_error_on_the_ranks_is_the_same_error(calib, tmp_path):
    """Every rank meets it (here: no such model); the build raises it once, as one process
    would, and writes nothing."""
    with pytest.raises(UserInputError, match="unknown model 'no-such-model'"):
        run_build("no-such-model", calib, tmp_path / "b", workers=2, **BUILD)
    assert list(tmp_path.iterdir()) == []


def test_bad_workers_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cscompile.cli", "build", "x", "--calib",
                           str(EXAMPLES), "-o", str(tmp_path / "b"), "--workers", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --workers must be in 1..64, got 0"]


@pytest.mark.parametrize("workers", ["-1", "two", "1.5", "65", ""])
def test_bad_workers_values_are_refused(workers):
    with pytest.raises(UserInputError, match="--workers must be"):
        parse_workers(workers)
    assert parse_workers(" 2 ") == 2


def test_workers_under_torchrun_is_refused(monkeypatch, stories_dir, calib, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="torchrun starts the ranks"):
        run_build(str(stories_dir), calib, tmp_path / "b", workers=3, **BUILD)


def test_items_are_shared_round_robin_and_gathered_in_order():
    groups = [RankGroup(r, 3) for r in range(3)]
    assert [g.mine(7) for g in groups] == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for g in groups for i in g.mine(7)) == list(range(7))
    assert RankGroup().map(4, lambda i: i * i) == [0, 1, 4, 9]


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_one_rank_bundle(one_rank, stories_dir, calib, tmp_path):
    """The multi-machine recipe (README), on 2 local ranks over loopback."""
    out1, _ = one_rank
    out = tmp_path / "bundle"
    torchrun = Path(sys.executable).parent / "torchrun"
    cli = Path(sys.executable).parent / "cscompile"
    proc = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "--no-python", str(cli), "build", str(stories_dir),
         "--calib", str(calib), "-o", str(out), "--density", "0.5", "--seed", "1",
         "--max-kl", str(BUILD["max_kl"]), "--json"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _digests(out) == _digests(out1)
    report = json.loads(proc.stdout)  # rank 0's report only: other ranks print nothing
    assert report["timing"]["ranks"] == 2 and report["timing"]["rank"] == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

