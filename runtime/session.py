"""A bundle (or a plain model) turned back into something that generates text.

`load(path)` verifies the bundle (every sha256, the format version), rebuilds the Hugging Face
model from the manifest's config and `weights.safetensors` (FFN channels already permuted,
tied weights restored), and reads the StructureMap, the class supports and the router. Given
a model instead of a bundle (a named model, an HF directory, ...), the session runs dense only.

Backends: `cpu` (automatic on a CPU when its kernels build) runs the per-token path's decode
steps on runtime.cpu_kernels, reading only the kept weights; everything else as `torch`.
`torch` runs a static class path on a physically reduced copy of the model
(`reduce_model`, built lazily per class and cached; execution="compact") or as masks over the
dense weights (execution="masked", also what refinement uses), on CPU or GPU. `triton` is the
same compact copy with its FFNs running the lowering's `ffn_decode` kernel at decode steps
(runtime.triton_backend); masked execution and refinement stay torch. `auto` picks triton on a
CUDA GPU and torch elsewhere; an explicit `triton` on CPU needs TRITON_INTERPRET=1.
`onnxruntime` runs a bundle's paths as their ONNX export (runtime.onnx_backend, exported into
the cache on first use); the torch model stays loaded on the CPU for that export and routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cscompile.errors import BundleError, UserInputError
from cscompile.execute import Support
from cscompile.structure import StructureMap

BACKENDS = ("auto", "torch", "cpu", "triton", "onnxruntime")


@dataclass
class ClassPath:
    """One task class as the runtime needs it."""

    id: int
    support: Support
    density: float  # kept fraction of the prunable bytes (from the manifest)


@dataclass
class Session:
    model: torch.nn.Module
    tokenizer: object | None
    smap: StructureMap | None = None
    classes: list[ClassPath] = field(default_factory=list)
    router: object | None = None  # passes.route.Router
    backend: str = "torch"
    device: torch.device = torch.device("cpu")
    source: str = ""
    is_bundle: bool = False
    # static class paths decode on a physically reduced copy ("compact", built lazily per
    # class) or as masks over the dense model ("masked"); refinement always runs masked
    execution: str = "compact"
    # manifest "input_sparsity": TEAL-like thresholds for refine mode "input" (None: older bundle)
    input_sparsity: dict | None = None
    # the bundle's per-token path (runtime.pertoken.PerToken, installed on `model`, mode
    # "dense" outside its decode steps); None for a plain model or a bundle without a plan
    pertoken: object | None = None
    onnx: object | None = None  # runtime.onnx_backend.OnnxPaths (backend onnxruntime)
    # the manifest's allocation path (passes.allocate.Path: the plan at any weight budget)
    # and weights/KV split table (passes.split); None for bundles built before them
    alloc_path: object | None = None
    split: dict | None = None
    _compact: dict = field(default_factory=dict, repr=False)

    @property
    def default_path(self) -> str:
        if self.pertoken is not None:
            return "pertoken"
        return "static" if self.is_bundle else "dense"

    def compact_model(self, class_id: int):
        """The class's reduced model (reduce_model), built once; None where it cannot be used
        with the prefill cache (dropped layers, or a layout reduce_model refuses)."""
        if class_id not in self._compact:
            from cscompile.execute import reduce_model

            support = self.classes[class_id].support
            model = None
            if support.layers is None:
                try:
                    model = reduce_model(self.model, self.smap, support).eval()
                except UserInputError:
                    model = None
            if model is not None and self.backend == "triton":
                from .triton_backend import use_triton_ffn

                use_triton_ffn(model, self.smap)
            self._compact[class_id] = model
        return self._compact[class_id]

    @property
    def context_length(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 dense: bool = False, refine=None, stream=None, path: str | None = None,
                 kv_budget: float | None = None, budget: float | None = None,
                 prompt_keep: float = 1.0):
        """Generate a continuation of `prompt`; see runtime.generate.generate. `path`:
        "pertoken" (the default for a bundle that has a plan), "static" or "dense";
        kv_budget: fraction of the prompt's KV positions kept for decode (runtime.kv_reduce;
        default 1). `budget`: a total of weight + KV bytes per decode token (fraction of
        dense), split for this prompt's length by the bundle's table (choose_split; a given
        kv_budget fixes the KV side); the per-token plan is cut at the weights' share for
        this call only. prompt_keep: fraction of the prompt's tokens kept before the
        prefill (runtime.kv_reduce.drop_prompt_tokens; default 1)."""
        if budget is not None:
            if prompt_keep != 1.0:
                raise UserInputError("--budget splits the bytes of decode steps; prompt "
                                     "dropping (--prompt-keep) does not combine with it")
            return self._generate_split(prompt, budget, kv_budget, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed, chat=chat, dense=dense, refine=refine, stream=stream, path=path))
        kv = self._kv_options(1.0 if kv_budget is None else kv_budget, prompt_keep)
        if self.backend == "onnxruntime":
            from .onnx_backend import generate
        else:
            from .generate import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, chat=chat, dense=dense, refine=refine,
                        stream=stream, path=path, **kv)

    def split_for(self, prompt_tokens: int, budget: float, new_tokens: int = 0,
                  kv_budget: float | None = None) -> tuple[dict, dict]:
        """(choose_split's choice, the per-token plan at its weight budget)."""
        from cscompile.passes.allocate import plan_for_budget

        from .kv_reduce import choose_split

        if self.pertoken is None or self.split is None or self.alloc_path is None:
            raise UserInputError(f"--budget needs a bundle with a per-token path and its "
                                 f"weights/KV split table; {self.source or 'this model'} has "
                                 f"none (rebuild it with this cscompile)")
        choice = choose_split(self.split, budget, prompt_tokens, new_tokens, kv_budget)
        plan, _ = plan_for_budget(self.alloc_path, choice["weight_budget"] + 1e-9)
        return choice, plan

    def _generate_split(self, prompt, budget, kv_budget, kwargs):
        from .generate import _prompt_ids

        if kwargs["dense"] or kwargs["path"] not in (None, "pertoken"):
            raise UserInputError("--budget splits the per-token path's bytes; it does not "
                                 "combine with --dense or --path static/dense")
        n = len(_prompt_ids(self, prompt, kwargs["chat"]))
        choice, plan = self.split_for(n, budget, kwargs["max_new_tokens"], kv_budget)
        saved = self.pertoken.plan
        self.pertoken.configure(plan)
        try:
            result = self.generate(prompt, kv_budget=choice["kv_keep"], **kwargs)
        finally:
            self.pertoken.configure(saved)
        result.split = {"total_budget": budget, **choice}
        return result

    def _kv_options(self, kv_budget, prompt_keep=1.0) -> dict:
        """{} at kv_budget and prompt_keep 1 (every backend), else those below 1 for the
        torch runtime."""
        from .kv_reduce import check_kv_budget, check_prompt_keep

        got = {k: v for k, v in (("kv_budget", check_kv_budget(kv_budget)),
                                 ("prompt_keep", check_prompt_keep(prompt_keep))) if v < 1}
        if got and self.backend == "onnxruntime":
            raise UserInputError("a kv budget or prompt keep below 1 runs on the torch "
                                 "runtime only, not --backend onnxruntime")
        return got

    def generate_batch(self, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       chat: bool = False, dense: bool = False, refine=None, stream=None,
                       path: str | None = None, kv_budget: float | None = None,
                       prompt_keep: float = 1.0):
        """Generate for several prompts, rows of the same class decoded together in chunks of
        `batch_size`; results in input order. See runtime.generate.generate_batch."""
        kv = self._kv_options(1.0 if kv_budget is None else kv_budget, prompt_keep)
        if self.backend == "onnxruntime":
            from .onnx_backend import generate_batch
        else:
            from .generate import generate_batch

        return generate_batch(self, prompts, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, chat=chat, dense=dense, refine=refine,
                              stream=stream, path=path, **kv)


def load(path, backend: str = "auto", device=None, execution: str = "compact",
         weights: str | None = None) -> Session:
    """Open a bundle directory (or, failing that, a model) as a ready-to-generate Session.
    weights="int8" / "int4": the per-token path's CPU kernels read int8 copies of the weights
    (one scale per output) or int4 blocks (runtime.pack.Q4) instead of the storage dtype."""
    if execution not in ("compact", "masked"):
        raise UserInputError(f"execution must be compact or masked, got {execution!r}")
    if backend not in BACKENDS:
        raise UserInputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":  # torch only exports and routes: the CPU is enough
        device = "cpu"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = _pick_backend(backend, device)
    p = Path(str(path)).expanduser()
    if not p.exists():
        from cscompile.models import NAMED_MODELS

        if str(path) not in NAMED_MODELS:
            raise UserInputError(f"{path}: no such bundle or model (named models: "
                                 f"{', '.join(sorted(NAMED_MODELS))})")
    looks_like_bundle = (p / "manifest.json").exists() or (
        p.is_dir() and not (p / "config.json").exists())
    if backend == "onnxruntime" and not looks_like_bundle:
        raise UserInputError(f"backend onnxruntime runs a bundle's exported paths; {path} is a "
                             f"model: build a bundle first (cscompile build)")
    if weights is not None and (backend != "cpu" or not looks_like_bundle):
        raise UserInputError(f"--weights {weights} runs a bundle's per-token path on the CPU "
                             f"kernels (--backend cpu)")
    session = (_load_bundle(p, backend, weights) if looks_like_bundle
               else _load_plain_model(path))
    session.model.to(device).eval()
    session.device = device
    session.execution = execution
    session.backend = backend
    return session


def _pick_backend(backend: str, device: torch.device) -> str:
    """auto: Triton kernels on CUDA, the CPU kernels on a CPU (torch where they cannot build,
    with a one-line notice); an explicit triton or cpu must be runnable."""
    from .triton_backend import triton_available

    if backend == "onnxruntime":
        from .onnx_backend import available

        usable, reason = available()
        if not usable:
            raise UserInputError(f"backend onnxruntime: {reason}")
        return backend
    if backend in ("auto", "cpu") and device.type == "cpu":
        from .cpu_kernels import available, disabled

        if available():
            return "cpu"
        if backend == "cpu" and disabled():
            raise UserInputError("backend cpu: the CPU kernels are disabled "
                                 "(CSCOMPILE_CPU_KERNELS=0)")
        if backend == "cpu":
            raise UserInputError("backend cpu: the CPU kernels could not be built here")
        return "torch"
    if backend == "cpu":
        raise UserInputError(f"backend cpu needs the CPU device, got {device}")
    usable, reason = triton_available(device)
    if backend == "auto":
        return "triton" if usable and reason == "cuda" else "torch"
    if backend == "triton" and not usable:
        raise UserInputError(f"backend triton cannot run here: {reason}")
    return backend


# ----------------------------------------------------------------------------- bundles
def _load_bundle(path: Path, backend: str = "torch", weights: str | None = None) -> Session:
    from cscompile.bundle import load_bundle
    from cscompile.passes.route import Router

    bundle = load_bundle(path)  # BundleError on anything missing, modified or pickle-like
    man = bundle.manifest
    if man.get("kind") != "cscompile-bundle":
        raise BundleError(f"{path} is not a cscompile bundle (kind {man.get('kind')!r})")
    try:
        smap = StructureMap.from_json(man["structure"])
        classes = [ClassPath(int(c["id"]), Support.from_json(c["support"]), float(c["density"]))
                   for c in man["classes"]]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: malformed manifest ({type(e).__name__}: {e})") from None
    model = _model_from_bundle(bundle)
    router = Router.from_arrays(bundle.tensors("router.safetensors"))
    if router.n_classes != len(classes):
        raise BundleError(f"bundle {path}: router knows {router.n_classes} classes, manifest "
                          f"lists {len(classes)}")
    pertoken = _pertoken_from_bundle(bundle, model, smap, backend, weights)
    alloc_path, split = _split_from_bundle(bundle) if pertoken is not None else (None, None)
    return Session(model, _tokenizer_from_bundle(bundle), smap, classes, router,
                   source=str(path), is_bundle=True, input_sparsity=man.get("input_sparsity"),
                   pertoken=pertoken, alloc_path=alloc_path, split=split)


def _split_from_bundle(bundle):
    """(allocation path, split table) of the manifest's pertoken section; (None, None) for
    a bundle built before they were stored."""
    from cscompile.passes.allocate import Path as AllocPath

    spec = bundle.manifest["pertoken"]
    if "path" not in spec:
        return None, None
    try:
        path, split = AllocPath.from_json(spec["path"]), spec["split"]
        for key in ("weights", "kv", "kv_position_bytes", "dense_weight_bytes"):
            split[key]
        if not split["weights"]:
            raise ValueError("no weight budgets")
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {bundle.path}: malformed per-token path or split table "
                          f"({type(e).__name__})") from None
    return path, split


