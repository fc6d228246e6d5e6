"""`cscompile run`: generate from a bundle (routed class paths) or a plain model (dense).

Registered in cscompile/cli.py with `main.add_command(run)`.
"""

from __future__ import annotations

import json
import sys

import click

from cscompile.errors import friendly_errors
from cscompile.errors import UserInputError


def _refine_config(refine_every, widen_threshold, inter_keep, refine_mode=None,
                   switch_every=None):
    from .refine import RefineConfig

    if refine_every is None and widen_threshold is None and inter_keep is None \
            and refine_mode is None and not switch_every:
        return None
    defaults = RefineConfig()
    if widen_threshold is None:  # input mode is its own path: widen only when asked
        widen_threshold = float("inf") if refine_mode == "input" else defaults.widen_threshold
    return RefineConfig(every=refine_every or defaults.every, widen_threshold=widen_threshold,
                        inter_keep=defaults.inter_keep if inter_keep is None else inter_keep,
                        mode=refine_mode or "class", switch_every=switch_every or 0)


def _stats_line(r) -> str:
    n = len(r.densities)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    widened = sum(1 for x in r.refinements if x["action"] == "widen")
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
@click.option("--dense", is_flag=True, help="Decode on the dense model (no class path).")
@click.option("--stats", is_flag=True, help="Print class, density, speed and bytes to stderr.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto",
              show_default=True, help="auto = triton on a CUDA GPU (FFN decode kernels on the "
                                      "class path), torch elsewhere.")
@click.option("--refine-every", type=click.IntRange(1), default=None,
              help="Refine the FFN support every r decode tokens (turns refinement on).")
@click.option("--widen-threshold", type=click.FloatRange(0), default=None,
              help="Widen a refined token to dense when its off-support energy fraction "
                   "reaches this (0 = always dense, inf = never refine; default 0.1).")
@click.option("--refine-mode", type=click.Choice(["class", "input"]), default=None,
              help="class: refine inside the class's channels; input: TEAL-like per-token input "
                   "sparsity on the dense weights at the class's bytes (turns refinement on).")
@click.option("--switch-every", type=click.IntRange(1), default=None,
              help="Re-route every s decode tokens and switch class when another fits better "
                   "(turns refinement on).")
@click.option("--inter-keep", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fraction of the class's FFN channels a refined token keeps (default 1).")
@friendly_errors
def run(target, prompt, input_path, output_path, batch_size, max_new_tokens, temperature,
        top_p, seed, chat, dense, stats, backend, refine_every, widen_threshold, refine_mode,
        switch_every, inter_keep):
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
    refine = _refine_config(refine_every, widen_threshold, inter_keep, refine_mode, switch_every)
    rows = None
    if input_path is not None:  # read the batch before the (slower) model load
        from cscompile.calib import read_prompts

        rows = read_prompts(input_path)
        if not rows:
            raise UserInputError(f"{input_path}: no prompts")
    session = load(target, backend=backend)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
               chat=chat, dense=dense, refine=refine)

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
