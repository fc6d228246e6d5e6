"""Fuzz targets for every parser of outside input, shared by the tests and the benchmark.

`tests/test_fuzz_loaders.py` runs each target with a short, derandomized hypothesis budget;
`benchmarks/fuzz_loaders.py` runs them with >= 10,000 generated inputs in total and prints
inputs / valid / clean errors / crashes per target.

The contract every target checks: a generated input ends either in a valid result or in a
`CsError` (which the CLI prints as one line `error: ...` and exit code 2 for UserInputError)
whose message is one line. Anything else is a *crash*, recorded with its traceback's last
line: another exception type, a multi-line message, a hang (SIGALRM after `TIMEOUT_S`), a
file written or changed anywhere in the case's sandbox (the loaders only read), code from
the input that ran (a marker), or a tampered input that was accepted as if it were genuine.

Targets (name: what is fuzzed -> which loader):
  calib_jsonl         calibration JSONL lines, bytes, file kinds -> calib.read_prompts (+ dedupe, hash)
  model_source        model path strings (NUL, huge, names, suffixes) -> frontend.load_model
  manifest_bytes      byte mutations of manifest.json -> bundle.load_bundle (must refuse any change)
  manifest_json       JSON mutations of manifest.json, resealed like an attacker would -> load_bundle
                      and every accessor (tensors, text, report)
  safetensors_header  safetensors header/length/byte mutations inside a bundle, manifest resealed
                      -> load_bundle + Bundle.tensors
  bundle_layout       missing / extra / renamed files, dirs for files, symlinks out of the bundle,
                      FIFOs, pickles -> load_bundle (must refuse any change of the file set)
  kernel_source       generated kernel text and its spec -> codegen.load_class_module (must refuse
                      any text not regenerated from the spec, before importing anything)
  model_hf_dir        HF directory with garbled config.json / weights / tokenizer -> load_model
  model_gguf          truncated / garbled GGUF -> load_model
  model_pt            garbage / truncated / odd-content model.pt -> load_model (never trusts pickle)
  model_pt2           garbage / truncated .pt2, and .pt2 archives holding pickles -> load_model
  runtime_bundle      (opt-in, EXTRA_TARGETS) resealed manifest mutations of a real bundle ->
                      cscompile.runtime.load
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import io
import json
import os
import pickle
import shutil
import signal
import tempfile
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

from cscompile.errors import CsError

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
CALIB = REPO / "examples" / "calib.jsonl"
TIMEOUT_S = 30  # one input taking longer than this is a hang
MARKER_ATTR = "_cscompile_fuzz_code_ran"  # set on builtins by payloads that must never run


class Hang(BaseException):
    """Raised by SIGALRM: one input ran past TIMEOUT_S."""


class ContractViolation(Exception):
    """A loader accepted input it must refuse, or wrote a file."""


@dataclass
class Outcome:
    kind: str  # "valid" | "error" | "crash"
    detail: str = ""


class Target:
    """One fuzz target: `strategy` generates examples; `run(example, case)` writes the input
    files into the empty directory `case`, calls `ready()` and then the loader (and whatever
    consumes its result). It returns normally for a valid result or lets a CsError out."""

    def __init__(self, name: str, strategy: st.SearchStrategy, needs: tuple[str, ...] = ()):
        self.name, self.strategy, self.needs = name, strategy, needs

    def run(self, example: Any, case: Path) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def warm(self) -> None:
        """Build shared inputs and import what the loader imports, once, outside the timeout
        (an alarm firing inside a first import would leave a half-initialised module)."""
        if self.name in _WARMED:
            return
        self._warm()
        _WARMED.add(self.name)

    def _warm(self) -> None:
        pass


_WARMED: set[str] = set()


_STATE: dict[str, Any] = {}


def ready() -> None:
    """Called by a target once its input is on disk: from here on nothing may be written."""
    _STATE["before"] = _snapshot(_STATE["sandbox"])


# ============================================================================ running one input


@contextlib.contextmanager
def _alarm(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, size, mtime_ns) without following symlinks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            out[p.relative_to(root).as_posix()] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


def _last_line(exc: BaseException) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines).strip().splitlines()
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" [{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}]"
    return (text[-1] if text else type(exc).__name__)[:300] + where


def run_one(target: Target, example: Any, work: Path, timeout_s: int = TIMEOUT_S) -> Outcome:
    """Run one input in a fresh sandbox under `work`; classify the result."""
    sandbox = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=work))
    case = sandbox / "case"
    case.mkdir()
    outside = sandbox / "outside"  # symlink targets etc.: must stay untouched
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the bundle\n")
    _STATE.clear()
    _STATE["sandbox"] = sandbox
    if hasattr(builtins, MARKER_ATTR):
        delattr(builtins, MARKER_ATTR)
    target.warm()
    try:
        try:
            with _alarm(timeout_s):
                target.run(example, case)
            outcome = Outcome("valid")
        except CsError as e:
            msg = str(e)
            if "\n" in msg or not msg.strip():
                outcome = Outcome("crash", f"{type(e).__name__} with a message that is not one "
                                           f"line: {msg[:200]!r}")
            else:
                outcome = Outcome("error", f"{type(e).__name__}: {msg[:200]}")
        except Hang as e:
            outcome = Outcome("crash", f"hang: {e}")
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - this is the point of the exercise
            outcome = Outcome("crash", _last_line(e))
        if "before" not in _STATE:
            return Outcome("crash", f"fuzz harness failed before the loader ran: {outcome.detail}")
        if hasattr(builtins, MARKER_ATTR):
            delattr(builtins, MARKER_ATTR)
            return Outcome("crash", "code from the input ran (marker set)")
        after = _snapshot(sandbox)
        if after != _STATE["before"]:
            before = _STATE["before"]
            changed = sorted(set(after) ^ set(before) | {k for k in after if before.get(k) != after[k]})
            return Outcome("crash", f"the loader wrote or changed files: {changed[:5]}")
        return outcome
    finally:
        _STATE.clear()
        shutil.rmtree(sandbox, ignore_errors=True)


# ============================================================================ shared fixtures


@functools.lru_cache(maxsize=None)
def _base_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="cscompile-fuzz-base-"))
    import atexit

    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.lru_cache(maxsize=None)
def tiny_bundle() -> Path:
    """A small bundle written by write_bundle (two tensor files, a kernel-like text, report)."""
    import torch

    from cscompile.bundle import write_bundle

    g = torch.Generator().manual_seed(0)
    tensors = {
        "weights.safetensors": {"layers.0.w": torch.randn(8, 6, generator=g),
                                "layers.0.b": torch.arange(5, dtype=torch.bfloat16),
                                "scale": torch.tensor(2.5)},
        "classes/c0.safetensors": {"heads": torch.tensor([0, 3, 5], dtype=torch.int32)},
    }
    manifest = {"kind": "cscompile-bundle", "model": "tiny", "classes": [{"id": 0, "density": 0.5}],
                "nested": {"a": [1, 2.5, None, True], "b": "text"}}
    report = {"ppl": 12.25, "kept": [1, 2, 3]}
    texts = {"kernels/class_0.py": "# generated kernel text\nX = 1\n",
             "tokenizer/tokenizer_config.json": "{}\n"}
    return write_bundle(_base_dir() / "tiny-bundle", manifest, tensors, report, texts)


@functools.lru_cache(maxsize=None)
def stories_bundle() -> Path:
    """A real stories260K bundle (built once per process, ~10 s): for kernel specs and tests."""
    from cscompile.build import run_build

    calib = _base_dir() / "calib6.jsonl"
    calib.write_text("".join(CALIB.read_text().splitlines(keepends=True)[:6]))
    out = _base_dir() / "stories-bundle"
    # static class paths only: the bundle's files and manifest are what is tested here
    run_build(str(STORIES), calib, out, density=0.5, classes=2, seed=0, progress=False,
              pertoken=False)
    return out


@functools.lru_cache(maxsize=None)
def tiny_gguf() -> bytes:
    """A small but complete llama GGUF (1 layer, hidden 16, vocab 32) that loads."""
    import gguf
    import numpy as np

    path = _base_dir() / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    toks = [b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(29)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 32)
    w.add_token_types([1] * 32)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (32, 16), "output_norm.weight": (16,), "output.weight": (32, 16),
              "blk.0.attn_norm.weight": (16,), "blk.0.attn_q.weight": (16, 16),
              "blk.0.attn_k.weight": (16, 16), "blk.0.attn_v.weight": (16, 16),
              "blk.0.attn_output.weight": (16, 16), "blk.0.ffn_norm.weight": (16,),
              "blk.0.ffn_gate.weight": (32, 16), "blk.0.ffn_up.weight": (32, 16),
              "blk.0.ffn_down.weight": (16, 32)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


TINY_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=32)


@functools.lru_cache(maxsize=None)
def tiny_pt() -> bytes:
    """torch.save({"config", "state_dict"}) of a tiny llama: loads with weights_only=True."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    buf = io.BytesIO()
    torch.save({"config": dict(TINY_LLAMA), "state_dict": model.state_dict()}, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def tiny_pt2() -> bytes:
    """torch.export.save of the hand-written TinyTransformer."""
    import torch

    from cscompile.toy import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    ep = torch.export.export(model, (torch.zeros(1, 8, dtype=torch.long),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _load_bytes(data: bytes, name: str) -> None:
    """Load a model file once (warm-up): it must load."""
    from cscompile.frontend import load_model

    d = Path(tempfile.mkdtemp(prefix="warm-", dir=_base_dir()))
    try:
        (d / name).write_bytes(data)
        load_model(d / name)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _copytree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ============================================================================ generic mutators

_INTERESTING_BYTES = [b"", b"\x00", b"\xff", b"\x80", b"{", b"}", b"[", b"]", b'"', b"\\",
                      b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"NaN", b"-0", b"1e999",
                      b"1" * 5000, b"[" * 3000, b"PK\x03\x04", b"\x80\x04\x95", b"GGUF"]

byte_ops = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**32), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 2**32), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**32),
              st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(_INTERESTING_BYTES))),
    st.tuples(st.just("delete"), st.integers(0, 2**32), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 2**32), st.just(0)),
    st.tuples(st.just("append"), st.just(0), st.binary(max_size=32)),
), min_size=1, max_size=4)


