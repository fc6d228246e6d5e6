"""CPU sparse GEMV kernels (runtime/cpu_kernels.py) against torch and the machine's bandwidth.

One run measures, for each thread count and batch size: the read bandwidth (a streaming byte
sum over a 256 MiB buffer), torch's dense GEMV (F.linear, fp32 and bf16), our dense_gemv (fp32, bf16, int8, int4), and
gather_gemv / rows_gemv / ffn_sparse at 50% and 25% kept, sketch_gemv at 2/3/4 bits (and sketch_q8, the int8 kernel a batch-1 step runs), at
SmolLM2-135M shapes and two 7B-like shapes. Every op of one (shape, threads, batch) group is
timed in interleaved rounds (so the ratios compare like with like on a noisy, shared machine),
each call on the next of several weight copies whose kept bytes together exceed the L3 cache (a
decode step streams weights from DRAM, not cache), and the median call is reported.

Columns: us = median time of one call through the Python wrapper, by default the calling
thread's CPU time at 1 thread (--clock auto: other jobs on a shared machine then only cost what
they take of the memory system, not the time they are scheduled instead of us) and wall time at
more threads; wall us = the median wall time; MB = weight bytes it reads; GB/s = MB / us; %bw = of the read bandwidth measured at that thread count; ceil = bytes of
the dense equivalent / bytes of the sparse op; speedup = our dense time / the op's time;
%ceil = speedup / ceil (the goal: >= 85% at batch 1).

    python benchmarks/cpu_kernels.py                       # everything, threads 1 and 2
    python benchmarks/cpu_kernels.py --threads 1 --batch 1 --json out.json
    python benchmarks/cpu_kernels.py --quick               # fewer shapes, shorter timing
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cscompile.runtime import cpu_kernels as C  # noqa: E402
from cscompile.runtime import pack  # noqa: E402

MB = 1e6
WORKING_SET = 96 * 2**20  # kept weight bytes rotated through per op (3x the 32 MiB L3)
KEEPS = (0.5, 0.25)

# (label, N, K): weights [N, K] as nn.Linear stores them
SMOL = [("q_proj 576x576", 576, 576), ("k/v_proj 192x576", 192, 576),
        ("gate/up 1536x576", 1536, 576), ("down 576x1536", 576, 1536),
        ("lm_head 49152x576", 49152, 576)]
BIG = [("7B 4096x4096", 4096, 4096), ("7B up 11008x4096", 11008, 4096)]
FFNS = [("SmolLM2 FFN 576/1536", 576, 1536), ("7B FFN 4096/11008", 4096, 11008)]
SKETCH = [("q_proj 576x576", 576, 576), ("gate/up 1536x576", 1536, 576),
          ("lm_head 49152x576", 49152, 576), ("7B 4096x4096", 4096, 4096)]
SKETCH_GROUP = 64


def copies_for(nbytes: int, keep: float = 1.0) -> int:
    return max(1, math.ceil(WORKING_SET / max(1, nbytes * keep)))


def make_copies(make, nbytes: int, keep: float = 1.0):
    n = copies_for(nbytes, keep)
    return [make(i) for i in range(n)]


def kept_idx(n: int, keep: float, gen) -> torch.Tensor:
    m = max(1, round(n * keep))
    return torch.randperm(n, generator=gen)[:m].sort().values.to(torch.int32)


def measure_bandwidth(threads: int, reps: int, clock: str) -> float:
    torch.set_num_threads(threads)
    buf = torch.randint(0, 255, (256 * 2**20,), dtype=torch.uint8)
    C.read_bandwidth(buf)
    times = []
    tick = time.thread_time_ns if clock == "cpu" else time.perf_counter_ns
    for _ in range(reps):
        t0 = tick()
        C.read_bandwidth(buf)
        times.append(tick() - t0)
    return buf.numel() / statistics.median(times)  # bytes per ns = GB/s


def time_group(ops: dict, rounds: int, round_s: float, min_calls: int) -> dict:
    """ops: name -> fn(i). Interleaved rounds; returns name -> (median wall s, median thread-CPU s)
    per call (the CPU time of the calling thread, which is all the work at 1 thread)."""
    wall = {name: [] for name in ops}
    cpu = {name: [] for name in ops}
    for fn in ops.values():  # warm-up
        fn(0)
        fn(1)
    for _ in range(rounds):
        for name, fn in ops.items():
            t_end = time.perf_counter() + round_s
            i = 0
            while i < min_calls or time.perf_counter() < t_end:
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                fn(i)
                wall[name].append(time.perf_counter_ns() - t0)
                cpu[name].append(time.thread_time_ns() - c0)
                i += 1
    return {name: (statistics.median(wall[name]) * 1e-9, statistics.median(cpu[name]) * 1e-9) for name in ops}


def weight_sets(n: int, k: int, dtype: torch.dtype, gen, transposed: bool):
    """Copies of one [n, k] weight (or its [k, n] transpose) in dtype (int8: with scales;
    "int4": runtime.pack.Q4 rows / Q4Cols, the same blocks of 32 inputs)."""
    base = torch.randn(n, k, generator=gen) / math.sqrt(k)
    if dtype == "int4":
        if transposed:
            qc = pack.quantize_q4_cols(base)
            make = lambda i: (pack.Q4Cols(qc.codes.clone(), qc.scales.clone(), qc.cols), None)  # noqa: E731
            return make, qc.nbytes
        q = pack.quantize_q4(base)
        make = lambda i: (pack.Q4(q.blocks.clone(), q.cols), None)  # noqa: E731
        return make, q.nbytes
    if transposed:
        base = base.T.contiguous()
    elt = {torch.float32: 4, torch.bfloat16: 2, torch.int8: 1}[dtype]
    if dtype == torch.int8:
        q, s = pack.quantize_int8(base, dim=0 if transposed else 1)
        make = lambda i: (q.clone(), s.clone())  # noqa: E731
    else:
        w = base.to(dtype)
        make = lambda i: (w.clone(), None)  # noqa: E731
    return make, base.numel() * elt


def bench_linear(label, n, k, threads, batch, dtypes, gen, args, bw):
    rows = []
    x = torch.randn(batch, k, generator=gen)
    ops, meta = {}, {}
    dense_name = {}
    for dt in dtypes:
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8", "int4": "int4"}[dt]
        make, nbytes = weight_sets(n, k, dt, gen, transposed=False)
        ws = make_copies(make, nbytes)
        if dt in (torch.float32, torch.bfloat16):
            xt = x.to(dt)
            ops[f"torch dense {dname}"] = (lambda ws, xt: lambda i: F.linear(xt, ws[i % len(ws)][0]))(ws, xt)
            meta[f"torch dense {dname}"] = ("torch dense", dname, 1.0, nbytes, None)
        ops[f"dense_gemv {dname}"] = (lambda ws: lambda i: C.dense_gemv(ws[i % len(ws)][0], x, ws[i % len(ws)][1]))(ws)
        meta[f"dense_gemv {dname}"] = ("dense_gemv", dname, 1.0, nbytes, None)
        dense_name[dname] = f"dense_gemv {dname}"
        for keep in KEEPS:
            idx = kept_idx(n, keep, gen)
            wr = ws if len(ws) >= copies_for(nbytes, keep) else make_copies(make, nbytes, keep)
            nm = f"rows_gemv {dname} {keep:.0%}"
            ops[nm] = (lambda wr, idx: lambda i: C.rows_gemv(wr[i % len(wr)][0], x, idx, wr[i % len(wr)][1]))(wr, idx)
            meta[nm] = ("rows_gemv", dname, keep, nbytes * idx.numel() / n, dense_name[dname])
        del ws
        if label.startswith("lm_head"):
            continue  # the lm_head keeps candidate rows; no input-sparse gather there
        make_t, _ = weight_sets(n, k, dt, gen, transposed=True)
        for keep in KEEPS:
            idx = kept_idx(k, keep, gen)
            wt = make_copies(make_t, nbytes, keep)
            nm = f"gather_gemv {dname} {keep:.0%}"
            ops[nm] = (lambda wt, idx: lambda i: C.gather_gemv(wt[i % len(wt)][0], x, idx, wt[i % len(wt)][1]))(wt, idx)
            read = nbytes * idx.numel() / k
            if dt == "int4":  # codes of the kept inputs, every group's scales and minima
                qc = wt[0][0]
                read = qc.codes.numel() * idx.numel() / k + 2 * qc.scales.numel()
            meta[nm] = ("gather_gemv", dname, keep, read, dense_name[dname])
    if batch == 1 and torch.bfloat16 in dtypes:
        read_ops(ops, meta, n, k, gen, inputs=not label.startswith("lm_head"))
    res = time_group(ops, args.rounds, args.round_s, args.min_calls)
    for nm, (op, dname, keep, nbytes, ref) in meta.items():
        rows.append(row(label, op, dname, keep, threads, batch, res[nm], nbytes, bw,
                        res[ref] if ref else None, nbytes_dense=nbytes / keep))
    return rows


def read_ops(ops, meta, n, k, gen, inputs: bool):
    """The memory system's own ceiling for the sparse kernels' patterns: the bytes of a bf16
    [n, k] matrix's kept rows (rows_gemv) and, with inputs, of its input-major copy's kept
    inputs (gather_gemv), read with no arithmetic (cpu_kernels.read_rows); their %ceil is
    against reading every row, so a kernel's %ceil compares with the read's at the same keep."""
    for op, (r, c) in (("read kept rows", (n, k)), ("read kept inputs", (k, n)))[:2 if inputs else 1]:
        make = lambda i, r=r, c=c: torch.randint(0, 256, (r, 2 * c), dtype=torch.uint8, generator=gen)  # noqa: E731
        nbytes = 2 * r * c
        if (2 * c) % 64:
            continue
        every = torch.arange(r, dtype=torch.int32)
        for keep in (1.0, *KEEPS):
            idx = every if keep == 1.0 else kept_idx(r, keep, gen)
            bufs = make_copies(make, nbytes, keep)
            nm = f"{op} {keep:.0%}"
            ops[nm] = (lambda bufs, idx: lambda i: C.read_rows(bufs[i % len(bufs)], idx))(bufs, idx)
            meta[nm] = (op, "bf16", keep, nbytes * idx.numel() / r,
                        None if keep == 1.0 else f"{op} 100%")


def bench_ffn(label, h, inter, threads, batch, dtypes, gen, args, bw):
    rows = []
    x = torch.randn(batch, h, generator=gen)
    ops, meta = {}, {}
    for dt in dtypes:
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]
        elt = 4 if dt == torch.float32 else 2
        nbytes = 3 * inter * h * elt
        g = (torch.randn(inter, h, generator=gen) / math.sqrt(h)).to(dt)
        u = (torch.randn(inter, h, generator=gen) / math.sqrt(h)).to(dt)
        d = (torch.randn(inter, h, generator=gen) / math.sqrt(inter)).to(dt)
        d_rowmajor = d.T.contiguous()  # W_down [H, I] for the dense path
        sets = [(g.clone(), u.clone(), d.clone(), d_rowmajor.clone()) for _ in range(copies_for(nbytes, min(KEEPS)))]

        def dense(i, sets=sets):
            wg, wu, _, wdn = sets[i % len(sets)]
            hh = F.silu(C.dense_gemv(wg, x)) * C.dense_gemv(wu, x)
            return C.dense_gemv(wdn, hh)

        nm = f"3x dense_gemv {dname}"
        ops[nm] = dense
        meta[nm] = ("3x dense_gemv+silu", dname, 1.0, nbytes, None)
        xt = x.to(dt)

        def tdense(i, sets=sets, xt=xt):
            wg, wu, _, wdn = sets[i % len(sets)]
            return F.linear(F.silu(F.linear(xt, wg)) * F.linear(xt, wu), wdn)

        ops[f"torch FFN {dname}"] = tdense
        meta[f"torch FFN {dname}"] = ("torch dense FFN", dname, 1.0, nbytes, None)
        for keep in KEEPS:
            idx = kept_idx(inter, keep, gen)
            nm = f"ffn_sparse {dname} {keep:.0%}"
            ops[nm] = (lambda idx, sets: lambda i: C.ffn_sparse(*sets[i % len(sets)][:3], x, idx))(idx, sets)
            meta[nm] = ("ffn_sparse", dname, keep, nbytes * idx.numel() / inter, f"3x dense_gemv {dname}")
    res = time_group(ops, args.rounds, args.round_s, args.min_calls)
    for nm, (op, dname, keep, nbytes, ref) in meta.items():
        rows.append(row(label, op, dname, keep, threads, batch, res[nm], nbytes, bw,
                        res[ref] if ref else None, nbytes_dense=nbytes / keep))
    return rows


def bench_sketch(label, n, k, threads, batch, gen, args, bw):
    x = torch.randn(batch, k, generator=gen)
    ops, meta = {}, {}
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    wb = w.bfloat16()
    dbytes = n * k * 2
    wbs = [wb.clone() for _ in range(copies_for(dbytes))]
    ops["dense_gemv bf16"] = lambda i: C.dense_gemv(wbs[i % len(wbs)], x)
    meta["dense_gemv bf16"] = ("dense_gemv", "bf16", None, dbytes, None)
    for bits in args.sketch_bits:
        codes, scales = pack.quantize_codes(w, bits, SKETCH_GROUP)
        packed = pack.pack_codes(codes, bits)
        nbytes = pack.packed_bytes(n, k, bits, SKETCH_GROUP)
        sets = [(packed.clone(), scales.clone()) for _ in range(copies_for(nbytes))]
        nm = f"sketch_gemv {bits}b"
        ops[nm] = (lambda sets, bits: lambda i: C.sketch_gemv(*sets[i % len(sets)], x, bits, SKETCH_GROUP, k))(sets, bits)
        meta[nm] = (f"sketch_gemv {bits}b g{SKETCH_GROUP}", "packed", None, nbytes, "dense_gemv bf16")
        if batch == 1 and C.planes_fit(bits, SKETCH_GROUP, k):  # what a batch-1 step runs
            planes = [(C.sketch_planes(p, bits, k), sc) for p, sc in sets]
            nm = f"sketch_q8 {bits}b"
            ops[nm] = (lambda planes, bits: lambda i: C.sketch_q8(
                *planes[i % len(planes)], x, bits, SKETCH_GROUP, k))(planes, bits)
            meta[nm] = (f"sketch_q8 {bits}b g{SKETCH_GROUP}", "planes", None, nbytes,
                        "dense_gemv bf16")
    res = time_group(ops, args.rounds, args.round_s, args.min_calls)
    return [row(label, op, dname, keep, threads, batch, res[nm], nbytes, bw, res[ref] if ref else None,
                nbytes_dense=dbytes) for nm, (op, dname, keep, nbytes, ref) in meta.items()]


CLOCK = {"value": "auto"}


def clock_for(threads: int) -> str:
    c = CLOCK["value"]
    return ("cpu" if threads == 1 else "wall") if c == "auto" else c


def row(label, op, dtype, keep, threads, batch, tt, nbytes, bw, tt_ref, nbytes_dense):
    wall, cpu = tt
    clock = clock_for(threads)
    t = cpu if clock == "cpu" else wall
    r = {"shape": label, "op": op, "dtype": dtype, "keep": keep, "threads": threads, "batch": batch,
         "clock": clock, "us": t * 1e6, "wall_us": wall * 1e6, "cpu_us": cpu * 1e6, "MB": nbytes / MB,
         "GBps": nbytes / t / 1e9, "pct_bw": 100 * nbytes / t / 1e9 / bw}
    if tt_ref is not None:
        t_ref = tt_ref[1] if clock == "cpu" else tt_ref[0]
        ceil = nbytes_dense / nbytes
        r.update(ceiling=ceil, speedup=t_ref / t, pct_ceiling=100 * t_ref / t / ceil)
    return r


def fmt_table(rows):
    head = (f"{'shape':<22} {'op':<22} {'dtype':<6} {'keep':>5} {'us':>9} {'wall us':>9} {'MB':>8} "
            f"{'GB/s':>6} {'%bw':>5} {'ceil':>5} {'speedup':>7} {'%ceil':>5}")
    out = [head, "-" * len(head)]
    for r in rows:
        keep = f"{r['keep']:.0%}" if r["keep"] is not None else ""
        extra = (f" {r['ceiling']:5.2f} {r['speedup']:7.2f} {r['pct_ceiling']:5.0f}" if "ceiling" in r else "")
        out.append(f"{r['shape']:<22} {r['op']:<22} {r['dtype']:<6} {keep:>5} {r['us']:9.1f} {r['wall_us']:9.1f} {r['MB']:8.3f} "
                   f"{r['GBps']:6.1f} {r['pct_bw']:5.0f}{extra}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--json", type=Path, help="write every row (and the bandwidths) here")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes and 4096x4096 only, shorter rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-s", type=float, default=0.03, help="seconds per op per round")
    ap.add_argument("--min-calls", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    ap.add_argument("--sketch-bits", default="2,3,4")
    ap.add_argument("--only", default="linear,ffn,sketch", help="which sections to run")
    ap.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                    help="time the ratios use: auto = the calling thread's CPU time at 1 thread "
                         "(robust to other jobs on a shared machine), wall time at more")
    args = ap.parse_args(argv)
    args.sketch_bits = [int(b) for b in args.sketch_bits.split(",")]
    CLOCK["value"] = args.clock
    if args.quick:
        args.rounds, args.round_s = 3, 0.02
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    dmap = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": "int4"}
    dtypes = [dmap[d] for d in args.dtypes.split(",")]
    only = set(args.only.split(","))
    if not C.available():
        print("the compiled kernels are unavailable: timing the torch fallback", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    linear = SMOL + (BIG[:1] if args.quick else BIG)
    ffns = FFNS[:1] if args.quick else FFNS
    sketch = SKETCH
    all_rows, bws = [], {}
    t_start = time.time()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"kernels {'compiled' if C.available() else 'torch fallback'}; median of interleaved rounds, "
          f"weights rotated over {WORKING_SET >> 20} MiB")
    for nt in threads:
        bw = measure_bandwidth(nt, reps=9, clock=clock_for(nt))
        bws[nt] = bw
        for b in batches:
            torch.set_num_threads(nt)
            rows = []
            if "linear" in only:
                for label, n, k in linear:
                    rows += bench_linear(label, n, k, nt, b, dtypes, gen, args, bw)
            if "ffn" in only:
                for label, h, inter in ffns:
                    rows += bench_ffn(label, h, inter, nt, b, [d for d in dtypes if d in (torch.float32, torch.bfloat16)], gen, args, bw)
            if "sketch" in only:
                for label, n, k in sketch:
                    rows += bench_sketch(label, n, k, nt, b, gen, args, bw)
            print(f"\n## threads {nt}, batch {b}: read bandwidth {bw:.1f} GB/s (byte sum over 256 MiB); "
                  f"us, GB/s and ratios from {clock_for(nt)} time")
            print(fmt_table(rows), flush=True)
            all_rows += rows
    print(f"\n# {time.time() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_GBps": bws, "rows": all_rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
