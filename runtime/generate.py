"""Prefill, route, decode with a KV cache on the class path; greedy or nucleus sampling.

Semantics (torch backend):
  * prefill runs the dense model over the prompt with a KV cache; the router's measurement
    (mean-pooled hidden state leaving the router layer) is captured during that same forward,
    and the first new token comes from the dense prefill logits;
  * every later token (a "decode step") runs on the routed class's path. Compact execution
    (default for a static path): the class's `reduce_model` copy decodes, and the prefill cache
    is sliced to the kv heads it keeps. Masked execution (refinement, or execution="masked"):
    the dense model with heads outside the support zeroed at the o-projection input, FFN
    channels at the down-projection input, dropped layers passing their input through; the
    cache keeps its dense layout (k/v of dropped heads are written but never read). Either
    way prompt positions hold dense k/v and generated positions k/v of the class path;
  * refinement (runtime.refine) may shrink a step's FFN support inside the class's channels,
    or widen the step to dense: the cache is cropped by one position and the token recomputed
    on the dense model, so a widened token is exactly a dense step;
  * with RefineConfig(switch_every=s) the class path re-routes every s decode steps on the
    running mean of the router feature over the prompt and the generated tokens (each step's
    feature taken on the path it ran) and switches to the class it now fits best (logged as a
    "switch" refinement; later steps use the new class's support);
  * refine mode "input" (RefineConfig(mode="input")) decodes on the dense weights with
    TEAL-like input sparsity instead (runtime.refine.InputSparsity: FFN inputs and
    intermediates below the bundle's per-layer thresholds are zeroed, so their weight columns
    are not read); its steps are charged the bytes they read and may widen the same way.
This is what a no-cache recomputation gives when positions < prompt length run dense and each
generated position runs on the support chosen for it (tests/test_runtime.py checks that).
With kv_budget < 1 (runtime.kv_reduce) the prefill cache keeps only that fraction of the
prompt's positions (sinks, a recent window, SnapKV-like importance) and every decode step
passes position_ids from the true prompt length on; at 1.0 nothing changes.

Batches (`generate_batch(session, prompts, batch_size=8, ...)`, results in input order):
  * each prompt is prefilled alone (batch 1) and routed, exactly as `generate` does, so its
    class and first token are the single-prompt ones;
  * rows that share a path form a group: one group per routed class, and one for the dense path
    (`dense=True`, or a plain model). A group decodes in chunks of up to `batch_size` rows, in
    input order, with ONE forward per step over the chunk: the prefill caches are left-padded to
    the longest prompt, an attention mask hides the padding and position_ids = cumsum(mask) - 1
    give every row its own positions. So each row's tokens are what single-prompt `generate`
    gives for it (up to float reordering; greedy ids are identical on stories260K in fp32).
    Grouping, not the union of the chunk's supports: the union reads more bytes than either
    class and changes each row's outputs vs its single-prompt path, grouping keeps them;
  * the per-token path's chunk: as torch masks each row keeps its own supports; on the CPU
    kernels a step of several rows reads every weight (PerToken.step_mode: their union is
    nearly all of it), so its rows decode the dense model's tokens, charged dense bytes;
  * static class paths batch in both executions (compact: the class's reduced copy with the
    stacked cache sliced once; masked: the hooks, applied to every row alike). A chunk decodes
    as soon as it is full, so about (groups x batch_size) prefill caches are held at once. A
    cache with sliding-window (or other non-plain) layers is not stacked: rows decode alone;
  * a chunk decodes on a DecodeBatch, the step-level form of this loop that the server
    (runtime.engine) also drives: rows join and leave between steps, and a row that finishes
    (eos, length, context) leaves the stacked cache at once;
  * refinement is NOT batched: with an active refine config every class-path row is decoded
    alone by the single-prompt loop (its Result says batch_size=1); dense rows still batch,
    since refinement never touches the dense path. A chunk of one row also runs that loop;
  * sampling: every row draws from its own generator seeded with `seed`, as if generated alone;
  * each Result keeps its own stats (class, densities, energy, bytes per token, finish reason)
    and prefill_s; decode_s is the row's own seconds in its batch and `batch_size` the most
    rows it shared a step with, so decode_tokens_per_s is the row's own steps over its own
    time (a chunk's throughput is the sum over its rows).
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from cscompile.compat import cache_kwargs
from cscompile.errors import UserInputError

from .decode_step import decode_logits
from .decode_step import supports as decode_step_supports
from .kv_reduce import check_kv_budget, check_prompt_keep, drop_prompt_tokens, reduce_prompt_cache
from .refine import (InputSparsity, RefineConfig, energy_fraction, measurement_bytes,
                     refined_support_bytes,
                     teal_select)


@dataclass
class Result:
    text: str
    token_ids: list[int]  # generated tokens only
    prompt_tokens: int
    class_id: int | None  # routed class (None without a bundle)
    path: str  # "class" or "dense"
    densities: list[float]  # per decode step: kept fraction of prunable bytes it used
    energy: list[float | None]  # per decode step: on-support FFN energy fraction (worst
    # layer); None on a compact step, which never computes the full intermediate
    bytes_per_token: list[int]  # per decode step: weight bytes read, measurement included
    refinements: list[dict]  # {"token", "action" (keep|widen), "energy", "density"}
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # generated tokens / (prefill + decode)
    decode_tokens_per_s: float  # decode steps / decode seconds
    finish_reason: str  # eos | length | context
    batch_size: int = 1  # rows decoded together, one forward per step (generate_batch); 1 =
    # decoded alone: a single prompt, a refined class path, or a chunk of one row
    missed: list[dict] = None  # per decode step on the per-token path: per part (qkv, o,
    # ffn, lm_head) the worst layer's estimate of what the support missed (energy share off
    # the support; for lm_head the sketch's probability mass off the candidates)
    kv_positions: int | None = None  # prompt positions left in the KV cache after a
    # kv_budget < 1 reduction (runtime.kv_reduce); None = every prompt position kept
    kv_bytes_per_token: list[int] | None = None  # per decode step: K and V bytes it reads
    # (every cached position, every layer; runtime.kv_reduce.kv_position_bytes)
    split: dict | None = None  # a total budget's split (runtime.kv_reduce.choose_split)
    prompt_kept: int | None = None  # prompt tokens prefilled after prompt_keep < 1 dropped
    # the rest (runtime.kv_reduce.drop_prompt_tokens); None = the whole prompt

    def __post_init__(self):
        if self.missed is None:
            self.missed = []

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- path hooks
class _PathHooks:
    """Hooks on the dense model whose behaviour follows `mode`: dense, class or refine.
    With support=None only the router's capture hook is installed (the dense prefill)."""

    def __init__(self, model, smap, support, refine: RefineConfig | None, router_layer=None):
        self.mode = "dense"
        self.refine = refine
        self.energy: dict[int, float] = {}
        self.kept: dict[int, int] = {}
        self.pooled = None
        self.per_row = False  # also keep each row's energy fraction (batched decode)
        self.row_energy: dict[int, torch.Tensor] = {}
        self.capture = router_layer is not None
        self._handles = []
        kept_layers = set(support.kept_layers(smap)) if support else set(range(smap.n_layers))
        for li, layer in enumerate(smap.layers):
            a, f = layer.attention, layer.ffn
            if support and a is not None and li in support.heads and \
                    len(support.heads[li]) < a.n_heads:
                cols = torch.zeros(sum(len(c) for c in a.o_cols))
                for h in support.heads[li]:
                    cols[a.o_cols[h]] = 1.0
                self._pre(model, a.o, self._scale_hook(cols))
            if support and f is not None and li in kept_layers:
                cand = torch.ones(f.width, dtype=torch.bool)
                if support and li in support.channels:
                    cand = torch.zeros(f.width, dtype=torch.bool)
                    cand[support.channels[li]] = True
                self._pre(model, f.down, self._ffn_hook(li, cand))
            if support and li not in kept_layers:
                self._handles.append(model.get_submodule(layer.module).register_forward_hook(
                    self._skip_hook, with_kwargs=True))
            if li == router_layer:
                self._handles.append(model.get_submodule(layer.module).register_forward_hook(
                    self._router_hook))

    def _pre(self, model, path, hook):
        self._handles.append(model.get_submodule(path).register_forward_pre_hook(hook))

    def _scale_hook(self, cols):
        def hook(module, args):
            if self.mode == "dense":
                return None
            return (args[0] * cols.to(args[0]), *args[1:])
        return hook

    def _ffn_hook(self, li, cand):
        def hook(module, args):
            if self.mode == "dense":
                return None
            h = args[0]
            flat = h.reshape(-1, h.shape[-1])
            c = cand.to(h.device)
            if self.mode == "refine":
                keep = teal_select(flat, c, self.refine.inter_keep)
            else:
                keep = c.to(h.dtype).expand_as(flat)
            self.energy[li] = energy_fraction(flat, keep)
            if self.per_row:
                self.row_energy[li] = _row_energy_fractions(flat, keep)
            self.kept[li] = int(keep[-1].sum())
            return ((flat * keep).view_as(h), *args[1:])
        return hook

    def _skip_hook(self, module, args, kwargs, out):
        if self.mode == "dense":
            return None
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    def _router_hook(self, module, args, out):
        if self.capture:
            h = out[0] if isinstance(out, tuple) else out
            self.pooled = h.detach().float().mean(1)

    def remove(self):
        for h in self._handles:
            h.remove()