def mutate_bytes(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        n = len(buf)
        at = pos % (n + 1) if kind in ("insert", "truncate") else (pos % n if n else 0)
        if kind == "flip" and n:
            buf[at] ^= arg
        elif kind == "set" and n:
            buf[at] = arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete" and n:
            del buf[at:at + arg]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "append":
            buf += arg
    return bytes(buf)


_SPECIAL_STR = st.sampled_from(["", " ", "../x", "../../outside/secret.txt", "/etc/passwd", "a\x00b",
                                "a" * 300, "x" * 5000, "\ud800", "é", "llama", "gpt2", "float16",
                                "bfloat16", "int64", "F32", "I64", "U8", "BOOL", "kernels/class_0.py",
                                "weights.safetensors", "manifest.json", "report.json", "0", "1",
                                "LlamaForCausalLM", "silu", "gather", "compact", "cscompile-bundle",
                                "nan", "null", "__metadata__"])
_SPECIAL_NUM = st.sampled_from([0, 1, -1, 2, 7, 8, 64, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
                                2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0, 1e308,
                                float("inf"), float("-inf"), float("nan")])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), _SPECIAL_NUM,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         _SPECIAL_STR)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), _SPECIAL_STR), inner,
                                                 max_size=4)), max_leaves=12)

