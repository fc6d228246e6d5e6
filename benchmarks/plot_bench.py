"""Plot `cscompile bench --json` results: decode speedup over transformers fp32 per path,
grouped by (threads, batch), one bar per path, the bytes ceiling marked on each bar.

    python benchmarks/plot_bench.py results/bench_pertoken_smollm2_cpu.json \\
        results/bench_pertoken_smollm2_cpu_t2.json --skip 2:16 \\
        -o results/bench_pertoken_smollm2_cpu.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="cscompile bench --json files")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--skip", action="append", default=[], metavar="THREADS:BATCH",
                    help="leave out a (threads, batch) group (e.g. a run another job disturbed)")
    args = ap.parse_args()
    skip = {tuple(int(v) for v in s.split(":")) for s in args.skip}
    by_key, title = {}, None
    for f in args.results:  # a later file's row replaces an earlier one for the same key
        data = json.loads(f.read_text())
        title = title or data["args"]["target"]
        for r in data["rows"]:
            if "skipped" not in r and (r["threads"], r["batch"]) not in skip:
                by_key[(r["threads"], r["batch"], r["path"])] = r
    rows = list(by_key.values())
    groups = sorted({(r["threads"], r["batch"]) for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(paths)
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(groups)), 6))
    for j, path in enumerate(paths):
        xs, ys, ceil = [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in rows if (r["threads"], r["batch"]) == g and r["path"] == path),
                     None)
            if r is not None:
                xs.append(i + (j - len(paths) / 2 + 0.5) * width)
                ys.append(r["speedup"])
                ceil.append(r["bytes_ratio"])
        ax.bar(xs, ys, width, label=path)
        ax.scatter(xs, ceil, marker="_", s=120, color="black", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{t} thread{'s' * (t > 1)}, batch {b}"
                                       for t, b in groups])
    ax.set_ylabel("decode speed × transformers fp32")
    ax.set_title(f"{title}: decode speed by path (black mark: bytes ceiling, fp32 bytes)",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below: bars stay visible
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
