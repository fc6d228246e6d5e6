"""`cscompile build`: calibration prompts -> task classes, class supports, a router -> a bundle.

Phases: read prompts -> load + analyze the model -> signatures of the build prompts (80%) ->
cluster into classes -> one hardware-constrained support per class -> permute FFN channels so
co-activated channels sit together (exact) -> fit the router, score it on the held-out 20% ->
write the bundle atomically.

Determinism: the same model, prompts, arguments and seed give a byte-identical bundle. So
nothing time- or machine-dependent goes into the bundle: build time, peak memory and the
router's timing cost are returned (and printed by the CLI with --json) under the "timing"
key of the report dict, but report.json inside the bundle holds only the deterministic
diagnostics (cluster scores, alignment with tasks, router accuracy, class densities).

Several ranks (cscompile.distributed: `workers=N` local ranks, or torchrun's): the calibration
forwards (signatures, router features and accuracy, the allocation's captures, menus,
sensitivities and decode KL) are sharded by prompt or fixed prompt chunk and reduced in global
order, so the bundle is byte-identical to one process's; the rest runs replicated on every
rank and rank 0 writes the bundle.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import distributed
from .bundle import to_jsonable, write_bundle
from .calib import dedupe_prompts, prompt_hash, read_prompts
from .errors import UserInputError
from .execute import Support, reduce_model
from .frontend import analyze, load_model, weight_hash
from .progress import bar as progress_bar, status as progress_status
from .safetensors_io import StreamedTensors
from .stream import state_items, stream_of

MIN_PROMPTS = 4
HOLDOUT_FRACTION = 0.2
LAYOUTS = ("gather", "compact")
# The per-token path's default budget, as a fraction of dense weight bytes read per decode
# token. Chosen for near-dense output (README, results/pertoken_quality_smollm2.md): on
# SmolLM2 it keeps WikiText perplexity within a few percent of dense and greedy chat answers
# read like the dense model's, where 0.5 already visibly degrades them.
DEFAULT_BUDGET = 0.7
ALLOC_PROMPTS = 32  # calibration prompts the allocation measures on (the rest: not needed)
ALLOC_TOKENS = 256  # per prompt
SPLIT_REPORT_LENGTHS = (128, 512, 1024, 2048, 4096)  # the report's split-by-length table


class _Phases:
    """Per-phase wall times and a ✓ line per phase on stderr; while a phase runs, a spinner or
    a bar (cscompile.progress: only where someone watches). progress=False: all quiet."""

    def __init__(self, progress: bool, group=distributed.SINGLE, status_dir=None):
        self.show = progress
        self.console = Console(stderr=True, quiet=not progress)
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}  # this process's CPU seconds per phase
        self.peak_rss: dict[str, float] = {}  # this process's peak RSS (MB) by each phase's end
        self.warnings: list[str] = []
        self.group, self.status_dir = group, status_dir

    def _enter(self, name: str):
        distributed.mark_phase(self.status_dir, self.group.rank, name)
        distributed.fail_hook(self.group, name)

    @contextmanager
    def phase(self, name: str):
        self._enter(name)
        t0, c0 = time.perf_counter(), time.process_time()
        with progress_status(f"{name} ...", show=self.show):
            yield
        self.times[name] = round(time.perf_counter() - t0, 4)
        self.cpu_times[name] = round(time.process_time() - c0, 3)
        self.peak_rss[name] = peak_rss_mb()
        self.console.print(f"[green]✓[/green] {name} ({self.times[name]:.2f} s)")

    @contextmanager
    def counted(self, name: str, total: int, unit: str):
        """A phase over `total` items (done / total, time left); yields advance()."""
        self._enter(name)
        t0, c0 = time.perf_counter(), time.process_time()
        with progress_bar(name, total, unit=unit, show=self.show) as advance:
            yield advance
        self.times[name] = round(time.perf_counter() - t0, 4)
        self.cpu_times[name] = round(time.process_time() - c0, 3)
        self.peak_rss[name] = peak_rss_mb()
        self.console.print(f"[green]✓[/green] {name} ({self.times[name]:.2f} s)")

    def warn(self, msg: str):
        self.warnings.append(msg)
        self.console.print(f"[yellow]warning:[/yellow] {msg}")


def run_build(model, calib, out, density=0.5, classes=None, max_classes=6, layout="gather",
              heads_keep=None, tile=64, seed=0, force=False, trust_pickle=False,
              progress=True, allocation="uniform", kv_groups=False, skip_layers=0,
              budget=None, max_kl=None, sketch_bits=3, pertoken=True, workers=1,
              stream=False) -> dict:
    """Build a bundle in `out`; return the build report (report.json + a "timing" section).

    The per-token path (the runtime's default) is allocated at `budget` (default
    DEFAULT_BUDGET) x dense bytes per token, or at the smallest budget whose held-out KL is at
    most `max_kl`; pertoken=False builds the static class paths only. `workers` > 1 runs the
    build on that many local ranks; a process started by torchrun (RANK / WORLD_SIZE set)
    joins torchrun's group instead. stream=True keeps the decoder layers on disk, one resident
    at a time (cscompile.stream). Either way the bundle is the one-process, in-memory bundle."""
    args = dict(model=model, calib=calib, out=out, density=density, classes=classes,
                max_classes=max_classes, layout=layout, heads_keep=heads_keep, tile=tile,
                seed=seed, force=force, trust_pickle=trust_pickle, progress=progress,
                allocation=allocation, kv_groups=kv_groups, skip_layers=skip_layers,
                budget=budget, max_kl=max_kl, sketch_bits=sketch_bits, pertoken=pertoken,
                stream=stream)
    workers = distributed.check_workers(workers)
    world = distributed.launched_world()
    if world is not None and world > 1:
        if workers not in (1, world):
            raise UserInputError(f"--workers {workers} with torchrun's WORLD_SIZE={world}: "
                                 f"torchrun starts the ranks, leave --workers out")
        rank = int(os.environ["RANK"])
        _check_build_args(args, writer=rank == 0)
        group = distributed.init_group(rank, world)
        try:
            return build_rank(group=group, **args)
        finally:
            distributed.leave_group()
    _check_build_args(args, writer=True)
    if workers == 1:
        return build_rank(**args)
    return distributed.spawn_ranks(workers, "cscompile.build:build_rank",
                                   {**args, "out": str(out), "calib": str(calib)})


def _check_build_args(a: dict, writer: bool) -> None:
    """Every refusal that needs no model, before any rank starts expensive work."""
    _check_args(a["density"], a["classes"], a["max_classes"], a["layout"], a["heads_keep"],
                a["tile"])
    budget, max_kl, bits = a["budget"], a["max_kl"], a["sketch_bits"]
    if budget is not None and max_kl is not None:
        raise UserInputError("give either --budget or --max-kl, not both")
    if budget is not None and not 0 < budget <= 1:
        raise UserInputError(f"--budget must be in (0, 1], got {budget}")
    if max_kl is not None and not max_kl >= 0:
        raise UserInputError(f"--max-kl must be >= 0, got {max_kl}")
    if bits not in (1, 2, 3, 4):
        raise UserInputError(f"--sketch-bits must be 1..4, got {bits}")
    if a["stream"] and a["layout"] == "compact":
        raise UserInputError("--stream writes the gather layout only (compact copies every "
                             "class's weights at once)")
    out = Path(a["out"])
    if writer and out.exists() and not a["force"]:  # refuse before any expensive work
        raise UserInputError(f"output directory {out} exists; pass --force to replace it")


def build_rank(model, calib, out, density, classes, max_classes, layout, heads_keep, tile,
               seed, force, trust_pickle, progress, allocation, kv_groups, skip_layers,
               budget, max_kl, sketch_bits, pertoken, stream=False, group=distributed.SINGLE,
               status_dir=None) -> dict:
    """The build as rank `group.rank` of `group.world` runs it (the whole build when world 1);
    arguments as run_build's, already checked. Rank 0 writes the bundle and returns the
    report; every rank returns it."""
    from .passes.cluster import alignment, cluster
    from .passes.lower import lower
    from .passes.constrain import (apply_permutation, channel_permutation, channel_profiles,
                                   class_support, core_scores, permute_support)
    from .passes.route import (default_layer, fit_router_features, route, router_cost,
                               router_features)
    from .passes.signature import prompt_signatures

    t_start = time.perf_counter()
    out = Path(out)
    ph = _Phases(progress and group.is_writer, group, status_dir)

    with ph.phase("reading prompts"):
        rows = read_prompts(calib)
        rows, dropped = dedupe_prompts(rows)
        if dropped:
            ph.warn(f"{calib}: dropped {dropped} duplicate prompt(s)")
        if len(rows) < MIN_PROMPTS:
            raise UserInputError(f"{calib}: need at least {MIN_PROMPTS} distinct prompts, "
                                 f"got {len(rows)}")
    with ph.phase("loading and analysing the model"):
        loaded = load_model(model, trust_pickle=trust_pickle, stream=stream)
        smap = analyze(loaded, tile=tile)
        source_hash = weight_hash(loaded.model)
        ids = _tokenize(loaded, rows, ph)

    build_idx, held_idx = _split(len(rows), seed)
    build_ids = [ids[i] for i in build_idx]
    held_ids = [ids[i] for i in held_idx]
    def signatures(prompts, advance):  # one row per prompt, each on the rank that owns it
        rows = group.map(len(prompts), lambda i: prompt_signatures(
            loaded.model, smap, [prompts[i]], on_prompt=advance)[0])
        return np.stack(rows) if rows else prompt_signatures(loaded.model, smap, [])

    with ph.counted(f"signatures of {len(build_ids)} build + {len(held_ids)} held-out prompts",
                    len(group.mine(len(build_ids))) + len(group.mine(len(held_ids))),
                    "prompts") as advance:
        sig = signatures(build_ids, advance)
        held_sig = signatures(held_ids, advance)
    with ph.phase("clustering into classes"):
        if classes is not None and classes > len(build_ids):
            raise UserInputError(f"--classes {classes} exceeds the {len(build_ids)} build prompts")
        clus = cluster(sig, n_classes=classes, max_classes=max_classes, seed=seed)
        tasks = [rows[i].task for i in build_idx]
        held_labels = clus.predict(held_sig)
    skipped, layer_costs = [], None
    if skip_layers:
        if skip_layers >= smap.n_layers:
            raise UserInputError(f"--skip-layers {skip_layers} must be below the model's "
                                 f"{smap.n_layers} layers")
        with ph.phase(f"measuring the cost of skipping each of {smap.n_layers} layers"):
            from .passes.measure import single_unit_costs

            layer_costs = single_unit_costs(loaded.model, smap, build_ids[:8], "layer")
            skipped = sorted(np.argsort(layer_costs, kind="stable")[:skip_layers].tolist())
    with ph.phase(f"class supports at density {density}"):
        core = core_scores(sig, clus.labels)
        supports = [class_support(smap, sig[clus.labels == c], density, core_importance=core,
                                  heads_keep=heads_keep, tile=tile, allocation=allocation,
                                  kv_groups=kv_groups, skip_layers=skipped)
                    for c in range(clus.k)]
    with ph.phase("permuting FFN channels"):
        perms = channel_permutation(channel_profiles(sig, smap), tile=tile, seed=seed)
        apply_permutation(loaded.model, smap, perms)
        supports = [permute_support(s, perms) for s in supports]
    with ph.phase("fitting the router"):
        layer = default_layer(smap)
        pooled = torch.cat(group.map(len(build_ids), lambda i: router_features(
            loaded.model, smap, [build_ids[i]], layer)))
        router = fit_router_features(pooled, clus.labels, layer, seed=seed)
        routed = group.map(len(held_ids), lambda i: route(loaded.model, smap, router,
                                                           held_ids[i]))
        held_acc = (float(np.mean(np.asarray(routed) == np.asarray(held_labels)))
                    if held_ids else None)
        train_acc = float((router.classify(pooled).numpy() == clus.labels).mean())
        cost = router_cost(loaded.model, smap, router, build_ids[:8], repeats=2)

    with ph.phase("calibrating per-token input-sparsity thresholds"):
        input_sparsity = _input_sparsity(loaded.model, smap, supports, build_ids[:16], seed)
    pertoken_json, sketch_tensors, pertoken_report = None, None, None
    if pertoken:
        pertoken_json, sketch_tensors, pertoken_report = _pertoken(
            loaded.model, smap, build_ids, held_ids, budget, max_kl, sketch_bits, seed, ph,
            group, loaded.context_length)

    classes_json = []
    for c, sup in enumerate(supports):
        kept = sup.kept_bytes(smap)
        classes_json.append({
            "id": c, "support": sup.to_json(), "density": kept / smap.prunable_bytes(),
            "bytes_kept": kept,
            "fraction_of_all_bytes": (kept + smap.unprunable_bytes()) / smap.total_bytes,
            "members": int((clus.labels == c).sum())})
    args = {"density": density, "classes": classes, "max_classes": max_classes, "layout": layout,
            "heads_keep": heads_keep, "tile": tile, "seed": seed, "allocation": allocation,
            "kv_groups": kv_groups, "skip_layers": skip_layers, "budget": budget,
            "max_kl": max_kl, "sketch_bits": sketch_bits, "pertoken": pertoken}
    # `stream` is left out: it changes where the weights wait, not the bundle
    manifest = {
        "kind": "cscompile-bundle",
        "source": {"model_id": loaded.model_id, "path": str(loaded.source),
                   "weight_hash": source_hash},
        "structure": smap.to_json(tile),
        "classes": classes_json,
        "router": {"file": "router.safetensors", "kind": "nearest-centroid",
                   "feature": "mean-pooled hidden state after layer, Gaussian projection",
                   "layer": router.layer, "dim": int(router.projection.shape[1]),
                   "n_classes": clus.k},
        "channel_permutation": {"applied": True, "tensors": "classes.safetensors:perm.layer{l}",
                                "meaning": "weights.safetensors FFN channel i = source channel "
                                           "perm[i]; class channel indices are post-permutation"},
        "refinement": {"enabled": False},
        "input_sparsity": input_sparsity,
        "pertoken": pertoken_json,
        "build_args": args,
        "calibration": {"file_sha256": _file_sha256(calib), "n_prompts": len(rows),
                        "n_build": len(build_idx), "n_held_out": len(held_idx),
                        "build_prompt_hashes": sorted(prompt_hash(rows[i].prompt)
                                                      for i in build_idx),
                        "held_out_prompt_hashes": sorted(prompt_hash(rows[i].prompt)
                                                         for i in held_idx)},
        "layout": layout,
        "versions": _versions(),
    }
    with ph.phase("lowering class supports to Triton kernels"):
        kernel_files, kernel_entries = lower(
            smap, supports, layout, "bfloat16" if smap.dtype == "bfloat16" else "float16", tile)
        for entry, cls in zip(kernel_entries, classes_json):
            cls["kernel"] = entry
    manifest["model_config"] = json.loads(loaded.model.config.to_json_string())
    tokenizer_files = _tokenizer_texts(loaded.tokenizer)
    manifest["tokenizer_files"] = sorted(tokenizer_files)
    # weights are stored in the source's storage dtype (bf16 for SmolLM2), not the fp32 we
    # compute in on CPU: the bundle is no bigger than the model it came from
    store = loaded.storage_dtype or next(loaded.model.parameters()).dtype
    weights, tied = _weights_file(loaded.model, store)
    manifest["tied_weights"] = tied
    manifest["weights_dtype"] = str(store).replace("torch.", "")
    tensors = {"weights.safetensors": weights,
               "router.safetensors": router.to_arrays(),
               "classes.safetensors": _class_tables(supports, perms)}
    if sketch_tensors:
        tensors["sketch.safetensors"] = sketch_tensors
    if layout == "compact":
        for c, sup in enumerate(supports):
            sliced = _dedup_tied(reduce_model(loaded.model, smap, sup).state_dict())[0]
            tensors[f"classes/c{c}.safetensors"] = {
                k: v.to(store) if v.is_floating_point() else v for k, v in sliced.items()}
    report = {
        "model_id": loaded.model_id,
        "n_classes": clus.k,
        "cluster": {"silhouette": {str(k): v for k, v in clus.silhouette.items()},
                    "chosen_k": clus.k,
                    "sizes": np.bincount(clus.labels, minlength=clus.k).tolist(),
                    "alignment_with_tasks": alignment(clus.labels, tasks),
                    "held_out_alignment_with_tasks": alignment(
                        held_labels, [rows[i].task for i in held_idx])},
        "router": {"layer": router.layer, "held_out_accuracy": held_acc,
                   "build_accuracy": train_acc, "n_held_out": len(held_idx)},
        "classes": [{k: v for k, v in c.items() if k != "support"} |
                    {"heads_per_layer": {str(l): len(h) for l, h in sorted(s.heads.items())},
                     "channels_per_layer": {str(l): len(h) for l, h in sorted(s.channels.items())}}
                    for c, s in zip(classes_json, supports)],
        "requested_density": density,
        "skipped_layers": skipped,
        "layer_skip_kl": None if layer_costs is None else [float(c) for c in layer_costs],
        "prunable_bytes": smap.prunable_bytes(), "total_bytes": smap.total_bytes,
        "pertoken": pertoken_report,
        "warnings": ph.warnings,
    }
    if group.is_writer:
        with ph.phase(f"writing bundle {out}"):
            write_bundle(out, manifest, tensors, report,
                         texts={**kernel_files, **tokenizer_files}, force=force)
    # the last collective: no rank reports success before the bundle is written
    usage = group.map(group.world, lambda r: (*_usage(), ph.cpu_times, ph.peak_rss))
    streamed = stream_of(loaded.model)
    timing = {"phases_s": ph.times, "build_s": round(time.perf_counter() - t_start, 3),
              "rank_phases_cpu_s": [u[2] for u in usage],
              "rank_peak_rss_by_phase_mb": [u[3] for u in usage],
              "peak_rss_mb": usage[0][0], "ranks": group.world, "rank": group.rank,
              "rank_peak_rss_mb": [u[0] for u in usage], "rank_cpu_s": [u[1] for u in usage],
              "router_cost": cost, "streamed": streamed is not None,
              "layer_reads": streamed.loads if streamed is not None else None,
              "layer_read_s": round(streamed.read_s, 2) if streamed is not None else None}
    return to_jsonable({**report, "bundle": str(out), "timing": timing})


def _usage() -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of this process: CPU time shows how the work split
    between ranks even on a machine whose other jobs stretch the wall time."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return peak_rss_mb(), round(u.ru_utime + u.ru_stime, 1)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, its own address space's high-water
    mark (ru_maxrss also carries the RSS of the parent a spawned process was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------- helpers
def _tokenizer_texts(tokenizer) -> dict[str, str]:
    """The tokenizer's text files (tokenizer.json, configs, chat template) for the bundle, so
    the runtime needs nothing but the bundle. Binary files (sentencepiece .model) are skipped:
    tokenizer.json carries the same vocabulary."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        texts = {}
        for f in sorted(Path(tmp).iterdir()):
            try:
                texts[f"tokenizer/{f.name}"] = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return texts


