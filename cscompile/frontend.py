"""Frontend: load a model from a name, HF directory, GGUF file or model.pt; trace it; map it.

`load_model` accepts
  * a named default (`smollm2-135m`, see cscompile.models),
  * a Hugging Face directory (config.json + safetensors),
  * a `.gguf` file (dequantised through transformers once, then cached by its sha256),
  * a `model.pt` written by `torch.save`: {"config": <HF config dict>, "state_dict": ...}
    loads with `weights_only=True`; a pickled `nn.Module` or `ExportedProgram` is executable
    code and loads only with `trust_pickle=True`,
  * a `.pt2` file written by `torch.export.save`.
`analyze` exports the model with `torch.export` and discovers its StructureMap from the graph.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UnsupportedModelError, UserInputError
from .structure import StructureMap


@dataclass
class LoadedModel:
    model: nn.Module
    model_id: str
    tokenizer: object | None = None
    storage_dtype: torch.dtype | None = None  # dtype the weights are stored in (bytes count)
    source: str = ""

    @property
    def is_hf(self) -> bool:
        return hasattr(self.model, "config") and hasattr(self.model, "generation_config")

    @property
    def context_length(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def vocab_size(self) -> int:
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "vocab_size", None):
            return int(cfg.vocab_size)
        emb = next(m for m in self.model.modules() if isinstance(m, nn.Embedding))
        return emb.num_embeddings


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a HF causal LM or any module mapping input_ids -> logits."""
    if hasattr(model, "generation_config"):
        return model(input_ids=input_ids, use_cache=False).logits
    out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------- loading
def load_model(source: str | Path, trust_pickle: bool = False,
               dtype: torch.dtype = torch.float32, stream: bool = False) -> LoadedModel:
    """Load any supported model for analysis and CPU execution (computing in `dtype`).

    stream=True (Hugging Face safetensors directories and GGUF files): the decoder layers
    stay on disk and are read one at a time when a forward needs them (cscompile.stream).

    Every failure caused by the input (missing, unreadable, truncated, garbled or implausible
    files, refused pickle) is a UserInputError subclass with a one-line message.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    src = str(source)
    shown = _shown(src)
    if not src or "\x00" in src:
        raise UserInputError(f"model path {shown} is empty or holds a NUL character")
    try:
        path = Path(src).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as e:  # name too long, ~unknown-user, ...
        raise UserInputError(f"model path {shown} cannot be used ({_one_line(e)})") from None
    if not exists:
        from . import models

        if src in models.NAMED_MODELS:
            path = models.resolve_model(src)
        elif "/" not in src and not path.suffix:
            raise UserInputError(f"unknown model {shown}: not a file or directory, and not "
                                 f"one of the named models ({', '.join(sorted(models.NAMED_MODELS))})")
        else:
            raise UserInputError(f"model path {shown} does not exist")
    if stream and not (path.is_dir() or path.suffix == ".gguf"):
        raise UserInputError(f"{path}: --stream reads a Hugging Face directory with "
                             f"safetensors weights or a GGUF file")
    if path.is_dir():
        loaded = _load_hf_dir(path, dtype, stream)
    elif path.suffix not in (".gguf", ".pt2", ".pt", ".pth", ".bin"):
        raise UnsupportedModelError(
            f"{path}: unsupported model format '{path.suffix or 'no suffix'}' (expected a Hugging "
            f"Face directory, .gguf, .pt/.pth saved with torch.save, or .pt2 from torch.export.save)")
    elif not path.is_file():  # a FIFO or device would block or never end
        raise UserInputError(f"{path}: not a regular file")
    elif path.suffix == ".gguf":
        loaded = _load_gguf(path, dtype, stream)
    elif path.suffix == ".pt2":
        loaded = _load_exported(path, trust_pickle)
    else:
        loaded = _load_torch_file(path, trust_pickle, dtype)
    loaded.source = src
    loaded.model.eval()
    return loaded


# Config fields that size the model: an implausible value is refused before anything is built
# (a garbled config.json must not allocate terabytes or construct a million layers).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_SIZE_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_head",
              "n_inner", "n_positions", "n_ctx", "ffn_dim", "d_model", "sliding_window")
MAX_LAYERS = 1024
MAX_SIZE = 1 << 24


def _check_config_sizes(path, cfg: dict) -> None:
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{path}: model config is a {type(cfg).__name__}, not a JSON "
                                    f"object")
    for sub in ("text_config",):
        if isinstance(cfg.get(sub), dict):
            _check_config_sizes(path, cfg[sub])
    for key in (*_LAYER_KEYS, *_SIZE_KEYS):
        if key not in cfg or cfg[key] is None:
            continue
        value, limit = cfg[key], MAX_LAYERS if key in _LAYER_KEYS else MAX_SIZE
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise UnsupportedModelError(f"{path}: config field {key}={str(value)[:40]} is not a "
                                        f"plausible size (an integer in 1..{limit})")


def _stored_numel(path: Path) -> int:
    """Elements held by the directory's safetensors files (read from their headers only)."""
    import math

    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        extra = f" ({', '.join(found[:3])} would need unpickling, which cscompile never does)" if found else ""
        raise UnsupportedModelError(f"{path}: no .safetensors weights in the directory{extra}")
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    total += math.prod(st.get_slice(key).get_shape())
        except Exception as e:  # SafetensorError for truncated or garbled headers
            raise UnsupportedModelError(f"{f}: not a readable safetensors file "
                                        f"({_one_line(e)})") from None
    return total