def slice_cache(cache, model, smap, support):
    """A new DynamicCache holding, per layer, only the k/v heads the reduced attention of
    `support` reads, in reduce_model's order (kept kv groups, or one per kept query head when
    groups keep different numbers of heads)."""
    from transformers import DynamicCache

    new = DynamicCache()
    for li, layer in enumerate(smap.layers):
        a = layer.attention
        idx = getattr(model.get_submodule(a.module), "layer_idx", li)
        k, v = cache.layers[idx].keys, cache.layers[idx].values
        heads = sorted(support.heads.get(li, range(a.n_heads)))
        if len(heads) < a.n_heads:
            groups = sorted({a.kv_group_of(h) for h in heads})
            counts = {g: sum(a.kv_group_of(h) == g for h in heads) for g in groups}
            kv_for = groups if len(set(counts.values())) == 1 else [a.kv_group_of(h)
                                                                    for h in heads]
            sel = torch.tensor(kv_for, device=k.device)
            k, v = k.index_select(1, sel), v.index_select(1, sel)
        new.update(k, v, idx)
    return new


def _row_energy_fractions(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row of h [N, W]: sum(h^2 on keep) / sum(h^2), 1.0 for an all-zero row (what
    refine.energy_fraction takes the minimum of)."""
    sq = h.float().square()
    total = sq.sum(-1)
    on = (sq * keep.float()).sum(-1)
    return torch.where(total > 0, on / total.clamp_min(1e-30), torch.ones_like(total))


# ----------------------------------------------------------------------------- helpers
def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if tokenizer is None:
        raise UserInputError("this model has no tokenizer, so it cannot take text prompts")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserInputError("empty prompt")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> int:
    """Next token from [V] logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _eos_ids(session) -> set[int]:
    ids = set()
    for src in (session.tokenizer, getattr(session.model, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def _check_args(max_new_tokens, temperature, top_p):
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserInputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1], got {top_p}")


class _Streamer:
    """Emit only the newly decoded text (holding back incomplete multi-byte characters)."""

    def __init__(self, tokenizer, callback):
        self.tok, self.cb, self.sent = tokenizer, callback, ""

    def push(self, ids: list[int]):
        if self.cb is None:
            return
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return
        if len(text) > len(self.sent):
            self.cb(text[len(self.sent):])
            self.sent = text


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Options:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    refine: RefineConfig | None  # None when absent or inactive
    eos: set[int]
    keep_last: dict
    ctx: int | None
    kv_budget: float = 1.0  # fraction of the prompt's KV positions kept (runtime.kv_reduce)
    prompt_keep: float = 1.0  # fraction of the prompt's tokens kept before the prefill

    def generator(self, device) -> torch.Generator | None:
        return torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None


def _options(session, max_new_tokens, temperature, top_p, seed, refine,
             kv_budget: float = 1.0, prompt_keep: float = 1.0) -> _Options:
    _check_args(max_new_tokens, temperature, top_p)
    kv_budget = check_kv_budget(kv_budget)
    prompt_keep = check_prompt_keep(prompt_keep)
    if kv_budget < 1 and refine is not None and refine.active:
        raise UserInputError("a kv budget below 1 does not combine with refinement")
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        session.model.forward).parameters else {}
    return _Options(max_new_tokens, temperature, top_p, seed,
                    refine if refine is not None and refine.active else None,
                    _eos_ids(session), keep_last, session.context_length, kv_budget,
                    prompt_keep)


def _prompt_ids(session, prompt, chat: bool) -> list[int]:
    ids = encode(session.tokenizer, prompt, chat)
    ctx = session.context_length
    if ctx and len(ids) >= ctx:
        raise UserInputError(f"prompt has {len(ids)} tokens; the model's context holds {ctx}, "
                             f"leaving no room to generate")
    return ids


@dataclass
class _Prefilled:
    """One prompt after its dense prefill: the cache, the last logits and its class."""

    ids: list[int]
    class_id: int | None
    logits: torch.Tensor  # [V] at the last prompt position
    cache: object  # DynamicCache of the dense model, batch 1
    prefill_s: float
    pooled: torch.Tensor | None = None  # router feature, mean over the prompt [1, hidden]
    kv_positions: int | None = None  # positions left in `cache` after KV reduction (None:
    # not reduced); decode steps then pass position_ids from len(ids) on
    prompt_tokens: int | None = None  # the prompt's tokens before any were dropped (ids: the
    # ones kept, prefilled as the whole prompt)

    def positions(self, generated: int, device) -> torch.Tensor | None:
        """position_ids [1, 1] of the step that feeds generated token number `generated`
        (1-based) on a reduced cache; None on an unreduced one (the cache length is right)."""
        if self.kv_positions is None:
            return None
        return torch.tensor([[len(self.ids) + generated - 1]], device=device)


def _prefill(session, ids: list[int], opts: _Options) -> _Prefilled:
    """Dense prefill with a KV cache; the router's measurement is captured in the same forward."""
    from transformers import DynamicCache

    model, smap = session.model, session.smap
    hooks = _PathHooks(model, smap, None, None, session.router.layer) if session.is_bundle \
        else None
    t0 = time.perf_counter()  # the prompt-dropping scorer counts as prefill time
    n_prompt = len(ids)
    if opts.prompt_keep < 1:
        ids = drop_prompt_tokens(model, ids, opts.prompt_keep)
    cache = DynamicCache(config=model.config)
    try:
        out = model(input_ids=torch.tensor([ids], device=session.device), **cache_kwargs(model, cache),
                    use_cache=True, **opts.keep_last)
    finally:
        if hooks:
            hooks.remove()
    class_id = None
    if session.is_bundle:
        class_id = int(session.router.classify(hooks.pooled.cpu())[0])
    kept = None
    if opts.kv_budget < 1:  # after the router hook is gone: importance runs more forwards
        kept = reduce_prompt_cache(model, ids, cache, opts.kv_budget)
    return _Prefilled(ids, class_id, out.logits[0, -1], cache, time.perf_counter() - t0,
                      hooks.pooled.cpu() if hooks else None, kept, n_prompt)


PATHS = ("pertoken", "static", "dense")


def path_kind(session, path: str | None, dense: bool = False) -> str:
    """The decode path a request gets: `path` if given (dense=True means "dense"), else the
    session's default (the per-token path when the bundle has one, else the static class
    path; dense for a plain model)."""
    if dense:
        path = path or "dense"
        if path != "dense":
            raise UserInputError(f"dense=True contradicts path={path!r}")
    if path is None:
        return session.default_path
    if path not in PATHS:
        raise UserInputError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "pertoken" and session.pertoken is None:
        raise UserInputError(f"{session.source} has no per-token plan (a plain model, or a "
                             f"bundle built without one)")
    if path == "static" and not session.is_bundle:
        raise UserInputError(f"{session.source} is a model, not a bundle: it has no class paths")
    return path


class _Path:
    """The decode path of a routed row: the per-token path, its static class (compact copy or
    masks) or the dense model, and the byte accounting of its steps."""

    def __init__(self, session, class_id, kind: str, refine: RefineConfig | None):
        smap = session.smap
        self.kind = kind
        self.pertoken = session.pertoken if kind == "pertoken" else None
        self.lean_step = self.pertoken is not None and decode_step_supports(session.model)
        self._step_bytes: dict[int, tuple[float, int]] = {}
        if self.pertoken is not None:
            self.pertoken_fraction, self.pertoken_bytes = self.pertoken_step(1)
        self.use_class = class_id is not None and kind == "static"
        self.cls = session.classes[class_id] if self.use_class else None
        self.compact = (session.compact_model(class_id) if self.use_class and refine is None
                        and session.execution == "compact" else None)
        self.total_bytes = smap.total_bytes if smap else sum(
            p.numel() * p.element_size() for p in session.model.parameters())
        if self.use_class:
            sup = self.cls.support
            self.class_bytes = smap.unprunable_bytes() + sup.kept_bytes(smap)
            self.kept_layers = sup.kept_layers(smap)
            self.attn_bytes = sup.kept_bytes(smap) - sum(
                len(sup.channels.get(li, range(smap.layers[li].ffn.width)))
                * smap.channel_bytes(li) for li in self.kept_layers if smap.layers[li].ffn)

    def pertoken_step(self, rows: int) -> tuple[float, int]:
        """(fraction of dense, weight bytes) a per-token step of `rows` rows reads; cached per
        row count, since a batch asks at every step and the plan is fixed for this path."""
        if rows not in self._step_bytes:
            nb = self.pertoken.bytes(rows)
            self._step_bytes[rows] = nb["fraction"], int(round(nb["bytes"]))
        return self._step_bytes[rows]

    @property
    def name(self) -> str:
        return "class" if self.use_class else self.kind


def _result(session, pre: _Prefilled, path: _Path, generated, densities, energy, nbytes, log,
            decode_s, finish, batch_size, missed=None) -> Result:
    n_steps = len(densities)
    return Result(
        text=session.tokenizer.decode(generated, skip_special_tokens=True),
        token_ids=generated, prompt_tokens=pre.prompt_tokens or len(pre.ids),
        class_id=pre.class_id,
        path=path.name, densities=densities, energy=energy, bytes_per_token=nbytes,
        refinements=log, prefill_s=pre.prefill_s, decode_s=decode_s,
        tokens_per_s=len(generated) / max(pre.prefill_s + decode_s, 1e-9),
        decode_tokens_per_s=n_steps / decode_s if n_steps and decode_s > 0 else 0.0,
        finish_reason=finish, batch_size=batch_size, missed=missed or [],
        kv_positions=pre.kv_positions, kv_bytes_per_token=_kv_step_bytes(session, pre, n_steps),
        prompt_kept=len(pre.ids) if len(pre.ids) < (pre.prompt_tokens or 0) else None)


def _kv_step_bytes(session, pre: _Prefilled, n_steps: int) -> list[int] | None:
    """K/V bytes of each decode step: step i attends to the kept prompt positions, the i
    answer tokens cached before it and its own."""
    from .kv_reduce import kv_position_bytes

    if session.smap is None:
        return None
    el = session.pertoken.shapes.elsize if session.pertoken is not None else None
    per_position = kv_position_bytes(session.model, session.smap, el)
    kept = pre.kv_positions if pre.kv_positions is not None else len(pre.ids)
    return [(kept + i + 1) * per_position for i in range(n_steps)]


@torch.no_grad()
def generate(session, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False,
             dense: bool = False, refine: RefineConfig | None = None, stream=None,
             path: str | None = None, kv_budget: float = 1.0,
             prompt_keep: float = 1.0) -> Result:
    """Prefill dense, route, then decode on the chosen path (see the module docstring);
    kv_budget < 1 keeps that fraction of the prompt's KV positions, prompt_keep < 1 that
    fraction of its tokens before the prefill (runtime.kv_reduce)."""
    kind = path_kind(session, path, dense)
    opts = _options(session, max_new_tokens, temperature, top_p, seed, refine, kv_budget,
                    prompt_keep)
    pre = _prefill(session, _prompt_ids(session, prompt, chat), opts)
    return _decode_one(session, pre, _Path(session, pre.class_id, kind, opts.refine), opts,
                       stream)


@contextmanager
def pertoken_steps(pt, mode: str = "pertoken"):
    """Forwards inside run on the per-token path (mode "full": the same kernels and loop at
    full support, runtime.pertoken.PerToken); outside, the model is the plain dense model
    (prefill, dense and class paths never see the swapped modules)."""
    pt.stats.clear()
    pt.attach()
    pt.mode = mode
    try:
        yield pt
    finally:
        pt.mode = "dense"
        pt.detach()


def pertoken_logits(pt, model, ids, cache, mask=None, positions=None, keep_last=None,
                    lean: bool | None = None, mode: str = "pertoken") -> torch.Tensor:
    """Logits [B, 1, V] of one decode step of `model` on the per-token path `pt`: Llama-family
    models (lean=None: runtime.decode_step.supports) run decode_step's plain loop over the
    same modules, others the HF forward. What run, eval's decode, bench and serve all time."""
    if lean is None:
        lean = decode_step_supports(model)
    with pertoken_steps(pt, pt.step_mode(ids.shape[0], mode)):
        if lean:
            return decode_logits(model, ids, cache, mask, positions, kernels=pt.cpu is not None)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     **cache_kwargs(model, cache), use_cache=True, **(keep_last or {})).logits


