"""`cscompile run`: generate from a bundle (its per-token path by default, or the routed static
class path) or a plain model (dense).

Refinement inside a class (widening to dense) and class switching lost to the per-token path
everywhere they were measured (README), so they are no longer options here; their code stays
in runtime.refine for `cscompile eval` and the benchmarks that compare against them.

Registered in cscompile/cli.py with `main.add_command(run)`.
"""

from __future__ import annotations

import json
import sys

import click

from cscompile.compat import hide_third_party_warnings
from cscompile.errors import friendly_errors
from cscompile.errors import UserInputError

STDIN_HINT = "reading prompts from stdin, one per line (end with Ctrl-D), or pass --prompt"


def _stats_line(r) -> str:
    n = len(r.densities)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    widened = sum(1 for x in r.refinements if x["action"] == "widen")
    kv = (f" | KV kept {r.kv_positions}/{r.prompt_tokens} prompt positions"
          if r.kv_positions is not None else "")
    if r.prompt_kept is not None:
        kv += f" | prompt tokens prefilled {r.prompt_kept}/{r.prompt_tokens}"
    if r.kv_bytes_per_token:
        kv += f", KV {mean(r.kv_bytes_per_token) / 1e6:.3f} MB/token"
    if r.split:
        s = r.split
        kv += (f" | total budget {s['total_budget']:g} split: weights {s['weight_budget']:.3f}, "
               f"KV keep {s['kv_keep']:g} (predicted KL {s['predicted_kl']:.3f}"
               f"{', beyond the calibrated lengths' if s['extrapolated'] else ''})")
    if r.path == "pertoken":
        worst = {k: max((m.get(k, 0.0) for m in r.missed), default=0.0)
                 for k in ("qkv", "o", "ffn", "lm_head")}
        missed = ", ".join(f"{k} {mean([m.get(k, 0.0) for m in r.missed]):.3f}/{v:.3f}"
                           for k, v in worst.items())
        return (f"per-token path | prompt {r.prompt_tokens} tok, prefill "
                f"{r.prefill_s * 1e3:.1f} ms | {len(r.token_ids)} new tok, decode "
                f"{r.decode_tokens_per_s:.1f} tok/s (batch {r.batch_size}) | "
                f"{mean(r.bytes_per_token) / 1e6:.3f} MB/token = {mean(r.densities):.3f} of "
                f"dense over {n} steps | missed (mean/worst step): {missed}{kv} | "
                f"stop: {r.finish_reason}")
    return (f"class {r.class_id} ({r.path} path) | prompt {r.prompt_tokens} tok, prefill "
            f"{r.prefill_s * 1e3:.1f} ms | {len(r.token_ids)} new tok, decode "
            f"{r.decode_tokens_per_s:.1f} tok/s (batch {r.batch_size}) | mean density "
            f"{mean(r.densities):.3f}, "
            f"{mean(r.bytes_per_token) / 1e6:.3f} MB/token over {n} steps | refinements "
            f"{len(r.refinements)} ({widened} widened){kv} | stop: {r.finish_reason}")


def _fraction(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"{option} must be a number in (0, 1], got {text!r}") from None


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # stdin closed or replaced by something odd
        return False


PATH_LABELS = {"dense": "dense model", "pertoken": "per-token path", "static": "routed class path"}


