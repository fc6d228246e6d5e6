"""`cscompile bench`: prefill latency and decode tokens/s, dense vs each class path.

Every path decodes the same seeded random prompt with a KV cache, greedy (argmax) tokens fed
back one at a time, exactly the loop runtime.generate runs. A class path runs on its physically
reduced copy (Session.compact_model) for prefill *and* decode, so both columns measure the
reduced model alone; generate itself prefills dense, which only changes prefill, not decode.

Next to the timings sit roofline numbers: decode at small batch is bound by reading the weights
once per step, so dense bytes / class bytes is the speed-up a perfect kernel could reach, and
the achieved class/dense tokens/s ratio says how much of it torch actually gets.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

import torch

from cscompile.compat import cache_kwargs
from cscompile.errors import UserInputError


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserInputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserInputError(f"{what} is empty")
    return values


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: time the work, not the launch
        torch.cuda.synchronize(device)


def touched_bytes(model) -> int:
    """Weight bytes one decode step reads as the model actually runs (fp32 in the session):
    every parameter once, except an untied input embedding, of which a step gathers one row."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


@torch.no_grad()
def _time_path(model, ids: torch.Tensor, new_tokens: int, repeats: int, warmup: int,
               device: torch.device, pertoken=None, mode: str | None = None) -> dict:
    """Prefill once with a fresh cache, then `new_tokens` single-token steps; per timed run.
    With `pertoken` (a runtime.pertoken.PerToken) the prefill runs dense and the steps on it,
    in `mode` ("pertoken", or "full": every weight on the same kernels)."""
    from transformers import DynamicCache

    from cscompile.runtime.generate import pertoken_logits

    def step(tok, cache):
        if pertoken is None:
            return model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True,
                         logits_to_keep=1).logits
        return pertoken_logits(pertoken, model, tok, cache, mode=mode or "pertoken")

    prefill_ms, tok_s, step_ms = [], [], []
    for run in range(warmup + repeats):
        cache = DynamicCache(config=model.config)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        _sync(device)
        t1 = time.perf_counter()
        logits = out.logits
        for _ in range(new_tokens):
            logits = step(logits[:, -1].argmax(-1, keepdim=True), cache)
        logits[:, -1].argmax(-1)  # the last token is part of the work being timed
        _sync(device)
        t2 = time.perf_counter()
        if run >= warmup:
            prefill_ms.append((t1 - t0) * 1e3)
            tok_s.append(ids.shape[0] * new_tokens / (t2 - t1))
            step_ms.append((t2 - t1) * 1e3 / new_tokens)
    return {"prefill_ms": _stats(prefill_ms), "decode_tok_s": _stats(tok_s),
            "step_ms": _stats(step_ms)}