def _pertoken_step(path: _Path, model, ids, cache, mask=None, positions=None,
                   keep_last=None):
    """One decode forward on the per-token path: (logits [B, 1, V], per-row missed dicts)."""
    pt = path.pertoken
    logits = pertoken_logits(pt, model, ids, cache, mask, positions, keep_last, path.lean_step)
    worst = pt.missed()
    n = logits.shape[0]
    rows = [{k: float(v.view(n, -1)[i, -1]) for k, v in worst.items()} for i in range(n)]
    return logits, rows


def _decode_one(session, pre: _Prefilled, path: _Path, opts: _Options, stream) -> Result:
    """The single-row decode loop: static class path, refinement, or dense."""
    model, smap, dev = session.model, session.smap, session.device
    refine, keep_last, cls = opts.refine, opts.keep_last, path.cls
    gen = opts.generator(dev)
    cache, pre.cache = pre.cache, None
    hooks, sparsity, step_model = None, None, model
    if path.compact is not None:  # decode on the reduced copy, with the cache sliced to match
        step_model, cache = path.compact, slice_cache(cache, model, smap, cls.support)
    elif path.use_class and refine is not None and refine.mode == "input":
        sparsity = InputSparsity(model, smap, _input_thresholds(session))
    elif path.use_class:
        switching = bool(refine and refine.switch_every and pre.pooled is not None)
        layer = session.router.layer if switching else None
        hooks = _PathHooks(model, smap, cls.support, refine, layer)
        feature_sum, n_feature = pre.pooled * len(pre.ids), len(pre.ids)

    streamer = _Streamer(session.tokenizer, stream)
    generated, densities, energy, nbytes, log, missed = [], [], [], [], [], []

    def record(density, e, step_bytes):
        densities.append(density)
        energy.append(e)
        nbytes.append(step_bytes)

    finish = "length"
    t1 = time.perf_counter()
    try:
        token = sample(pre.logits, opts.temperature, opts.top_p, gen)
        for step in range(opts.max_new_tokens):
            generated.append(token)
            streamer.push(generated)
            if token in opts.eos:
                finish = "eos"
                break
            if len(generated) == opts.max_new_tokens:
                break
            if opts.ctx and len(pre.ids) + len(generated) >= opts.ctx:
                finish = "context"
                break
            mode = "dense"
            if sparsity is not None:
                mode = "input" if refine.refines_step(step) else "dense"
                sparsity.on = mode == "input"
            elif path.use_class:
                mode = "refine" if refine and refine.refines_step(step) else "class"
            if hooks:
                hooks.mode = mode
            step_in = torch.tensor([[token]], device=dev)
            pos = pre.positions(len(generated), dev)  # None unless the KV cache was reduced
            if path.pertoken is not None:
                logits, (m,) = _pertoken_step(path, model, step_in, cache, positions=pos,
                                              keep_last=keep_last)
                missed.append(m)
                record(path.pertoken_fraction, 1.0 - m.get("ffn", 0.0), path.pertoken_bytes)
                token = sample(logits[0, -1], opts.temperature, opts.top_p, gen)
                continue
            out = step_model(input_ids=step_in, **cache_kwargs(step_model, cache), use_cache=True,
                             **({"position_ids": pos} if pos is not None else {}), **keep_last)
            if mode == "dense":
                record(1.0, 1.0, path.total_bytes)
            elif mode == "input":
                e = min(sparsity.energy.values(), default=1.0)
                step_bytes = sparsity.step_bytes()
                density = (step_bytes - smap.unprunable_bytes()) / smap.prunable_bytes()
                action = "keep"
                if refine.widens(e):  # recompute this token densely
                    action, density = "widen", 1.0
                    cache.crop(-1)
                    sparsity.on = False
                    out = model(input_ids=step_in, **cache_kwargs(model, cache), use_cache=True,
                                **keep_last)
                    step_bytes += path.total_bytes
                record(density, e, step_bytes)
                log.append({"token": len(generated), "action": action, "energy": e,
                            "density": density})
            elif mode == "class":  # the compact model never sees the full intermediate
                record(cls.density, min(hooks.energy.values(), default=1.0) if hooks else None,
                       path.class_bytes)
            else:
                e = min(hooks.energy.values(), default=1.0)
                kept = refined_support_bytes(smap, path.attn_bytes, path.kept_layers,
                                             hooks.kept)
                density = kept / smap.prunable_bytes()
                step_bytes = (smap.unprunable_bytes() + kept
                              + measurement_bytes(smap, path.kept_layers, hooks.kept))
                action = "keep"
                if refine.widens(e):  # recompute this token densely
                    action, density = "widen", 1.0
                    cache.crop(-1)  # drop this token's k/v
                    hooks.mode = "dense"
                    out = model(input_ids=step_in, **cache_kwargs(model, cache), use_cache=True,
                                **keep_last)
                    step_bytes += path.total_bytes
                record(density, e, step_bytes)
                log.append({"token": len(generated), "action": action, "energy": e,
                            "density": density})
            if hooks is not None and hooks.capture:  # running router feature; maybe switch
                feature_sum, n_feature = feature_sum + hooks.pooled.cpu(), n_feature + 1
                if (step + 1) % refine.switch_every == 0:
                    best = int(session.router.classify(feature_sum / n_feature)[0])
                    if best != path.cls.id:
                        log.append({"token": len(generated), "action": "switch",
                                    "from": path.cls.id, "to": best})
                        hooks.remove()
                        path = _Path(session, best, "static", refine)
                        cls = path.cls
                        hooks = _PathHooks(model, smap, path.cls.support, refine,
                                           session.router.layer)
            token = sample(out.logits[0, -1], opts.temperature, opts.top_p, gen)
    finally:
        for h in (hooks, sparsity):
            if h is not None:
                h.remove()
    return _result(session, pre, path, generated, densities, energy, nbytes, log,
                   time.perf_counter() - t1, finish, 1, missed)


