"""Per-class code generation: one readable Triton source file per class support.

A class spec is a JSON-able dict (the bundle stores it next to the generated file):

    {
      "class_id": "math",                    # str or int
      "model": {"hidden": 4096, "intermediate": 11008, "n_heads": 32, "n_kv": 8, "head_dim": 128},
      "activation": "silu",                  # silu | gelu_tanh | gelu | relu
      "gated": true,                         # SwiGLU/GeGLU (gate, up, down) or plain (W_1, W_2)
      "layout": "gather",                    # gather: dense weights + runtime index lists
                                             # compact: per-class weights holding kept rows only
      "block_size": 64,                      # BLOCK_N of the prefill channel blocks: 16/32/64/128
      "dtype": "float16",                    # float16 | bfloat16 | float32
      "layers": [                            # the layers this class serves, any order
        {"layer": 0, "ffn_channels": 5504,   # kept FFN channels (decode index length / compact rows)
         "ffn_blocks": 86,                   # kept BLOCK_N blocks for prefill (gather; optional)
         "q_heads": [0, 1, 5], "kv_groups": [0, 1]},
        ...
      ],
      "tiles": {"decode_block_k": 32, ...}   # optional tile sizes, see DEFAULT_TILES
    }

`generate_class_source(spec)` bakes the class constants (counts, shapes, block sizes, kept head
lists) into the file as literals that reach the kernels as tl.constexpr; per-token index lists
stay runtime inputs. The kernels themselves are copied verbatim from kernels.py, so a generated
file imports nothing but torch and triton. Output is deterministic: same spec, same bytes.

`load_class_module(source, sha256, spec)` is the runtime's only way in: it regenerates the
source from the spec, refuses anything that differs (BundleError), and imports the verified
text from a private temporary directory (Triton's @jit needs a real source file).
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import inspect
import math
import re
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from cscompile.errors import BundleError, UserInputError

from . import kernels

LAYOUTS = ("gather", "compact")
DTYPES = ("float16", "bfloat16", "float32")
BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_TILES = {
    "decode_block_k": None,  # kept FFN channels per decode program (None: ffn_decode chooses)
    "decode_block_h": 128,  # hidden chunk of the decode GEMVs
    "decode_block_d": 32,  # head-dim slice per q/k/v decode program
    "o_proj_split": 4,  # kept-head splits of the decode output projection
    "prefill_block_m": 64,  # tokens per prefill tile
    "prefill_block_h": 64,  # hidden chunk / output tile of the prefill GEMMs
}
ACTIVATION_NAMES = {"silu": "SiLU", "gelu_tanh": "GELU (tanh approximation)",
                    "gelu": "GELU (erf)", "relu": "ReLU"}


# --------------------------------------------------------------------------- spec


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"class spec: {what} must be a positive integer, got {value!r}")
    return value


def _id(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserInputError(f"class spec: {what} must be a non-negative integer, got {value!r}")
    return value


def _index_list(value, limit, what):
    if not isinstance(value, (list, tuple)) or not value:
        raise UserInputError(f"class spec: {what} must be a non-empty list of ids")
    ids = [_id(v, what) for v in value]
    if ids != sorted(set(ids)) or ids[-1] >= limit:
        raise UserInputError(f"class spec: {what} must be sorted, unique and below {limit}, "
                             f"got {list(value)}")
    return ids


def validate_class_spec(spec: dict) -> dict:
    """Check a class spec and return its canonical form (layers sorted, tile defaults filled)."""
    if not isinstance(spec, dict):
        raise UserInputError(f"class spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in ("class_id", "model", "activation", "gated", "layout", "block_size",
                           "dtype", "layers") if k not in spec]
    if missing:
        raise UserInputError(f"class spec is missing {', '.join(missing)}")
    class_id = spec["class_id"]
    if isinstance(class_id, bool) or not isinstance(class_id, (str, int)) or \
            not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", str(class_id)):
        raise UserInputError(f"class spec: class_id must be a short name of letters, digits, "
                             f"'_', '.', '-', got {class_id!r}")
    model = spec["model"]
    if not isinstance(model, dict):
        raise UserInputError("class spec: model must be a dict of dimensions")
    dims = {k: _positive_int(model.get(k), f"model.{k}")
            for k in ("hidden", "intermediate", "n_heads", "n_kv", "head_dim")}
    if dims["n_heads"] % dims["n_kv"]:
        raise UserInputError(f"class spec: n_heads {dims['n_heads']} is not a multiple of "
                             f"n_kv {dims['n_kv']}")
    if spec["activation"] not in kernels.ACTIVATIONS:
        raise UserInputError(f"class spec: activation must be one of {kernels.ACTIVATIONS}, "
                             f"got {spec['activation']!r}")
    if not isinstance(spec["gated"], bool):
        raise UserInputError(f"class spec: gated must be true or false, got {spec['gated']!r}")
    if spec["layout"] not in LAYOUTS:
        raise UserInputError(f"class spec: layout must be one of {LAYOUTS}, got {spec['layout']!r}")
    if spec["block_size"] not in BLOCK_SIZES or isinstance(spec["block_size"], bool):
        raise UserInputError(f"class spec: block_size must be one of {BLOCK_SIZES}, "
                             f"got {spec['block_size']!r}")
    if spec["dtype"] not in DTYPES:
        raise UserInputError(f"class spec: dtype must be one of {DTYPES}, got {spec['dtype']!r}")
    tiles = dict(DEFAULT_TILES)
    extra = spec.get("tiles") or {}
    if not isinstance(extra, dict) or set(extra) - set(DEFAULT_TILES):
        raise UserInputError(f"class spec: tiles may only set {sorted(DEFAULT_TILES)}")
    for name, value in extra.items():
        if value is None and name == "decode_block_k":
            continue
        tiles[name] = _positive_int(value, f"tiles.{name}")
        if name != "o_proj_split" and (value < 16 or value & (value - 1)):
            raise UserInputError(f"class spec: tiles.{name} must be a power of two >= 16")

    block = spec["block_size"]
    n_blocks_total = math.ceil(dims["intermediate"] / block)
    per_group = dims["n_heads"] // dims["n_kv"]
    layers = spec["layers"]
    if not isinstance(layers, list) or not layers:
        raise UserInputError("class spec: layers must be a non-empty list")
    canonical = []
    for entry in layers:
        if not isinstance(entry, dict):
            raise UserInputError("class spec: every layers entry must be a dict")
        layer = _id(entry.get("layer"), "layers[].layer")
        where = f"layer {layer}"
        channels = _positive_int(entry.get("ffn_channels"), f"{where} ffn_channels")
        if channels > dims["intermediate"]:
            raise UserInputError(f"class spec: {where} keeps {channels} FFN channels of "
                                 f"{dims['intermediate']}")
        if spec["layout"] == "compact":  # compact prefill runs over all blocks of the kept rows
            blocks = math.ceil(channels / block)
        else:
            blocks = _positive_int(entry.get("ffn_blocks", math.ceil(channels / block)),
                                   f"{where} ffn_blocks")
            if blocks > n_blocks_total:
                raise UserInputError(f"class spec: {where} keeps {blocks} FFN blocks of "
                                     f"{n_blocks_total}")
        q_heads = _index_list(entry.get("q_heads"), dims["n_heads"], f"{where} q_heads")
        kv_groups = _index_list(entry.get("kv_groups"), dims["n_kv"], f"{where} kv_groups")
        needed = kernels.required_kv_groups(q_heads, dims["n_heads"], dims["n_kv"])
        if not set(needed) <= set(kv_groups):
            raise UserInputError(f"class spec: {where} keeps query heads {q_heads} that read kv "
                                 f"groups {needed}, but kv_groups is {kv_groups}")
        canonical.append({"layer": layer, "ffn_channels": channels, "ffn_blocks": blocks,
                          "q_heads": q_heads, "kv_groups": kv_groups})
    canonical.sort(key=lambda e: e["layer"])
    ids = [e["layer"] for e in canonical]
    if len(set(ids)) != len(ids):
        raise UserInputError(f"class spec: layer ids repeat: {ids}")
    return {"class_id": str(class_id), "model": dims, "activation": spec["activation"],
            "gated": spec["gated"], "layout": spec["layout"], "block_size": block,
            "dtype": spec["dtype"], "layers": canonical, "tiles": tiles}


# --------------------------------------------------------------------------- source text


def _portable_source() -> str:
    """kernels.py's kernels and wrappers, verbatim (decorators included)."""
    parts = ["\n".join(f"{name} = {value!r}" for name, value in kernels.PORTABLE_CONSTANTS.items())]
    for obj in kernels.PORTABLE:
        fn = getattr(obj, "fn", obj)  # JITFunction / InterpretedFunction wrap the Python function
        parts.append(inspect.getsource(fn).rstrip())
    return "\n\n\n".join(parts)