def _environment(device: torch.device) -> tuple[dict, dict]:
    from importlib import metadata

    import cscompile

    hardware = {"processor": platform.processor() or platform.machine(),
                "platform": platform.platform(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cscompile": cscompile.__version__}
    for pkg in ("transformers", "triton"):  # metadata, not import: triton may be absent
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return hardware, versions


def run_bench(target, classes="all", batch_sizes=(1,), prompt_len=128, new_tokens=32,
              repeats=5, warmup=1, threads=None, device=None, seed=0, overhead=False,
              progress=True, onnxruntime=False, int8=False, int4=False) -> dict:
    """Benchmark TARGET (bundle or model): a JSON-able dict with environment and rows.
    progress=False: nothing on stderr (else a bar where someone watches, cscompile.progress).
    onnxruntime: also rows for the bundle's ONNX export on onnxruntime (runtime.onnx_backend;
    exported into the cache on first use). int8 / int4: also the CPU kernels' rows (every
    weight, per-token) with int8 weights (runtime.cpu_backend.quantize_rows) / int4 blocks
    (runtime.pack.Q4), each on a session of its own."""
    from cscompile.progress import bar, status
    from cscompile.runtime import load
    from cscompile.runtime.pertoken import dense_plan, plan_bytes

    batch_sizes = [int(b) for b in batch_sizes]
    # threads: one count, a list of them (each timed in turn), or None for torch's default
    thread_counts = [None] if not threads else (
        [int(threads)] if isinstance(threads, int) else [int(t) for t in threads])
    for name, v in [("prompt-len", prompt_len), ("new-tokens", new_tokens),
                    ("repeats", repeats)] + [("threads", t or 1) for t in thread_counts] + [
                    ("batch size", b) for b in batch_sizes]:
        if v < 1:
            raise UserInputError(f"{name} must be >= 1, got {v}")
    if warmup < 0:
        raise UserInputError(f"warmup must be >= 0, got {warmup}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is available here")
    args = dict(target=str(target), classes=str(classes), batch_sizes=batch_sizes,
                prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                threads=threads, device=device, seed=seed)
    old_threads = torch.get_num_threads()
    if thread_counts[0]:
        torch.set_num_threads(thread_counts[0])
    try:
        with status(f"loading {target} ...", show=progress):
            session = load(target, device=device)
        ctx = session.context_length
        if ctx and prompt_len + new_tokens > ctx:
            raise UserInputError(f"prompt-len + new-tokens = {prompt_len + new_tokens} exceeds "
                                 f"the model's context of {ctx}")
        class_ids = _select_classes(session, classes)
        dev = session.device
        hardware, versions = _environment(dev)
        smap = session.smap
        dense_fp32 = touched_bytes(session.model)
        paths = [("dense", None, session.model, smap.total_bytes if smap else None, dense_fp32)]
        if dev.type == "cpu":  # torch's bf16 GEMV, the storage dtype's bytes
            import copy

            bf16 = copy.deepcopy(session.model).to(torch.bfloat16)
            paths.append(("dense bf16", "dense-bf16", bf16, smap.total_bytes if smap else None,
                          touched_bytes(bf16)))
        pt = session.pertoken
        if pt is not None and pt.cpu is not None:
            # every weight on the same kernels and decode loop: what the backend alone gains
            paths.append(("dense (cpu kernels)", ("full", True, pt), session.model,
                          smap.total_bytes, dense_fp32))
        def sized(plan_b: float) -> tuple[float, float]:
            """plan_bytes' bytes as (storage bytes, the same fraction of the fp32 model)."""
            storage = plan_b * smap.total_bytes / pt.bytes()["dense_bytes"]
            return storage, storage * dense_fp32 / smap.total_bytes

        for quant in [q for q, on in (("int8", int8), ("int4", int4)) if on]:
            if pt is None or pt.cpu is None:
                raise UserInputError(f"--{quant} benches a bundle's per-token path on the CPU "
                                     f"kernels: this target has none here")
            sq = load(target, device=device, weights=quant)
            ptq = sq.pertoken
            paths.append((f"dense {quant} (cpu kernels)", ("full", True, ptq), sq.model,
                          *sized(plan_bytes(dense_plan(smap), ptq.shapes)["bytes"])))
            paths.append((f"pertoken {quant} (cpu kernels)", ("pertoken", True, ptq), sq.model,
                          *sized(ptq.bytes()["bytes"])))
        if pt is not None:  # the per-token path on its kernels, and as torch masks
            for kernels in ([True, False] if pt.cpu is not None else [False]):
                paths.append((f"pertoken ({'cpu kernels' if kernels else 'torch masks'})",
                              ("pertoken", kernels, pt), session.model,
                              *sized(pt.bytes()["bytes"])))
        skipped = []
        for c in class_ids:
            cls = session.classes[c]
            model = session.compact_model(c)
            if model is None:
                reason = ("drops layers" if cls.support.layers is not None
                          else "reduce_model refuses its layout")
                skipped.append({"path": f"class {c}", "class_id": c, "density": cls.density,
                                "skipped": f"no compact model ({reason}); masked execution is "
                                           f"not benchmarked"})
                continue
            paths.append((f"class {c}", c, model,
                          smap.unprunable_bytes() + cls.support.kept_bytes(smap),
                          touched_bytes(model)))

        vocab = session.model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(seed)
        rows = []
        bandwidth = {}  # threads -> GB/s of a streaming read, measured in this run (CPU)
        prompts = {b: torch.randint(0, vocab, (b, prompt_len), generator=gen).to(dev)
                   for b in batch_sizes}
        with bar("timing", len(thread_counts) * len(batch_sizes) * len(paths), unit="paths",
                 show=progress) as advance:
            for nt, b in ((nt, b) for nt in thread_counts for b in batch_sizes):
                if nt:
                    torch.set_num_threads(nt)
                threads_now = torch.get_num_threads()
                if dev.type == "cpu" and threads_now not in bandwidth:
                    bandwidth[threads_now] = read_bandwidth_gbps()
                ids = prompts[b]
                dense_tok_s = None
                for name, cid, model, nbytes, fp32 in paths:
                    advance(0, description=f"timing {nt or 'default'} threads, batch {b}, "
                                           f"{name}")
                    on_pt = isinstance(cid, tuple)
                    path_pt = cid[2] if on_pt else None
                    cpu = path_pt.cpu if on_pt else None
                    if on_pt and not cid[1]:
                        path_pt.cpu = None  # the same plan as torch masks
                    try:
                        t = _time_path(model, ids, new_tokens, repeats, warmup, dev,
                                       pertoken=path_pt, mode=cid[0] if on_pt else None)
                    finally:
                        if on_pt:
                            path_pt.cpu = cpu
                    med = t["decode_tok_s"]["median"]
                    dense_tok_s = med if cid is None else dense_tok_s
                    static = isinstance(cid, int)
                    runs_full = on_pt and (cid[0] == "full" or
                                           (cid[1] and path_pt.step_mode(b) == "full"))
                    if runs_full:  # a kernel step of several rows reads every weight
                        nbytes, fp32 = sized(plan_bytes(dense_plan(smap),
                                                        path_pt.shapes)["bytes"])
                    # per-token rows: of the dense storage bytes (int8 rows below 1 at full)
                    density = (nbytes / smap.total_bytes if on_pt else
                               session.classes[cid].density if static else 1.0)
                    # what the step streams: the kernels read their storage dtype; torch paths
                    # multiply fp32 matrices (masks: every weight, whatever they keep)
                    read = (nbytes if on_pt and cid[1] else
                            dense_fp32 if on_pt else fp32)
                    gbps = read / (t["step_ms"]["median"] * 1e-3) / 1e9
                    row = {"threads": torch.get_num_threads(), "batch": b, "path": name,
                           "class_id": cid if static else None,
                           "density": density,
                           "prefill_on": "compact" if static else "dense",
                           **t,
                           "weight_bytes": nbytes, "weight_bytes_fp32": fp32,
                           # bytes-bound ceiling: dense bytes over this path's bytes, as run
                           # (fp32) and as stored (the bundle's dtype, embeddings counted whole)
                           "bytes_ratio": dense_fp32 / fp32,
                           "bytes_ratio_storage": paths[0][3] / nbytes if nbytes else None,
                           "speedup": med / dense_tok_s,
                           "read_bytes": read, "gbps": gbps,
                           "pct_bandwidth": (100 * gbps / bandwidth[threads_now]
                                             if threads_now in bandwidth else None)}
                    rows.append(row)
                    advance()
                rows.extend({"threads": torch.get_num_threads(), "batch": b, **s}
                            for s in skipped)
        if onnxruntime:
            if not session.is_bundle:
                raise UserInputError(f"--onnxruntime benches a bundle's ONNX export; "
                                     f"{target} is a model")
            from cscompile.runtime.onnx_backend import bench_rows

            with status("exporting (first use) and timing the ONNX graphs ...", show=progress):
                rows.extend(bench_rows(session, prompts, thread_counts, batch_sizes, class_ids,
                                       new_tokens, repeats, warmup, rows))
        # on the session already loaded: a second load would double start-up and memory
        extra = {}
        if overhead:
            with status("timing routing and the refinement monitor ...", show=progress):
                extra["overhead"] = runtime_overhead(session, prompt_len, new_tokens, repeats,
                                                     seed=seed)
    finally:
        torch.set_num_threads(old_threads)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": hardware, "versions": versions, "args": args,
            "storage_dtype": smap.dtype if smap else None,
            "read_bandwidth_GBps": {str(k): v for k, v in bandwidth.items()}, "rows": rows,
            **extra}


def read_bandwidth_gbps(nbytes: int = 256 * 2**20, reps: int = 3) -> float:
    """The machine's read bandwidth at torch's thread count: the best of `reps` streaming
    reads of an nbytes buffer (runtime.cpu_kernels.read_bandwidth; torch's sum without it)."""
    from cscompile.runtime import cpu_kernels

    buf = torch.ones(nbytes, dtype=torch.uint8)
    read = (cpu_kernels.read_bandwidth if cpu_kernels.available()
            else lambda b: int(b.sum(dtype=torch.int64)))
    read(buf)  # first touch
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        read(buf)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def runtime_overhead(target, prompt_len=128, new_tokens=32, repeats=3, threads=None,
                     seed=0) -> dict:
    """What routing and the refinement monitor cost, as shares of a generate() call.

    Three decodes of one prompt through runtime.generate on the routed class: the static path
    on masks (execution="masked"), the same path with the monitor on every step but a widen
    threshold of 1.0 (it selects and measures, and never widens), and the compact path. The
    monitor's share is (refined - masked) / refined step time; routing's share is the router's
    classify call over the whole request (its feature is pooled during the dense prefill)."""
    from cscompile.runtime import RefineConfig, Session, load
    from cscompile.runtime.generate import encode

    if threads:
        torch.set_num_threads(threads)
    session = target if isinstance(target, Session) else load(target, device="cpu")
    if not session.is_bundle:
        raise UserInputError(f"{target}: routing and refinement overhead needs a bundle")
    words = "The history of the city begins with a small market town on the river. " * 64
    ids = encode(session.tokenizer, words, chat=False)[:prompt_len]
    prompt = session.tokenizer.decode(ids)
    runs, execution_before = {}, session.execution
    for name, execution, refine in (("masked", "masked", None),
                                    ("masked+monitor", "masked", RefineConfig(1, 1.0, 1.0)),
                                    ("compact", "compact", None)):
        session.execution = execution
        steps, prefill, total, cls = [], [], [], None
        for r in range(repeats + 1):  # the first run warms up
            res = session.generate(prompt, max_new_tokens=new_tokens, refine=refine, seed=seed)
            if r:
                steps.append(1e3 * res.decode_s / max(1, len(res.densities)))
                prefill.append(1e3 * res.prefill_s)
                total.append(1e3 * (res.prefill_s + res.decode_s))
            cls = res.class_id
        runs[name] = {"class_id": cls, "step_ms": _stats(steps), "prefill_ms": _stats(prefill),
                      "request_ms": _stats(total)}
    session.execution = execution_before
    pooled = torch.randn(1, session.model.config.hidden_size)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        session.router.classify(pooled)
        times.append((time.perf_counter() - t0) * 1e3)
    route_ms = statistics.median(times)
    masked, monitored = runs["masked"]["step_ms"]["median"], runs["masked+monitor"]["step_ms"]["median"]
    return {"runs": runs, "route_ms": route_ms,
            "route_share": route_ms / runs["compact"]["request_ms"]["median"],
            "monitor_share": (monitored - masked) / monitored,
            "compact_vs_monitored_step": runs["compact"]["step_ms"]["median"] / monitored}


def _select_classes(session, classes) -> list[int]:
    n = len(session.classes)
    if str(classes).strip().lower() == "all":
        return list(range(n))
    if not session.is_bundle:
        raise UserInputError(f"{session.source} is a plain model: it has no classes to bench "
                             f"(leave --classes at all)")
    ids = parse_int_list(classes, "--classes")
    bad = [c for c in ids if not 0 <= c < n]
    if bad:
        raise UserInputError(f"--classes {bad} out of range: the bundle has classes 0..{n - 1}")
    return sorted(set(ids))


def print_bench(result: dict, console) -> None:
    from rich.table import Table

    hw, a = result["hardware"], result["args"]
    threads = sorted({r.get("threads", hw["torch_threads"]) for r in result["rows"]})
    table = Table(title=f"{a['target']} — prompt {a['prompt_len']}, {a['new_tokens']} new tok, "
                        f"{a['repeats']} runs, {hw['device']} ({hw['gpu'] or hw['processor']}, "
                        f"{'/'.join(map(str, threads))} threads)")
    cols = ["threads", "batch", "path", "density", "prefill ms", "decode tok/s (min–max)", "ms/step",
            "MB/step fp32", "ceiling ×", "achieved ×"]
    if any(r.get("gbps") for r in result["rows"]):
        cols.append("GB/s")
    if any(r.get("pct_bandwidth") for r in result["rows"]):
        cols.append("% bw")
    for col in cols:
        table.add_column(col, justify="left" if col == "path" else "right")
    last = None
    for r in result["rows"]:
        nt = str(r.get("threads", hw["torch_threads"]))
        if last is not None and (nt, r["batch"]) != last:
            table.add_section()
        last = (nt, r["batch"])
        if "skipped" in r:
            table.add_row(nt, str(r["batch"]), r["path"], f"{r['density']:.3f}", r["skipped"])
            continue
        d = r["decode_tok_s"]
        cells = [nt, str(r["batch"]), r["path"], f"{r['density']:.3f}",
                 f"{r['prefill_ms']['median']:.2f}",
                 f"{d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}]",
                 f"{r['step_ms']['median']:.2f}", f"{r['weight_bytes_fp32'] / 1e6:.3f}",
                 f"{r['bytes_ratio']:.2f}",
                 f"{r['speedup']:.2f}" if r.get("speedup") is not None else "–"]
        if "GB/s" in cols:
            cells.append(f"{r['gbps']:.1f}" if r.get("gbps") is not None else "–")
        if "% bw" in cols:
            cells.append(f"{r['pct_bandwidth']:.0f}" if r.get("pct_bandwidth") is not None
                         else "–")
        table.add_row(*cells)
    console.print(table)


# ----------------------------------------------------------------------------- command line
import click  # noqa: E402

from cscompile.errors import friendly_errors  # noqa: E402


@click.command()
@click.argument("target")
@click.option("--classes", default="all", show_default=True,
              help="Class ids to bench, comma-separated (e.g. 0,1), or all.")
@click.option("--batch-sizes", default="1", show_default=True,
              help="Comma-separated batch sizes (e.g. 1,4).")
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--new-tokens", default=32, show_default=True, type=int,
              help="Decode steps timed per run.")
