"""`--backend onnxruntime`: a bundle's decode paths run as their ONNX export on onnxruntime.

The export (cscompile.export_onnx) is made on first use into the cache,
`<cache>/onnx/<path>-<key>`, the key hashing the bundle's manifest seal, the path and the
library versions that shape the bytes; later runs verify every file's sha256 and reuse it, and
a cache entry that fails verification is exported again. A cache, not a user-kept export
directory, because an export is a pure function of (bundle, path, versions): a content-keyed
cache can never pair a rebuilt bundle with a stale export, and `cscompile run BUNDLE --backend
onnxruntime` works on its own, as the CPU kernels and the model conversion are built once and
cached. `cscompile export` writes the same directory wherever a deployment wants it.

Decoding is runtime.generate's, step for step: the prompt is prefilled dense on step.onnx, the
router classifies its `router_feature`, and every later token runs on the path's graph (the
dense step, the class's reduced graph with the prefill cache sliced by runtime.generate's
slice_cache, or the per-token graph); tokens come from runtime.generate.sample. Batches decode
one prompt at a time (the graphs are batch 1). Providers: CUDAExecutionProvider first where
the installed onnxruntime has it (onnxruntime-gpu), else the CPU provider; intra-op threads =
torch.get_num_threads().
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import torch

from cscompile.errors import BundleError, UserInputError

from .generate import (Result, _eos_ids, _prompt_ids, _Streamer, _check_args, path_kind,
                       sample, slice_cache)


def available() -> tuple[bool, str]:
    from cscompile.export_onnx import require_onnx

    try:
        require_onnx()  # the export runs in this process on first use
    except UserInputError as e:
        return False, str(e)
    return True, ""


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []) + \
        ["CPUExecutionProvider"]


def ort_session(file, threads: int | None = None):
    """An InferenceSession on `file` (full graph optimisation, sequential execution)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers are not the user's business
    try:
        return ort.InferenceSession(str(file), so, providers=providers())
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"onnxruntime cannot load {file}: {first[:300]}") from None


