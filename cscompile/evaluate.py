"""`cscompile eval`: quality against the dense model, side by side with the baselines.

Everything is teacher-forced on the same token ids, one forward per (row, method):

  lm   (WikiText-2 raw text)   fixed windows; perplexity, KL and top-1 vs dense on the last half
  mc   (rows with choices)     acc_norm: argmax over choices of log p(choice | prompt) / chars,
                               and how often the method picks the dense model's choice
  gen  (any other rows)        the dense model's greedy continuation (--gen-tokens) is generated
                               once (prompt in the chat template with --chat); KL and top-1 vs
                               dense over those generated positions, weighted by token

Methods see the row's prompt (the text before the scored tokens) and nothing after it:
per-prompt methods (griffin, the bundle's router) select from it; static methods calibrate on
--calib-rows rows of every data set, disjoint from the evaluated rows; per-token methods
decide every position from its own activations. Every position, prompt included, runs on the
method's path (the strict convention: a reduced prefill, as in TEAL's perplexity numbers).

Equal bytes: every method is charged the weight bytes it reads per token (unprunable weights
included, the runtime monitor's extra reads too), reported as a fraction of the dense bytes.
For a MODEL target the densities are FFN densities with every head kept; for a bundle, the
baselines keep every head and the FFN share that matches the bundle's mean bytes per token.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .calib import prompt_hash
from .errors import UserInputError
from .metrics import compare_to_dense, nll, wikitext_windows
from .runtime.generate import encode

BASELINES = ("magnitude", "wanda", "activation", "griffin", "teal", "cats", "oracle", "random", "cs")
DEFAULT_BASELINES = ("magnitude", "wanda", "griffin", "teal", "cats", "random")
# SmolLM2-135M (base model) acc_norm from its model card (lighteval, zero-shot)
PUBLISHED = {"hellaswag": 42.1, "piqa": 68.4, "arc_easy": 59.9}


@dataclass
class EvalSet:
    name: str
    kind: str  # lm | mc | gen
    items: list  # lm: LongTensor windows; mc/gen: row dicts
    skipped_build_rows: int = 0


@dataclass
class Method:
    """One column of the comparison: `run(ids, prompt_len)` -> (logits [1, T, V], bytes read
    per token as a fraction of dense)."""

    name: str
    density: float | None
    kind: str
    run: object
    note: str = ""
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data
def load_sets(data: Path, tokenizer, rows: int, seed: int, windows: int, window: int,
              calib_rows: int, build_hashes: set[str]) -> tuple[list[EvalSet], list[str]]:
    """Evaluation sets under `data` (one JSONL, a WikiText raw file, a task dir, or a dir of task
    dirs) and the calibration texts drawn from the same files (disjoint rows)."""
    data = Path(data)
    if not data.exists():
        raise UserInputError(f"--data {data}: no such file or directory")
    if data.is_dir() and not (data / "data.jsonl").exists() and not (data / "wiki.test.raw").exists():
        sources = sorted(p for p in data.iterdir() if p.is_dir() and (
            (p / "data.jsonl").exists() or (p / "wiki.test.raw").exists()))
        if not sources:
            raise UserInputError(f"--data {data}: no data.jsonl or wiki.test.raw in it or its subfolders")
    else:
        sources = [data]
    sets, calib = [], []
    for src in sources:
        raw = src / "wiki.test.raw" if src.is_dir() else src
        if raw.suffix in (".raw", ".txt") and raw.is_file():
            wins = wikitext_windows(tokenizer, raw, windows + calib_rows, window, seed)
            sets.append(EvalSet(src.name if src.is_dir() else raw.stem, "lm", list(wins[calib_rows:])))
            calib += [tokenizer.decode(w[: window // 2]) for w in wins[:calib_rows]]
            continue
        path = src / "data.jsonl" if src.is_dir() else src
        name = src.name if src.is_dir() else path.stem
        all_rows = _read_jsonl(path)
        order = np.random.default_rng(seed).permutation(len(all_rows))
        built = [prompt_hash(r["prompt"]) in build_hashes for r in all_rows]
        picked, cal = [], []
        for i in order:
            if built[i]:  # built the bundle: never evaluated (the count is reported)
                continue
            if len(cal) < calib_rows:
                cal.append(all_rows[i])
            elif len(picked) < rows:
                picked.append(all_rows[i])
            else:
                break
        skipped = sum(built)
        kind = "mc" if all("choices" in r and "label" in r for r in picked[:1]) else "gen"
        sets.append(EvalSet(name, kind, picked, skipped))
        calib += [r["prompt"] + "\n" + str(r.get("solution") or r.get("answer") or "") for r in cal]
    return sets, calib


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserInputError(f"{path}:{n}: each line needs a string \"prompt\"")
        out.append(row)
    if not out:
        raise UserInputError(f"{path}: no rows")
    return out


# ----------------------------------------------------------------------------- methods
def _logits(model, ids):
    from .frontend import logits_of

    with torch.no_grad():
        return logits_of(model, ids)


def dense_method(model) -> Method:
    return Method("dense", 1.0, "dense", lambda ids, p: (_logits(model, ids), 1.0))


def baseline_method(model, smap, name: str, ffn_density: float, calib_ids, seed: int,
                    total_bytes: int) -> Method:
    from .passes.support import KINDS, estimate_support

    ffn_bytes = sum(smap.layers[li].ffn.width * smap.channel_bytes(li)
                    for li in range(smap.n_layers) if smap.layers[li].ffn)

    def charged(fraction):  # all weights but the FFN share the method drops
        return (total_bytes - (1 - fraction) * ffn_bytes) / total_bytes

    if KINDS[name] == "per_prompt":
        def run(ids, p):
            est = estimate_support(model, smap, [ids[:, :p]], ffn_density, method=name, seed=seed)
            with est.apply(model):
                return _logits(model, ids), charged(est.bytes_fraction)
    else:
        est = estimate_support(model, smap, calib_ids, ffn_density, method=name, seed=seed)

        def run(ids, p):
            with est.apply(model):
                return _logits(model, ids), charged(est.bytes_fraction)
    return Method(name, ffn_density, KINDS[name], run)


class ClassPath:
    """A class support on every position of one forward; with `refine`, per-token TEAL inside
    the class's channels and, as in the runtime, tokens whose off-support FFN energy reaches the
    threshold recomputed dense (decided on a first pass, applied on a second)."""

    def __init__(self, model, smap, support, refine=None):
        self.model, self.smap, self.support, self.refine = model, smap, support, refine

    @contextmanager
    def hooks(self, dense_rows: torch.Tensor | None):
        from .runtime.refine import teal_select

        smap, support, handles = self.smap, self.support, []
        self.energy, self.kept = {}, {}
        kept_layers = set(support.kept_layers(smap))

        def rows(mask, x):  # per-position override: dense rows keep everything
            if dense_rows is None:
                return mask
            return torch.where(dense_rows.view(-1, 1).to(x.device), torch.ones_like(mask), mask)

        for li, layer in enumerate(smap.layers):
            a, f = layer.attention, layer.ffn
            if a is not None and len(support.heads.get(li, range(a.n_heads))) < a.n_heads:
                cols = torch.zeros(sum(len(c) for c in a.o_cols))
                for h in support.heads[li]:
                    cols[a.o_cols[h]] = 1.0

                def head_hook(m, args, cols=cols):
                    x = args[0]
                    flat = x.reshape(-1, x.shape[-1])
                    keep = rows(cols.to(x.dtype).expand_as(flat), x)
                    return ((flat * keep).view_as(x), *args[1:])
                handles.append(self.model.get_submodule(a.o).register_forward_pre_hook(head_hook))
            if f is not None and li in kept_layers:
                cand = torch.zeros(f.width, dtype=torch.bool)
                cand[support.channels.get(li, list(range(f.width)))] = True

                def ffn_hook(m, args, li=li, cand=cand):
                    h = args[0]
                    flat = h.reshape(-1, h.shape[-1])
                    if self.refine is not None:
                        keep = teal_select(flat, cand, self.refine.inter_keep)
                    else:
                        keep = cand.to(h.dtype).expand_as(flat)
                    sq = flat.float().square()
                    total = sq.sum(-1)
                    self.energy[li] = torch.where(total > 0, (sq * keep).sum(-1) / total.clamp_min(1e-30),
                                                  torch.ones_like(total))
                    keep = rows(keep, h)
                    self.kept[li] = keep.sum(-1)
                    return ((flat * keep).view_as(h), *args[1:])
                handles.append(self.model.get_submodule(f.down).register_forward_pre_hook(ffn_hook))
            if li not in kept_layers:
                def skip(m, args, kwargs, out):
                    x = args[0] if args else kwargs["hidden_states"]
                    h = out[0] if isinstance(out, tuple) else out
                    new = x if dense_rows is None else torch.where(
                        dense_rows.view(1, -1, 1).to(h.device), h, x)
                    return (new, *out[1:]) if isinstance(out, tuple) else new
                handles.append(self.model.get_submodule(layer.module).register_forward_hook(
                    skip, with_kwargs=True))
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    def run(self, ids: torch.Tensor):
        """Logits [1, T, V] and per-position stats: bytes read, widened, min energy."""
        from .runtime.refine import gate_up_row_bytes

        smap = self.smap
        with self.hooks(None):
            logits = _logits(self.model, ids)
        t = ids.shape[1]
        energy = torch.stack(list(self.energy.values())).min(0).values if self.energy else torch.ones(t)
        widened = torch.zeros(t, dtype=torch.bool)
        kept_layers = self.support.kept_layers(smap)
        attn_bytes = self.support.kept_bytes(smap) - sum(
            len(self.support.channels.get(li, range(smap.layers[li].ffn.width))) * smap.channel_bytes(li)
            for li in kept_layers if smap.layers[li].ffn)
        per_token = torch.full((t,), float(smap.unprunable_bytes() + attn_bytes), dtype=torch.float64)
        if self.refine is None:
            per_token += self.support.kept_bytes(smap) - attn_bytes
        else:
            for li in kept_layers:
                f = smap.layers[li].ffn
                if f is None:
                    continue
                kept = self.kept[li].double().cpu()
                # the monitor reads the gate/up rows of every channel the token dropped
                per_token += kept * smap.channel_bytes(li) + (f.width - kept) * gate_up_row_bytes(smap, li)
            widened = (1.0 - energy.cpu()) >= self.refine.widen_threshold
            if bool(widened.any()):
                with self.hooks(widened):
                    logits = _logits(self.model, ids)
                per_token += widened.double() * smap.total_bytes
        return logits, per_token / smap.total_bytes, widened, energy.cpu()


def refine_key(cfg) -> str:
    return f"bundle+refine(w={cfg.widen_threshold:g},k={cfg.inter_keep:g})"


def bundle_methods(session, refines) -> list[Method]:
    """The bundle's routed class path: refinement off, and on with each config in `refines`."""
    from .runtime.generate import _PathHooks

    smap, model = session.smap, session.model

    def route(ids, p):
        hooks = _PathHooks(model, smap, None, None, session.router.layer)
        try:
            _logits(model, ids[:, :p])
        finally:
            hooks.remove()
        return int(session.router.classify(hooks.pooled.cpu())[0])

    def make(table, name):
        method = Method(name, None, "routed", None, stats={"classes": {}, "widened": [], "energy": []})

        def run(ids, p):
            c = route(ids, p)
            method.stats["classes"][c] = method.stats["classes"].get(c, 0) + 1
            logits, per_token, widened, energy = table[c].run(ids)
            method.stats["widened"].append(float(widened[p - 1:].double().mean()))
            method.stats["energy"].append(float(energy[p - 1:].mean()))
            return logits, float(per_token[p - 1:].mean())
        method.run = run
        return method

    out = [make({c.id: ClassPath(model, smap, c.support) for c in session.classes}, "bundle")]
    if session.pertoken is not None:  # the runtime's default path, on every position
        from .runtime.generate import pertoken_steps

        pt = session.pertoken

        def run_pertoken(ids, p):
            with pertoken_steps(pt):
                logits = _logits(model, ids)
            return logits, pt.bytes()["fraction"]
        out.insert(0, Method("bundle+pertoken", None, "per_token", run_pertoken,
                             note="the runtime's default path: the bundle's per-token plan "
                                  "(bytes: of the dense model's bytes read per token)"))
    if session.input_sparsity:  # the runtime's refine mode "input", on every position
        from .runtime.refine import InputSparsity

        def run_input(ids, p):
            sparsity = InputSparsity(model, smap, session.input_sparsity["thresholds"])
            sparsity.on = True
            try:
                logits = _logits(model, ids)
            finally:
                sparsity.remove()
            return logits, float(sparsity.position_bytes()[p - 1:].mean()) / smap.total_bytes
        out.append(Method("bundle+input", None, "per_token", run_input,
                          note="refine mode input: TEAL-like thresholds stored in the bundle"))
    for cfg in refines:
        out.append(make({c.id: ClassPath(model, smap, c.support, cfg) for c in session.classes},
                        refine_key(cfg)))
    return out


