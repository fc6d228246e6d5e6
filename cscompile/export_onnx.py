"""`cscompile export BUNDLE -o OUT --format onnx`: a bundle's decode paths as ONNX graphs.

Every graph is one forward of a module the runtime itself runs (runtime.generate), wrapped
tensor-in / tensor-out so it can be traced (`torch.onnx.export(dynamo=True)`, opset OPSET):

    inputs   input_ids int64 [1, T];  past.<j>.key / past.<j>.value float32 [1, H_j, P, D]
    outputs  logits float32 [1, vocab] (last position);  present.<j>.key / .value
             [1, H_j, P + T, D] (the cache after this step: feed it back as the next past)

The position of the new tokens is the past length P (batch 1, no padding), as in the runtime.

* `step.onnx` — the dense model: prefill (P = 0, T = prompt length) for every path, and the
  dense path's decode steps (T = 1). It also outputs `router_feature` [1, hidden], the router's
  measurement (runtime.generate's hook: mean over the T positions of the router layer's output).
* `class_<c>.onnx` (--path static) — the class's physically reduced copy
  (Session.compact_model = execute.reduce_model), T = 1; its past holds only the kv heads the
  class keeps (runtime.generate.slice_cache of the dense prefill cache).
* `pertoken.onnx` (--path pertoken) — one decode step (T = 1) of the per-token path on the
  runtime's own per-token modules, on their torch branch (what `--backend torch` runs): every
  selection is a graph op (TopK over |x|, |x| * norms or a sketch's estimate, a 0/1 mask), but
  the mask is multiplied into the dense MatMul and the sketches are fp32 matrices, so the graph
  reproduces the path's outputs, NOT its savings: it reads every weight byte plus the
  sketches, and is labelled so (`MASKED`). A gather form (Gather of the kept rows, MatMul, a
  packed low-bit GEMV) is what the runtime's CPU-kernel branch computes, but that branch calls
  C++ through data pointers and returns host floats, which no tracer follows; an export-only
  copy of it would be a second implementation of the path. It also outputs `missed.<part>`
  [1], the per-part missed-energy estimates the runtime reports.

The directory is written like a bundle (cscompile.bundle.write_sealed_dir: a temp directory
renamed into place, every file's sha256 in a sealed manifest.json, read back by load_bundle).
Weights are fp32 (what the runtime computes in) in external-data files `<graph>.onnx.data`,
which start with a text header so nothing in the directory can look like pickle. Node stack
traces are stripped, so the bytes depend only on the bundle, the path, the seed-free export
and the library versions the manifest records: exporting twice gives identical files.
Each graph is run on onnxruntime right after it is written and compared with torch; the
figures are in the returned report (not in the files, which must not vary by machine).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bundle import dumps_json, write_sealed_dir
from .compat import cache_kwargs
from .errors import BuildError, UserInputError, one_line

KIND = "cscompile-onnx-export"
EXPORT_VERSION = 1
OPSET = 18  # torchlib's own opset: no version conversion, onnxruntime >= 1.14 runs it
PATHS = ("dense", "static", "pertoken")
CHOICES = PATHS + ("all",)  # all: every path the bundle has, the step graph once
DATA_HEADER = b"cscompile ONNX external data\n".ljust(64, b"\0")
ALIGN = 64  # external tensors start on 64-byte boundaries
INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx file
CHECK_RTOL = 1e-3  # export self-check: max |diff| <= CHECK_RTOL * max(1, max |torch value|)


# ----------------------------------------------------------------------------- graphs
class StepGraph(nn.Module):
    """One step of a decode path as tensors in, tensors out (see the module docstring).

    `step(input_ids, cache)` returns logits [1, T, V] and fills the DynamicCache built here
    from the past tensors; `extras()` returns further outputs (router feature, missed)."""

    def __init__(self, model, layer_ids: list[int], step, extras=None):
        super().__init__()
        self.model = model  # registered: its parameters become the graph's initializers
        self.layer_ids = layer_ids
        self.step, self.extras = step, extras

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for j, idx in enumerate(self.layer_ids):
            cache.update(past[2 * j], past[2 * j + 1], idx)
        logits = self.step(input_ids, cache)
        outs = [logits[:, -1].float()]
        for idx in self.layer_ids:
            outs += [cache.layers[idx].keys, cache.layers[idx].values]
        return (*outs, *(self.extras() if self.extras else ()))


@dataclass
class Graph:
    name: str
    role: str
    module: StepGraph
    decode_only: bool  # T = 1 fixed (class and per-token graphs)
    extra_outputs: list[str] = field(default_factory=list)
    labels: dict | None = None  # per-token: how each part exports
    slice_past: object = None  # dense cache -> this graph's cache (a class's kept kv heads)
    dense_model: object = None  # what example caches are prefilled on
    examples: dict = field(default_factory=dict, repr=False)

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def _hf_step(model):
    """model's HF forward on the cache, as runtime.generate's decode loop calls it."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}

    def step(ids, cache):
        return model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, **keep).logits
    return step


