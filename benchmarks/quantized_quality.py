"""What int8 / int4 kernel weights cost in quality, alone and with the per-token path's sparsity.

The CPU backend's `--weights int8` (runtime.cpu_backend.quantize_rows: one fp32 scale per
output) halves the bf16 bytes again; `--weights int4` (runtime.pack.Q4: blocks of 32 with an
fp16 scale and minimum, rows multiplied by x rounded to int8 per block) takes them to 0.31 of
bf16. Their numbers exist only in the kernels' batch-1 decode steps, so this decodes
teacher-forced, one step at a time, exactly as `run` does: --windows WikiText-2 windows of --prefix + --steps
tokens, the prefix prefilled dense, then every step on the path; KL(dense || path) and top-1
agreement with the dense fp32 model's logits at the same positions, per storage (--weights)
and path: every weight, and the bundle's per-token plan.

    python benchmarks/quantized_quality.py demo-bundle --windows 6 --json results/quantized_quality_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cscompile.metrics import wikitext_windows  # noqa: E402
from cscompile.runtime import load  # noqa: E402
from cscompile.runtime.generate import pertoken_logits  # noqa: E402
from cscompile.runtime.pertoken import dense_plan, plan_bytes  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "data.jsonl"


@torch.no_grad()
def decode(session, mode: str, windows: torch.Tensor, prefix: int) -> torch.Tensor:
    """Log-probs [W, steps, V] of each window's tokens after the prefix, one step at a time."""
    model, pt = session.model, session.pertoken
    out = []
    for w in windows:
        cache = model(input_ids=w[None, :prefix], use_cache=True).past_key_values
        steps = [pertoken_logits(pt, model, w[None, t:t + 1], cache, mode=mode)[0, -1]
                 for t in range(prefix, len(w))]
        out.append(F.log_softmax(torch.stack(steps).double(), -1))
    return torch.stack(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="bf16,int8,int4",
                    help="storages to measure, comma-separated: bf16 (the bundle's), int8, int4")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    wanted = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not set(wanted) <= {"bf16", "int8", "int4"}:
        raise SystemExit(f"error: --weights takes bf16, int8, int4; got {args.weights!r}")
    sessions = {"bf16": load(args.bundle)}  # also the reference model and the bytes' base
    sessions.update({w: load(args.bundle, weights=w) for w in wanted if w != "bf16"})
    if sessions["bf16"].pertoken is None or sessions["bf16"].pertoken.cpu is None:
        raise SystemExit(f"error: {args.bundle}: no per-token path on the CPU kernels here")
    tok = sessions["bf16"].tokenizer
    windows = wikitext_windows(tok, WIKI, args.windows, args.prefix + args.steps, args.seed)
    model = sessions["bf16"].model
    with torch.no_grad():  # the dense fp32 reference, one forward per window
        ref = F.log_softmax(model(input_ids=windows).logits[:, args.prefix:].double(), -1)
    rows = []
    for weights, session in sessions.items():
        if weights not in wanted:
            continue
        pt = session.pertoken
        for mode, label in (("full", "every weight"), ("pertoken", "per-token plan")):
            lp = decode(session, mode, windows, args.prefix)
            # step t feeds token t: its logits are the dense forward's at position t
            kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
            top1 = float((ref.argmax(-1) == lp.argmax(-1)).double().mean())
            plan = pt.plan if mode == "pertoken" else dense_plan(session.smap)
            frac = plan_bytes(plan, pt.shapes)["bytes"] / \
                sessions["bf16"].pertoken.bytes()["dense_bytes"]
            rows.append({"weights": weights, "path": label, "bytes_of_bf16_dense": frac,
                         "kl": kl, "top1": top1})
            print(f"{weights:5s} {label:15s} bytes {frac:.3f} of bf16 dense   KL {kl:.4f}   "
                  f"top-1 {top1:.3f}", flush=True)
    info = {"command": "python " + " ".join(["benchmarks/quantized_quality.py"] + sys.argv[1:]),
            "tokens": args.windows * args.steps, "run_s": round(time.perf_counter() - t0, 1),
            "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