json_ops = st.lists(st.tuples(
    st.lists(st.integers(0, 2**16), min_size=0, max_size=6),  # path choices
    st.sampled_from(["replace", "delete", "add", "wrap", "stringify", "nest"]),
    json_values,
), min_size=1, max_size=3)


def mutate_json(obj: Any, ops) -> Any:
    """Apply structural edits to a deep copy of a JSON value (paths chosen by the ops)."""
    obj = json.loads(json.dumps(obj))
    holder = {"root": obj}
    for choices, op, value in ops:
        parent, key = holder, "root"
        for c in choices:
            node = parent[key]
            if isinstance(node, dict) and node:
                keys = sorted(node)
                parent, key = node, keys[c % len(keys)]
            elif isinstance(node, list) and node:
                parent, key = node, c % len(node)
            else:
                break
        node = parent[key]
        if op == "replace":
            parent[key] = value
        elif op == "delete" and parent is not holder:
            del parent[key]
        elif op == "add":
            if isinstance(node, dict):
                node[str(value)[:20] if not isinstance(value, str) else value] = value
            elif isinstance(node, list):
                node.append(value)
            else:
                parent[key] = value
        elif op == "wrap":
            parent[key] = [node]
        elif op == "stringify":
            parent[key] = json.dumps(node) if not isinstance(node, str) else node + "x"
        elif op == "nest":
            parent[key] = {"x": node}
    return holder["root"]


