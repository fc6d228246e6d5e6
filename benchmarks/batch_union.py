"""How much of each weight the union of a batch's per-token supports keeps.

A decode step of B rows on the per-token path reads, per matrix, the union of the rows'
supports (each row still multiplies only its own kept inputs). When that union is nearly every
weight the step saves no reads and still pays for selection, which is why the CPU backend runs
steps of several rows on every weight (runtime.pertoken.PerToken.step_mode). This measures the
union: B WikiText-2 passages, prefilled dense, then --steps decode steps on the per-token path
as torch masks (every row its own support), recording per step and matrix kind the fraction of
units kept by any row (inputs of q/k/v and o, FFN channels, lm_head candidate rows).

    python benchmarks/batch_union.py demo-bundle --batch-sizes 1,2,4,16
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cscompile.runtime import load  # noqa: E402
from cscompile.runtime.generate import pertoken_logits  # noqa: E402
from cscompile.runtime import pertoken as P  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "data.jsonl"


def passages(tok, n: int, length: int) -> torch.Tensor:
    """n WikiText-2 rows of at least `length` tokens, cut to it: [n, length]."""
    out = []
    for line in WIKI.open():
        ids = tok(json.loads(line)["prompt"], return_tensors="pt").input_ids[0]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return torch.stack(out)
    raise SystemExit(f"error: fewer than {n} WikiText-2 rows of {length} tokens in {WIKI}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--batch-sizes", default="1,2,4,16")
    ap.add_argument("--prefix", type=int, default=48, help="prompt tokens prefilled dense")
    ap.add_argument("--steps", type=int, default=8, help="decode steps measured")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    session = load(args.bundle, backend="torch")
    pt, model = session.pertoken, session.model
    if pt is None:
        raise SystemExit(f"error: {args.bundle} has no per-token plan")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ids = passages(session.tokenizer, max(sizes), args.prefix + args.steps)
    kept: dict[tuple[int, str], list[float]] = defaultdict(list)
    real_topk = P.topk_mask

    def spy(score, k):  # every selection of the torch path goes through topk_mask
        mask = real_topk(score, k)
        rows = mask.reshape(-1, mask.shape[-1])
        kept[(rows.shape[0], _kind(mask.shape[-1]))].append(float(rows.any(0).float().mean()))
        return mask

    shapes = pt.shapes
    kinds = {shapes.hidden: "q/k/v, o, FFN inputs", shapes.vocab: "lm_head rows"}
    kinds.update({w: "FFN channels" for w in shapes.ffn_width})
    kinds.update({n: "o inputs" for n in shapes.o_in if n != shapes.hidden})

    def _kind(n):
        return kinds.get(n, str(n))

    P.topk_mask = spy
    try:
        with torch.no_grad():
            for b in sizes:
                batch = ids[:b]
                cache = model(input_ids=batch[:, :args.prefix], use_cache=True).past_key_values
                for t in range(args.prefix, args.prefix + args.steps):
                    pertoken_logits(pt, model, batch[:, t:t + 1], cache)
    finally:
        P.topk_mask = real_topk
    rows = [{"batch": b, "kind": kind, "union_kept": sum(v) / len(v), "selections": len(v)}
            for (b, kind), v in sorted(kept.items())]
    print(f"{'batch':>5}  {'matrix units':<22} {'union kept':>10}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['kind']:<22} {r['union_kept']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"bundle": args.bundle, "prefix": args.prefix,
                                         "steps": args.steps, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
