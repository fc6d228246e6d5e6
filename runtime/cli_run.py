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

from cscompile.errors import friendly_errors
from cscompile.errors import UserInputError


def _stats_line(r) -> str:
    n = len(r.densities)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    widened = sum(1 for x in r.refinements if x["action"] == "widen")
    if r.path == "pertoken":
        worst = {k: max((m.get(k, 0.0) for m in r.missed), default=0.0)
                 for k in ("qkv", "o", "ffn", "lm_head")}
        missed = ", ".join(f"{k} {mean([m.get(k, 0.0) for m in r.missed]):.3f}/{v:.3f}"
                           for k, v in worst.items())
        return (f"per-token path | prompt {r.prompt_tokens} tok, prefill "
                f"{r.prefill_s * 1e3:.1f} ms | {len(r.token_ids)} new tok, decode "
                f"{r.decode_tokens_per_s:.1f} tok/s (batch {r.batch_size}) | "
                f"{mean(r.bytes_per_token) / 1e6:.3f} MB/token = {mean(r.densities):.3f} of "
                f"dense over {n} steps | missed (mean/worst step): {missed} | "
                f"stop: {r.finish_reason}")
    return (f"class {r.class_id} ({r.path} path) | prompt {r.prompt_tokens} tok, prefill "
            f"{r.prefill_s * 1e3:.1f} ms | {len(r.token_ids)} new tok, decode "
            f"{r.decode_tokens_per_s:.1f} tok/s (batch {r.batch_size}) | mean density "
            f"{mean(r.densities):.3f}, "
            f"{mean(r.bytes_per_token) / 1e6:.3f} MB/token over {n} steps | refinements "
            f"{len(r.refinements)} ({widened} widened) | stop: {r.finish_reason}")


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
@click.option("--stats", is_flag=True, help="Print class, density, speed and bytes to stderr.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "torch", "triton"]), default="auto",
              show_default=True, help="auto = the CPU kernels on a CPU (per-token decode reads "
                                      "only the kept weights; torch if they cannot build), "
                                      "triton on a CUDA GPU (FFN kernels on the class path).")
@friendly_errors
def run(target, prompt, input_path, output_path, batch_size, max_new_tokens, temperature,
        top_p, seed, chat, path, dense, stats, backend):
    """Generate text with TARGET: a bundle directory, or a model (named, HF dir) run dense.

    With --prompt the answer streams to stdout; with --input each prompt's result is one JSON
    line, in input order (--batch-size N batches prompts of the same class); with neither,
    each line of stdin is a prompt.
    """
    from . import load

    if prompt is not None and input_path is not None:
        raise UserInputError("give either --prompt or --input, not both")
    if output_path is not None and input_path is None:
        raise UserInputError("--output needs --input (a batch of prompts)")
    if batch_size > 1 and input_path is None:
        raise UserInputError("--batch-size needs --input (a batch of prompts)")
    rows = None
    if input_path is not None:  # read the batch before the (slower) model load
        from cscompile.calib import read_prompts

        rows = read_prompts(input_path)
        if not rows:
            raise UserInputError(f"{input_path}: no prompts")
    session = load(target, backend=backend)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
               chat=chat, dense=dense, path=path)

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
        r = session.generate(text, stream=lambda piece: click.echo(piece, nl=False), **gen)
        click.echo("")
        if stats:
            click.echo(_stats_line(r), err=True)