def _dumps(obj: Any) -> bytes:
    """JSON text of a mutated value; values Python's json cannot write are written raw."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError, RecursionError):
        return repr(obj).encode("utf-8", "surrogatepass")


# ============================================================================ calibration JSONL

_good_calib_line = st.builds(
    lambda p, t, extra: json.dumps({"prompt": p, **({"task": t} if t else {}), **extra},
                                   ensure_ascii=False),
    st.text(min_size=1, max_size=40).filter(str.strip), st.one_of(st.none(), st.text(max_size=8)),
    st.dictionaries(st.sampled_from(["answer", "id", "choices"]), json_scalars, max_size=2))
_calib_line = st.one_of(
    st.builds(lambda p, t, extra: json.dumps({"prompt": p, **({"task": t} if t is not None else {}),
                                              **extra}),
              st.text(max_size=40), st.one_of(st.none(), st.text(max_size=8), json_scalars),
              st.dictionaries(st.text(max_size=6), json_values, max_size=2)),
    st.builds(lambda p: json.dumps({"prompt": p}), json_values),
    json_values.map(lambda v: _dumps(v).decode("utf-8", "surrogateescape")),
    st.text(max_size=40),
    st.sampled_from(['{"prompt": "\\ud800"}', '{"prompt": "ok", "task": "\\udfff"}',
                     '{"prompt": "ok", "x": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000,
                     '{"prompt": "a", "prompt": 3}', '{"prompt": "ok"} trailing', "\x00",
                     '{"prompt": "ok", "task": "math"}', '{"prompt": "  "}', "{}", "null", "NaN",
                     '{"prompt": "nan", "x": NaN}', '{"prompt": "\\u0000"}']),
)


@st.composite
def calib_inputs(draw):
    kind = draw(st.sampled_from(["file"] * 12 + ["missing", "dir", "fifo", "symlink", "dangling"]))
    clean = draw(st.booleans())  # half the files hold only well-formed rows
    lines = draw(st.lists(_good_calib_line if clean else _calib_line, min_size=0, max_size=6))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    data = sep.join(line.encode("utf-8", "surrogateescape") for line in lines)
    if not clean and draw(st.booleans()):
        data = mutate_bytes(data, draw(byte_ops))
    if draw(st.integers(0, 9)) == 0:
        data = b"\xef\xbb\xbf" + data
    max_rows = draw(st.one_of(st.none(), st.none(), st.integers(-1, 4)))
    return kind, data, max_rows


class CalibTarget(Target):
    def run(self, example, case: Path):
        from cscompile.bundle import dumps_json
        from cscompile.calib import dedupe_prompts, prompt_hash, read_prompts

        kind, data, max_rows = example
        path = case / "data.jsonl"
        if kind in ("file", "symlink"):
            real = case / "real.jsonl" if kind == "symlink" else path
            real.write_bytes(data)
            if kind == "symlink":
                path.symlink_to(real)
        elif kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dangling":
            path.symlink_to(case / "nowhere.jsonl")
        ready()
        rows = read_prompts(path, max_rows=max_rows)
        rows, _ = dedupe_prompts(rows)
        for row in rows:  # what build does with them next
            if not isinstance(row.prompt, str) or not row.prompt.strip():
                raise ContractViolation(f"accepted a row without a usable prompt: {row!r}")
            prompt_hash(row.prompt)
            dumps_json({"task": row.task, "extra": row.extra}).encode("utf-8")


# ============================================================================ model source strings


class ModelSourceTarget(Target):
    def run(self, example, case: Path):
        from cscompile.frontend import load_model

        text, make = example
        if make == "relative":
            text = str(case / text) if "\x00" not in text else text
        ready()
        load_model(text)


model_sources = st.tuples(
    st.one_of(st.text(max_size=30), _SPECIAL_STR, st.sampled_from([
        "smollm2-135m-nope", "SMOLLM2", "model.pt", "x.gguf", "x.pt2", "dir/", "~", "~nouser/x",
        ".", "..", "/", "/dev/null", "/dev/zero", "/proc/self/mem", "a/b/c.bin", "x" * 300,
        ("d/" * 200) + "m.pt", "http://example.com/model", "\\\\server\\share"])),
    st.sampled_from(["as_is", "relative"]))


# ============================================================================ bundles


def _reseal(case: Path, manifest: Any) -> None:
    """Write a manifest as an attacker who knows the format would: canonical and resealed."""
    from cscompile.bundle import dumps_json

    try:
        from cscompile.bundle import seal_manifest
    except ImportError:  # a cscompile from before manifests were sealed
        def seal_manifest(m):
            return m
    if isinstance(manifest, dict):
        try:
            (case / "manifest.json").write_text(dumps_json(seal_manifest(manifest)), encoding="utf-8")
            return
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
            pass
    (case / "manifest.json").write_bytes(_dumps(manifest))


def _exercise(bundle) -> None:
    """Use a loaded bundle the way its consumers do: every tensor file, text and the report."""
    for relpath in sorted(bundle.files):
        if relpath.endswith(".safetensors"):
            bundle.tensors(relpath)
        else:
            bundle.text(relpath)
    json.dumps(bundle.report)


class ManifestBytesTarget(Target):
    def _warm(self):
        tiny_bundle()

    def run(self, ops, case: Path):
        from cscompile.bundle import load_bundle

        _copytree(tiny_bundle(), case)
        original = (case / "manifest.json").read_bytes()
        mutated = mutate_bytes(original, ops)
        (case / "manifest.json").write_bytes(mutated)
        ready()
        bundle = load_bundle(case)
        if mutated != original:
            raise ContractViolation("a byte-modified manifest.json was accepted")
        _exercise(bundle)


class ManifestJsonTarget(Target):
    def _warm(self):
        tiny_bundle()

    def run(self, example, case: Path):
        from cscompile.bundle import load_bundle

        ops, reseal, verify = example
        _copytree(tiny_bundle(), case)
        manifest = json.loads((case / "manifest.json").read_text())
        mutated = mutate_json(manifest, ops)
        if reseal:
            _reseal(case, mutated)
        else:
            (case / "manifest.json").write_bytes(_dumps(mutated))
        ready()
        bundle = load_bundle(case, verify=verify)
        if not reseal and mutated != manifest:
            raise ContractViolation("a modified, unsealed manifest.json was accepted")
        _exercise(bundle)


def _st_header_edit(draw_value, header: dict, ops):
    return mutate_json(header, ops)


@st.composite
def safetensors_inputs(draw):
    which = draw(st.sampled_from(["weights.safetensors", "classes/c0.safetensors"]))
    mode = draw(st.sampled_from(["header_json", "header_json", "length", "bytes", "header_raw"]))
    if mode == "header_json":
        payload = draw(json_ops)
    elif mode == "length":
        payload = draw(st.one_of(st.integers(0, 2**64 - 1), _SPECIAL_NUM.filter(
            lambda v: isinstance(v, int) and 0 <= v < 2**64)))
    elif mode == "header_raw":
        payload = draw(byte_ops)
    else:
        payload = draw(byte_ops)
    return which, mode, payload, draw(st.booleans())


class SafetensorsTarget(Target):
    def _warm(self):
        tiny_bundle()

    def run(self, example, case: Path):
        import struct

        from cscompile.bundle import load_bundle, sha256_file

        which, mode, payload, fix_length = example
        _copytree(tiny_bundle(), case)
        f = case / which
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header, body = data[8:8 + n], data[8 + n:]
        if mode == "header_json":
            new_header = _dumps(mutate_json(json.loads(header), payload))
            data = (struct.pack("<Q", len(new_header)) if fix_length else data[:8]) + new_header + body
        elif mode == "length":
            data = struct.pack("<Q", payload) + data[8:]
        elif mode == "header_raw":
            new_header = mutate_bytes(header, payload)
            data = (struct.pack("<Q", len(new_header)) if fix_length else data[:8]) + new_header + body
        else:
            data = mutate_bytes(data, payload)
        f.write_bytes(data)
        manifest = json.loads((case / "manifest.json").read_text())
        manifest["files"][which] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        _reseal(case, manifest)
        ready()
        bundle = load_bundle(case)
        bundle.tensors(which)


_layout_names = st.one_of(
    st.sampled_from(["evil.py", "kernels/evil.py", "__init__.py", "state.pkl", "model.pt",
                     "pytorch_model.bin", ".hidden", "kernels/.x.py", "weights.safetensors.bak",
                     "deep/er/file.json", "classes/c1.safetensors", "manifest.json.orig",
                     "report.json~", "sub/manifest.json", "tokenizer/tokenizer.json"]),
    st.text(alphabet="abcxyz._-/", min_size=1, max_size=12).filter(
        lambda s: not s.startswith("/") and ".." not in s.split("/") and "//" not in s
        and not s.endswith("/") and s not in (".",) and "/./" not in s and not s.startswith("./")))
_layout_content = st.one_of(st.binary(max_size=64), st.sampled_from([
    pickle.dumps({"a": 1}), pickle.dumps([1, 2], protocol=2), b"PK\x03\x04" + b"\0" * 30,
    b"import builtins\nsetattr(builtins, '_cscompile_fuzz_code_ran', True)\n", b"{}"]))

layout_ops = st.lists(st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.just(None)),
    st.tuples(st.just("add"), _layout_names, _layout_content),
    st.tuples(st.just("rename"), st.integers(0, 2**16), _layout_names),
    st.tuples(st.just("file_to_dir"), st.integers(0, 2**16), st.just(None)),
    st.tuples(st.just("dir_to_file"), st.sampled_from(["kernels", "classes", "tokenizer"]),
              _layout_content),
    st.tuples(st.just("symlink_file"), st.integers(0, 2**16),
              st.sampled_from(["outside", "inside", "dangling", "loop", "self"])),
    st.tuples(st.just("symlink_dir"), st.sampled_from(["kernels", "classes", "tokenizer", "newdir"]),
              st.sampled_from(["outside", "root", "dangling"])),
    st.tuples(st.just("fifo"), _layout_names, st.just(None)),
    st.tuples(st.just("empty_dir"), _layout_names, st.just(None)),
    st.tuples(st.just("hardlink_outside"), st.integers(0, 2**16), st.just(None)),
    st.tuples(st.just("swap"), st.integers(0, 2**16), st.integers(0, 2**16)),
), min_size=1, max_size=3)


def _apply_layout(case: Path, ops, outside: Path) -> None:
    ops = sorted(ops, key=lambda op: op[0] == "fifo")  # FIFOs last: nothing may open one here
    for kind, a, b in ops:
        files = sorted(p for p in case.rglob("*") if p.is_file() and not p.is_symlink())
        pick = files[a % len(files)] if files and isinstance(a, int) else None
        try:
            if kind == "delete" and pick:
                pick.unlink()
            elif kind == "add":
                target = case / a
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink() or (target.exists() and not target.is_file()):
                    continue
                target.write_bytes(b)
            elif kind == "rename" and pick:
                target = case / b
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_dir():
                    pick.rename(target)
            elif kind == "file_to_dir" and pick:
                pick.unlink()
                pick.mkdir()
                (pick / "inner.bin").write_bytes(b"x")
            elif kind == "dir_to_file":
                d = case / a
                if d.is_dir():
                    shutil.rmtree(d)
                    d.write_bytes(b)
            elif kind == "symlink_file" and pick:
                data = pick.read_bytes()
                pick.unlink()
                if b == "outside":
                    (outside / "copy").write_bytes(data)
                    pick.symlink_to(outside / "copy")
                elif b == "inside":
                    (case / ".real").write_bytes(data)
                    pick.symlink_to(case / ".real")
                elif b == "dangling":
                    pick.symlink_to(outside / "missing")
                elif b == "loop":
                    pick.symlink_to(pick)
                else:
                    pick.symlink_to(pick.name)
            elif kind == "symlink_dir":
                d = case / a
                real = outside / f"dir-{a}"
                if d.is_dir() and not d.is_symlink():
                    shutil.copytree(d, real, dirs_exist_ok=True)
                    shutil.rmtree(d)
                elif d.exists() or d.is_symlink():
                    continue
                d.symlink_to(real if b == "outside" else (case if b == "root" else outside / "nope"))
            elif kind == "fifo":
                target = case / a
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists() and not target.is_symlink():
                    os.mkfifo(target)
            elif kind == "empty_dir":
                target = case / a
                if not target.exists():
                    target.mkdir(parents=True, exist_ok=True)
            elif kind == "hardlink_outside" and pick:
                (outside / "hl").unlink(missing_ok=True)
                os.link(pick, outside / "hl")
            elif kind == "swap" and len(files) > 1:
                x, y = files[a % len(files)], files[b % len(files)]
                if x != y:
                    tmp = case / ".swap"
                    x.rename(tmp)
                    y.rename(x)
                    tmp.rename(y)
        except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                OSError):
            continue  # the op does not apply to this layout: keep going


class LayoutTarget(Target):
    def _warm(self):
        tiny_bundle()

    def run(self, example, case: Path):
        from cscompile.bundle import load_bundle

        _copytree(tiny_bundle(), case)
        _apply_layout(case, example, case.parent / "outside")
        ready()
        bundle = load_bundle(case)
        original = _files(tiny_bundle())
        now = {p.relative_to(case).as_posix(): p.read_bytes()
               for p in sorted(case.rglob("*")) if p.is_file() or p.is_symlink()}
        if now != original:
            raise ContractViolation(f"a bundle with changed files was accepted: "
                                    f"{sorted(set(now) ^ set(original))[:4]}")
        _exercise(bundle)


# ============================================================================ kernel sources


@functools.lru_cache(maxsize=None)
def kernel_entry() -> tuple[str, str, dict]:
    from cscompile.bundle import load_bundle

    b = load_bundle(stories_bundle())
    entry = b.manifest["classes"][0]["kernel"]
    return b.text(entry["file"]), entry["sha256"], entry["spec"]


_MARKER_SRC = "import builtins\nsetattr(builtins, %r, True)\n" % MARKER_ATTR

kernel_inputs = st.tuples(
    st.sampled_from(["bytes", "inject_top", "inject_end", "same", "regen", "empty"]),
    byte_ops,
    st.one_of(st.none(), json_ops),  # spec mutation
    st.sampled_from(["recorded", "recompute", "none", "garbage"]),
)


class KernelTarget(Target):
    def _warm(self):
        from cscompile.codegen.generate import load_class_module

        source, sha, spec = kernel_entry()
        load_class_module(source, sha, spec)

    def run(self, example, case: Path):
        from cscompile.codegen.generate import (generate_class_source, load_class_module,
                                                source_sha256)

        mode, ops, spec_ops, sha_mode = example
        source, sha, spec = kernel_entry()
        if spec_ops is not None:
            spec = mutate_json(spec, spec_ops)
        if mode == "bytes":
            source = mutate_bytes(source.encode(), ops).decode("utf-8", "replace")
        elif mode == "inject_top":
            source = _MARKER_SRC + source
        elif mode == "inject_end":
            source = source + "\n" + _MARKER_SRC
        elif mode == "empty":
            source = ""
        elif mode == "regen":  # an attacker with a consistent (spec, source) pair
            try:
                source = generate_class_source(spec)
            except CsError:
                pass
        digest = {"recorded": sha, "recompute": source_sha256(source), "none": None,
                  "garbage": "0" * 64}[sha_mode]
        ready()
        load_class_module(source, digest, spec)
        if source != generate_class_source(spec):
            raise ContractViolation("a kernel source differing from its spec was imported")


# ============================================================================ models


@st.composite
def hf_dir_inputs(draw):
    part = draw(st.sampled_from(["config_json"] * 4 + ["config_bytes", "weights", "tokenizer",
                                                        "missing"]))
    if part == "config_json":
        return part, draw(json_ops)
    if part == "missing":
        return part, draw(st.sampled_from(["config.json", "model.safetensors", "tokenizer.json",
                                           "tokenizer_config.json"]))
    return part, draw(byte_ops)


class HfDirTarget(Target):
    def _warm(self):
        from cscompile.frontend import load_model

        load_model(STORIES)

    def run(self, example, case: Path):
        from cscompile.frontend import load_model

        part, payload = example
        model_dir = case / "stories"
        model_dir.mkdir()
        for f in STORIES.iterdir():
            if f.is_file():
                os.link(f, model_dir / f.name) if part not in ("weights",) or f.suffix != ".safetensors" \
                    else shutil.copy(f, model_dir / f.name)
        if part == "config_json":
            cfg = json.loads((STORIES / "config.json").read_text())
            _replace(model_dir / "config.json", _dumps(mutate_json(cfg, payload)))
        elif part == "config_bytes":
            _replace(model_dir / "config.json", mutate_bytes((STORIES / "config.json").read_bytes(), payload))
        elif part == "weights":
            _replace(model_dir / "model.safetensors",
                     mutate_bytes((STORIES / "model.safetensors").read_bytes(), payload))
        elif part == "tokenizer":
            _replace(model_dir / "tokenizer.json", mutate_bytes((STORIES / "tokenizer.json").read_bytes(), payload))
        elif part == "missing":
            (model_dir / payload).unlink()
        ready()
        load_model(model_dir)


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # a hard link to ../shared: never write through it
    path.write_bytes(data)


gguf_inputs = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2**32)),
    st.tuples(st.just("bytes"), byte_ops),
    st.tuples(st.just("count"), st.tuples(st.sampled_from([4, 8, 16]),
                                          st.sampled_from([0, 1, 3, 1000, 2**31, 2**32 - 1,
                                                           2**40, 2**63 - 1, 2**64 - 1]))),
    st.tuples(st.just("garbage"), st.binary(max_size=256).map(lambda b: b"GGUF" + b)),
)


@contextlib.contextmanager
def _private_model_cache():
    """GGUF loads convert into the model cache: keep the fuzzed files out of the user's."""
    from cscompile.models import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(_base_dir() / "model-cache")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