def _routed_step(model, smap, router_layer):
    """The dense step plus the router's measurement, captured by runtime.generate's own hook
    (installed for each forward, then removed: the model is left as it was)."""
    from cscompile.runtime.generate import _PathHooks

    step, seen = _hf_step(model), {}

    def run(ids, cache):
        hooks = _PathHooks(model, smap, None, None, router_layer)
        try:
            logits = step(ids, cache)
        finally:
            hooks.remove()
        seen["pooled"] = hooks.pooled
        return logits
    return run, lambda: [seen["pooled"]]


def layer_ids(session) -> list[int]:
    """The cache index of each layer's attention (what runtime.generate.slice_cache uses)."""
    return [getattr(session.model.get_submodule(layer.attention.module), "layer_idx", li)
            for li, layer in enumerate(session.smap.layers)]


# ----------------------------------------------------------------------------- checks
def check_exportable(session, paths: list[str], class_ids: list[int]) -> None:
    """Refuse, in one line, what these graphs cannot express (before any work)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not session.is_bundle:
        raise UserInputError(f"{session.source} is a model, not a bundle: build a bundle "
                             f"first (cscompile build), then export it")
    cfg = getattr(session.model, "config", None)
    if cfg is None or any(type(layer) is not DynamicLayer
                          for layer in DynamicCache(config=cfg).layers):
        raise UserInputError(f"{session.source}: only models whose KV cache is plain full "
                             f"attention export (no sliding-window layers)")
    if any(layer.attention is None for layer in session.smap.layers):
        raise UserInputError(f"{session.source}: a layer without attention found; "
                             f"the step graphs need one KV cache per layer")
    if "static" in paths:
        for c in class_ids:
            support = session.classes[c].support
            if support.layers is not None or session.compact_model(c) is None:
                raise UserInputError(
                    f"class {c} has no physically reduced model (it "
                    f"{'drops layers' if support.layers is not None else 'keeps kv groups unevenly in a fused projection'}); "
                    f"its static path runs as masks over the dense weights, which this export "
                    f"does not write")
    if "pertoken" in paths:
        if session.pertoken is None:
            raise UserInputError(f"{session.source} has no per-token plan (built with "
                                 f"--static-only): export --path dense or --path static")
        fixed = [li for li, layer in enumerate(session.pertoken.plan["layers"])
                 if layer["ffn"]["op"] == "fixed"]
        if fixed:
            raise UserInputError(f"the per-token plan's layers {fixed} use op 'fixed' (a "
                                 f"channel set given from outside, benchmarks only): nothing "
                                 f"in the bundle says which channels, so it cannot export")


def resolve(session, path: str | None, class_id: int | None) -> tuple[list[str], list[int]]:
    """(paths, class ids) an export request means; bad requests refused in one line."""
    path = path or session.default_path
    if path not in CHOICES:
        raise UserInputError(f"--path must be one of {', '.join(CHOICES)}, got {path!r}")
    paths = ["dense", "static"] + (["pertoken"] if session.pertoken is not None else []) \
        if path == "all" else sorted({"dense", path})
    n = len(session.classes)
    if class_id is not None:  # one class id, or a list of them
        if "static" not in paths:
            raise UserInputError(f"--class selects a static class path; give --path static "
                                 f"(this export is --path {path})")
        wanted = sorted(set([class_id] if isinstance(class_id, int) else class_id))
        for c in wanted:
            if not 0 <= c < n:
                raise UserInputError(f"unknown class {c}: the bundle has classes 0..{n - 1}")
        return paths, wanted
    return paths, list(range(n)) if "static" in paths else []


# ----------------------------------------------------------------------------- export
def require_onnx() -> None:
    """The [onnx] extra, or one line saying how to get it."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserInputError(f"ONNX export needs {', '.join(missing)} (cscompile's [onnx] "
                             f"extra): pip install 'cscompile[onnx]'")


