"""Command line: click commands that call the library functions, nothing more.

Exit codes: 0 success, 2 bad input (CsError subclasses UserInputError), 1 failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserInputError, friendly_errors

err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cscompile")
def main():
    """cscompile: compile a causal LM + calibration prompts into task-specialised sparse paths."""


@main.command()
@click.argument("model")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, writable=True),
              help="Write the full StructureMap as JSON to this file ('-' for stdout).")
@click.option("--tile", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="FFN channel block size (tile) for block units.")
@click.option("--channels", is_flag=True, help="List every FFN channel as its own unit in --json.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a fully pickled model.pt (runs code from the file).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="For a bundle: write a per-layer support heat map (PNG) to this file.")
@friendly_errors
def inspect(model, json_out, tile, channels, trust_pickle, plot):
    """Print MODEL's prunable structure (heads, kv groups, FFN blocks, layers) and byte totals.

    MODEL is a named model (smollm2-135m), a Hugging Face directory, a .gguf file, or a
    model.pt / .pt2 file. Given a bundle directory, verifies its hashes and prints a summary.
    """
    from .frontend import analyze, load_model

    if (Path(model) / "manifest.json").exists() or (Path(model).is_dir() and not (Path(model) / "config.json").exists()
                                                    and any(Path(model).glob("*.safetensors"))):
        print_bundle_summary(model, Console(width=None if sys.stdout.isatty() else 150))
        if plot:
            from .plots import support_heatmap

            support_heatmap(model, plot)
            err_console.print(f"wrote {plot}")
        return
    with err_console.status(f"loading and tracing {model} ..."):
        loaded = load_model(model, trust_pickle=trust_pickle)
        smap = analyze(loaded, tile=tile)
    if json_out:
        text = json.dumps(smap.to_json(tile, channels=channels), indent=2, sort_keys=True)
        if json_out == "-":
            click.echo(text)
            return
        Path(json_out).write_text(text + "\n")
    print_structure(smap, tile, Console(width=None if sys.stdout.isatty() else 150))
    if json_out:
        err_console.print(f"wrote {json_out}")


@main.command()
@click.argument("model")
@click.option("--calib", required=True, type=click.Path(dir_okay=False),
              help="JSON Lines calibration prompts: one {\"prompt\": ..., \"task\": ...} per line.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Bundle directory to write (refused if it exists, unless --force).")
@click.option("--density", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of prunable bytes each class keeps.")
@click.option("--classes", type=click.IntRange(1), default=None,
              help="Number of task classes (default: chosen by silhouette).")
@click.option("--max-classes", default=6, show_default=True, type=click.IntRange(2),
              help="Largest number of classes considered when --classes is not given.")
@click.option("--layout", type=click.Choice(["gather", "compact"]), default="gather",
              show_default=True, help="gather: index tables over the dense weights; compact: "
                                      "also per-class sliced weights.")
@click.option("--tile", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="FFN channels are kept in multiples of this tile.")
@click.option("--heads-keep", type=click.IntRange(1), default=None,
              help="Keep exactly this many query heads per layer (default: heads compete for "
                   "the byte budget with FFN channels).")
@click.option("--kv-groups", is_flag=True, help="Keep attention heads in whole kv groups.")
@click.option("--skip-layers", default=0, show_default=True, type=click.IntRange(0),
              help="Drop this many whole layers: those whose removal alone costs least KL, "
                   "measured on build prompts.")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Per-token path: fraction of dense weight bytes each decode token reads, "
                   "measurement included [default: 0.7, near-dense output]. The build also "
                   "calibrates how `run --budget` splits a total (weights + KV) budget by "
                   "prompt length.")
@click.option("--max-kl", type=click.FloatRange(0), default=None,
              help="Per-token path: instead of --budget, the smallest budget whose KL to dense "
                   "on held-out calibration prompts is at most this.")
@click.option("--sketch-bits", default=3, show_default=True, type=click.IntRange(1, 4),
              help="Bits per weight of the rotated sketches that select FFN channels and "
                   "lm_head candidates.")
@click.option("--static-only", is_flag=True,
              help="Build the static class paths only (no per-token path).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for every random choice.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a fully pickled model.pt (runs code from the file).")
@click.option("--workers", default="1", show_default=True, metavar="N",
              help="Local ranks (processes) the calibration is sharded over, on "
                   "torch.distributed (gloo), each with torch's threads // N threads; the "
                   "bundle is byte-identical to --workers 1 run with as many threads "
                   "(e.g. OMP_NUM_THREADS=1 for both).")
@click.option("--stream", is_flag=True,
              help="Layer-streamed: keep the decoder layers in MODEL's safetensors and read "
                   "one at a time as the calibration flows through them (models larger than "
                   "memory; slower: each forward reads every layer). Same bundle.")
@click.option("--json", "json_out", is_flag=True, help="Print the build report as JSON on stdout.")
@friendly_errors
def build(model, calib, out, density, classes, max_classes, layout, tile, heads_keep,
          kv_groups, skip_layers, budget, max_kl, sketch_bits, static_only, seed, force,
          trust_pickle, workers, stream, json_out):
    """Compile MODEL + calibration prompts into a bundle: a per-token sparse path at one byte
    budget (the runtime's default), plus static task-class paths and a router.

    \b
    Several machines: start the same command on each under torchrun (env:// rendezvous;
    only rank 0 writes the bundle, on its machine), e.g. on 2 machines of 1 rank each:
      torchrun --nnodes 2 --node-rank R --nproc-per-node 1 \\
               --master-addr HOST0 --master-port 29500 \\
               --no-python cscompile build MODEL --calib data.jsonl -o bundle/
    with R = 0 on HOST0 and 1 on the other; every machine needs MODEL and the prompts file
    at the same paths. OMP_NUM_THREADS sets each rank's threads (keep it equal on all
    ranks: the bundle is byte-identical only for equal per-rank thread counts)."""
    from .build import run_build
    from .distributed import parse_workers

    report = run_build(model, calib, out, density=density, classes=classes,
                       max_classes=max_classes, layout=layout, heads_keep=heads_keep,
                       tile=tile, seed=seed, force=force, trust_pickle=trust_pickle,
                       progress=not json_out, kv_groups=kv_groups,
                       skip_layers=skip_layers, budget=budget, max_kl=max_kl,
                       sketch_bits=sketch_bits, pertoken=not static_only,
                       workers=parse_workers(workers), stream=stream)
    if report["timing"]["rank"] != 0:  # under torchrun: rank 0 speaks for the build
        return
    if json_out:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    print_bundle_summary(out, Console(width=None if sys.stdout.isatty() else 150))
    err_console.print(f"built in {report['timing']['build_s']:.1f} s")


@main.command("eval")
@click.argument("target")
@click.option("--data", type=click.Path(), default=None,
              help="A task JSONL, a WikiText raw file, a task folder, or a folder of task folders "
                   "(default with --suite: ../shared/data).")
@click.option("--suite", is_flag=True, help="Every task under --data (default ../shared/data), "
                                           "densities 0.75,0.5, tables and plot under results/.")
@click.option("--rows", default=8, show_default=True, type=click.IntRange(1),
              help="Evaluated rows per task (held out: never the bundle's build rows).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--densities", default=None, help="FFN densities for the baselines on a model "
              "target, e.g. 0.75,0.5 (a bundle sets its own). Default 0.5; --suite 0.75,0.5.")
@click.option("--methods", default=",".join(("magnitude", "wanda", "griffin", "teal", "cats",
                                               "random")), show_default=True,
              help="Baselines: magnitude, wanda, activation, griffin, teal, cats, oracle, random, "
                   "cs; 'none' for the dense model (and a bundle's own paths) only.")
@click.option("--windows", default=8, show_default=True, type=click.IntRange(1),
              help="WikiText-2 windows (perplexity of the last half).")
@click.option("--window", default=256, show_default=True, type=click.IntRange(8))
@click.option("--gen-tokens", default=32, show_default=True, type=click.IntRange(1),
              help="Dense greedy tokens scored on generative rows.")
@click.option("--calib-rows", default=4, show_default=True, type=click.IntRange(1),
              help="Rows per task for static baselines' calibration (disjoint from evaluated rows).")
@click.option("--widen-threshold", default="0.1", show_default=True,
              help="Bundle refinement: widen a token to dense at this off-support energy "
                   "(comma list: one refined path each, e.g. 0.5,0.3,0.1).")
@click.option("--inter-keep", default="1.0", show_default=True,
              help="Bundle refinement: fraction of the class's channels a token keeps (comma list).")
@click.option("--include-build-rows", is_flag=True,
              help="Do not leave out rows whose prompt built the bundle (not recommended).")
@click.option("--chat", is_flag=True,
              help="Generative rows: wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("-o", "--out", type=click.Path(file_okay=False), default=None,
              help="Folder for eval.json / eval.md / eval.png (default: results/ with --suite, "
                   "else print only).")
@friendly_errors
def eval_cmd(target, data, suite, rows, seed, densities, methods, windows, window, gen_tokens,
             calib_rows, widen_threshold, inter_keep, include_build_rows, chat, threads, out):
    """Quality of TARGET (bundle or model) vs its dense model and the baselines, side by side."""
    import torch

    from .evaluate import markdown, run_eval, suite_data_dir, write_report
    from .runtime.refine import RefineConfig

    if threads:
        torch.set_num_threads(threads)
    if data is None:
        if not suite:
            raise UserInputError("give --data FILE_OR_DIR (or --suite for ../shared/data)")
        data = suite_data_dir()
    dens = _floats("--densities", densities or ("0.75,0.5" if suite else "0.5"))
    refines = [RefineConfig(1, w, k) for w in _floats("--widen-threshold", widen_threshold)
               for k in _floats("--inter-keep", inter_keep)]
    report = run_eval(target, data, rows=rows, seed=seed, densities=dens,
                      methods=[m for m in methods.split(",") if m], windows=windows, window=window,
                      gen_tokens=gen_tokens, calib_rows=calib_rows,
                      refine=refines,
                      include_build_rows=include_build_rows, progress=True, chat=chat)
    click.echo(markdown(report))
    out = out or ("results" if suite else None)
    if out:
        stem = "eval_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in report["model"])
        for path in write_report(report, Path(out), stem):
            err_console.print(f"wrote {path}")
    if not report["checks"].get("full_path_equals_dense", True):
        raise click.ClickException("the full-density bundle path does not equal the dense model")


def _floats(option: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserInputError(f"{option} must be comma-separated numbers, got {text!r}") from None


def print_bundle_summary(path, console: Console) -> None:
    """Verify a bundle's hashes and print its classes, densities and sizes."""
    from .bundle import load_bundle

    bundle = load_bundle(path)  # raises BundleError on tampering or version mismatch
    man, rep = bundle.manifest, bundle.report
    if man.get("kind") == "cscompile-onnx-export":  # written by cscompile export
        from .export_onnx import print_export_summary

        return print_export_summary(bundle, console)
    sizes = {name: info["bytes"] for name, info in man["files"].items()}
    console.print(f"bundle {path}: model {man['source'].get('model_id')} "
                  f"(weights sha256 {str(man['source'].get('weight_hash'))[:12]}...), "
                  f"format {man['format_version']}, cscompile {man['cscompile_version']}, "
                  f"{sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files — hashes verified")
    table = Table(title="task classes")
    for col in ("class", "members", "density (prunable)", "of all bytes", "kept MB"):
        table.add_column(col, justify="right")
    for c in man["classes"]:
        table.add_row(str(c.get("id")), str(c.get("members", c.get("n_members", ""))),
                      f"{c.get('density', 0):.3f}", f"{c.get('fraction_of_all_bytes', 0):.3f}",
                      f"{c.get('bytes_kept', 0) / 1e6:.2f}")
    console.print(table)
    align = (rep.get("cluster") or {}).get("alignment_with_tasks")
    if align:
        console.print(f"class/task alignment: {json.dumps(align, sort_keys=True)[:300]}")
    router = rep.get("router")
    if router:
        console.print(f"router: {json.dumps(router, sort_keys=True)[:300]}")
    split = (rep.get("pertoken") or {}).get("split")
    if split:
        table = Table(title=f"run --budget {split['total_budget']:g}: the weights/KV split "
                            f"by prompt length (predicted)")
        for col in ("prompt tokens", "weight budget", "KV keep", "predicted KL", "note"):
            table.add_column(col, justify="right")
        for r in split["by_prompt_length"]:
            if r.get("kv_keep") is None:
                table.add_row(str(r["prompt_tokens"]), "", "", "", "unreachable")
                continue
            table.add_row(str(r["prompt_tokens"]), f"{r['weight_budget']:.3f}",
                          f"{r['kv_keep']:g}", f"{r['predicted_kl']:.4f}",
                          "beyond calibrated lengths" if r["extrapolated"] else "")
        console.print(table)