# ----------------------------------------------------------------------------- scoring
def score_set(ev: EvalSet, methods: list[Method], model, tokenizer, gen_tokens: int,
              max_len: int, progress=None, chat: bool = False) -> dict:
    """Per-method metrics on one set: {method key: {metric: value}}."""
    keys = [_key(m) for m in methods]
    acc = {k: {"kl": 0.0, "top1": 0.0, "scored": 0, "nll": 0.0, "tokens": 0, "correct": 0,
               "agree": 0, "n": 0, "bytes": []} for k in keys}
    for item in ev.items:
        if ev.kind == "lm":
            ids = item.view(1, -1)
            p = ids.shape[1] // 2
            _score_sequence(ids, p, methods, keys, acc, with_nll=True)
        elif ev.kind == "gen":
            prompt = encode(tokenizer, item["prompt"], chat)[-(max_len - gen_tokens):]  # keep the end
            ids = _greedy(model, torch.tensor([prompt]), gen_tokens, tokenizer)
            _score_sequence(ids, len(prompt), methods, keys, acc, with_nll=False)
        else:
            _score_choices(item, methods, keys, acc, tokenizer, max_len)
        if progress is not None:
            progress()
    out = {}
    for k in keys:
        a = acc[k]
        r = {"bytes": float(np.mean(a["bytes"])) if a["bytes"] else float("nan")}
        if ev.kind == "mc":
            r.update(acc_norm=a["correct"] / max(1, a["n"]), agree=a["agree"] / max(1, a["n"]))
        else:
            r.update(kl=a["kl"] / max(1, a["scored"]), top1=a["top1"] / max(1, a["scored"]),
                     tokens=a["scored"])
        if ev.kind == "lm":
            with np.errstate(over="ignore"):
                r["ppl"] = float(np.exp(a["nll"] / max(1, a["tokens"])))
        out[k] = r
    return out