class GgufTarget(Target):
    def _warm(self):
        with _private_model_cache():
            _load_bytes(tiny_gguf(), "model.gguf")

    def run(self, example, case: Path):
        import struct

        from cscompile.frontend import load_model

        mode, payload = example
        data = tiny_gguf()
        if mode == "truncate":
            data = data[:payload % (len(data) + 1)]
        elif mode == "bytes":
            data = mutate_bytes(data, payload)
        elif mode == "count":  # version / tensor count / kv count fields
            offset, value = payload
            width = 4 if offset == 4 else 8
            value %= 2 ** (8 * width)
            data = data[:offset] + value.to_bytes(width, "little") + data[offset + width:]
        else:
            data = payload
        path = case / "model.gguf"
        path.write_bytes(data)
        del struct
        ready()
        with _private_model_cache():
            load_model(path)


def _torch_save_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Payload:
    """Unpickling this would set the marker: it must never be unpickled."""

    def __reduce__(self):
        return (exec, (f"import builtins; builtins.{MARKER_ATTR} = True",))


@st.composite
def pt_inputs(draw):
    mode = draw(st.sampled_from(["bytes", "truncate", "config", "config", "object", "zip",
                                 "random", "payload"]))
    if mode == "bytes":
        return mode, draw(byte_ops)
    if mode == "truncate":
        return mode, draw(st.integers(0, 2**32))
    if mode == "config":
        return mode, (draw(json_ops), draw(st.sampled_from(["keep", "drop_one", "reshape", "junk"])))
    if mode == "object":
        return mode, draw(json_values)
    if mode == "zip":
        return mode, draw(st.lists(st.tuples(_layout_names, st.binary(max_size=64)), max_size=3))
    if mode == "payload":
        return mode, draw(st.sampled_from(["top", "in_config", "in_state"]))
    return mode, draw(st.binary(max_size=200))


