"""Build time and peak memory on 1 vs 2 ranks (cscompile build --workers), and the per-layer
statistics in memory vs layer-streamed (cscompile.stream), for results/distributed_build.md.

  python benchmarks/distributed_build.py --model ../shared/models/stories260K --rows 24
  python benchmarks/distributed_build.py --model smollm2-135m --rows 20 --workers 1,2

Every build and every statistics pass runs in its own process (`nice`, OMP_NUM_THREADS=1 per
rank), which reports its own peak RSS (ru_maxrss); the bundles of all worker counts are
compared file by file (sha256). Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _digests(bundle: Path) -> dict:
    return {str(f.relative_to(bundle)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(bundle.rglob("*")) if f.is_file()}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def build(model: str, calib: Path, workers: int, out: Path) -> dict:
    cmd = ["nice", sys.executable, "-m", "cscompile.cli", "build", model, "--calib", str(calib),
           "-o", str(out), "--json", "--force", "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stderr.strip().splitlines()[-1]}")
    timing = json.loads(proc.stdout)["timing"]
    return {"workers": workers, "wall_s": round(wall, 1), "build_s": timing["build_s"],
            "rank_peak_rss_mb": timing["rank_peak_rss_mb"], "rank_cpu_s": timing["rank_cpu_s"],
            "phases_s": timing["phases_s"], "rank_phases_cpu_s": timing["rank_phases_cpu_s"],
            "rank_peak_rss_by_phase_mb": timing.get("rank_peak_rss_by_phase_mb"),
            "command": " ".join(["OMP_NUM_THREADS=1"] + cmd[1:2] + ["-m", "cscompile.cli"]
                                + cmd[4:])}


def child_stats(mode: str, model: str, prompts_pkl: str) -> None:
    """One statistics pass in this process; prints {seconds, peak_rss_mb, per-layer s}."""
    import torch

    from cscompile.build import peak_rss_mb

    torch.set_num_threads(1)
    with open(prompts_pkl, "rb") as f:
        job = pickle.load(f)
    prompts, smap, layer, model_dir = job["prompts"], job["smap"], job["layer"], job["dir"]
    t0 = time.perf_counter()
    layer_times = []
    if mode == "memory":
        from cscompile.frontend import load_model
        from cscompile.passes.route import router_features
        from cscompile.passes.signature import prompt_signatures

        loaded = load_model(model_dir)
        t_loaded = time.perf_counter()
        sig = prompt_signatures(loaded.model, smap, prompts)
        pooled = router_features(loaded.model, smap, prompts, layer)
    else:
        from cscompile.stream import streamed_statistics

        t_loaded = t0
        marks = [time.perf_counter()]  # per_layer_s[0] also holds the shell's load
        sig, pooled = streamed_statistics(model_dir, smap, prompts, layer,
                                          on_layer_done=lambda li: marks.append(
                                              time.perf_counter()))
        layer_times = [round(b - a, 3) for a, b in zip(marks, marks[1:])]
    digest = hashlib.sha256(sig.tobytes() + pooled.numpy().tobytes()).hexdigest()
    print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - t0, 2),
                      "load_s": round(t_loaded - t0, 2),
                      "peak_rss_mb": peak_rss_mb(),
                      "per_layer_s": layer_times, "statistics_sha256": digest}))


def stats(model: str, calib: Path, tmp: Path) -> list[dict]:
    """Signatures + router features of every prompt, in memory vs layer-streamed."""
    import torch

    from cscompile.build import _Phases, _tokenize
    from cscompile.calib import read_prompts
    from cscompile.frontend import analyze, load_model
    from cscompile.passes.route import default_layer

    loaded = load_model(model)
    smap = analyze(loaded)
    ids = _tokenize(loaded, read_prompts(calib), _Phases(False))
    job = tmp / "job.pkl"
    src = Path(loaded.source or model)
    with open(job, "wb") as f:
        pickle.dump({"prompts": ids, "smap": smap, "layer": default_layer(smap),
                     "dir": str(src)}, f)
    del loaded
    torch.set_num_threads(1)
    out = []
    for mode in ("memory", "streamed"):
        proc = subprocess.run(["nice", sys.executable, __file__, "--child-stats", mode, model,
                               str(job)], env=_env(), capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{mode} statistics failed: {proc.stderr[-500:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260K"))
    ap.add_argument("--calib", default=str(REPO / "examples" / "calib.jsonl"))
    ap.add_argument("--rows", type=int, default=24, help="first rows of --calib to use")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--no-stats", action="store_true")
    ap.add_argument("--only-stats", action="store_true",
                    help="redo only the statistics passes, into the existing --out JSON")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-stats", nargs=3, metavar=("MODE", "MODEL", "JOB"))
    a = ap.parse_args()
    if a.child_stats:
        child_stats(*a.child_stats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.jsonl"
        calib.write_text("\n".join(Path(a.calib).read_text().splitlines()[:a.rows]) + "\n")
        if a.only_stats:
            result = json.loads(Path(a.out).read_text())
            result["statistics"] = stats(a.model, calib, tmp)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result["statistics"], indent=2))
            return
        result = {"model": a.model, "rows": a.rows, "cpu_count": os.cpu_count(),
                  "loadavg_before": os.getloadavg(), "builds": []}
        digests = {}
        for w in [int(x) for x in a.workers.split(",")]:
            run = build(a.model, calib, w, tmp / f"bundle{w}")
            digests[w] = _digests(tmp / f"bundle{w}")
            result["builds"].append(run)
        result["bundles_identical"] = len({json.dumps(d, sort_keys=True)
                                           for d in digests.values()}) == 1
        if not a.no_stats:
            result["statistics"] = stats(a.model, calib, tmp)
        result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