@click.option("--repeats", default=5, show_default=True, type=int, help="Timed runs per path.")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed runs first.")
@click.option("--threads", default=None,
              help="torch CPU threads, or several comma-separated (e.g. 1,2: each timed in "
                   "turn; default: torch's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True),
              help="Also write the full result as JSON to this file ('-' for stdout).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu.")
@click.option("--overhead", is_flag=True,
              help="Also time routing and the refinement monitor as shares of generate().")
@click.option("--onnxruntime", is_flag=True,
              help="Also time the bundle's ONNX export on onnxruntime (batch 1; exported "
                   "into the cache on first use).")
@click.option("--int8", is_flag=True,
              help="Also time the CPU kernels with int8 weights (every weight, and the "
                   "per-token path): sparsity and quantization together.")
@click.option("--int4", is_flag=True,
              help="Also time the CPU kernels with int4 weights (blocks of 32, fp16 scale and "
                   "minimum; every weight, and the per-token path).")
@friendly_errors
def bench(target, classes, batch_sizes, prompt_len, new_tokens, repeats, warmup, threads,
          json_out, device, overhead, onnxruntime, int8, int4):
    """Time prefill and decode of TARGET (a bundle: dense and each class; a model: dense)."""
    import json
    from pathlib import Path

    from rich.console import Console

    result = run_bench(target, classes=classes,
                       batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
                       prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                       warmup=warmup, device=device, overhead=overhead,
                       onnxruntime=onnxruntime, int8=int8, int4=int4,
                       threads=parse_int_list(threads, "--threads") if threads else None,
                       progress=not json_out)  # --json: stderr stays quiet too
    text = json.dumps(result, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    print_bench(result, Console(width=None if sys.stdout.isatty() else 150))
    if overhead:
        o = result["overhead"]
        click.echo("overhead on the routed class (generate, " + result["hardware"]["device"] + "): " + ", ".join(
            f"{k} {v['step_ms']['median']:.2f} ms/step" for k, v in o["runs"].items())
            + f"; router classify {o['route_ms']:.3f} ms = {o['route_share']:.2%} of a request; "
            f"monitor {o['monitor_share']:.1%} of a monitored step")
    if json_out:
        Path(json_out).write_text(text + "\n")
        click.echo(f"wrote {json_out}", err=True)
