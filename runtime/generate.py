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
    on the dense model, so a widened token is exactly a dense step.
This is what a no-cache recomputation gives when positions < prompt length run dense and each
generated position runs on the support chosen for it (tests/test_runtime.py checks that).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field

import torch

from cscompile.errors import UserInputError

from .refine import (RefineConfig, energy_fraction, measurement_bytes, refined_support_bytes,
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
@torch.no_grad()
def generate(session, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False,
             dense: bool = False, refine: RefineConfig | None = None, stream=None) -> Result:
    """Prefill dense, route, then decode on the class path (see the module docstring)."""
    from transformers import DynamicCache

    _check_args(max_new_tokens, temperature, top_p)
    ids = encode(session.tokenizer, prompt, chat)
    ctx = session.context_length
    if ctx and len(ids) >= ctx:
        raise UserInputError(f"prompt has {len(ids)} tokens; the model's context holds {ctx}, "
                             f"leaving no room to generate")
    model, smap, dev = session.model, session.smap, session.device
    refine = refine if refine is not None and refine.active else None
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    eos = _eos_ids(session)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}
    hooks = None
    if session.is_bundle:
        hooks = _PathHooks(model, smap, None, None, session.router.layer)
    total_bytes = smap.total_bytes if smap else sum(
        p.numel() * p.element_size() for p in model.parameters())

    # prefill (dense) + routing measurement
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    try:
        out = model(input_ids=torch.tensor([ids], device=dev), past_key_values=cache,
                    use_cache=True, **keep_last)
    finally:
        if hooks:
            hooks.remove()
    class_id = None
    if session.is_bundle:
        class_id = int(session.router.classify(hooks.pooled.cpu())[0])
    prefill_s = time.perf_counter() - t0

    use_class = class_id is not None and not dense
    cls = session.classes[class_id] if use_class else None
    hooks, step_model = None, model
    compact = (session.compact_model(class_id) if use_class and refine is None
               and session.execution == "compact" else None)
    if compact is not None:  # decode on the reduced copy, with the cache sliced to match
        step_model, cache = compact, slice_cache(cache, model, smap, cls.support)
    elif use_class:
        hooks = _PathHooks(model, smap, cls.support, refine)
    if use_class:
        class_bytes = smap.unprunable_bytes() + cls.support.kept_bytes(smap)
        kept_layers = cls.support.kept_layers(smap)
        attn_bytes = cls.support.kept_bytes(smap) - sum(
            len(cls.support.channels.get(li, range(smap.layers[li].ffn.width)))
            * smap.channel_bytes(li) for li in kept_layers if smap.layers[li].ffn)

    streamer = _Streamer(session.tokenizer, stream)
    generated, densities, energy, nbytes, log = [], [], [], [], []

    def record(density, e, step_bytes):
        densities.append(density)
        energy.append(e)
        nbytes.append(step_bytes)

    finish = "length"
    t1 = time.perf_counter()
    try:
        token = sample(out.logits[0, -1], temperature, top_p, gen)
        for step in range(max_new_tokens):
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
            mode = "dense"
            if use_class:
                mode = "refine" if refine and refine.refines_step(step) else "class"
            if hooks:
                hooks.mode = mode
            step_in = torch.tensor([[token]], device=dev)
            out = step_model(input_ids=step_in, past_key_values=cache, use_cache=True,
                             **keep_last)
            if mode == "dense":
                record(1.0, 1.0, total_bytes)
            elif mode == "class":  # the compact model never sees the full intermediate
                record(cls.density, min(hooks.energy.values(), default=1.0) if hooks else None,
                       class_bytes)
            else:
                e = min(hooks.energy.values(), default=1.0)
                kept = refined_support_bytes(smap, attn_bytes, kept_layers, hooks.kept)
                density = kept / smap.prunable_bytes()
                step_bytes = (smap.unprunable_bytes() + kept
                              + measurement_bytes(smap, kept_layers, hooks.kept))
                action = "keep"
                if refine.widens(e):  # recompute this token densely
                    action, density = "widen", 1.0
                    cache.crop(-1)  # drop this token's k/v
                    hooks.mode = "dense"
                    out = model(input_ids=step_in, past_key_values=cache, use_cache=True,
                                **keep_last)
                    step_bytes += total_bytes
                record(density, e, step_bytes)
                log.append({"token": len(generated), "action": action, "energy": e,
                            "density": density})
            token = sample(out.logits[0, -1], temperature, top_p, gen)
    finally:
        if hooks:
            hooks.remove()
    decode_s = time.perf_counter() - t1
    n_steps = len(densities)
    return Result(
        text=session.tokenizer.decode(generated, skip_special_tokens=True),
        token_ids=generated, prompt_tokens=len(ids), class_id=class_id,
        path="class" if use_class else "dense", densities=densities, energy=energy,
        bytes_per_token=nbytes, refinements=log, prefill_s=prefill_s, decode_s=decode_s,
        tokens_per_s=len(generated) / max(prefill_s + decode_s, 1e-9),
        decode_tokens_per_s=n_steps / decode_s if n_steps and decode_s > 0 else 0.0,
        finish_reason=finish)
