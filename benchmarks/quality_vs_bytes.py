"""One quality-vs-bytes plot (and Markdown table) from several `cscompile eval` reports.

Each report is one bundle (or model) at one byte budget; merged, every method becomes a curve:
the bundle's static class path, each refinement setting, and the baselines evaluated beside it
(TEAL-, CATS-like, per-token oracle, Wanda-like, GRIFFIN-like) at the same bytes.

    cscompile eval /tmp/b0.8125 --data D -o r75 ...; cscompile eval /tmp/b0.625 --data D -o r50 ...
    python benchmarks/quality_vs_bytes.py r75/eval_smollm2-135m.json r50/eval_smollm2-135m.json \\
        --out results/runtime_quality_smollm2
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curve_name(key: str) -> str:
    """'teal@0.53' -> 'teal'; refinement keys keep their settings."""
    return re.sub(r"@[0-9.]+$", "", key)


def points(report: dict) -> list[dict]:
    """Per method: bytes, WikiText KL and perplexity, generative KL and top-1 (token-weighted
    over the generative sets), and widened share where the method refines."""
    sets = report["sets"]
    gen = [s for s in sets.values() if s["kind"] == "gen"]
    lm = [s for s in sets.values() if s["kind"] == "lm"]
    out = []
    for m in report["methods"]:
        k = m["key"]
        tokens = [s["methods"][k].get("tokens", 1) for s in gen]
        row = {"key": k, "curve": curve_name(k),
               "bytes": float(np.mean([s["methods"][k]["bytes"] for s in sets.values()])),
               "gen_kl": float(np.average([s["methods"][k]["kl"] for s in gen], weights=tokens)) if gen else None,
               "gen_top1": float(np.average([s["methods"][k]["top1"] for s in gen], weights=tokens)) if gen else None,
               "wiki_kl": lm[0]["methods"][k]["kl"] if lm else None,
               "wiki_ppl": lm[0]["methods"][k]["ppl"] if lm else None,
               "widened": m.get("stats", {}).get("widened_share")}
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="eval JSON files")
    ap.add_argument("--out", required=True, help="output stem (writes .png and .md)")
    args = ap.parse_args(argv)
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    rows = [dict(p, budget=f"{r['checks'].get('bundle_mean_bytes_fraction', 1.0):.3f}")
            for r in reports for p in points(r)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = sorted({r["curve"] for r in rows if r["curve"] != "dense"})
    for i, name in enumerate(curves):
        pts = sorted((r for r in rows if r["curve"] == name), key=lambda r: r["bytes"])
        style = dict(marker="o", color=plt.cm.tab20(i % 20), label=name,
                     linestyle="--" if name.startswith("bundle+refine") else "-")
        for ax, metric in zip(axes, ("wiki_kl", "gen_kl")):
            xs = [p["bytes"] for p in pts if p[metric] is not None]
            ax.plot(xs, [p[metric] for p in pts if p[metric] is not None], **style)
    for ax, title in zip(axes, ("WikiText-2 KL to dense", "generative rows: KL to dense (64 dense greedy tokens)")):
        ax.set_xlabel("weight bytes read per token / dense")
        ax.set_ylabel("KL (nats/token)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.axvline(1.0, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{reports[0]['model']}: quality vs bytes read per token (refinement costs included)")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)

    lines = ["| bundle bytes | method | bytes read | WikiText ppl | WikiText KL | gen KL | gen top-1 | widened |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['budget']} | {r['key']} | {r['bytes']:.3f} | {fmt(r['wiki_ppl'], '.2f')} | "
                     f"{fmt(r['wiki_kl'], '.3f')} | {fmt(r['gen_kl'], '.3f')} | {fmt(r['gen_top1'], '.3f')} | "
                     f"{fmt(r['widened'], '.3f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
