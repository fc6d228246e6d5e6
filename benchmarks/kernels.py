"""Benchmark the decode kernels against dense torch (cuBLAS) on random weights.

Batch-1..16 decode reads every kept weight byte once, so the figures that matter are time,
achieved bandwidth and how close it gets to the DRAM bandwidth measured in the same run (a large
device-to-device copy). Two suites:

* ``class``     the reduced class-path kernels of codegen/kernels.py (ffn_decode, qkv_decode,
                o_proj_decode; gather and compact layouts) vs dense and pre-sliced torch;
* ``pertoken``  the per-token kernels of codegen/pertoken_kernels.py: gather_gemv (kept inputs of
                an input-major copy) and rows_gemv (kept output rows) at 50% / 25% kept,
                sketch_gemv on packed 2/3/4-bit codes, ffn_sparse (SwiGLU over kept channels)
                at 50% / 25%, at SmolLM2-135M shapes (hidden 576, FFN 1536, lm_head 49152x576)
                and 7B-like ones (4096x4096, 11008x4096, 4096x11008), bf16, batch 1 / 4 / 16.

Columns:

    time      median microseconds over --reps runs timed with CUDA events, L2 flushed (a large
              buffer is zeroed) before each run, so every run reads its weights from DRAM; the
              wrapper's own launches (e.g. zeroing an atomic accumulator) are included
    MB / GB/s bytes the operator must read (kept weights + index list + x) and bytes / time
    %copy     GB/s / the device-to-device copy bandwidth measured at the start of the run
    x dense   dense torch time (F.linear on the full weights, cuBLAS) / kernel time
    ceiling   dense bytes / kept bytes: the speedup a perfectly bandwidth-bound kernel would get
    err       relative error against a torch reference on the same inputs (checked every row)

Usage:
    python benchmarks/kernels.py                  # both suites (needs CUDA; exits 2 without)
    python benchmarks/kernels.py --suite pertoken --batches 1 16
    python benchmarks/kernels.py --quick          # fewer configurations
    python benchmarks/kernels.py --json out.json
    python benchmarks/kernels.py --cpu-check      # tiny correctness pass in Triton's interpreter
"""
import argparse
import json
import os
import statistics
import sys
import time

SHAPES = {  # class suite. name: (hidden, intermediate, n_heads, n_kv, head_dim)
    "Llama-2-7B": (4096, 11008, 32, 32, 128),
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
    "SmolLM2-135M": (576, 1536, 9, 3, 64),
}
TINY_SHAPE = {"tiny": (64, 172, 4, 2, 16)}  # --cpu-check
FFN_DENSITIES = (0.25, 0.5, 0.75)
HEAD_KEEPS = (1.0, 0.75, 0.5)
BATCHES = (1, 4, 16)

