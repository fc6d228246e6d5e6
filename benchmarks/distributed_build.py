"""Build time and peak memory on 1 vs 2 ranks (cscompile build --workers) and layer-streamed
(--stream), with the bundles compared file by file, for results/distributed_build.md.

  python benchmarks/distributed_build.py --model ../shared/models/stories260K --rows 24
  python benchmarks/distributed_build.py --model smollm2-135m --rows 10 --runs 1,2,1s,2s

--runs: worker counts, a trailing "s" for --stream. Every build runs in its own process
(`nice`, OMP_NUM_THREADS=1 per rank) and reports its ranks' peak RSS (VmHWM) and CPU seconds;
a streamed build also reports its layer reads and their seconds, the per-layer cost behind
the 7B estimate. Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _digests(bundle: Path) -> dict:
    return {str(f.relative_to(bundle)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(bundle.rglob("*")) if f.is_file()}


def build(model: str, calib: Path, run: str, out: Path) -> dict:
    workers, streamed = int(run.rstrip("s")), run.endswith("s")
    cmd = ["nice", sys.executable, "-m", "cscompile.cli", "build", model, "--calib", str(calib),
           "-o", str(out), "--json", "--force", "--workers", str(workers)]
    cmd += ["--stream"] if streamed else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"build {run} failed: {proc.stderr.strip().splitlines()[-1]}")
    timing = json.loads(proc.stdout)["timing"]
    by_phase = timing["rank_peak_rss_by_phase_mb"]
    return {"run": run, "workers": workers, "streamed": streamed, "wall_s": round(wall, 1),
            "build_s": timing["build_s"], "rank_peak_rss_mb": timing["rank_peak_rss_mb"],
            # the first phase ends right after the imports: what the libraries alone hold
            "rank_rss_after_imports_mb": [p["reading prompts"] for p in by_phase],
            "rank_cpu_s": timing["rank_cpu_s"], "phases_s": timing["phases_s"],
            "rank_phases_cpu_s": timing["rank_phases_cpu_s"],
            "rank_peak_rss_by_phase_mb": by_phase, "layer_reads": timing["layer_reads"],
            "layer_read_s": timing["layer_read_s"],
            "command": " ".join(["OMP_NUM_THREADS=1", "cscompile"] + cmd[4:])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260K"))
    ap.add_argument("--calib", default=str(REPO / "examples" / "calib.jsonl"))
    ap.add_argument("--rows", type=int, default=24, help="first rows of --calib to use")
    ap.add_argument("--runs", default="1,2,1s", help="worker counts; 's' suffix: --stream")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.jsonl"
        calib.write_text("\n".join(Path(a.calib).read_text().splitlines()[:a.rows]) + "\n")
        result = {"model": a.model, "rows": a.rows, "cpu_count": os.cpu_count(),
                  "loadavg_before": os.getloadavg(), "builds": []}
        digests = {}
        for run in a.runs.split(","):
            result["builds"].append(build(a.model, calib, run, tmp / f"bundle{run}"))
            digests[run] = _digests(tmp / f"bundle{run}")
            print(json.dumps({k: v for k, v in result["builds"][-1].items()
                              if not k.startswith("rank_phases")}), file=sys.stderr)
        result["bundles_identical"] = len({json.dumps(d, sort_keys=True)
                                           for d in digests.values()}) == 1
        result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