def _docstring(s: dict) -> str:
    m, t = s["model"], s["tiles"]
    ffn_kind = (f"gated {ACTIVATION_NAMES[s['activation']]} (gate, up, down)" if s["gated"]
                else f"plain {ACTIVATION_NAMES[s['activation']]} (W_1 + b_1, W_2 + b_2)")
    n_blocks_total = math.ceil(m["intermediate"] / s["block_size"])
    rows = [f"    {'layer':>5}  {'ffn channels':>14}  {'ffn blocks':>10}  {'q heads':>9}  "
            f"{'kv groups':>9}  kept q heads"]
    for e in s["layers"]:
        rows.append(f"    {e['layer']:>5}  {e['ffn_channels']:>6}/{m['intermediate']:<7}  "
                    f"{e['ffn_blocks']:>4}/{n_blocks_total:<5}  "
                    f"{len(e['q_heads']):>4}/{m['n_heads']:<4}  "
                    f"{len(e['kv_groups']):>4}/{m['n_kv']:<4}  {e['q_heads']}")
    w_rows = "I" if s["layout"] == "gather" else "K_l"
    q_rows = "n_heads*D" if s["layout"] == "gather" else "n_q_l*D"
    kv_rows = "n_kv*D" if s["layout"] == "gather" else "n_kv_l*D"
    index_note = ("runtime int32 index lists (idx [K_l] channels, blocks [NB_l]; head lists\n"
                  "default to the class's own) select rows of the dense weights, so per-token\n"
                  "supports reuse these kernels" if s["layout"] == "gather" else
                  "weights are per-class copies holding only the kept rows, in kept order;\n"
                  "no index lists are read")
    title = f"Reduced kernels for class {s['class_id']}"
    return f'''"""
{title}
{"=" * len(title)}

Generated by cscompile.codegen.generate from the class spec; do not edit: the runtime
regenerates this text from the spec and refuses the file if a single byte differs.

Model: hidden H={m["hidden"]}, FFN intermediate I={m["intermediate"]}, {m["n_heads"]} query heads /
{m["n_kv"]} kv heads of head_dim D={m["head_dim"]}; FFN is {ffn_kind}.
Layout: {s["layout"]}: {index_note}.
dtype: {s["dtype"]}. Prefill channel blocks: BLOCK_N={s["block_size"]}.
{textwrap.fill("Tiles: " + ", ".join(f"{k}={v}" for k, v in t.items()) + ".", 96)}

Serves {len(s["layers"])} layer(s):

{chr(10).join(rows)}

Shapes (M = rows: B <= 16 for *_decode_layer, T tokens for *_prefill_layer):

    ffn_*_layer     x [M, {m["hidden"]}], W_g / W_u / W_dT [{w_rows}, {m["hidden"]}] -> y [M, {m["hidden"]}]
    qkv_*_layer     x [M, {m["hidden"]}], W_q [{q_rows}, {m["hidden"]}], W_k / W_v [{kv_rows}, {m["hidden"]}]
                    -> q [M, n_q_l*{m["head_dim"]}], k / v [M, n_kv_l*{m["head_dim"]}]
    o_proj_*_layer  attn [M, n_q_l*{m["head_dim"]}], W_oT [{q_rows}, {m["hidden"]}] -> y [M, {m["hidden"]}]

Counts, shapes, block sizes and the activation reach the kernels as tl.constexpr.
"""'''