def _check_args(density, classes, max_classes, layout, heads_keep, tile):
    if not 0 < density <= 1:
        raise UserInputError(f"--density must be in (0, 1], got {density}")
    if classes is not None and classes < 1:
        raise UserInputError(f"--classes must be >= 1, got {classes}")
    if max_classes < 2:
        raise UserInputError(f"--max-classes must be >= 2, got {max_classes}")
    if layout not in LAYOUTS:
        raise UserInputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if heads_keep is not None and heads_keep < 1:
        raise UserInputError(f"heads_keep must be >= 1, got {heads_keep}")
    if tile < 1:
        raise UserInputError(f"--tile must be >= 1, got {tile}")


def _tokenize(loaded, rows, ph: _Phases) -> list[torch.Tensor]:
    tok = loaded.tokenizer
    if tok is None:
        raise UserInputError(f"model {loaded.model_id} has no tokenizer; build needs one to "
                             f"read text prompts")
    limit = loaded.context_length
    out = []
    for row in rows:
        ids = list(tok(row.prompt)["input_ids"])
        if not ids:
            raise UserInputError(f"line {row.line}: prompt tokenizes to nothing")
        if limit and len(ids) > limit:
            ph.warn(f"line {row.line}: prompt has {len(ids)} tokens, truncated to the model "
                    f"context of {limit}")
            ids = ids[:limit]
        out.append(torch.tensor(ids, dtype=torch.long).view(1, -1))
    return out