# per-token suite. matrices are nn.Linear shapes (N outputs, K inputs); ffn is (hidden, inter)
PERTOKEN_MODELS = {
    "SmolLM2-135M": {"ffn": (576, 1536), "matrices": {
        "q/k/v/o": (576, 576), "gate/up": (1536, 576), "down": (576, 1536),
        "lm_head": (49152, 576)}},
    "7B-like": {"ffn": (4096, 11008), "matrices": {
        "q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}},
}
TINY_PERTOKEN = {"tiny": {"ffn": (130, 77), "matrices": {"tiny": (77, 130)}}}  # --cpu-check
PERTOKEN_KEEPS = (0.5, 0.25)
SKETCH_BITS = (2, 3, 4)
SKETCH_GROUP = 64
SUITES = ("class", "pertoken")
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}  # relative error vs reference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES),
                   help="which kernels to measure (default: both)")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", metavar="PATH", help="also write all rows as JSON")
    p.add_argument("--cpu-check", action="store_true",
                   help="tiny correctness pass under TRITON_INTERPRET=1 (no GPU needed)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                   help="class suite: only these shapes")
    p.add_argument("--models", nargs="+", choices=sorted(PERTOKEN_MODELS),
                   help="per-token suite: only these models")
    p.add_argument("--batches", nargs="+", type=int, help=f"batch sizes (default {BATCHES})")
    p.add_argument("--group", type=int, default=SKETCH_GROUP,
                   help=f"sketch scale group (default {SKETCH_GROUP})")
    p.add_argument("--reps", type=int, default=100, help="timed runs per configuration")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing


def make_timer(device, reps=100, warmup=10):
    """median seconds of fn().

    CUDA: `reps` runs, each timed with its own pair of CUDA events after zeroing a buffer far
    larger than L2 (the zeroing also keeps the GPU busy while Python launches fn, so launch
    latency is hidden unless fn launches several kernels). CPU (correctness mode): two plain runs.
    """
    if device == "cuda":
        import torch

        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
        flush = torch.empty(max(256 << 20, 4 * l2), dtype=torch.uint8, device="cuda")

        def cuda_timer(fn):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return statistics.median(start.elapsed_time(end) for start, end in events) * 1e-3

        return cuda_timer

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


# --------------------------------------------------------------------------- per-token suite


def rel_error(got, ref):
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def pertoken_row(op, matrix, n, k, keep, impl, seconds, n_bytes, dense_seconds, dense_bytes,
                 bandwidth, err=None, tol=None):
    gb_s = n_bytes / seconds / 1e9
    return {"suite": "pertoken", "op": op, "matrix": matrix, "n": n, "k": k, "keep": keep,
            "impl": impl, "us": seconds * 1e6, "bytes": n_bytes, "gb_s": gb_s,
            "pct_copy": 100 * gb_s / bandwidth if bandwidth else None,
            "x_dense": dense_seconds / seconds, "ceiling": dense_bytes / n_bytes,
            "rel_err": err, "ok": None if err is None else bool(err <= tol)}


def kept_list(total, keep, gen, dev):
    """A random sorted int32 list of max(1, round(keep * total)) distinct ids."""
    import torch

    m = max(1, round(keep * total))
    return torch.randperm(total, generator=gen)[:m].sort().values.to(dev, torch.int32)


def random_sketch(n, k, bits, group, gen, dev):
    """Random packed words and fp16 scales of a b-bit sketch of an [n, k] matrix."""
    import torch

    from cscompile.runtime.pack import pack_codes

    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, -(-k // group), generator=gen) * 2 / k ** 0.5 + 1e-3).half()
    return pack_codes(codes, bits).to(dev), scales.to(dev)


def dequantize_sketch(packed, scales, bits, group, k):
    """float32 [N, k] weights of a packed sketch, computed on packed's device (the same math as
    runtime/pack.py's unpack_codes + dequantize_codes, whose shift tensors live on the CPU)."""
    import torch

    vpw = 32 // bits
    shifts = torch.arange(vpw, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)  # arithmetic shift, then mask
    codes = codes.reshape(packed.shape[0], -1)[:, :k].float()
    s = scales.float().repeat_interleave(group, dim=1)[:, :k]
    return (codes - (2 ** bits - 1) / 2) * s


def bench_matrix(matrix, shape, dtype, batch, timer, gen, dev, bandwidth, keeps, bits_list,
                 group):
    """gather_gemv / rows_gemv / sketch_gemv rows for one [N, K] weight, vs dense F.linear."""
    import torch
    import torch.nn.functional as F

    from cscompile.codegen import pertoken_kernels as P
    from cscompile.runtime.pack import packed_bytes

    n, k = shape
    tol = TOLERANCE[str(dtype).replace("torch.", "")]
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dev, dtype)
    wt = w.T.contiguous()  # input-major copy for gather_gemv
    x = torch.randn(batch, k, generator=gen).to(dev, dtype)
    elem, x_bytes = w.element_size(), x.numel() * x.element_size()
    dense_bytes = n * k * elem + x_bytes
    t_dense = timer(lambda: F.linear(x, w))
    row = lambda *a, **kw: pertoken_row(*a, dense_seconds=t_dense, dense_bytes=dense_bytes,  # noqa: E731
                                        bandwidth=bandwidth, tol=tol, **kw)
    rows = [row("dense", matrix, n, k, "100%", "cuBLAS F.linear", t_dense, dense_bytes)]
    for keep in keeps:
        idx = kept_list(k, keep, gen, dev)
        m = idx.numel()
        err = rel_error(P.gather_gemv(wt, x, idx), P.gather_gemv_reference(wt, x, idx))
        t = timer(lambda: P.gather_gemv(wt, x, idx))
        rows.append(row("gather_gemv", matrix, n, k, f"{keep:.0%}", "triton", t,
                        m * n * elem + 4 * m + batch * m * x.element_size(), err=err))
    for keep in keeps:
        idx = kept_list(n, keep, gen, dev)
        m = idx.numel()
        err = rel_error(P.rows_gemv(w, x, idx), P.rows_gemv_reference(w, x, idx))
        t = timer(lambda: P.rows_gemv(w, x, idx))
        rows.append(row("rows_gemv", matrix, n, k, f"{keep:.0%}", "triton", t,
                        m * k * elem + 4 * m + x_bytes, err=err))
    for bits in bits_list:
        packed, scales = random_sketch(n, k, bits, group, gen, dev)
        err = rel_error(P.sketch_gemv(packed, scales, x, bits, group, k),
                        x.float() @ dequantize_sketch(packed, scales, bits, group, k).T)
        t = timer(lambda: P.sketch_gemv(packed, scales, x, bits, group, k))
        rows.append(row("sketch_gemv", matrix, n, k, f"{bits}-bit g{group}", "triton", t,
                        packed_bytes(n, k, bits, group) + x_bytes, err=err))
    return rows


def bench_ffn_sparse(ffn, dtype, batch, timer, gen, dev, bandwidth, keeps):
    """ffn_sparse rows vs the dense SwiGLU FFN in torch (three F.linear)."""
    import torch
    import torch.nn.functional as F

    from cscompile.codegen import pertoken_kernels as P

    hidden, inter = ffn
    tol = TOLERANCE[str(dtype).replace("torch.", "")]
    wg = (torch.randn(inter, hidden, generator=gen) * hidden ** -0.5).to(dev, dtype)
    wu = (torch.randn(inter, hidden, generator=gen) * hidden ** -0.5).to(dev, dtype)
    wd_t = (torch.randn(inter, hidden, generator=gen) * inter ** -0.5).to(dev, dtype)
    wd = wd_t.T.contiguous()  # HF layout [H, I] for cuBLAS
    x = torch.randn(batch, hidden, generator=gen).to(dev, dtype)
    elem, x_bytes = wg.element_size(), x.numel() * x.element_size()
    dense_bytes = 3 * inter * hidden * elem + x_bytes
    t_dense = timer(lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd))
    label = f"{hidden}/{inter}"
    row = lambda *a, **kw: pertoken_row(*a, dense_seconds=t_dense, dense_bytes=dense_bytes,  # noqa: E731
                                        bandwidth=bandwidth, tol=tol, **kw)
    rows = [row("ffn dense", "ffn " + label, inter, hidden, "100%", "cuBLAS 3x F.linear",
                t_dense, dense_bytes)]
    for keep in keeps:
        idx = kept_list(inter, keep, gen, dev)
        m = idx.numel()
        err = rel_error(P.ffn_sparse(wg, wu, wd_t, x, idx),
                        P.ffn_sparse_reference(wg, wu, wd_t, x, idx))
        t = timer(lambda: P.ffn_sparse(wg, wu, wd_t, x, idx))
        rows.append(row("ffn_sparse", "ffn " + label, inter, hidden, f"{keep:.0%}", "triton", t,
                        3 * m * hidden * elem + 4 * m + x_bytes, err=err))
    return rows