class PtTarget(Target):
    def _warm(self):
        _load_bytes(tiny_pt(), "model.pt")

    def run(self, example, case: Path):
        import torch

        from cscompile.frontend import load_model

        mode, payload = example
        base = tiny_pt()
        if mode == "bytes":
            data = mutate_bytes(base, payload)
        elif mode == "truncate":
            data = base[:payload % (len(base) + 1)]
        elif mode == "config":
            ops, sd_mode = payload
            obj = torch.load(io.BytesIO(base), weights_only=True)
            cfg = mutate_json(obj["config"], ops)
            sd = dict(obj["state_dict"])
            if sd_mode == "drop_one":
                sd.pop(sorted(sd)[0])
            elif sd_mode == "reshape":
                k = sorted(sd)[-1]
                sd[k] = sd[k].reshape(-1)[:3]
            elif sd_mode == "junk":
                sd = {"x": torch.zeros(2), 3: torch.ones(1)} if cfg else []
            data = _torch_save_bytes({"config": cfg, "state_dict": sd})
        elif mode == "object":
            data = _torch_save_bytes(payload)
        elif mode == "zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                for name, content in payload:
                    z.writestr(name, content)
            data = buf.getvalue()
        elif mode == "payload":
            obj = {"config": dict(TINY_LLAMA), "state_dict": {}}
            if payload == "top":
                obj = _Payload()
            elif payload == "in_config":
                obj["config"]["x"] = _Payload()
            else:
                obj["state_dict"]["w"] = _Payload()
            data = _torch_save_bytes(obj)
        else:
            data = payload
        path = case / "model.pt"
        path.write_bytes(data)
        ready()
        load_model(path)


