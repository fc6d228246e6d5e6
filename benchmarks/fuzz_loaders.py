"""Fuzz every parser of outside input with hypothesis; print a count table; 0 crashes expected.

    python benchmarks/fuzz_loaders.py                          # 1,000 inputs per target (11,000)
    python benchmarks/fuzz_loaders.py --examples-per-target 200 --targets calib_jsonl,model_pt
    python benchmarks/fuzz_loaders.py --json results/fuzz_loaders.json
    python benchmarks/fuzz_loaders.py --targets runtime_bundle   # opt-in: runtime.load on
                                                                  # resealed manifest mutations

The targets live in tests/fuzz_targets.py (the test suite runs the same ones with a short
budget). An input is *valid* (the loader returned a result), a *clean error* (a CsError with a
one-line message: the CLI prints `error: ...` and exits 2), or a *crash*: any other exception,
a multi-line message, a hang, a file written, code from the input run, or a tampered input
accepted. Crashes are listed with the last line of their traceback; the exit code is 1 if any.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples-per-target", type=int, default=1000)
    ap.add_argument("--targets", default="all", help="comma-separated names (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same inputs)")
    ap.add_argument("--timeout", type=int, default=30, help="seconds before one input is a hang")
    ap.add_argument("--memory-gb", type=float, default=16.0,
                    help="address-space limit for this process, so a runaway allocation is a "
                         "MemoryError (a crash) instead of swapping the machine (0: none)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the counts as JSON here")
    args = ap.parse_args(argv)

    if args.memory_gb > 0:
        limit = int(args.memory_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(1)
    from hypothesis import HealthCheck, Phase, given, seed, settings

    import fuzz_targets as F

    F.quiet()
    known = {**F.TARGETS, **F.EXTRA_TARGETS}
    names = list(F.TARGETS) if args.targets == "all" else args.targets.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(known)}")
    if not F.STORIES.is_dir():
        skipped = [n for n in names if "stories" in known[n].needs]
        print(f"../shared/models/stories260K is absent: skipping {skipped}", file=sys.stderr)
        names = [n for n in names if n not in skipped]

    work = Path(tempfile.mkdtemp(prefix="cscompile-fuzz-"))
    results, t_all = {}, time.perf_counter()
    try:
        for name in names:
            target = known[name]
            tally = F.Tally()
            t0 = time.perf_counter()

            @seed(args.seed)
            @settings(max_examples=args.examples_per_target, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                      derandomize=False)
            @given(target.strategy)
            def fuzz(example):
                tally.add(F.run_one(target, example, work, timeout_s=args.timeout))

            fuzz()
            results[name] = {"inputs": tally.inputs, "valid": tally.valid, "errors": tally.errors,
                             "crashes": tally.crashes, "seconds": round(time.perf_counter() - t0, 1),
                             "crash_kinds": tally.crash_kinds, "error_kinds": tally.error_kinds}
            print(f"{name:20s} {tally.inputs:7d} inputs {tally.valid:6d} valid {tally.errors:6d} "
                  f"errors {tally.crashes:4d} crashes  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = {k: sum(r[k] for r in results.values()) for k in ("inputs", "valid", "errors", "crashes")}
    print(f"\n| target | inputs | valid | clean errors | crashes | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['inputs']:,} | {r['valid']:,} | {r['errors']:,} | {r['crashes']} | "
              f"{r['seconds']:.0f} |")
    print(f"| **total** | **{total['inputs']:,}** | {total['valid']:,} | {total['errors']:,} | "
          f"**{total['crashes']}** | {time.perf_counter() - t_all:.0f} |")
    for name, r in results.items():
        for line, count in sorted(r["crash_kinds"].items(), key=lambda kv: -kv[1]):
            print(f"CRASH {name} x{count}: {line}")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"seed": args.seed, "examples_per_target": args.examples_per_target,
                                   "targets": results, "total": total}, indent=2, sort_keys=True)
                       + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 1 if total["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