def print_pertoken_table(title, rows):
    print(f"\n{title}")
    header = (f"{'dtype':>8} {'B':>3} {'op':>11} {'matrix':>14} {'N x K':>12} {'keep':>11} "
              f"{'time us':>9} {'MB':>8} {'GB/s':>7} {'%copy':>6} {'x dense':>8} "
              f"{'ceiling':>8} {'err':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{r['pct_copy']:5.1f}%" if r["pct_copy"] is not None else "    -"
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        if r["ok"] is False:
            err += " WRONG"
        print(f"{r['dtype']:>8} {r['batch']:>3} {r['op']:>11} {r['matrix']:>14} "
              f"{str(r['n']) + 'x' + str(r['k']):>12} {r['keep']:>11} {r['us']:9.1f} "
              f"{r['bytes'] / 1e6:8.3f} {r['gb_s']:7.1f} {pct:>6} {r['x_dense']:8.2f} "
              f"{r['ceiling']:8.2f} {err:>8}")


def run_pertoken(args, device, timer, bandwidth, gen):
    import torch

    if args.cpu_check:
        models, dtypes, batches = TINY_PERTOKEN, (torch.float32,), (1, 3)
        keeps, bits_list, group = (0.5,), (2, 3), 32
    else:
        models = {k: PERTOKEN_MODELS[k] for k in (args.models or PERTOKEN_MODELS)}
        dtypes = (torch.bfloat16,)
        batches = tuple(args.batches or ((1, 16) if args.quick else BATCHES))
        keeps = (0.5,) if args.quick else PERTOKEN_KEEPS
        bits_list, group = ((3,) if args.quick else SKETCH_BITS), args.group
    all_rows = []
    for model, spec in models.items():
        rows = []
        for dtype in dtypes:
            for batch in batches:
                found = []
                for matrix, shape in spec["matrices"].items():
                    found += bench_matrix(matrix, shape, dtype, batch, timer, gen, device,
                                          bandwidth, keeps, bits_list, group)
                found += bench_ffn_sparse(spec["ffn"], dtype, batch, timer, gen, device,
                                          bandwidth, keeps)
                for r in found:
                    r.update(shape=model, dtype=str(dtype).replace("torch.", ""), batch=batch)
                rows += found
        print_pertoken_table(f"per-token kernels, {model}", rows)
        all_rows += rows
    return all_rows


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
    timer = make_timer(device, reps=args.reps)
    bandwidth = None if check else copy_bandwidth(timer, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}" + (f"; device-to-device copy: {bandwidth:.0f} GB/s" if bandwidth
                               else "; correctness pass, times are not meaningful"))
    gen = torch.Generator().manual_seed(0)
    report = {"device": name, "copy_gb_s": bandwidth, "torch": torch.__version__,
              "rows": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    if "class" in args.suite:
        report["rows"] += run_class(args, device, timer, bandwidth, gen)
    if "pertoken" in args.suite:
        report["rows"] += run_pertoken(args, device, timer, bandwidth, gen)
    wrong = [r for r in report["rows"] if r.get("ok") is False]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")
    if wrong:
        print(f"\n{len(wrong)} rows FAILED their correctness check (marked WRONG above)")
        if check:
            raise AssertionError(f"{len(wrong)} per-token kernel results differ from the "
                                 "reference")
    elif check:
        print("\ncpu check passed: every Triton kernel matches its torch reference")
    report["failed"] = len(wrong)
    return report


def run_class(args, device, timer, bandwidth, gen):
    """The class-path kernels of codegen/kernels.py (ffn_decode, qkv_decode, o_proj_decode)."""
    import torch

    check = args.cpu_check
    if check:
        shapes, dtypes, batches = TINY_SHAPE, (torch.float32,), (3,)
        densities, keeps = (0.5,), (0.5, 1.0)
    else:
        shapes = {k: SHAPES[k] for k in (args.shapes or SHAPES)}
        dtypes = (torch.float16,) if args.quick else (torch.float16, torch.bfloat16)
        batches = tuple(args.batches or ((1, 16) if args.quick else BATCHES))
        densities = (0.5,) if args.quick else FFN_DENSITIES
        keeps = (1.0, 0.5) if args.quick else HEAD_KEEPS
    all_rows = []
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
                    r.update(suite="class", shape=shape_name,
                             dtype=str(dtype).replace("torch.", ""), batch=batch)
                rows += found
        hidden, inter, n_heads, n_kv, head_dim = shape
        print_table(f"{shape_name}: hidden {hidden}, FFN {inter}, {n_heads} heads / {n_kv} kv, "
                    f"head_dim {head_dim}", rows, bandwidth)
        all_rows += rows
    return all_rows


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_check:
        # before triton defines any kernel: run them in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device, so there is nothing to measure "
              "(--cpu-check runs a correctness pass in Triton's interpreter)", file=sys.stderr)
        return 2
    report = run(args)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