def _key(m: Method) -> str:
    return m.name if m.density is None or m.name == "dense" else f"{m.name}@{m.density:.2f}"


def _greedy(model, ids: torch.Tensor, n: int, tokenizer) -> torch.Tensor:
    """The dense model's greedy continuation of `ids` (at most n tokens; stops at EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=eos, eos_token_id=eos)
    return out[:, : ids.shape[1] + n]


def _score_sequence(ids, p, methods, keys, acc, with_nll):
    dense_logits = None
    for m, k in zip(methods, keys):
        logits, nbytes = m.run(ids, p)
        if dense_logits is None:
            dense_logits = logits
        r = compare_to_dense(dense_logits, logits, p)  # token-weighted over the set
        acc[k]["kl"] += r["kl"] * r["tokens"]
        acc[k]["top1"] += r["top1"] * r["tokens"]
        acc[k]["scored"] += r["tokens"]
        acc[k]["bytes"].append(nbytes)
        if with_nll:
            total, n = nll(logits, ids, p)
            acc[k]["nll"] += total
            acc[k]["tokens"] += n


def _score_choices(row, methods, keys, acc, tokenizer, max_len):
    prompt = tokenizer(row["prompt"], verbose=False)["input_ids"]
    seqs = []
    for choice in row["choices"]:
        full = tokenizer(row["prompt"] + " " + choice, verbose=False)["input_ids"][:max_len]
        start = min(len(prompt), len(full) - 1)
        seqs.append((torch.tensor([full]), max(1, start), len(choice)))
    dense_pick = None
    for m, k in zip(methods, keys):
        scores, spent = [], []
        for ids, p, n_chars in seqs:
            logits, nbytes = m.run(ids, p)
            logp = F.log_softmax(logits[0, p - 1:-1].double(), -1)
            scores.append(float(logp.gather(-1, ids[0, p:].view(-1, 1)).sum()) / max(1, n_chars))
            spent.append(nbytes)
        pick = int(np.argmax(scores))
        dense_pick = pick if dense_pick is None else dense_pick
        acc[k]["correct"] += int(pick == int(row["label"]))
        acc[k]["agree"] += int(pick == dense_pick)
        acc[k]["n"] += 1
        acc[k]["bytes"].append(float(np.mean(spent)))


# ----------------------------------------------------------------------------- entry
def run_eval(target, data, rows: int = 8, seed: int = 0, densities=(0.5,), methods=None,
             windows: int = 8, window: int = 256, gen_tokens: int = 32, calib_rows: int = 4,
             max_len: int = 256, refine=None, include_build_rows: bool = False,
             progress: bool = True, chat: bool = False) -> dict:
    """Evaluate TARGET (bundle dir or model) on `data`; returns the JSON-able report."""
    from .progress import bar, status
    from .runtime import load
    from .runtime.refine import RefineConfig

    started = time.perf_counter()
    with status(f"loading {target} ...", show=progress):
        if _is_bundle(target):
            session = load(target, device="cpu")
            model, tok, smap = session.model, session.tokenizer, session.smap
        else:  # a plain model: the frontend gives the structure map the baselines need
            from .frontend import analyze, load_model

            loaded = load_model(target)
            session, model, tok, smap = None, loaded.model.eval(), loaded.tokenizer, analyze(loaded)
    if tok is None:
        raise UserInputError(f"{target}: no tokenizer, so text data cannot be evaluated")
    is_bundle = session is not None
    build_hashes = set()
    if is_bundle and not include_build_rows:
        from .bundle import load_bundle

        cal = load_bundle(session.source).manifest.get("calibration", {})
        build_hashes = set(cal.get("build_prompt_hashes", []))
    sets, calib_texts = load_sets(Path(data), tok, rows, seed, windows, window, calib_rows, build_hashes)
    calib_ids = [torch.tensor([tok(t, verbose=False)["input_ids"][:128]]) for t in calib_texts if t.strip()]
    total_bytes = smap.total_bytes
    ffn_bytes = sum(l.ffn.width * smap.channel_bytes(i) for i, l in enumerate(smap.layers) if l.ffn)
    names = list(methods) if methods else list(DEFAULT_BASELINES)
    if names == ["none"]:  # dense (and the bundle's own paths) only
        names = []
    unknown = set(names) - set(BASELINES) - {"bundle"}
    if unknown:
        raise UserInputError(f"unknown methods {sorted(unknown)}; choose from {', '.join(BASELINES)}")

    method_list = [dense_method(model)]
    checks = {}
    if refine is None:
        refine = [RefineConfig()]
    refines = [refine] if isinstance(refine, RefineConfig) else list(refine)
    if is_bundle:
        bundle = bundle_methods(session, refines)
        method_list += bundle
        mean_kept = float(np.mean([c.support.kept_bytes(smap) for c in session.classes]))
        attn_all = smap.prunable_bytes() - ffn_bytes
        ffn_density = (mean_kept - attn_all) / ffn_bytes
        densities = [ffn_density] if ffn_density > 0 else []
        checks["bundle_mean_bytes_fraction"] = (mean_kept + smap.unprunable_bytes()) / total_bytes
        if ffn_density <= 0:
            checks["baselines_skipped"] = ("the bundle keeps fewer bytes than all heads alone; "
                                          "baselines keep every head, so none fits")
        elif ffn_density > 1:
            densities = [1.0]
    for d in densities:
        if not 0 < d <= 1:
            raise UserInputError(f"density must be in (0, 1], got {d}")
    baselines = [(d, name) for d in densities for name in names if name != "bundle"]
    with bar("calibrating baselines", len(baselines), unit="methods",
             show=progress and bool(baselines)) as advance:
        for d, name in baselines:
            method_list.append(baseline_method(model, smap, name, float(d), calib_ids, seed, total_bytes))
            advance()
    checks["full_path_equals_dense"] = _full_path_check(model, smap, sets, tok)

    results = {}
    n_items = sum(len(s.items) for s in sets)
    with bar(f"evaluating {len(method_list)} methods", n_items, show=progress) as advance:
        for ev in sets:
            advance(0, description=f"{ev.name} ({ev.kind}, {len(method_list)} methods)")
            results[ev.name] = {"kind": ev.kind, "rows": len(ev.items),
                                "skipped_build_rows": ev.skipped_build_rows,
                                "methods": score_set(ev, method_list, model, tok, gen_tokens, max_len,
                                                     advance, chat)}
    report = {
        "target": str(target), "model": smap.model_id, "is_bundle": is_bundle,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": time.perf_counter() - started,
        "args": {"rows": rows, "seed": seed, "densities": [float(d) for d in densities],
                 "windows": windows, "window": window, "gen_tokens": gen_tokens,
                 "calib_rows": calib_rows, "max_len": max_len, "methods": names, "chat": chat,
                 "refine": [asdict(r) for r in refines] if is_bundle else None},
        "methods": [{"key": _key(m), "name": m.name, "kind": m.kind, "density": m.density,
                     **({"stats": _summarise_stats(m.stats)} if m.stats else {})} for m in method_list],
        "sets": results, "checks": checks, "published": _published(smap.model_id, results),
        "machine": _machine(),
    }
    return report


def suite_data_dir() -> Path:
    """../shared/data next to the working directory or next to the repository."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base.parent / "shared" / "data").is_dir():
            return base.parent / "shared" / "data"
    raise UserInputError("--suite found no ../shared/data; give --data DIR (a folder of task folders)")