def export_bundle(bundle, out, path: str | None = None, class_id=None, force: bool = False,
                  note=None) -> dict:
    """Load BUNDLE (torch backend) and export it to OUT; returns the export report."""
    from cscompile.runtime import load

    session = load(bundle, backend="torch", device="cpu")
    return export_session(session, out, path, class_id, force=force, note=note)


def export_session(session, out, path: str | None = None, class_id=None, force: bool = False,
                   note=None) -> dict:
    """Export a loaded bundle Session's `path` ("all": every path) to the directory `out`
    (see the module doc); class_id: one class id or a list of them (static path), None for
    every class."""
    require_onnx()
    import onnx
    import onnxscript
    import transformers

    t0 = time.perf_counter()
    paths, class_ids = resolve(session, path, class_id)
    path = path or session.default_path
    check_exportable(session, paths, class_ids)
    note = note or (lambda text: None)
    with torch.no_grad():
        graphs = _graphs(session, paths, class_ids)
    labels = next((g.labels for g in graphs if g.labels is not None), None)
    bundle_manifest = _bundle_manifest(session)
    versions = {"torch": torch.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__, "transformers": transformers.__version__}
    manifest = {
        "kind": KIND, "export_version": EXPORT_VERSION, "format": "onnx", "opset": OPSET,
        "path": path, "paths": paths, "classes": class_ids,
        "bundle": {"manifest_sha256": bundle_manifest["manifest_sha256"],
                   "model_id": bundle_manifest.get("source", {}).get("model_id"),
                   "weights_dtype": bundle_manifest.get("weights_dtype")},
        "compute_dtype": "float32", "versions": versions,
        "graphs": {g.name: _graph_entry(g) for g in graphs},
    }
    checks, sizes = {}, {}

    def fill(tmp: Path) -> list[str]:
        files = []
        for g in graphs:
            t = time.perf_counter()
            note(f"exporting {g.name} ({g.role}) ...")
            proto = _export(g)
            # no path in the metadata: step.onnx is the same file in every path's export
            files += _save(proto, tmp, g.file, {"cscompile.graph": g.name,
                                                 "cscompile.bundle": manifest["bundle"][
                                                     "manifest_sha256"]})
            sizes[g.name] = _describe(proto, tmp, g.file)
            del proto
            checks[g.name] = _self_check(session, g, tmp / g.file)
            sizes[g.name]["export_s"] = time.perf_counter() - t
        report = {"path": path, "paths": paths, "classes": class_ids, "opset": OPSET,
                  "graphs": {n: {k: v for k, v in s.items() if k != "export_s"}
                             for n, s in sizes.items()}}
        if labels is not None:
            report["pertoken"] = labels
        (tmp / "report.json").write_text(dumps_json(report), encoding="utf-8")
        return files + ["report.json"]

    out = write_sealed_dir(out, manifest, fill, force=force, what="ONNX export")
    return {"out": str(out), "format": "onnx", "opset": OPSET, "path": path, "paths": paths,
            "classes": class_ids, "bundle": manifest["bundle"], "versions": versions,
            "graphs": {g.name: {"role": g.role, **manifest["graphs"][g.name], **sizes[g.name],
                                "check": checks[g.name]} for g in graphs},
            **({"pertoken": labels} if labels is not None else {}),
            "timing": {"export_s": time.perf_counter() - t0}}


def _bundle_manifest(session) -> dict:
    from .bundle import load_bundle

    return load_bundle(session.source, verify=False).manifest