# ----------------------------------------------------------------------------- exports
def export_key(bundle_seal: str, path: str) -> str:
    import onnx
    import onnxscript
    import transformers

    import cscompile
    from cscompile.export_onnx import EXPORT_VERSION, OPSET

    parts = [bundle_seal, path, cscompile.__version__, EXPORT_VERSION, OPSET, torch.__version__,
             onnx.__version__, onnxscript.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def load_export(directory, bundle_seal: str | None = None):
    """A verified export directory (cscompile.bundle.Bundle), refused in one line when it is
    modified, incomplete, not an export, or made from another bundle."""
    from cscompile.bundle import load_bundle
    from cscompile.export_onnx import EXPORT_VERSION, KIND

    try:
        export = load_bundle(directory)
    except BundleError as e:
        raise BundleError(f"ONNX export {directory}: {e}") from None
    man = export.manifest
    if man.get("kind") != KIND or man.get("export_version") != EXPORT_VERSION:
        raise BundleError(f"{directory} is not a cscompile ONNX export (version "
                          f"{EXPORT_VERSION}); export it again")
    if bundle_seal is not None and man.get("bundle", {}).get("manifest_sha256") != bundle_seal:
        raise BundleError(f"ONNX export {directory} was made from another bundle")
    graphs = man.get("graphs")
    if not isinstance(man.get("paths"), list) or not isinstance(graphs, dict) or \
            "step" not in graphs or any(
            not isinstance(g, dict) or not export.has(g.get("file", "")) for g in graphs.values()):
        raise BundleError(f"ONNX export {directory}: malformed graph table")
    return export


def _bundle_seal(session) -> str:
    from cscompile.bundle import load_bundle

    return load_bundle(session.source, verify=False).manifest["manifest_sha256"]


def _entry(path: str, classes: list[int] | None) -> str:
    return path if classes is None else f"{path}-classes-{'_'.join(map(str, classes))}"


def ensure_export(session, path: str, note=None, classes: list[int] | None = None):
    """The verified cached export of `session`'s `path` (made now if absent or corrupt).
    `classes`: only these classes' graphs (bench --classes); None: every class."""
    from cscompile.export_onnx import export_session
    from cscompile.models import cache_root

    note = note or (lambda text: print(f"cscompile: {text}", file=sys.stderr))
    seal = _bundle_seal(session)
    root = cache_root() / "onnx"
    name = _entry(path, classes)
    directory = root / f"{name}-{export_key(seal, name)}"
    # an export of every path ("all") holds this path too; the dense path needs only
    # step.onnx, which every export holds
    held = [name] + ([_entry("all", classes)] if path != "all" else []) + \
        (["pertoken", "static", "all"] if path == "dense" else [])
    for candidate in (root / f"{h}-{export_key(seal, h)}" for h in held):
        if candidate.exists():
            try:
                return load_export(candidate, seal)
            except BundleError as e:
                note(f"cached ONNX export unusable ({e}); exporting again")
    t0 = time.perf_counter()
    what = "every path" if path == "all" else f"the {path} path"
    note(f"exporting {what} to ONNX in {directory} (once per bundle) ...")
    export_session(session, directory, path, classes, force=True)
    note(f"exported in {time.perf_counter() - t0:.0f} s")
    return load_export(directory, seal)


class OnnxPaths:
    """Per session: each path's verified export and its onnxruntime sessions (lazily).
    `fixed`: an export directory the user gave (run --onnx DIR), used instead of the cache."""

    def __init__(self, session, fixed=None):
        self.session, self.fixed = session, fixed
        self.exports: dict[str, object] = {}
        self.graphs: dict[tuple[str, str], tuple] = {}

    def export(self, path: str):
        if self.fixed is not None:
            held = self.fixed.manifest["paths"]
            if path not in held:  # every export holds the dense step graph
                raise UserInputError(f"ONNX export {self.fixed.path} holds the "
                                     f"{' and '.join(held)} path{'s' * (len(held) > 1)}, "
                                     f"not {path}: run it with --path {held[-1]}")
            return self.fixed
        if path not in self.exports:
            self.exports[path] = ensure_export(self.session, path)
        return self.exports[path]

    def graph(self, path: str, name: str):
        """(ort session, manifest entry) of graph `name` of `path`'s export."""
        export = self.export(path)
        key = (str(export.path), name)  # paths sharing an export share its sessions
        if key not in self.graphs:
            entry = export.manifest["graphs"].get(name)
            if entry is None:
                raise BundleError(f"ONNX export {export.path} has no graph {name}")
            self.graphs[key] = (ort_session(export.path / entry["file"]), entry)
        return self.graphs[key]


def paths_of(session) -> OnnxPaths:
    if getattr(session, "onnx", None) is None:
        session.onnx = OnnxPaths(session)
    return session.onnx


def use_export(session, directory) -> None:
    """Run `session` on the export in `directory` (verified, and made from this bundle)."""
    session.onnx = OnnxPaths(session, load_export(directory, _bundle_seal(session)))


# ----------------------------------------------------------------------------- steps
def run_step(sess, entry, ids: np.ndarray, past: list[np.ndarray]) -> dict:
    """One graph call: {output name: array}; past in the graph's layer order."""
    feeds = {"input_ids": ids}
    feeds.update(zip(entry["inputs"][1:], past))
    return dict(zip(entry["outputs"], sess.run(None, feeds)))


def presents(out: dict, entry) -> list[np.ndarray]:
    return [out[name] for name in entry["outputs"] if name.startswith("present.")]


def empty_past(entry) -> list[np.ndarray]:
    d = entry["head_dim"]
    return [np.zeros((1, h, 0, d), np.float32) for h in entry["kv_heads"] for _ in range(2)]


def slice_past(session, past: list[np.ndarray], class_id: int) -> list[np.ndarray]:
    """The dense prefill cache cut to the kv heads class `class_id` keeps, by the runtime's
    own slice_cache (so the layout is the one the class's reduced model was exported with)."""
    from transformers import DynamicCache

    from cscompile.export_onnx import layer_ids

    cache = DynamicCache(config=session.model.config)
    ids = layer_ids(session)
    for j, idx in enumerate(ids):
        cache.update(torch.from_numpy(past[2 * j]), torch.from_numpy(past[2 * j + 1]), idx)
    cut = slice_cache(cache, session.model, session.smap, session.classes[class_id].support)
    return [t.numpy() for idx in ids for t in (cut.layers[idx].keys, cut.layers[idx].values)]


def decode_graph(session, path: str, class_id: int | None):
    """(ort session, entry) of the graph that runs `path`'s decode steps."""
    onnx = paths_of(session)
    if path == "static":
        export = onnx.export(path)
        if f"class_{class_id}" not in export.manifest["graphs"]:
            held = ", ".join(str(c) for c in export.manifest.get("classes", []))
            raise UserInputError(f"ONNX export {export.path} holds class {held} only; this "
                                 f"prompt routes to class {class_id} (export without --class "
                                 f"to run every class)")
        return onnx.graph(path, f"class_{class_id}")
    return onnx.graph(path, "pertoken" if path == "pertoken" else "step")


def _step_accounting(session, path: str, class_id: int | None) -> tuple[float, int]:
    """(density, weight bytes) a decode step of `path` is charged, as runtime.generate does."""
    smap = session.smap
    if path == "pertoken":
        nb = session.pertoken.bytes()
        return nb["fraction"], int(round(nb["bytes"]))
    if path == "static":
        sup = session.classes[class_id].support
        return session.classes[class_id].density, smap.unprunable_bytes() + sup.kept_bytes(smap)
    return 1.0, smap.total_bytes


# ----------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(session, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False,
             dense: bool = False, refine=None, stream=None, path: str | None = None) -> Result:
    """runtime.generate.generate on the exported graphs (see the module docstring)."""
    if refine is not None and getattr(refine, "active", True):
        raise UserInputError("refinement runs on torch only; drop it or use another backend")
    onnx = paths_of(session)
    if path is None and not dense and onnx.fixed is not None:
        held = onnx.fixed.manifest["paths"]  # a given export runs a path it holds
        path = session.default_path if session.default_path in held else held[-1]
    kind = path_kind(session, path, dense)
    _check_args(max_new_tokens, temperature, top_p)
    step, step_entry = onnx.graph(kind, "step")
    ids = _prompt_ids(session, prompt, chat)

    t0 = time.perf_counter()
    out = run_step(step, step_entry, np.array([ids], dtype=np.int64), empty_past(step_entry))
    past = presents(out, step_entry)
    class_id = int(session.router.classify(torch.from_numpy(out["router_feature"]))[0])
    if kind == "static":
        past = slice_past(session, past, class_id)
    prefill_s = time.perf_counter() - t0
    dec, dec_entry = decode_graph(session, kind, class_id)
    density, step_bytes = _step_accounting(session, kind, class_id)

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos, ctx = _eos_ids(session), session.context_length
    streamer = _Streamer(session.tokenizer, stream)
    generated, missed, energy = [], [], []
    finish = "length"
    t1 = time.perf_counter()
    token = sample(torch.from_numpy(out["logits"][0]), temperature, top_p, gen)
    for _ in range(max_new_tokens):
        generated.append(token)
        streamer.push(generated)
        if token in eos:
            finish = "eos"
            break
        if len(generated) == max_new_tokens:
            break
        if ctx and len(ids) + len(generated) >= ctx:
            finish = "context"
            break
        out = run_step(dec, dec_entry, np.array([[token]], dtype=np.int64), past)
        past = presents(out, dec_entry)
        m = {name.split(".", 1)[1]: float(v.reshape(-1)[-1]) for name, v in out.items()
             if name.startswith("missed.")}
        if kind == "pertoken":
            missed.append(m)
        energy.append(1.0 - m.get("ffn", 0.0) if kind == "pertoken" else
                      None if kind == "static" else 1.0)
        token = sample(torch.from_numpy(out["logits"][0]), temperature, top_p, gen)
    decode_s = time.perf_counter() - t1
    n = len(energy)
    return Result(
        text=session.tokenizer.decode(generated, skip_special_tokens=True),
        token_ids=generated, prompt_tokens=len(ids), class_id=class_id,
        path="class" if kind == "static" else kind, densities=[density] * n, energy=energy,
        bytes_per_token=[step_bytes] * n, refinements=[], prefill_s=prefill_s,
        decode_s=decode_s, tokens_per_s=len(generated) / max(prefill_s + decode_s, 1e-9),
        decode_tokens_per_s=n / decode_s if n and decode_s > 0 else 0.0,
        finish_reason=finish, batch_size=1, missed=missed)