def compare_paths(session, prompt: str, gen: dict, stats: bool = False) -> dict:
    """`prompt` answered on the dense path and on the bundle's default path, each streamed
    under its name, then their decode tokens/s and weight bytes per token side by side.

    Both answers come from session.generate, the one decode loop of every path. Each path
    first decodes two untimed tokens, so one-time costs (first-call allocations, loading the
    CPU kernels) land in neither path's speed. Returns {path: Result}."""
    import torch
    from rich.console import Console
    from rich.table import Table

    results = {}
    for kind in ("dense", session.default_path):
        options = {**gen, "path": kind, "dense": False}
        session.generate(prompt, **{**options, "max_new_tokens": 2})
        click.echo(f"[{PATH_LABELS[kind]}]")
        results[kind] = session.generate(prompt, stream=lambda piece: click.echo(piece, nl=False),
                                         **options)
        click.echo("")
        if stats:
            click.echo(_stats_line(results[kind]), err=True)

    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    dense = results["dense"]
    dense_bytes = mean(dense.bytes_per_token)
    threads = torch.get_num_threads()
    table = Table(title=f"{len(dense.token_ids)} new tokens, {session.backend} backend, "
                        f"{threads} thread{'s' if threads != 1 else ''}")
    for col in ("path", "decode tok/s", "weight MB / token", "of dense", "tokens as dense"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for kind, r in results.items():
        same = next((i for i, (a, b) in enumerate(zip(r.token_ids, dense.token_ids)) if a != b),
                    min(len(r.token_ids), len(dense.token_ids)))  # common prefix
        table.add_row(PATH_LABELS[kind], f"{r.decode_tokens_per_s:.1f}",
                      f"{mean(r.bytes_per_token) / 1e6:.3g}",
                      f"{mean(r.bytes_per_token) / dense_bytes:.3f}",
                      f"{same}/{len(dense.token_ids)}")
    console = Console(width=None if sys.stdout.isatty() else 100)
    console.print(table)
    other = results[session.default_path]
    if dense.decode_tokens_per_s > 0 and dense_bytes > 0:
        console.print(f"{PATH_LABELS[session.default_path]}: "
                      f"{other.decode_tokens_per_s / dense.decode_tokens_per_s:.2f}x the dense "
                      f"decode speed, reading {mean(other.bytes_per_token) / dense_bytes:.2f} of "
                      f"its weight bytes per token", soft_wrap=True)
    return results


@click.command()
@click.argument("target")
@click.option("--prompt", help="Prompt text; the answer streams to stdout.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="JSON Lines prompts ({\"prompt\": ...} per line) to run as a batch.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, writable=True),
              help="Where a batch writes one JSON line per prompt (default: stdout).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1),
              help="With --input: decode up to N prompts routed to the same class together "
                   "(one forward per step); each prompt's output is what it gets alone.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True,
              type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--path", "path", type=click.Choice(["pertoken", "static", "dense"]), default=None,
              help="Decode path [default: pertoken when the bundle has one, else static]: "
                   "per-token sparse, the routed static class path, or dense.")
@click.option("--dense", is_flag=True, help="Same as --path dense.")
@click.option("--kv-budget", "kv_budget", default=None,
              help="Fraction of the prompt's KV positions kept for decode: attention sinks, a "
                   "recent window and the rest by SnapKV-like importance; the others are cut "
                   "from the cache [default: 1 = keep every position, the unreduced path; "
                   "with --budget: chosen for the prompt's length].")
@click.option("--prompt-keep", "prompt_keep", default="1.0", show_default=True,
              help="Fraction of the prompt's tokens kept before the prefill (LLMLingua-like: "
                   "sinks, a recent window and the rest by self-information under the model's "
                   "first quarter of layers); the prefill runs on the shorter prompt. Its "
                   "scoring time counts in the prefill time.")
@click.option("--budget", "budget", default=None,
              help="Total bytes per decode token, weights + KV, as a fraction of dense: split "
                   "between the per-token plan and the KV cache for each prompt's length by "
                   "the table the build calibrated (least predicted KL; --kv-budget fixes the "
                   "KV side by hand) [default: the bundle's plan, full KV].")
@click.option("--stats", is_flag=True, help="Print class, density, speed and bytes to stderr.")
@click.option("--compare", is_flag=True,
              help="Answer each prompt on the dense model and on the bundle's default path, "
                   "then print decode tokens/s and weight bytes per token side by side.")
@click.option("--verbose", is_flag=True,
              help="Also show third-party warnings (transformers, torch), hidden by default.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "torch", "triton", "onnxruntime"]),
              default="auto",
              show_default=True, help="auto = the CPU kernels on a CPU (per-token decode reads "
                                      "only the kept weights; torch if they cannot build), "
                                      "triton on a CUDA GPU (FFN kernels on the class path); "
                                      "onnxruntime = the bundle's ONNX export (made into the "
                                      "cache on first use), one prompt at a time.")
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False), default=None,
              help="With --backend onnxruntime: run this export directory (cscompile export "
                   "BUNDLE -o DIR) instead of the cached export; it must be from this bundle.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default=None,
              help="The per-token path's CPU kernels read int8 copies of the weights (one "
                   "scale per output: about half the bytes of bf16) or int4 blocks of 32 with "
                   "an fp16 scale and minimum (0.31 of bf16's bytes); different numbers "
                   "(default: the bundle's storage dtype).")
@friendly_errors
@hide_third_party_warnings  # consumes --verbose
def run(target, prompt, input_path, output_path, batch_size, max_new_tokens, temperature,
        top_p, seed, chat, path, dense, kv_budget, prompt_keep, budget, stats, compare, backend,
        onnx_dir, weights):
    """Generate text with TARGET: a bundle directory, or a model (named, HF dir) run dense.

    With --prompt the answer streams to stdout; with --input each prompt's result is one JSON
    line, in input order (--batch-size N batches prompts of the same class); with neither,
    each line of stdin is a prompt. --compare answers each prompt twice, dense and on the
    bundle's default path, and compares their speed and bytes.
    """
    from . import load
    from .kv_reduce import check_kv_budget, check_prompt_keep

    # before the model load
    kv_budget = None if kv_budget is None else check_kv_budget(_fraction("--kv-budget",
                                                                          kv_budget))
    prompt_keep = check_prompt_keep(_fraction("--prompt-keep", prompt_keep))
    if budget is not None:
        budget = _fraction("--budget", budget)
        if not 0 < budget <= 1:
            raise UserInputError(f"--budget must be in (0, 1], got {budget:g}")
        if batch_size > 1 or compare or dense or path not in (None, "pertoken"):
            raise UserInputError("--budget splits the per-token path's bytes for each prompt "
                                 "alone: it does not combine with --batch-size, --compare, "
                                 "--dense or --path static/dense")
        if backend == "onnxruntime":
            raise UserInputError("--budget runs on the torch or cpu backend, not --backend "
                                 "onnxruntime")
    if prompt is not None and input_path is not None:
        raise UserInputError("give either --prompt or --input, not both")
    if output_path is not None and input_path is None:
        raise UserInputError("--output needs --input (a batch of prompts)")
    if batch_size > 1 and input_path is None:
        raise UserInputError("--batch-size needs --input (a batch of prompts)")
    if compare and (input_path is not None or path is not None or dense):
        raise UserInputError("--compare picks the paths itself (dense and the bundle's "
                             "default) and takes --prompt or stdin, not --input, --path or "
                             "--dense")
    rows = None
    if input_path is not None:  # read the batch before the (slower) model load
        from cscompile.calib import read_prompts

        rows = read_prompts(input_path)
        if not rows:
            raise UserInputError(f"{input_path}: no prompts")
    if prompt is None and rows is None and _stdin_is_terminal():
        click.echo(STDIN_HINT, err=True)  # else the terminal just waits, saying nothing
    if onnx_dir is not None and backend != "onnxruntime":
        raise UserInputError("--onnx DIR runs an ONNX export: give --backend onnxruntime")
    session = load(target, backend=backend, weights=weights)
    if onnx_dir is not None:
        from .onnx_backend import use_export

        use_export(session, onnx_dir)
    if kv_budget is not None and kv_budget < 1 and backend == "onnxruntime":
        raise UserInputError("--kv-budget below 1 runs on the torch runtime, not --backend "
                             "onnxruntime")
    if compare and not session.is_bundle:
        raise UserInputError(f"--compare needs a bundle: {target} is a model, which runs "
                             f"dense only")
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
               chat=chat, dense=dense, path=path, kv_budget=kv_budget,
               **({"budget": budget} if budget is not None else {}),
               **({"prompt_keep": prompt_keep} if prompt_keep < 1 else {}))

    if rows is not None:
        out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
        try:
            # batch size 1: one prompt at a time, each line written as soon as it is done;
            # larger: generate_batch groups prompts by class, lines still in input order
            results = (session.generate(row.prompt, **gen) for row in rows) if batch_size == 1 \
                else session.generate_batch([row.prompt for row in rows], batch_size=batch_size,
                                            **gen)
            for row, r in zip(rows, results):
                line = {"prompt": row.prompt, **({"id": row.extra["id"]} if "id" in row.extra
                                                 else {}), **r.to_json()}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
                if stats:
                    click.echo(_stats_line(r), err=True)
        finally:
            if out is not sys.stdout:
                out.close()
        return

    prompts = [prompt] if prompt is not None else (l.rstrip("\n") for l in sys.stdin)
    for text in prompts:
        if prompt is None and not text.strip():
            continue
        if compare:
            compare_paths(session, text, gen, stats)
            continue
        r = session.generate(text, stream=lambda piece: click.echo(piece, nl=False), **gen)
        click.echo("")
        if stats:
            click.echo(_stats_line(r), err=True)