def _tuple(values) -> str:
    return "(" + ", ".join(str(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def _constants(s: dict) -> str:
    m, t = s["model"], s["tiles"]
    layers = s["layers"]
    lines = [
        "# ---------------------------------------------------------------- class constants",
        f"CLASS_ID = {s['class_id']!r}",
        f"HIDDEN = {m['hidden']}",
        f"INTERMEDIATE = {m['intermediate']}",
        f"N_HEADS = {m['n_heads']}",
        f"N_KV = {m['n_kv']}",
        f"HEAD_DIM = {m['head_dim']}",
        f"ACTIVATION = {s['activation']!r}",
        f"GATED = {s['gated']}",
        f"LAYOUT = {s['layout']!r}",
        f"DTYPE = torch.{s['dtype']}",
        f"BLOCK_N = {s['block_size']}",
    ]
    lines += [f"{k.upper()} = {v}" for k, v in t.items()]
    lines += [
        "",
        "# per served layer, in LAYERS order",
        f"LAYERS = {_tuple([e['layer'] for e in layers])}",
        f"FFN_CHANNELS = {_tuple([e['ffn_channels'] for e in layers])}",
        f"FFN_BLOCKS = {_tuple([e['ffn_blocks'] for e in layers])}",
        "Q_HEADS = (",
        *[f"    {_tuple(e['q_heads'])}," for e in layers],
        ")",
        "KV_GROUPS = (",
        *[f"    {_tuple(e['kv_groups'])}," for e in layers],
        ")",
    ]
    return "\n".join(lines)


_HELPERS = '''
# ---------------------------------------------------------------- class entry points

_HEAD_INDEX = {}  # (table, slot, device) -> int32 tensor of this class's kept heads


def _slot(layer):
    if layer not in LAYERS:
        raise ValueError(f"class {CLASS_ID} does not serve layer {layer}; it serves {LAYERS}")
    return LAYERS.index(layer)


def _check_x(x):
    if x.dim() != 2 or x.shape[1] != HIDDEN or x.dtype != DTYPE:
        raise ValueError(f"expected x [M, {HIDDEN}] {DTYPE}, got {tuple(x.shape)} {x.dtype}")


def _check_attn(attn, n_q):
    if attn.dim() != 2 or attn.shape[1] != n_q * HEAD_DIM or attn.dtype != DTYPE:
        raise ValueError(f"expected attn [M, {n_q * HEAD_DIM}] {DTYPE}, "
                         f"got {tuple(attn.shape)} {attn.dtype}")


def _check_count(name, t, n, rows=False):
    got = t.shape[0] if rows else t.numel()
    if got != n:
        raise ValueError(f"{name} has {got} {'rows' if rows else 'entries'}, this layer needs {n}")


def _heads(table, slot, device):
    """int32 tensor of table[slot] (cached): a layer's kept heads, or 0..n-1 for compact rows."""
    key = (id(table), slot, str(device))
    if key not in _HEAD_INDEX:
        _HEAD_INDEX[key] = torch.tensor(table[slot], dtype=torch.int32, device=device)
    return _HEAD_INDEX[key]


_COMPACT_Q = tuple(tuple(range(len(heads))) for heads in Q_HEADS)
_COMPACT_KV = tuple(tuple(range(len(groups))) for groups in KV_GROUPS)
'''


def _ffn_entry_points(s: dict) -> str:
    gather = s["layout"] == "gather"
    if s["gated"]:
        weights, call_weights, bias_args, bias_call = "w_gate, w_up, w_down_t", \
            "w_gate, w_up, w_down_t", "", ""
        weight_doc = "w_gate, w_up, w_down_t"
    else:
        weights, call_weights = "w_up, w_down_t", "None, w_up, w_down_t"
        bias_args, bias_call = ", b_up=None, b_down=None", ", b_up=b_up, b_down=b_down"
        weight_doc = "w_up (W_1), w_down_t (W_2 transposed)"
    if gather:
        decode_check = ('    _check_count("w_up", w_up, INTERMEDIATE, rows=True)\n'
                        '    _check_count("idx", idx, FFN_CHANNELS[slot])\n')
        decode_sig, decode_idx = ", idx", "idx"
        decode_doc = f"{weight_doc} dense [INTERMEDIATE, HIDDEN]; idx int32 [FFN_CHANNELS[l]]"
        prefill_check = ('    _check_count("w_up", w_up, INTERMEDIATE, rows=True)\n'
                         '    _check_count("blocks", blocks, FFN_BLOCKS[slot])\n')
        prefill_sig, prefill_blocks = ", blocks", "blocks"
        prefill_doc = f"{weight_doc} dense; blocks int32 [FFN_BLOCKS[l]] kept BLOCK_N blocks"
    else:
        decode_check = '    _check_count("w_up", w_up, FFN_CHANNELS[slot], rows=True)\n'
        decode_sig, decode_idx = "", "None"
        decode_doc = f"{weight_doc} compact [FFN_CHANNELS[l], HIDDEN]"
        prefill_check = decode_check
        prefill_sig, prefill_blocks = "", "None"
        prefill_doc = decode_doc
    return f'''


def ffn_decode_layer(layer, x, {weights}{decode_sig}{bias_args}):
    """Reduced FFN of `layer` for B <= 16 rows.

    {decode_doc}.
    """
    slot = _slot(layer)
    _check_x(x)
{decode_check}    return ffn_decode(x, {call_weights}, {decode_idx},
                      activation=ACTIVATION{bias_call},
                      block_k=DECODE_BLOCK_K, block_h=DECODE_BLOCK_H)


def ffn_prefill_layer(layer, x, {weights}{prefill_sig}{bias_args}):
    """Reduced FFN of `layer` for T tokens.

    {prefill_doc}.
    """
    slot = _slot(layer)
    _check_x(x)
{prefill_check}    return ffn_prefill(x, {call_weights}, {prefill_blocks}, block_n=BLOCK_N,
                       activation=ACTIVATION{bias_call},
                       block_m=PREFILL_BLOCK_M, block_h=PREFILL_BLOCK_H)
'''


def _attention_entry_points(s: dict) -> str:
    if s["layout"] == "gather":
        select = '''    if q_heads is None:  # the class's own heads; pass runtime lists for per-token supports
        q_heads = _heads(Q_HEADS, slot, x.device)
    if kv_groups is None:
        kv_groups = _heads(KV_GROUPS, slot, x.device)
    _check_count("q_heads", q_heads, len(Q_HEADS[slot]))
    _check_count("kv_groups", kv_groups, len(KV_GROUPS[slot]))
    _check_count("w_q", w_q, N_HEADS * HEAD_DIM, rows=True)
'''
        o_select = '''    if q_heads is None:
        q_heads = _heads(Q_HEADS, slot, attn.device)
    _check_count("q_heads", q_heads, len(Q_HEADS[slot]))
    _check_count("w_o_t", w_o_t, N_HEADS * HEAD_DIM, rows=True)
'''
        sig, o_sig = ", q_heads=None, kv_groups=None", ", q_heads=None"
        doc = ("dense weights; kept heads default to Q_HEADS[l] / KV_GROUPS[l]; runtime lists\n"
               "    must keep the kv group h // (N_HEADS // N_KV) of every kept query head h")
        o_doc = "dense W_oT; kept heads default to Q_HEADS[l]"
    else:
        select = '''    q_heads = _heads(_COMPACT_Q, slot, x.device)
    kv_groups = _heads(_COMPACT_KV, slot, x.device)
    _check_count("w_q", w_q, len(Q_HEADS[slot]) * HEAD_DIM, rows=True)
    _check_count("w_k", w_k, len(KV_GROUPS[slot]) * HEAD_DIM, rows=True)
'''
        o_select = '''    q_heads = _heads(_COMPACT_Q, slot, attn.device)
    _check_count("w_o_t", w_o_t, len(Q_HEADS[slot]) * HEAD_DIM, rows=True)
'''
        sig, o_sig = "", ""
        doc = "compact weights holding the kept heads' rows in Q_HEADS[l] / KV_GROUPS[l] order"
        o_doc = "compact W_oT holding the rows of the heads in Q_HEADS[l]"
    out = []
    for phase, rows_doc in (("decode", "B <= 16 rows"), ("prefill", "T tokens")):
        extra = "block_d=DECODE_BLOCK_D, block_h=DECODE_BLOCK_H" if phase == "decode" else \
            "block_m=PREFILL_BLOCK_M, block_h=PREFILL_BLOCK_H"
        o_extra = ("block_h=DECODE_BLOCK_H, split=O_PROJ_SPLIT" if phase == "decode" else
                   "block_m=PREFILL_BLOCK_M, block_h=PREFILL_BLOCK_H")
        out.append(f'''

def qkv_{phase}_layer(layer, x, w_q, w_k, w_v{sig}, biases=None):
    """Kept-head q, k, v of `layer` for {rows_doc}.

    {doc}.
    """
    slot = _slot(layer)
    _check_x(x)
{select}    return qkv_{phase}(x, w_q, w_k, w_v, q_heads, kv_groups, HEAD_DIM, biases=biases,
                      {extra})


def o_proj_{phase}_layer(layer, attn, w_o_t{o_sig}, b_o=None):
    """Output projection of `layer` over its kept heads for {rows_doc}.

    {o_doc}.
    """
    slot = _slot(layer)
    _check_attn(attn, len(Q_HEADS[slot]))
{o_select}    return o_proj_{phase}(attn, w_o_t, q_heads, HEAD_DIM, b_o=b_o,
                         {o_extra})
''')
    return "".join(out)


def generate_class_source(spec: dict) -> str:
    """The Triton source file for one class (deterministic: same spec, same bytes)."""
    s = validate_class_spec(spec)
    sections = [
        _docstring(s),
        "import torch\nimport triton\nimport triton.language as tl",
        _constants(s),
        "# ---------------------------------------------------------------- kernels\n"
        "# (copied verbatim from cscompile.codegen.kernels)\n\n" + _portable_source(),
        _HELPERS.strip("\n") + _ffn_entry_points(s) + _attention_entry_points(s),
    ]
    return "\n\n\n".join(sections).rstrip() + "\n"


# --------------------------------------------------------------------------- loading


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


_MODULE_DIR: Path | None = None


def _module_dir() -> Path:
    """A private (0700) directory for this process's verified kernel files, removed at exit."""
    global _MODULE_DIR
    if _MODULE_DIR is None:
        _MODULE_DIR = Path(tempfile.mkdtemp(prefix="cscompile-kernels-"))
        atexit.register(shutil.rmtree, _MODULE_DIR, ignore_errors=True)
    return _MODULE_DIR


def load_class_module(source: str, expected_sha256: str | None, spec: dict):
    """Verify `source` against `spec` (and `expected_sha256`), then import it.

    Raises BundleError if the spec is invalid, the sha256 does not match, or the text is not
    exactly what this cscompile version generates from the spec (tampered, or another version).
    """
    try:
        expected_source = generate_class_source(spec)
    except UserInputError as e:
        raise BundleError(f"cannot regenerate class kernels: {e}") from None
    class_id = str(spec["class_id"])
    if not isinstance(source, str):
        raise BundleError(f"kernel source of class {class_id} is not text")
    digest = source_sha256(source)
    if expected_sha256 is not None and digest != expected_sha256:
        raise BundleError(f"kernel source of class {class_id} does not match its recorded sha256")
    if source != expected_source:
        raise BundleError(f"kernel source of class {class_id} differs from the code generated from "
                          "its spec (tampered, or built by another cscompile version)")
    name = f"cscompile_class_{re.sub(r'[^A-Za-z0-9_]', '_', class_id)}_{digest[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    path = _module_dir() / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


__all__ = ["generate_class_source", "load_class_module", "validate_class_spec", "source_sha256",
           "DEFAULT_TILES", "LAYOUTS", "DTYPES", "BLOCK_SIZES"]