def _is_bundle(target) -> bool:
    p = Path(str(target)).expanduser()
    return (p / "manifest.json").is_file()


def _summarise_stats(stats: dict) -> dict:
    out = {"classes": {str(k): v for k, v in sorted(stats.get("classes", {}).items())}}
    if stats.get("widened"):
        out["widened_share"] = float(np.mean(stats["widened"]))
        out["mean_energy"] = float(np.mean(stats["energy"]))
    return out


def _full_path_check(model, smap, sets, tok) -> bool:
    """The bundle path at density 1.0 (a full class support through ClassPath) must give the
    plain dense logits exactly; checked on the first evaluated sequence."""
    from .execute import Support

    ids = None
    for ev in sets:
        if ev.items:
            ids = ev.items[0].view(1, -1) if ev.kind == "lm" else torch.tensor(
                [tok(ev.items[0]["prompt"], verbose=False)["input_ids"][:64]])
            break
    if ids is None:
        return True
    logits, *_ = ClassPath(model, smap, Support.full(smap)).run(ids)
    return bool(torch.equal(logits, _logits(model, ids)))


def _published(model_id: str, results: dict) -> list[dict]:
    if "smollm2" not in model_id.lower():
        return []
    out = []
    for name, ref in PUBLISHED.items():
        if name in results and "dense" in results[name]["methods"]:
            n = results[name]["rows"]
            acc = 100 * results[name]["methods"]["dense"]["acc_norm"]
            se = 100 * math.sqrt(max(acc / 100 * (1 - acc / 100), 1e-9) / max(1, n))
            out.append({"set": name, "dense_acc_norm": acc, "published": ref, "rows": n,
                        "std_error": se, "gap": acc - ref})
    return out