def _graphs(session, paths: list[str], class_ids: list[int]) -> list[Graph]:
    from cscompile.runtime.generate import slice_cache

    model, smap = session.model, session.smap
    ids = layer_ids(session)
    step, router = _routed_step(model, smap, session.router.layer)
    graphs = [Graph("step", "prefill (every path) and dense decode",
                    StepGraph(model, ids, step, router), False, ["router_feature"])]
    for c in class_ids if "static" in paths else []:
        compact, support = session.compact_model(c), session.classes[c].support
        graphs.append(Graph(f"class_{c}", f"class {c} decode (physically reduced model)",
                            StepGraph(compact, ids, _hf_step(compact)), True,
                            slice_past=lambda cache, s=support: slice_cache(cache, model, smap,
                                                                            s)))
    if "pertoken" in paths:
        from cscompile.runtime.generate import pertoken_logits

        pt = session.pertoken
        names = _missed_parts(pt)

        def pt_step(input_ids, cache):
            with torch_branch(pt):
                return pertoken_logits(pt, model, input_ids, cache)

        def missed():
            worst = pt.missed()
            return [worst[k].reshape(1) for k in names]
        graphs.append(Graph("pertoken", "per-token decode (dense compute with masks)",
                            StepGraph(model, ids, pt_step, missed), True,
                            [f"missed.{k}" for k in names], pertoken_labels(pt)))
    for g in graphs:
        g.dense_model = model
    return graphs


MASKED = ("dense compute with masks: each part's selection is a graph op (TopK, a 0/1 mask) "
          "but is multiplied into the dense MatMul, and the sketches are fp32 matrices, so the "
          "graph reads every weight byte plus the sketches: it reproduces the per-token "
          "path's outputs, not its savings")


@contextlib.contextmanager
def torch_branch(pt):
    """The per-token modules on their torch branch (masks over the dense matrices, what
    `--backend torch` runs): the CPU-kernel branch calls C++ through data pointers and
    returns host floats, which no tracer can follow."""
    saved, pt.cpu = pt.cpu, None
    try:
        yield pt
    finally:
        pt.cpu = saved


def pertoken_labels(pt) -> dict:
    """How each part of the plan is in the per-token graph."""
    def label(cfg, what):
        if cfg["op"] == "dense":
            return "dense"
        if cfg["op"] == "sketch" and what == "lm_head":
            return f"sketch (fp32 MatMul) -> TopK {cfg['candidates']} -> exact logits where kept"
        keep = f" keep {cfg.get('keep', 1.0)}" if "keep" in cfg else ""
        return f"{cfg['op']}{keep}: TopK mask x dense MatMul"
    return {"execution": MASKED,
            "layers": [{k: label(layer[k], k) for k in ("qkv", "o", "ffn")}
                       for layer in pt.plan["layers"]],
            "lm_head": label(pt.plan["lm_head"], "lm_head")}


def _missed_parts(pt) -> list[str]:
    """Parts the per-token modules record a missed estimate for (non-dense in some layer)."""
    plan = pt.plan
    names = [k for k in ("qkv", "o", "ffn") if any(layer[k]["op"] != "dense"
                                                   for layer in plan["layers"])]
    return sorted(names + (["lm_head"] if plan["lm_head"]["op"] != "dense" else []))