def _check_model_size(path, config, stored: int | None) -> None:
    """Build the model on the meta device (no memory) and compare its size with the weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in meta.parameters())
    buffers = sum(b.numel() for b in meta.buffers())
    if stored is not None and params > 2 * stored + (1 << 20):
        raise UnsupportedModelError(
            f"{path}: config.json describes {params:,} parameters but the weights hold only "
            f"{stored:,}: the config does not belong to these weights (garbled or mismatched)")
    if buffers > (1 << 28):
        raise UnsupportedModelError(f"{path}: the config implies {buffers:,} buffer elements: "
                                    f"not a plausible model")


def _load_hf_dir(path: Path, dtype, stream: bool = False) -> LoadedModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UnsupportedModelError(f"{path}: directory has no config.json (not a Hugging Face "
                                    f"model directory)")

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        raw_cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, 5000-digit integers
        raise UnsupportedModelError(f"{cfg_path}: not valid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise UnsupportedModelError(f"{cfg_path}: cannot read ({_one_line(e)})") from None
    _check_config_sizes(path, raw_cfg)
    stored = _stored_numel(path)
    try:
        config = AutoConfig.from_pretrained(path)
        stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        _check_model_size(path, config, stored)
        if stream:
            from .stream import open_streamed

            model = open_streamed(path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except UserInputError:
        raise
    except Exception as e:  # transformers raises many types for garbled configs and weights
        raise UnsupportedModelError(f"{path}: cannot load as a causal LM ({_one_line(e)})") from None
    tokenizer = _maybe_tokenizer(path)
    stored_dtype = getattr(torch, stored_dtype, None) if isinstance(stored_dtype, str) else stored_dtype
    if not isinstance(stored_dtype, torch.dtype):
        stored_dtype = None
    return LoadedModel(model, _model_id(path), tokenizer, stored_dtype)


def _check_gguf_header(path: Path) -> None:
    """Magic, version and counts must be plausible for the file's size before a parser walks
    them (a count of 2**63 key/value pairs must not become a very long loop)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise UnsupportedModelError(f"{path}: not a GGUF file (no GGUF header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    # every key/value pair takes >= 13 bytes (key length, type, value), every tensor >= 24
    if n_kv * 13 > size or n_tensors * 24 > size:
        raise UnsupportedModelError(f"{path}: GGUF header claims {n_tensors:,} tensors and "
                                    f"{n_kv:,} metadata entries in {size:,} bytes (truncated or "
                                    f"corrupt)")


def _load_gguf(path: Path, dtype, stream: bool = False) -> LoadedModel:
    """Dequantizing a GGUF takes tens of seconds to minutes, so it happens once: the bf16
    Hugging Face directory it becomes is cached by the file's sha256 (cscompile.models)."""
    from . import models

    _check_gguf_header(path)
    loaded = _load_hf_dir(models.resolve_model(path), dtype, stream)
    loaded.model_id = _model_id(path)  # the file's name, not the cache directory's
    loaded.storage_dtype = torch.bfloat16
    return loaded


class _PickleRefused(BaseException):
    """Raised inside torch.export.load when it tries to unpickle; a BaseException so that
    torch's own `except Exception` fallbacks (to weights_only=False) cannot swallow it."""


@contextmanager
def _refuse_unpickling():
    """While active, torch.load runs only with weights_only=True and plain pickle is refused.

    torch.export.load unpickles parts of a .pt2 archive with weights_only=False (pickled
    weights and constants, custom objects, and as a fallback for sample inputs), which runs
    code from the file; cscompile loads .pt2 files without that unless --trust-pickle.
    """
    real_load, real_loads = torch.load, pickle.loads
    real_obj = getattr(torch._C, "_pickle_load_obj", None)

    def safe_load(*args, weights_only=None, **kwargs):
        if weights_only is False:
            raise _PickleRefused("torch.load(weights_only=False)")
        return real_load(*args, weights_only=True, **kwargs)

    def refuse(*args, **kwargs):
        raise _PickleRefused("pickle")

    torch.load, pickle.loads = safe_load, refuse
    if real_obj is not None:
        torch._C._pickle_load_obj = refuse
    try:
        yield
    finally:
        torch.load, pickle.loads = real_load, real_loads
        if real_obj is not None:
            torch._C._pickle_load_obj = real_obj


def _load_exported(path: Path, trust_pickle: bool = False) -> LoadedModel:
    try:
        with warnings.catch_warnings():  # torch warns about odd archives on stderr: our line says it
            warnings.simplefilter("ignore")
            if trust_pickle:
                ep = torch.export.load(str(path))
            else:
                with _refuse_unpickling():
                    ep = torch.export.load(str(path))
    except _PickleRefused:
        raise UserInputError(
            f"{path}: this torch.export archive holds pickled objects; unpickling runs code from "
            f"the file, so it is refused — pass --trust-pickle only if you trust its source") from None
    except Exception as e:
        raise UserInputError(f"{path}: cannot read torch.export program ({_one_line(e)})") from None
    if not isinstance(ep, torch.export.ExportedProgram):
        raise UserInputError(f"{path}: holds no torch.export program")
    try:
        return LoadedModel(_ExportedModule(ep), _model_id(path))
    except Exception as e:
        raise UnsupportedModelError(f"{path}: cannot rebuild the exported program "
                                    f"({_one_line(e)})") from None


def _load_torch_file(path: Path, trust_pickle: bool, dtype) -> LoadedModel:
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({_one_line(e)})") from None
    if not is_zip:
        raise UserInputError(f"{path}: not a readable torch.save file (truncated or corrupt)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our line says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            what = _one_line(e).split("Unsupported global: ")[-1].split(" was not")[0][:120]
            raise UserInputError(
                f"{path}: holds pickled Python objects ({what}); unpickling runs code from the "
                f"file, so it is refused — pass --trust-pickle only if you trust its source, or "
                f"save {{'config': ..., 'state_dict': ...}} instead") from None
        obj = _torch_load_trusted(path)
    except Exception as e:  # RuntimeError, EOFError, zipfile/struct/Unicode errors on corrupt files
        raise UserInputError(f"{path}: cannot read ({_one_line(e)})") from None

    if isinstance(obj, torch.export.ExportedProgram):
        return LoadedModel(_ExportedModule(obj), _model_id(path))
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.to(dtype), _model_id(path))
    if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        return LoadedModel(_model_from_config(path, obj["config"], obj["state_dict"], dtype),
                           _model_id(path))
    if isinstance(obj, dict):
        raise UnsupportedModelError(
            f"{path}: holds a bare state dict; save {{'config': <HF config dict>, "
            f"'state_dict': ...}} so the architecture is known")
    raise UnsupportedModelError(f"{path}: holds a {type(obj).__name__}, not a model")


def _torch_load_trusted(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserInputError(f"{path}: cannot unpickle ({_one_line(e)})") from None


def _model_from_config(path, config: dict, state_dict, dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_config_sizes(path, config)
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise UnsupportedModelError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{path}: config has no 'model_type'")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{path}: config 'model_type' is not a string")
    if not all(isinstance(k, str) for k in cfg):
        raise UnsupportedModelError(f"{path}: config keys must be strings")
    stored = sum(v.numel() for v in state_dict.values())
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        _check_model_size(path, hf_config, stored)
        model = AutoModelForCausalLM.from_config(hf_config)
        model.load_state_dict(state_dict, strict=False)
    except UserInputError:
        raise
    except Exception as e:  # ValueError, KeyError, TypeError, RuntimeError, ... from garbled configs
        raise UnsupportedModelError(f"{path}: cannot build '{model_type[:60]}' "
                                    f"({_one_line(e)})") from None
    return model.to(dtype)


class _ExportedModule(nn.Module):
    """An ExportedProgram as an nn.Module (fixed input shapes, as it was exported). Unflattened,
    so its submodules keep their original paths and masking hooks attach to them."""

    def __init__(self, ep):
        super().__init__()
        self.ep = ep
        self.inner = torch.export.unflatten(ep)

    def train(self, mode: bool = True):  # an exported graph has no train/eval switch
        return self

    def forward(self, input_ids):
        return self.inner(input_ids)


def _maybe_tokenizer(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a model without a tokenizer is still analysable
        return None


def _model_id(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _shown(text: str, limit: int = 200) -> str:
    """A user-given name for a one-line message: quoted, control characters escaped."""
    if text.isprintable():
        return f"'{text[:limit]}'" + ("..." if len(text) > limit else "")
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _one_line(e: BaseException) -> str:
    try:
        text = str(e).strip().splitlines()
    except Exception:  # an exception whose __str__ fails
        text = []
    return (text[0] if text else type(e).__name__)[:200]


def weight_hash(model: nn.Module) -> str:
    """Content hash of every parameter (names, shapes, bytes): the source model's identity."""
    from .stream import state_items

    h = hashlib.sha256()
    for name, p in state_items(model):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        t = p.detach().contiguous().cpu()  # hashed in place: no bytes copy of each tensor
        h.update(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------- tracing
def trace(loaded: LoadedModel, seq_len: int = 8):
    """torch.export the model on a random prompt (use_cache=False, no_grad)."""
    model = loaded.model
    if isinstance(model, _ExportedModule):
        ids = _example_ids_for(model.ep)
        return model.ep, (ids,), {}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(loaded.vocab_size, 1000), (1, seq_len), generator=gen)
    args, kwargs = ((), {"input_ids": ids, "use_cache": False}) if loaded.is_hf else ((ids,), {})
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise UnsupportedModelError(f"{loaded.model_id}: torch.export failed ({_one_line(e)})") from None
    return ep, args, kwargs


def _example_ids_for(ep):
    ph = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == ph[0].arg.name)
    shape = tuple(node.meta["val"].shape)
    return torch.zeros(shape, dtype=torch.long)


def analyze(loaded: LoadedModel, tile: int = 64, seq_len: int = 8) -> StructureMap:
    """Trace the model and discover its StructureMap."""
    from .stream import stream_of

    if stream_of(loaded.model) is not None:
        return _analyze_streamed(loaded, tile, seq_len)
    return _analyze_traced(loaded, tile, seq_len)


def _analyze_traced(loaded: LoadedModel, tile: int, seq_len: int) -> StructureMap:
    from .discover import discover

    ep, args, kwargs = trace(loaded, seq_len)
    smap = discover(loaded.model if not isinstance(loaded.model, _ExportedModule)
                    else loaded.model.inner, ep, args, kwargs, loaded.model_id,
                    loaded.storage_dtype, tile)
    _record_layer_outputs(loaded, smap, args[0] if args else kwargs["input_ids"])
    return smap


def _analyze_streamed(loaded: LoadedModel, tile: int, seq_len: int) -> StructureMap:
    """A layer-streamed model's StructureMap: the model cut to its first two decoder layers
    (both resident) is traced and discovered as usual, and layer 1's structure is repeated
    for every later layer, after checking that layer 0's is the same pattern (a decoder stack
    of one layer type). Byte tables come from the whole model's parameter shapes."""
    from .discover import param_table
    from .stream import stream_of

    model, stream = loaded.model, stream_of(loaded.model)
    n, depth = stream.n_layers, min(stream.n_layers, 2)
    layers, config = model.model.layers, model.config
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    try:
        with stream.resident(0), stream.resident(depth - 1):
            model.model.layers = nn.ModuleList(list(layers)[:depth])
            config.num_hidden_layers = depth
            if saved[1] is not None:
                config.layer_types = list(saved[1])[:depth]
            short = _analyze_traced(loaded, tile, seq_len)
    finally:
        model.model.layers = layers
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]
    if depth > 1 and _layer_as(short, 0, 1) != short.layers[1]:
        raise UnsupportedModelError(f"{loaded.model_id}: layer streaming needs decoder layers "
                                    f"of one structure (layers 0 and 1 differ)")
    shapes = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in layers]
    if differ := [i for i in range(depth, n) if shapes[i] != shapes[depth - 1]]:
        raise UnsupportedModelError(f"{loaded.model_id}: layer streaming needs decoder layers "
                                    f"of one structure (layer {differ[0]}'s parameters differ "
                                    f"from layer {depth - 1}'s)")
    params, total = param_table(model, loaded.storage_dtype)
    short.layers += [_layer_as(short, depth - 1, i) for i in range(depth, n)]
    short.params, short.total_bytes = params, total
    for layer in short.layers:
        layer.param_bytes = sum(elsize * math.prod(shape) for name, (shape, elsize)
                                in params.items() if name.startswith(layer.module + "."))
    short.unidentified += [m.replace(f"model.layers.{depth - 1}.", f"model.layers.{i}.")
                           for i in range(depth, n) for m in list(short.unidentified)
                           if f"model.layers.{depth - 1}." in m]
    return short


def _layer_as(smap: StructureMap, src: int, dst: int):
    """Layer `src` of smap as layer `dst`: the same structure under dst's module paths."""
    pattern = rf"model\.layers\.{src}(?=[.\"])"
    d = json.loads(re.sub(pattern, f"model.layers.{dst}",
                          json.dumps(smap.to_json()["layers"][src])))
    d["index"] = dst
    return StructureMap.from_json({**smap.to_json(), "layers": [d]}).layers[0]


def _record_layer_outputs(loaded: LoadedModel, smap: StructureMap, example_ids) -> None:
    """Whether each residual block returns a tuple (needed to skip it physically)."""
    model = loaded.model.inner if isinstance(loaded.model, _ExportedModule) else loaded.model
    seen = {}
    handles = []
    for layer in smap.layers:
        try:
            mod = model.get_submodule(layer.module)
        except AttributeError:
            continue
        handles.append(mod.register_forward_hook(
            lambda m, a, out, key=layer.module: seen.__setitem__(key, isinstance(out, tuple))))
    try:
        with torch.no_grad():
            logits_of(model, example_ids)
    finally:
        for h in handles:
            h.remove()
    for layer in smap.layers:
        layer.returns_tuple = seen.get(layer.module, False)