def _split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded 80/20 split of prompt indices (each part in file order)."""
    n_held = max(1, int(round(HOLDOUT_FRACTION * n)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_held:].tolist()), sorted(order[:n_held].tolist())


def _dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once (first name in sorted order); return {alias: stored name}."""
    tied = _tied_names(state)
    kept = {name: t.detach().contiguous().clone() for name, t in sorted(state.items())
            if name not in tied}
    return kept, tied


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first name in sorted order} of tensors sharing storage. A streamed model's
    unloaded weights each have a placeholder storage of their own, so this holds for it too."""
    tied, seen = {}, {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def _weights_file(model, store: torch.dtype) -> tuple[StreamedTensors, dict[str, str]]:
    """weights.safetensors, each tensor cast to the storage dtype as it is written (a
    layer-streamed model's one decoder layer at a time), tied tensors once; and the ties."""
    state = model.state_dict()
    tied = _tied_names(state)

    def stored(t):
        return store if t.is_floating_point() else t.dtype

    specs = {name: (stored(t), tuple(t.shape)) for name, t in state.items() if name not in tied}

    def produce():
        for name, t in state_items(model):
            if name not in tied:
                yield name, t.to(store) if t.is_floating_point() else t

    return StreamedTensors(specs, produce), tied


def _class_tables(supports: list[Support], perms: dict) -> dict[str, torch.Tensor]:
    """Per class, int32 index tables of kept channels and kept heads per layer."""
    out = {}
    for c, sup in enumerate(supports):
        for li, chans in sup.channels.items():
            out[f"class{c}.layer{li}.channels"] = torch.tensor(chans, dtype=torch.int32)
        for li, heads in sup.heads.items():
            out[f"class{c}.layer{li}.heads"] = torch.tensor(heads, dtype=torch.int32)
    for li, perm in perms.items():
        out[f"perm.layer{li}"] = torch.tensor(np.asarray(perm), dtype=torch.int32)
    return out


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _input_sparsity(model, smap, supports, prompts, seed) -> dict:
    """TEAL-like thresholds for the runtime's per-token input-sparsity path (refine mode
    "input"): |x| quantiles of every FFN's input (gate/up) and intermediate (down) that keep
    the fraction of FFN bytes the mean class keeps, so the two paths read equal bytes."""
    from .passes.support import estimate_support

    ffn = [li for li, layer in enumerate(smap.layers) if layer.ffn is not None]
    total = sum(smap.layers[li].ffn.width * smap.channel_bytes(li) for li in ffn)
    kept = np.mean([sum(len(s.channels.get(li, range(smap.layers[li].ffn.width)))
                        * smap.channel_bytes(li) for li in ffn if li in s.kept_layers(smap))
                    for s in supports])
    keep = float(min(1.0, max(kept / total, 1e-3)))
    est = estimate_support(model, smap, None, keep, method="teal", calib_prompts=prompts, seed=seed)
    return {"keep": keep, "calibration_prompts": len(prompts),
            "thresholds": {k: float(v) for k, v in est.info["thresholds"].items()}}


def _pertoken(model, smap, build_ids, held_ids, budget, max_kl, bits, seed, ph, group,
              context_length=None):
    """Sketch, allocate and check the per-token path, calibrate the weights/KV split
    (passes.split): (manifest section, sketch tensors, report section). Runs on the permuted
    weights the bundle stores. The manifest keeps the whole allocation path and the sketches
    any prefix of it reads, so the runtime can cut the plan a total budget leaves the weights."""
    from .passes.allocate import decode_kl, greedy_path, plan_at_kl, plan_for_budget
    from .passes.sketch import sketch
    from .passes.split import calibrate_split
    from .runtime.kv_reduce import choose_split, kv_position_bytes
    from .runtime.pertoken import PerToken, plan_bytes

    prompts = [ids.reshape(-1)[:ALLOC_TOKENS] for ids in build_ids[:ALLOC_PROMPTS]]
    held = [ids.reshape(-1)[:ALLOC_TOKENS] for ids in held_ids[:ALLOC_PROMPTS]] or prompts
    with ph.phase(f"sketching FFN and lm_head weights ({bits}-bit, rotated)"):
        sk = sketch(model, smap, bits=bits, group=64, seed=seed)
    with ph.counted(f"per-token operator menus on {len(prompts)} prompts",
                    3 * smap.n_layers, "parts") as advance:
        path, alloc_report = greedy_path(model, smap, prompts, sk, bits=bits, group=64,
                                         progress=advance, ranks=group)
    gc.collect()  # the menus' PerToken and its modules are a cycle holding sketch copies
    pt = PerToken(model, smap, path.start, sk)
    try:
        with ph.phase("allocating the byte budget"):
            if max_kl is not None:
                plan, steps, check = plan_at_kl(path, model, pt, held, max_kl, ranks=group)
            else:
                plan, steps = plan_for_budget(path, DEFAULT_BUDGET if budget is None else budget)
                pt.configure(plan)
                check = decode_kl(model, pt, held, ranks=group)
            nbytes = plan_bytes(plan, pt.shapes)
        with ph.phase("calibrating the weights/KV split by prompt length"):
            split = calibrate_split(model, pt, path, build_ids, held, context_length,
                                    kv_position_bytes(model, smap, pt.shapes.elsize),
                                    ranks=group)
    finally:
        pt.remove()
    total = budget if budget is not None else (
        DEFAULT_BUDGET if max_kl is None else nbytes["fraction"])
    by_length = []
    for n in SPLIT_REPORT_LENGTHS:
        if context_length and n >= context_length:
            break
        try:
            by_length.append({"prompt_tokens": n, **choose_split(split, total, n)})
        except UserInputError:
            by_length.append({"prompt_tokens": n, "kv_keep": None})
    used = _sketches_used(path, sk)
    ops = {}
    for layer in plan["layers"]:
        for part, cfg in layer.items():
            key = f"{part}:{cfg['op']}"
            ops[key] = ops.get(key, 0) + 1
    section = {"plan": plan, "sketch_file": "sketch.safetensors" if used else None,
               "bytes_per_token": nbytes["bytes"], "dense_bytes_per_token": nbytes["dense_bytes"],
               "fraction": nbytes["fraction"], "path": path.to_json(), "split": split,
               "total_budget": total}
    report = {"budget": budget if max_kl is None else None, "max_kl": max_kl,
              "fraction": nbytes["fraction"], "ffn_fraction": nbytes["ffn_fraction"],
              "lm_head_fraction": nbytes["lm_head_fraction"], "steps": steps,
              "path_steps": len(path.steps), "ops": ops, "held_out": check,
              "held_out_prompts": len(held), "split": {
                  "weights": split["weights"], "kv": split["kv"], "total_budget": total,
                  "by_prompt_length": by_length}, "sketch_bytes": sum(
                  t.numel() * t.element_size() for t in used.values()), **alloc_report}
    return section, used, report


def _sketches_used(path, sketches) -> dict:
    """Only the sketch tensors some plan of the path reads (the rest stay out of the bundle)."""
    keep = path.sketched_parts()
    return {k: v for k, v in sketches.items() if any(k.startswith(p) for p in keep)}


def _versions() -> dict:
    import numpy
    import sklearn
    import transformers

    from . import __version__

    return {"cscompile": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "sklearn": sklearn.__version__}