@st.composite
def pt2_inputs(draw):
    mode = draw(st.sampled_from(["bytes", "truncate", "member", "member", "pickle", "random"]))
    if mode == "bytes":
        return mode, draw(byte_ops)
    if mode == "truncate":
        return mode, draw(st.integers(0, 2**32))
    if mode == "member":  # mutate one archive member, keep the zip valid
        return mode, (draw(st.integers(0, 2**16)), draw(byte_ops), draw(st.one_of(st.none(), json_ops)))
    if mode == "pickle":
        return mode, draw(st.sampled_from(["sample_inputs", "weight_pickle", "constant_opaque",
                                           "legacy_weights"]))
    return mode, draw(st.binary(max_size=200))


def _rezip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, content in members.items():
            z.writestr(name, content)
    return buf.getvalue()


class Pt2Target(Target):
    def _warm(self):
        _load_bytes(tiny_pt2(), "model.pt2")

    def run(self, example, case: Path):
        from cscompile.frontend import load_model

        mode, payload = example
        base = tiny_pt2()
        if mode == "bytes":
            data = mutate_bytes(base, payload)
        elif mode == "truncate":
            data = base[:payload % (len(base) + 1)]
        elif mode in ("member", "pickle"):
            with zipfile.ZipFile(io.BytesIO(base)) as z:
                members = {n: z.read(n) for n in z.namelist()}
            names = sorted(members)
            prefix = names[0].split("/")[0]
            if mode == "member":
                idx, ops, jops = payload
                name = names[idx % len(names)]
                content = members[name]
                if jops is not None and name.endswith(".json"):
                    content = _dumps(mutate_json(json.loads(content), jops))
                else:
                    content = mutate_bytes(content, ops)
                members[name] = content
            else:
                evil = pickle.dumps(_Payload())
                if payload == "sample_inputs":
                    members[f"{prefix}/data/sample_inputs/model.pt"] = evil
                elif payload == "legacy_weights":
                    members[f"{prefix}/data/weights/model.pt"] = _torch_save_bytes(_Payload())
                else:
                    cfg_name = (f"{prefix}/data/weights/model_weights_config.json"
                                if payload == "weight_pickle" else
                                f"{prefix}/data/constants/model_constants_config.json")
                    cfg = json.loads(members[cfg_name])
                    if payload == "weight_pickle":
                        fqn = sorted(cfg["config"])[0]
                        cfg["config"][fqn]["use_pickle"] = True
                        members[f"{prefix}/data/weights/{cfg['config'][fqn]['path_name']}"] = \
                            _torch_save_bytes(_Payload())
                    else:
                        cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                                 "use_pickle": True, "tensor_meta": None}
                        members[f"{prefix}/data/constants/opaque_obj_0"] = evil
                    members[cfg_name] = json.dumps(cfg).encode()
            data = _rezip(members)
        else:
            data = payload
        path = case / "model.pt2"
        path.write_bytes(data)
        ready()
        load_model(path)