def _machine() -> dict:
    import platform

    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cscompile": __version__,
            "cpu_count": __import__("os").cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


# ----------------------------------------------------------------------------- reports
def markdown(report: dict) -> str:
    keys = [m["key"] for m in report["methods"]]
    lines = [f"### {report['model']} — `cscompile eval` ({report['date']}, {report['machine']['device']}, "
             f"{report['seconds']:.0f} s)", "",
             "Bytes: weight bytes read per token as a fraction of dense (mean over the sets). "
             "lm: perplexity (KL to dense); mc: acc_norm % (agreement with dense's pick); "
             "gen: top-1 agreement with dense (KL), teacher-forced on dense greedy output.", ""]
    sets = report["sets"]
    header = "| method | bytes | " + " | ".join(f"{n} ({s['kind']}, {s['rows']})" for n, s in sets.items()) + " |"
    lines += [header, "|" + "---|" * (len(sets) + 2)]
    for k in keys:
        cells, spent = [], []
        for s in sets.values():
            r = s["methods"][k]
            spent.append(r["bytes"])
            if s["kind"] == "lm":
                cells.append(f"{r['ppl']:.2f} ({r['kl']:.3f})")
            elif s["kind"] == "mc":
                cells.append(f"{100 * r['acc_norm']:.1f} ({100 * r['agree']:.0f})")
            else:
                cells.append(f"{r['top1']:.3f} ({r['kl']:.3f})")
        lines.append(f"| {k} | {np.mean(spent):.3f} | " + " | ".join(cells) + " |")
    skipped = {n: s["skipped_build_rows"] for n, s in sets.items() if s["skipped_build_rows"]}
    lines.append("")
    if skipped:
        lines.append(f"Rows that built the bundle were found and left out: {skipped}.")
    for m in report["methods"]:
        if m.get("stats"):
            st = m["stats"]
            extra = (f"; share of positions widened to dense {st['widened_share']:.3f}, mean "
                     f"on-support energy {st['mean_energy']:.3f}") if "widened_share" in st else ""
            lines.append(f"- {m['key']}: rows routed per class {st['classes']}{extra}")
    lines.append(f"- checks: {json.dumps(report['checks'], sort_keys=True)}")
    for p in report["published"]:
        lines.append(f"- {p['set']}: dense acc_norm {p['dense_acc_norm']:.1f} ± {p['std_error']:.1f} "
                     f"({p['rows']} rows) vs published {p['published']:.1f} for the base model")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Quality vs bytes, one line per method (needs several densities)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(report["args"]["densities"]) < 2:
        return False
    sets = report["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], sets.items()):
        metric = {"lm": "kl", "mc": "acc_norm", "gen": "top1"}[s["kind"]]
        by_name = {}
        for m in report["methods"]:
            r = s["methods"][m["key"]]
            by_name.setdefault(m["name"], []).append((r["bytes"], r[metric]))
        for i, (mname, pts) in enumerate(sorted(by_name.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mname, color=f"C{i}")
        ax.set_title(f"{name} ({metric})")
        ax.set_xlabel("bytes read per token / dense")
        if metric == "kl":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: quality vs bytes read")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path, stem: str = "eval") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    paths[1].write_text(markdown(report))
    if plot(report, out_dir / f"{stem}.png"):
        paths.append(out_dir / f"{stem}.png")
    return paths