def print_structure(smap, tile: int, console: Console) -> None:
    table = Table(title=f"{smap.model_id} — {smap.architecture}, {smap.n_layers} layers, "
                        f"{smap.dtype}, FFN tile {tile}")
    for col in ("layer", "module", "heads", "kv groups", "head dim", "attn MB", "FFN",
                "width", f"blocks/{tile}", "FFN MB", "layer MB"):
        table.add_column(col, justify="right" if col not in ("module", "FFN") else "left")
    mb = lambda b: f"{b / 1e6:.3f}"  # noqa: E731
    for r in smap.summary_rows(tile):
        table.add_row(str(r["layer"]), r["module"], str(r["heads"]), str(r["kv_groups"]),
                      str(r["head_dim"]), mb(r["attn_bytes"]), r["ffn_kind"], str(r["ffn_width"]),
                      str(r["ffn_blocks"]), mb(r["ffn_bytes"]), mb(r["layer_bytes"]))
    console.print(table)
    prunable, unprunable = smap.prunable_bytes(), smap.unprunable_bytes()
    console.print(f"model bytes {smap.total_bytes:,} = prunable (heads + kv groups + FFN channels) "
                  f"{prunable:,} + unprunable {unprunable:,} "
                  f"({prunable / smap.total_bytes:.1%} prunable)")
    for note in smap.unidentified:
        console.print(f"[yellow]left dense:[/yellow] {note}")


from cscompile.runtime.cli_run import run  # noqa: E402

main.add_command(run)
from cscompile.bench import bench  # noqa: E402
main.add_command(bench)
from cscompile.export_onnx import export  # noqa: E402
main.add_command(export)
from cscompile.runtime.cli_serve import serve  # noqa: E402
main.add_command(serve)

if __name__ == "__main__":  # pragma: no cover
    main()