# ============================================================================ runtime (opt-in)


class RuntimeBundleTarget(Target):
    """Resealed manifest mutations of a real bundle -> cscompile.runtime.load (opt-in: the
    runtime's own parsing of manifest fields lives in runtime/session.py)."""

    def _warm(self):
        import cscompile.runtime as runtime

        runtime.load(stories_bundle(), backend="torch")

    def run(self, ops, case: Path):
        import cscompile.runtime as runtime

        _copytree(stories_bundle(), case)
        manifest = json.loads((case / "manifest.json").read_text())
        _reseal(case, mutate_json(manifest, ops))
        ready()
        runtime.load(case, backend="torch")


# ============================================================================ registry


TARGETS: dict[str, Target] = {t.name: t for t in [
    CalibTarget("calib_jsonl", calib_inputs()),
    ModelSourceTarget("model_source", model_sources),
    ManifestBytesTarget("manifest_bytes", byte_ops),
    ManifestJsonTarget("manifest_json", st.tuples(json_ops, st.booleans(), st.booleans())),
    SafetensorsTarget("safetensors_header", safetensors_inputs()),
    LayoutTarget("bundle_layout", layout_ops),
    KernelTarget("kernel_source", kernel_inputs, needs=("stories",)),
    HfDirTarget("model_hf_dir", hf_dir_inputs(), needs=("stories",)),
    GgufTarget("model_gguf", gguf_inputs),
    PtTarget("model_pt", pt_inputs()),
    Pt2Target("model_pt2", pt2_inputs()),
]}
# not in the default set (see RuntimeBundleTarget); run with --targets runtime_bundle
EXTRA_TARGETS: dict[str, Target] = {
    "runtime_bundle": RuntimeBundleTarget("runtime_bundle", json_ops, needs=("stories",)),
}


@dataclass
class Tally:
    inputs: int = 0
    valid: int = 0
    errors: int = 0
    crashes: int = 0
    crash_kinds: dict = field(default_factory=dict)  # last line -> count
    error_kinds: dict = field(default_factory=dict)  # exception type -> count

    def add(self, outcome: Outcome) -> None:
        self.inputs += 1
        if outcome.kind == "valid":
            self.valid += 1
        elif outcome.kind == "error":
            self.errors += 1
            kind = outcome.detail.split(":")[0]
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        else:
            self.crashes += 1
            self.crash_kinds[outcome.detail] = self.crash_kinds.get(outcome.detail, 0) + 1


def quiet() -> None:
    """Silence transformers / tqdm chatter for bulk runs."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.CRITICAL)
    logging.getLogger("transformers").setLevel(logging.CRITICAL)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