def _pertoken_from_bundle(bundle, model, smap, backend: str, weights: str | None = None):
    """The per-token path of the manifest's "pertoken" section, installed on `model`."""
    from .pertoken import PerToken

    spec = bundle.manifest.get("pertoken")
    if not spec:
        if weights is not None:
            raise UserInputError(f"--weights {weights}: bundle {bundle.path} has no per-token "
                                 f"plan")
        return None
    try:
        plan, file = spec["plan"], spec["sketch_file"]
    except (KeyError, TypeError):
        raise BundleError(f"bundle {bundle.path}: malformed pertoken section") from None
    sketches = bundle.tensors(file) if file else {}
    elsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(bundle.manifest.get("weights_dtype"))
    perms = None
    cperm = bundle.manifest.get("channel_permutation") or {}
    if weights == "int4" and cperm.get("applied") and ":" in str(cperm.get("tensors", "")):
        # int4 keeps the down projection's source blocks through the build's permutation
        file, key = cperm["tensors"].split(":", 1)  # e.g. classes.safetensors:perm.layer{l}
        stored = bundle.tensors(file)
        perms = {li: stored[key.format(l=li)] for li in range(len(smap.layers))
                 if key.format(l=li) in stored}
    try:
        pt = PerToken(model, smap, plan, sketches, elsize=elsize,
                      backend="cpu" if backend == "cpu" else "torch", weights=weights,
                      ffn_perms=perms)
    except (BundleError, UserInputError):
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise BundleError(f"bundle {bundle.path}: malformed per-token plan or sketches "
                          f"({type(e).__name__})") from None
    pt.detach()  # attached by the decode steps that use it (runtime.generate)
    return pt


