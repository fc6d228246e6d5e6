"""Benchmark the reduced decode kernels against dense and sliced torch (cuBLAS) on random weights.

Batch-1..16 decode reads every kept weight byte once, so the figures that matter are time,
achieved bandwidth and how close it gets to the DRAM bandwidth measured in the same run (a large
device-to-device copy). For each model shape, dtype, batch and kept fraction it prints:

    time      median microseconds (triton.testing.do_bench, L2 flushed between runs)
    GB/s      bytes the kernel must read (kept weights + index list) / time
    %DRAM     GB/s / copy bandwidth
    x dense   dense torch time (F.linear on the full weights) / kernel time
    x sliced  torch time on pre-sliced compact weights / kernel time
    ceiling   dense bytes / kept bytes: the speedup a perfectly bandwidth-bound kernel would get

Usage:
    python benchmarks/kernels.py                 # all shapes, fp16 + bf16, batch 1/4/16
    python benchmarks/kernels.py --quick         # one dtype, batch 1 and 16, fewer fractions
    python benchmarks/kernels.py --json out.json
    python benchmarks/kernels.py --cpu-check     # tiny correctness pass in Triton's interpreter
"""
import argparse
import json
import os
import statistics
import sys
import time

SHAPES = {  # name: (hidden, intermediate, n_heads, n_kv, head_dim)
    "Llama-2-7B": (4096, 11008, 32, 32, 128),
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
    "SmolLM2-135M": (576, 1536, 9, 3, 64),
}
TINY_SHAPE = {"tiny": (64, 172, 4, 2, 16)}  # --cpu-check
FFN_DENSITIES = (0.25, 0.5, 0.75)
HEAD_KEEPS = (1.0, 0.75, 0.5)
BATCHES = (1, 4, 16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", metavar="PATH", help="also write all rows as JSON")
    p.add_argument("--cpu-check", action="store_true",
                   help="tiny correctness pass under TRITON_INTERPRET=1 (no GPU needed)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="only these shapes")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing


def make_timer(device):
    """median seconds of fn(): do_bench on GPU; a few plain runs on CPU (correctness mode)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    def cpu_timer(fn):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return cpu_timer


def copy_bandwidth(timer, device, n_bytes=1 << 30):
    """DRAM bandwidth in GB/s from a large device-to-device copy (reads + writes n_bytes each)."""
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n_bytes / seconds / 1e9


# --------------------------------------------------------------------------- configurations


def kept_heads(n_heads, n_kv, keep, gen):
    """Kept query heads covering as few kv groups as possible (whole groups first, random order)."""
    import torch

    n_q = max(1, round(keep * n_heads))
    per_group = n_heads // n_kv
    order = torch.randperm(n_kv, generator=gen).tolist()
    heads = [g * per_group + j for g in order for j in range(per_group)][:n_q]
    return sorted(heads)


def bench_ffn(shape, dtype, batch, density, timer, gen, dev, check=False):
    """Rows for one FFN config: dense torch, sliced torch, Triton gather and compact."""
    import torch
    import torch.nn.functional as F

    from cscompile.codegen import kernels as K

    hidden, inter = shape[:2]
    s = hidden ** -0.5
    w_gate = (torch.randn(inter, hidden, generator=gen) * s).to(dev, dtype)
    w_up = (torch.randn(inter, hidden, generator=gen) * s).to(dev, dtype)
    w_down_t = (torch.randn(inter, hidden, generator=gen) * inter ** -0.5).to(dev, dtype)
    w_down = w_down_t.T.contiguous()  # HF layout [H, I] for cuBLAS
    n_kept = max(1, round(density * inter))
    idx = torch.randperm(inter, generator=gen)[:n_kept].sort().values.to(dev, torch.int32)
    sliced = [w_gate[idx.long()].contiguous(), w_up[idx.long()].contiguous(),
              w_down_t[idx.long()].contiguous()]
    sliced_down = sliced[2].T.contiguous()
    x = torch.randn(batch, hidden, generator=gen).to(dev, dtype)

    def torch_ffn(wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    runs = {
        "torch dense": lambda: torch_ffn(w_gate, w_up, w_down),
        "torch sliced": lambda: torch_ffn(sliced[0], sliced[1], sliced_down),
        "triton gather": lambda: K.ffn_decode(x, w_gate, w_up, w_down_t, idx),
        "triton compact": lambda: K.ffn_decode(x, *sliced),
    }
    if check:  # --cpu-check: the interpreter needs large blocks to stay quick
        runs["triton gather"] = lambda: K.ffn_decode(x, w_gate, w_up, w_down_t, idx, block_k=64,
                                                     block_h=64)
        runs["triton compact"] = lambda: K.ffn_decode(x, *sliced, block_k=64, block_h=64)
    elem = w_up.element_size()
    dense_bytes = 3 * inter * hidden * elem
    kept_bytes = {"torch dense": dense_bytes, "torch sliced": 3 * n_kept * hidden * elem,
                  "triton gather": 3 * n_kept * hidden * elem + 4 * n_kept,
                  "triton compact": 3 * n_kept * hidden * elem}
    if check:
        ref = K.ffn_reference(x.double(), w_gate.double(), w_up.double(), w_down_t.double(),
                              idx=idx)
        for name in ("triton gather", "triton compact"):
            err = ((runs[name]().double() - ref).norm() / ref.norm()).item()
            if not err <= 1e-4:
                raise AssertionError(f"ffn {name}: relative error {err:.2e}")
    return measure("ffn", f"{density:.0%}", runs, kept_bytes, dense_bytes, timer)


def bench_attention(shape, dtype, batch, keep, timer, gen, dev, check=False):
    """Rows for q/k/v and o-proj at one head keep fraction."""
    import torch
    import torch.nn.functional as F

    from cscompile.codegen import kernels as K

    hidden, _, n_heads, n_kv, head_dim = shape
    s = hidden ** -0.5
    w_q, w_k, w_v = ((torch.randn(n * head_dim, hidden, generator=gen) * s).to(dev, dtype)
                     for n in (n_heads, n_kv, n_kv))
    w_o_t = (torch.randn(n_heads * head_dim, hidden, generator=gen) * s).to(dev, dtype)
    w_o = w_o_t.T.contiguous()
    heads = kept_heads(n_heads, n_kv, keep, gen)
    groups = K.required_kv_groups(heads, n_heads, n_kv)
    rows_q = K.head_rows(heads, head_dim).to(dev)
    rows_kv = K.head_rows(groups, head_dim).to(dev)
    wq_c, wk_c, wv_c = w_q[rows_q].contiguous(), w_k[rows_kv].contiguous(), w_v[rows_kv].contiguous()
    wo_t_c = w_o_t[rows_q].contiguous()
    wo_c = wo_t_c.T.contiguous()
    qh = torch.tensor(heads, dtype=torch.int32, device=dev)
    kg = torch.tensor(groups, dtype=torch.int32, device=dev)
    ar_q = torch.arange(len(heads), dtype=torch.int32, device=dev)
    ar_kv = torch.arange(len(groups), dtype=torch.int32, device=dev)
    x = torch.randn(batch, hidden, generator=gen).to(dev, dtype)
    attn_full = torch.randn(batch, n_heads * head_dim, generator=gen).to(dev, dtype)
    attn = attn_full[:, rows_q].contiguous()
    blocks = {"block_h": 64} if check else {}

    qkv_runs = {
        "torch dense": lambda: (F.linear(x, w_q), F.linear(x, w_k), F.linear(x, w_v)),
        "torch sliced": lambda: (F.linear(x, wq_c), F.linear(x, wk_c), F.linear(x, wv_c)),
        "triton gather": lambda: K.qkv_decode(x, w_q, w_k, w_v, qh, kg, head_dim, **blocks),
        "triton compact": lambda: K.qkv_decode(x, wq_c, wk_c, wv_c, ar_q, ar_kv, head_dim,
                                               **blocks),
    }
    o_runs = {
        "torch dense": lambda: F.linear(attn_full, w_o),
        "torch sliced": lambda: F.linear(attn, wo_c),
        "triton gather": lambda: K.o_proj_decode(attn, w_o_t, qh, head_dim, **blocks),
        "triton compact": lambda: K.o_proj_decode(attn, wo_t_c, ar_q, head_dim, **blocks),
    }
    elem = w_q.element_size()
    qkv_dense = (n_heads + 2 * n_kv) * head_dim * hidden * elem
    qkv_kept = (len(heads) + 2 * len(groups)) * head_dim * hidden * elem
    o_dense = n_heads * head_dim * hidden * elem
    o_kept = len(heads) * head_dim * hidden * elem
    if check:
        ref_q = K.qkv_reference(x.double(), w_q.double(), w_k.double(), w_v.double(), heads,
                                groups, head_dim)
        ref_o = K.o_proj_reference(attn.double(), w_o_t.double(), heads, head_dim)
        for name in ("triton gather", "triton compact"):
            for got, ref in list(zip(qkv_runs[name](), ref_q)) + [(o_runs[name](), ref_o)]:
                err = ((got.double() - ref).norm() / ref.norm()).item()
                if not err <= 1e-4:
                    raise AssertionError(f"attention {name}: relative error {err:.2e}")
    label = f"{len(heads)}/{n_heads}h {len(groups)}/{n_kv}kv"
    rows = measure("qkv", label, qkv_runs,
                   {"torch dense": qkv_dense, "torch sliced": qkv_kept,
                    "triton gather": qkv_kept + 4 * (len(heads) + len(groups)),
                    "triton compact": qkv_kept}, qkv_dense, timer)
    rows += measure("o_proj", label, o_runs,
                    {"torch dense": o_dense, "torch sliced": o_kept,
                     "triton gather": o_kept + 4 * len(heads), "triton compact": o_kept},
                    o_dense, timer)
    return rows


def measure(op, keep, runs, bytes_read, dense_bytes, timer):
    seconds = {name: timer(fn) for name, fn in runs.items()}
    rows = []
    for name, t in seconds.items():
        rows.append({"op": op, "keep": keep, "impl": name, "us": t * 1e6,
                     "gb_s": bytes_read[name] / t / 1e9,
                     "x_dense": seconds["torch dense"] / t,
                     "x_sliced": seconds["torch sliced"] / t,
                     "ceiling": dense_bytes / bytes_read[name]})
    return rows


# --------------------------------------------------------------------------- report


def print_table(title, rows, bandwidth):
    print(f"\n{title}")
    header = (f"{'dtype':>8} {'B':>3} {'op':>6} {'keep':>14} {'impl':>15} {'time us':>9} "
              f"{'GB/s':>7} {'%DRAM':>6} {'x dense':>8} {'x sliced':>8} {'ceiling':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{100 * r['gb_s'] / bandwidth:5.1f}%" if bandwidth else "    -"
        print(f"{r['dtype']:>8} {r['batch']:>3} {r['op']:>6} {r['keep']:>14} {r['impl']:>15} "
              f"{r['us']:9.1f} {r['gb_s']:7.1f} {pct:>6} {r['x_dense']:8.2f} "
              f"{r['x_sliced']:8.2f} {r['ceiling']:8.2f}")


def run(args):
    import torch

    check = args.cpu_check
    device = "cuda" if torch.cuda.is_available() and not check else "cpu"
    timer = make_timer(device)
    if check:
        shapes, dtypes, batches = TINY_SHAPE, (torch.float32,), (3,)
        densities, keeps = (0.5,), (0.5, 1.0)
    else:
        shapes = {k: SHAPES[k] for k in (args.shapes or SHAPES)}
        dtypes = (torch.float16,) if args.quick else (torch.float16, torch.bfloat16)
        batches = (1, 16) if args.quick else BATCHES
        densities = (0.5,) if args.quick else FFN_DENSITIES
        keeps = (1.0, 0.5) if args.quick else HEAD_KEEPS
    bandwidth = None if check else copy_bandwidth(timer, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}" + (f"; device-to-device copy: {bandwidth:.0f} GB/s" if bandwidth
                               else "; correctness pass, times are not meaningful"))
    gen = torch.Generator().manual_seed(0)
    report = {"device": name, "copy_gb_s": bandwidth, "rows": []}
    for shape_name, shape in shapes.items():
        rows = []
        for dtype in dtypes:
            for batch in batches:
                found = []
                for density in densities:
                    found += bench_ffn(shape, dtype, batch, density, timer, gen, device, check)
                for keep in keeps:
                    found += bench_attention(shape, dtype, batch, keep, timer, gen, device, check)
                for r in found:
                    r.update(shape=shape_name, dtype=str(dtype).replace("torch.", ""), batch=batch)
                rows += found
        hidden, inter, n_heads, n_kv, head_dim = shape
        print_table(f"{shape_name}: hidden {hidden}, FFN {inter}, {n_heads} heads / {n_kv} kv, "
                    f"head_dim {head_dim}", rows, bandwidth)
        report["rows"] += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")
    if check:
        print("\ncpu check passed: every Triton kernel matches its float64 reference")
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_check:
        # before triton defines any kernel: run them in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (try --cpu-check for a correctness pass)")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