def _input_thresholds(session) -> dict:
    if not session.input_sparsity:
        raise UserInputError(f"bundle {session.source} holds no input-sparsity thresholds "
                             f"(built by an older cscompile): rebuild it to use refine mode input")
    return session.input_sparsity["thresholds"]


# ----------------------------------------------------------------------------- batches
def _batchable(cache) -> bool:
    """Whether a prefill cache can be left-padded and stacked: plain full-attention layers
    only (a sliding-window or other special layer decodes row by row instead)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _stack_caches(config, caches, length: int):
    """One DynamicCache [B, H, length, D] per layer: the rows' batch-1 caches left-padded with
    zeros to `length` (the padding is hidden by the attention mask)."""
    from transformers import DynamicCache

    new = DynamicCache(config=config)
    for idx, layer in enumerate(caches[0].layers):
        if not layer.is_initialized:
            continue
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[idx].keys, c.layers[idx].values
            pad = (0, 0, length - k.shape[-2], 0)
            ks.append(torch.nn.functional.pad(k, pad))
            vs.append(torch.nn.functional.pad(v, pad))
        new.update(torch.cat(ks), torch.cat(vs), idx)
    return new


class BatchRow:
    """One prompt inside a DecodeBatch: its prefill, sampling state and what it generated."""

    def __init__(self, session, pre: _Prefilled, opts: _Options, stream=None):
        self.session, self.pre, self.opts = session, pre, opts
        self.gen = opts.generator(session.device)
        self.streamer = _Streamer(session.tokenizer, stream)
        self.generated: list[int] = []
        self.densities, self.energy, self.nbytes, self.missed = [], [], [], []
        self.token: int | None = None  # the next input token (sampled, not yet fed)
        self.finish: str | None = None  # eos | length | context once done
        self.batch_size = 1  # most rows this one shared a step with
        self.t0 = time.perf_counter()

    def advance(self, token: int) -> bool:
        """Record a sampled token; False when it ends the row (same order of checks as the
        single-prompt loop, so both stop on the same token)."""
        self.generated.append(token)
        self.streamer.push(self.generated)
        self.token = token
        if token in self.opts.eos:
            self.finish = "eos"
        elif len(self.generated) == self.opts.max_new_tokens:
            self.finish = "length"
        elif self.opts.ctx and len(self.pre.ids) + len(self.generated) >= self.opts.ctx:
            self.finish = "context"
        return self.finish is None

    def result(self, path: _Path) -> Result:
        return _result(self.session, self.pre, path, self.generated, self.densities,
                       self.energy, self.nbytes, [], time.perf_counter() - self.t0,
                       self.finish or "length", self.batch_size, self.missed)


class DecodeBatch:
    """Rows that share one static decode path (the per-token path, one class, or dense),
    decoded with ONE forward per step; rows join (`add`) and leave (`drop`) between steps.

    The stacked cache holds every row left-padded to the longest; an attention mask hides
    the padding and position_ids = cumsum(mask) - 1 give each row its own positions, so a
    row's tokens are what single-prompt `generate` gives it (up to float reordering) whatever
    joins or leaves around it. A row that finishes leaves at once (its cache rows are cut out,
    and the columns no row uses any more). generate_batch decodes its chunks on one; the server
    (runtime.engine) keeps one per path open and admits requests between steps. close() when
    done (a masked class path holds hooks on the dense model, active only inside its steps)."""

    def __init__(self, session, path: _Path):
        self.session, self.path = session, path
        self.rows: list[BatchRow] = []
        self.cache, self.mask = None, None  # mask: [rows, cache length] long
        self.model = path.compact if path.compact is not None else session.model
        self.hooks = None
        if path.use_class and path.compact is None:
            self.hooks = _PathHooks(session.model, session.smap, path.cls.support, None)
            self.hooks.per_row = True  # mode stays "dense" (a no-op) outside this batch's steps

    @torch.no_grad()
    def add(self, pre: _Prefilled, opts: _Options, stream=None) -> BatchRow:
        """A prefilled prompt joins (sampling its first token from the prefill logits, as the
        single-prompt loop does); if that token already ends it, it never enters the cache."""
        row = BatchRow(self.session, pre, opts, stream)
        cache, pre.cache = pre.cache, None
        if not row.advance(sample(pre.logits, opts.temperature, opts.top_p, row.gen)):
            return row
        if self.path.compact is not None:
            cache = slice_cache(cache, self.session.model, self.session.smap,
                                self.path.cls.support)
        n = len(pre.ids)
        own = torch.ones(1, n, dtype=torch.long, device=self.session.device)
        if not self.rows:
            self.cache, self.mask = cache, own
        else:
            width = max(self.mask.shape[1], n)
            self.cache = _stack_caches(self.model.config, [self.cache, cache], width)
            pad = torch.nn.functional.pad
            self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)),
                                   pad(own, (width - n, 0))])
        self.rows.append(row)
        return row

    def drop(self, row: BatchRow):
        """Take a row out (finished, cancelled): its cache rows go, and any leading columns
        no remaining row uses."""
        i = self.rows.index(row)
        del self.rows[i]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        keep = torch.tensor([j for j in range(len(self.rows) + 1) if j != i],
                            device=self.mask.device)
        mask = self.mask[keep]
        start = int(mask.any(0).nonzero()[0])  # rows are left-padded: a prefix no row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[keep, :, start:]
                layer.values = layer.values[keep, :, start:]

    @torch.no_grad()
    def step(self) -> list[BatchRow]:
        """One decode forward over every row; returns the rows it finished (already dropped)."""
        rows, path, dev = self.rows, self.path, self.session.device
        n = len(rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(n, 1)], dim=1)
        mask, opts0 = self.mask, rows[0].opts

        def run():
            return self.model(input_ids=torch.tensor([[r.token] for r in rows], device=dev),
                              attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                              **cache_kwargs(self.model, self.cache), use_cache=True,
                              **opts0.keep_last)

        row_missed = None
        if path.pertoken is not None:
            ids = torch.tensor([[r.token] for r in rows], device=dev)
            logits, row_missed = _pertoken_step(path, self.model, ids, self.cache, mask,
                                                mask.sum(-1, keepdim=True) - 1, opts0.keep_last)
        elif self.hooks is not None:
            self.hooks.mode = "class"
            try:
                logits = run().logits
            finally:
                self.hooks.mode = "dense"
        else:
            logits = run().logits
        done = []
        step_bytes = path.pertoken_step(n) if row_missed is not None else None
        for i, r in enumerate(rows):
            r.batch_size = max(r.batch_size, n)
            if row_missed is not None:
                r.missed.append(row_missed[i])
                fraction, nbytes = step_bytes
                stats = (fraction, 1.0 - row_missed[i].get("ffn", 0.0), nbytes)
            elif path.use_class:
                e = (min((float(t[i]) for t in self.hooks.row_energy.values()), default=1.0)
                     if self.hooks else None)
                stats = (path.cls.density, e, path.class_bytes)
            else:
                stats = (1.0, 1.0, path.total_bytes)
            r.densities.append(stats[0])
            r.energy.append(stats[1])
            r.nbytes.append(stats[2])
            if not r.advance(sample(logits[i, -1], r.opts.temperature, r.opts.top_p, r.gen)):
                done.append(r)
        for r in done:
            self.drop(r)
        return done

    def close(self):
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def _decode_chunk(session, rows: list[_Prefilled], path: _Path, opts: _Options,
                  streams) -> list[Result]:
    """Decode rows that share a static path (one class, or dense) with one forward per step."""
    batch = DecodeBatch(session, path)
    try:
        members = [batch.add(pre, opts, s) for pre, s in zip(rows, streams)]
        while batch.rows:
            batch.step()
    finally:
        batch.close()
    return [r.result(path) for r in members]


@torch.no_grad()
def generate_batch(session, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   chat: bool = False, dense: bool = False, refine: RefineConfig | None = None,
                   stream=None, path: str | None = None,
                   kv_budget: float = 1.0, prompt_keep: float = 1.0) -> list[Result]:
    """Generate for every prompt, batching rows routed to the same path (see the module
    docstring); results in input order. `stream`, if given, is called as stream(index, text).
    With kv_budget < 1 every row decodes alone (reduced caches keep their own positions).

    A chunk decodes as soon as it holds `batch_size` rows, so at most about
    (groups x batch_size) prefill caches are held at once."""
    if isinstance(prompts, str):
        raise UserInputError("generate_batch takes a list of prompts, not one string")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    kind = path_kind(session, path, dense)
    opts = _options(session, max_new_tokens, temperature, top_p, seed, refine, kv_budget,
                    prompt_keep)
    all_ids = []
    for i, prompt in enumerate(prompts):  # refuse bad input before any compute
        try:
            all_ids.append(_prompt_ids(session, prompt, chat))
        except UserInputError as e:
            raise UserInputError(f"prompt {i}: {e}") from None

    def stream_for(i):
        return None if stream is None else (lambda piece: stream(i, piece))

    results: list[Result | None] = [None] * len(all_ids)
    pending: dict[object, list[tuple[int, _Prefilled, _Path]]] = {}

    def flush(key):
        chunk = pending.pop(key)
        if len(chunk) == 1:
            i, pre, path = chunk[0]
            results[i] = _decode_one(session, pre, path, opts, stream_for(i))
            return
        done = _decode_chunk(session, [pre for _, pre, _ in chunk], chunk[0][2], opts,
                             [stream_for(i) for i, _, _ in chunk])
        for (i, _, _), r in zip(chunk, done):
            results[i] = r

    for i, ids in enumerate(all_ids):
        pre = _prefill(session, ids, opts)
        row_path = _Path(session, pre.class_id, kind, opts.refine)
        if batch_size == 1 or (row_path.use_class and opts.refine) or not _batchable(pre.cache) \
                or pre.kv_positions is not None:
            results[i] = _decode_one(session, pre, row_path, opts, stream_for(i))
            continue
        key = ("class", pre.class_id) if row_path.use_class else (kind,)
        pending.setdefault(key, []).append((i, pre, row_path))
        if len(pending[key]) == batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    return results