def _names(g: Graph, n_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{{}}.{j}.{part}" for j in range(n_layers) for part in ("key", "value")]
    return (["input_ids"] + [x.format("past") for x in kv],
            ["logits"] + [x.format("present") for x in kv] + g.extra_outputs)


def _graph_entry(g: Graph) -> dict:
    past, _ = example_past(g, 1)
    inputs, outputs = _names(g, len(past) // 2)
    return {"file": g.file, "data": f"{g.file}.data", "role": g.role, "inputs": inputs,
            "outputs": outputs, "kv_heads": [int(t.shape[1]) for t in past[0::2]],
            "head_dim": int(past[0].shape[-1]), "seq": 1 if g.decode_only else "dynamic"}


def example_past(g: Graph, length: int):
    """(past tensors, ids): a real cache of `length` positions in g's layout — the dense
    prefill of `length` tokens, sliced as the runtime slices it; length 0 gives empty
    tensors of the same heads (a prefill's past). Memoised per graph."""
    if length in g.examples:
        return g.examples[length]
    from transformers import DynamicCache

    model = g.dense_model
    vocab = model.get_input_embeddings().weight.shape[0]
    n = max(length, 1)
    ids = (torch.arange(n) * 7 + 1).remainder(vocab).view(1, -1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    if g.slice_past is not None:
        cache = g.slice_past(cache)
    past = []
    for idx in g.module.layer_ids:
        for t in (cache.layers[idx].keys, cache.layers[idx].values):
            past.append(t[:, :, :length].contiguous())
    g.examples[length] = (past, ids[:, :length])
    return g.examples[length]


def _export(g: Graph):
    """torch.onnx.export of one graph -> ModelProto (its own chatter kept off stdout)."""
    import onnx  # noqa: F401 - fail early, with the import error, if it is missing

    past, _ = example_past(g, 3)
    seq = torch.export.Dim("seq", min=1)
    plen = torch.export.Dim("past", min=1 if g.decode_only else 0)
    ids = torch.tensor([[3]]) if g.decode_only else torch.tensor([[3, 4, 5, 6]])
    dynamic = ({} if g.decode_only else {1: seq}, tuple({2: plen} for _ in past))
    entry_inputs, entry_outputs = _names(g, len(past) // 2)
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export",
                                                     "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            # optimize=False: onnxruntime optimises the graph itself when it loads it; measured
            # on SmolLM2, onnxscript's pass made decode no faster and the export 1.7x slower
            prog = torch.onnx.export(
                g.module, (ids, *past), dynamo=True, dynamic_shapes=dynamic,
                input_names=entry_inputs, output_names=entry_outputs, opset_version=OPSET,
                optimize=False, verbose=False)
        return prog.model_proto
    except (UserInputError, BuildError):
        raise
    except Exception as e:  # torch.export / translation failures: ours to fix, said plainly
        first = one_line(str(e).strip().splitlines()[0] if str(e).strip() else "", 300)
        raise BuildError(f"torch.onnx could not export the {g.name} graph "
                         f"({type(e).__name__}: {first})") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _save(proto, directory: Path, name: str, meta: dict) -> list[str]:
    """Write `name` and `name`.data (initializers of >= INLINE_BYTES, 64-byte aligned, after
    a text header); node stack traces dropped. Returns the two relative paths."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    for key in sorted(meta):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(meta[key])
    data_name = f"{name}.data"
    with open(directory / data_name, "wb") as f:
        f.write(DATA_HEADER)
        offset = len(DATA_HEADER)
        for t in proto.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < INLINE_BYTES:
                continue
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            raw = t.raw_data
            f.write(raw)
            set_external_data(t, location=data_name, offset=offset, length=len(raw))
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            offset += len(raw)
    (directory / name).write_bytes(proto.SerializeToString(deterministic=True))
    return [name, data_name]


def _describe(proto, directory: Path, name: str) -> dict:
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    return {"nodes": len(proto.graph.node), "op_types": dict(sorted(ops.items())),
            "onnx_bytes": (directory / name).stat().st_size,
            "data_bytes": (directory / f"{name}.data").stat().st_size,
            "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}}


# ----------------------------------------------------------------------------- self-check
def _self_check(session, g: Graph, file: Path) -> dict:
    """Run the written graph on onnxruntime and on torch; max |diff| per output kind. A graph
    that disagrees beyond CHECK_RTOL is refused (BuildError), never written."""
    import numpy as np

    from cscompile.runtime.onnx_backend import ort_session

    sess = ort_session(file)
    result = {}
    cases = [("decode", 4, torch.tensor([[9]]))]
    if not g.decode_only:
        cases.insert(0, ("prefill", 0, torch.tensor([[1, 5, 9, 13, 2]])))
    for case, plen, ids in cases:
        past, _ = example_past(g, plen)
        with torch.no_grad():
            ref = [t.detach().float().numpy() for t in g.module(ids, *past)]
        names = [o.name for o in sess.get_outputs()]
        feeds = {"input_ids": ids.numpy()}
        for i, t in enumerate(past):
            feeds[sess.get_inputs()[i + 1].name] = t.numpy()
        got = sess.run(None, feeds)
        diff = {"logits": 0.0, "kv": 0.0, "extra": 0.0}
        scale = {"logits": 1.0, "kv": 1.0, "extra": 1.0}
        for name, r, o in zip(names, ref, got):
            kind = "logits" if name == "logits" else "kv" if name.startswith("present") \
                else "extra"
            if r.shape != o.shape:
                raise BuildError(f"exported {g.name} graph: output {name} has shape "
                                 f"{o.shape}, torch gives {r.shape}")
            diff[kind] = max(diff[kind], float(np.abs(r - o).max()) if r.size else 0.0)
            scale[kind] = max(scale[kind], float(np.abs(r).max()) if r.size else 0.0)
        for kind in diff:
            if not diff[kind] <= CHECK_RTOL * scale[kind]:
                raise BuildError(f"exported {g.name} graph disagrees with torch on {case}: "
                                 f"max |diff| {diff[kind]:.3g} in {kind} (values up to "
                                 f"{scale[kind]:.3g})")
        result[case] = {"max_abs_diff_logits": diff["logits"], "max_abs_diff_kv": diff["kv"]}
    return result


# ----------------------------------------------------------------------------- command line
import click  # noqa: E402

from .errors import friendly_errors  # noqa: E402


def summary_lines(report: dict) -> list[str]:
    lines = [f"wrote {report['out']}: {', '.join(report['paths'])} of bundle "
             f"{report['bundle']['model_id']} (manifest {report['bundle']['manifest_sha256'][:12]}"
             f"...), ONNX opset {report['opset']}, fp32, every file's sha256 in manifest.json"]
    for name, g in report["graphs"].items():
        check = ", ".join(f"{case} max |diff| {c['max_abs_diff_logits']:.2g}"
                          for case, c in g["check"].items())
        lines.append(f"  {g['file']} + .data  {(g['onnx_bytes'] + g['data_bytes']) / 1e6:.2f} MB, "
                     f"{g['nodes']} nodes — {g['role']}; onnxruntime vs torch logits: {check}")
    if "pertoken" in report:
        lines.append(f"  per-token graph: {report['pertoken']['execution']}")
    return lines


def print_export_summary(export, console) -> None:
    """`cscompile inspect EXPORT_DIR`: the verified export's paths and graphs."""
    man, files = export.manifest, export.manifest["files"]
    console.print(f"ONNX export {export.path}: {', '.join(man.get('paths', []))} of bundle "
                  f"{man['bundle'].get('model_id')} (manifest "
                  f"{str(man['bundle'].get('manifest_sha256'))[:12]}...), opset {man['opset']}, "
                  f"{sum(e['bytes'] for e in files.values()) / 1e6:.1f} MB in {len(files)} "
                  f"files — hashes verified")
    for name, g in man["graphs"].items():
        mb = sum(files.get(f, {}).get("bytes", 0) for f in (g["file"], g["data"])) / 1e6
        console.print(f"  {g['file']}: {g['role']}, {mb:.2f} MB, kv heads {g['kv_heads']}")
    labels = export.report.get("pertoken")
    if labels:
        console.print(f"  per-token graph: {labels['execution']}")


@click.command("export")
@click.argument("bundle")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Export directory to write (refused if it exists, unless --force).")
@click.option("--format", "fmt", default="onnx", show_default=True, metavar="onnx",
              help="Export format (onnx only).")
@click.option("--path", "path", default=None, metavar="dense|static|pertoken|all",
              help="Decode path to export [default: the bundle's default path], or all of "
                   "them; the dense prefill graph comes with every path.")
@click.option("--class", "class_id", type=int, default=None,
              help="With --path static: only this class (default: every class).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "json_out", is_flag=True, help="Print the export report as JSON.")
@friendly_errors
def export(bundle, out, fmt, path, class_id, force, json_out):
    """Export BUNDLE's decode path (with KV-cache inputs/outputs) and its prefill as ONNX."""
    import json

    if fmt != "onnx":
        raise UserInputError(f"--format must be onnx, got {fmt!r}")
    if path is not None and path not in CHOICES:
        raise UserInputError(f"--path must be one of {', '.join(CHOICES)}, got {path!r}")
    if not (Path(bundle) / "manifest.json").is_file():
        raise UserInputError(f"{bundle} is not a bundle directory (no manifest.json); build "
                             f"one with cscompile build")
    if Path(out).exists() and not force:  # refuse before the (slow) load
        raise UserInputError(f"output directory {out} exists; pass --force to replace it")
    report = export_bundle(bundle, out, path, class_id, force=force,
                           note=lambda text: click.echo(text, err=True))
    if json_out:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"exported in {report['timing']['export_s']:.1f} s", err=True)