def generate_batch(session, prompts: list[str], batch_size: int = 8, stream=None,
                   **kwargs) -> list[Result]:
    """One prompt at a time (the exported graphs are batch 1); results in input order."""
    if isinstance(prompts, str):
        raise UserInputError("generate_batch takes a list of prompts, not one string")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i, prompt in enumerate(prompts):
        piece = None if stream is None else (lambda text, i=i: stream(i, text))
        out.append(generate(session, prompt, stream=piece, **kwargs))
    return out


# ----------------------------------------------------------------------------- bench
def time_path(session, path: str, class_id: int | None, ids: torch.Tensor, new_tokens: int,
              repeats: int, warmup: int) -> dict:
    """cscompile.bench's timing loop on the exported graphs: per run, a dense prefill on
    step.onnx (with the class's cache slice), then `new_tokens` greedy decode steps."""
    from cscompile.bench import _stats

    onnx = paths_of(session)
    step, step_entry = onnx.graph(path, "step")
    dec, dec_entry = decode_graph(session, path, class_id) if path != "dense" else (step, step_entry)
    prompt = ids.numpy().astype(np.int64)
    prefill_ms, tok_s, step_ms = [], [], []
    for run in range(warmup + repeats):
        t0 = time.perf_counter()
        out = run_step(step, step_entry, prompt, empty_past(step_entry))
        past = presents(out, step_entry)
        if path == "static":
            past = slice_past(session, past, class_id)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            tok = out["logits"].argmax(-1).reshape(1, 1).astype(np.int64)
            out = run_step(dec, dec_entry, tok, past)
            past = presents(out, dec_entry)
        out["logits"].argmax(-1)
        t2 = time.perf_counter()
        if run >= warmup:
            prefill_ms.append((t1 - t0) * 1e3)
            tok_s.append(new_tokens / (t2 - t1))
            step_ms.append((t2 - t1) * 1e3 / new_tokens)
    return {"prefill_ms": _stats(prefill_ms), "decode_tok_s": _stats(tok_s),
            "step_ms": _stats(step_ms)}