def _source_dir(bundle) -> Path:
    """The source model directory recorded at build time (fallback for older bundles)."""
    src = str(bundle.manifest.get("source", {}).get("path", ""))
    p = Path(src).expanduser()
    if not p.exists():
        from cscompile import models

        if src in models.NAMED_MODELS:
            p = models.resolve_model(src)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise BundleError(f"bundle {bundle.path} holds no model config and its source model "
                          f"{src!r} is not a Hugging Face directory here; rebuild the bundle "
                          f"with a cscompile that stores the config")
    return p


def _model_from_bundle(bundle) -> torch.nn.Module:
    """The HF model the manifest describes; a manifest that passed its seal can still carry
    values transformers chokes on (a resealed edit): those are refused as one line."""
    try:
        return _build_model(bundle)
    except BundleError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise BundleError(f"bundle {bundle.path}: the model config or weights do not load "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                          ) from None


def _build_model(bundle) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg_dict = bundle.manifest.get("model_config")
    if cfg_dict:  # self-contained bundle
        cfg = dict(cfg_dict)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        config = AutoConfig.from_pretrained(_source_dir(bundle))
    weights = bundle.tensors("weights.safetensors")
    for alias, stored in (bundle.manifest.get("tied_weights") or {}).items():
        if stored not in weights:
            raise BundleError(f"bundle {bundle.path}: tied weight {alias} points at missing "
                              f"{stored}")
        weights[alias] = weights[stored]
    # compute in fp32: bundles store the source's dtype (bf16 for SmolLM2), which CPUs run slowly
    # and less accurately; a GPU backend casts down again where its kernels want it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise BundleError(f"bundle {bundle.path}: weights do not fit the model config "
                          f"({str(e).splitlines()[0][:200]})") from None
    return model


def _tokenizer_from_bundle(bundle):
    from transformers import AutoTokenizer

    if any(f.startswith("tokenizer/") for f in bundle.files):
        return AutoTokenizer.from_pretrained(bundle.path / "tokenizer")  # verified files
    try:
        return AutoTokenizer.from_pretrained(_source_dir(bundle))
    except BundleError:
        return None  # generate() explains that text needs a tokenizer


# ----------------------------------------------------------------------------- plain models
def _load_plain_model(source) -> Session:
    from cscompile.frontend import load_model

    loaded = load_model(source)
    if not loaded.is_hf:
        raise UserInputError(f"{source}: only Hugging Face causal LMs can generate text "
                             f"(this one loads as {type(loaded.model).__name__})")
    return Session(loaded.model, loaded.tokenizer, source=str(source))
