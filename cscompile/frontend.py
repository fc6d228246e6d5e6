"""Frontend: load a model from a name, HF directory, GGUF file or model.pt; trace it; map it.

`load_model` accepts
  * a named default (`smollm2-135m`, see cscompile.models),
  * a Hugging Face directory (config.json + safetensors),
  * a `.gguf` file (dequantised through transformers),
  * a `model.pt` written by `torch.save`: {"config": <HF config dict>, "state_dict": ...}
    loads with `weights_only=True`; a pickled `nn.Module` or `ExportedProgram` is executable
    code and loads only with `trust_pickle=True`,
  * a `.pt2` file written by `torch.export.save`.
`analyze` exports the model with `torch.export` and discovers its StructureMap from the graph.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
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
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load any supported model for analysis and CPU execution (computing in `dtype`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    src = str(source)
    path = Path(src).expanduser()
    if not path.exists():
        from . import models

        if src in models.NAMED_MODELS:
            path = models.resolve_model(src)
        elif "/" not in src and not path.suffix:
            raise UserInputError(f"unknown model '{src}': not a file or directory, and not one of "
                                 f"the named models ({', '.join(sorted(models.NAMED_MODELS))})")
        else:
            raise UserInputError(f"model path '{src}' does not exist")
    if path.is_dir():
        loaded = _load_hf_dir(path, dtype)
    elif path.suffix == ".gguf":
        loaded = _load_gguf(path, dtype)
    elif path.suffix == ".pt2":
        loaded = _load_exported(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        loaded = _load_torch_file(path, trust_pickle, dtype)
    else:
        raise UnsupportedModelError(
            f"{path}: unsupported model format '{path.suffix or 'no suffix'}' (expected a Hugging "
            f"Face directory, .gguf, .pt/.pth saved with torch.save, or .pt2 from torch.export.save)")
    loaded.source = src
    loaded.model.eval()
    return loaded


def _load_hf_dir(path: Path, dtype) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"{path}: directory has no config.json (not a Hugging Face "
                                    f"model directory)")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path}: cannot load as a causal LM ({_one_line(e)})") from None
    tokenizer = _maybe_tokenizer(path)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return LoadedModel(model, _model_id(path), tokenizer, stored)


def _load_gguf(path: Path, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises many types for corrupt files
        raise UnsupportedModelError(f"{path}: cannot read GGUF ({_one_line(e)})") from None
    return LoadedModel(model, _model_id(path), tokenizer, torch.bfloat16)


def _load_exported(path: Path) -> LoadedModel:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise UserInputError(f"{path}: cannot read torch.export program ({_one_line(e)})") from None
    return LoadedModel(_ExportedModule(ep), _model_id(path))


def _load_torch_file(path: Path, trust_pickle: bool, dtype) -> LoadedModel:
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"{path}: not a readable torch.save file (truncated or corrupt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            what = _one_line(e).split("Unsupported global: ")[-1].split(" was not")[0][:120]
            raise UserInputError(
                f"{path}: holds pickled Python objects ({what}); unpickling runs code from the "
                f"file, so it is refused — pass --trust-pickle only if you trust its source, or "
                f"save {{'config': ..., 'state_dict': ...}} instead") from None
        obj = _torch_load_trusted(path)
    except (RuntimeError, EOFError, OSError) as e:
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

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{path}: config has no 'model_type'")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        model = AutoModelForCausalLM.from_config(hf_config)
        model.load_state_dict(state_dict, strict=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UnsupportedModelError(f"{path}: cannot build '{model_type}' ({_one_line(e)})") from None
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def weight_hash(model: nn.Module) -> str:
    """Content hash of every parameter (names, shapes, bytes): the source model's identity."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                 if p.dtype != torch.bool else p.numpy().tobytes())
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
    from .discover import discover

    ep, args, kwargs = trace(loaded, seq_len)
    smap = discover(loaded.model if not isinstance(loaded.model, _ExportedModule)
                    else loaded.model.inner, ep, args, kwargs, loaded.model_id,
                    loaded.storage_dtype, tile)
    _record_layer_outputs(loaded, smap, args[0] if args else kwargs["input_ids"])
    return smap


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