def bench_rows(session, prompts: dict, thread_counts: list, batch_sizes: list[int],
               class_ids: list[int], new_tokens: int, repeats: int, warmup: int,
               torch_rows: list[dict]) -> list[dict]:
    """cscompile bench's rows for the onnxruntime backend: the dense step graph, each class's
    reduced graph and the per-token graph (masks, so it reads every weight), in the same
    schema as bench's torch rows; `speedup` is against the torch dense row of the same threads
    and batch. The graphs are batch 1: other batch sizes get a skipped row."""
    from cscompile.bench import touched_bytes

    smap = session.smap
    paths = ["dense", "static"] + (["pertoken"] if session.pertoken is not None else [])
    export = ensure_export(session, "all", classes=class_ids)
    dense_fp32 = touched_bytes(session.model)
    runs = [("dense (onnxruntime)", "dense", None, smap.total_bytes, dense_fp32)]
    for c in class_ids:
        sup = session.classes[c].support
        runs.append((f"class {c} (onnxruntime)", "static", c,
                     smap.unprunable_bytes() + sup.kept_bytes(smap),
                     dense_fp32 * (smap.unprunable_bytes() + sup.kept_bytes(smap))
                     / smap.total_bytes))
    if "pertoken" in paths:  # masks over every weight, plus the fp32 sketches
        sketch = sum(e["bytes"] for f, e in export.manifest["files"].items()
                     if f == "pertoken.onnx.data") - sum(
            e["bytes"] for f, e in export.manifest["files"].items() if f == "step.onnx.data")
        runs.append(("pertoken (onnxruntime, masks)", "pertoken", None,
                     smap.total_bytes, dense_fp32 + max(0, sketch)))
    rows = []
    for nt, b in ((nt, b) for nt in thread_counts for b in batch_sizes):
        if nt:
            torch.set_num_threads(nt)
        threads = torch.get_num_threads()
        base = next((r for r in torch_rows if r.get("path") == "dense" and r["batch"] == b
                     and r.get("threads") == threads and "decode_tok_s" in r), None)
        for name, path, c, nbytes, fp32 in runs:
            if b != 1:
                rows.append({"threads": threads, "batch": b, "path": name, "class_id": c,
                             "density": 1.0 if c is None else session.classes[c].density,
                             "skipped": "the exported graphs are batch 1"})
                continue
            session.onnx = OnnxPaths(session)  # sessions made with this thread count
            session.onnx.exports = {p: export for p in paths}
            t = time_path(session, path, c, prompts[b], new_tokens, repeats, warmup)
            med = t["decode_tok_s"]["median"]
            rows.append({"threads": threads, "batch": b, "path": name, "class_id": c,
                         "density": (session.pertoken.bytes()["fraction"] if path == "pertoken"
                                     else 1.0 if c is None else session.classes[c].density),
                         "prefill_on": "dense", **t, "weight_bytes": nbytes,
                         "weight_bytes_fp32": fp32, "bytes_ratio": dense_fp32 / fp32,
                         "bytes_ratio_storage": smap.total_bytes / nbytes,
                         "speedup": med / base["decode_tok_s"]["median"] if base else None,
                         "gbps": None, "backend": "onnxruntime", "provider": providers()[0],
                         "onnxruntime": _ort_version()})
    session.onnx = None
    return rows
