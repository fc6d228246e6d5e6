"""Layer-streamed models: a Hugging Face causal LM whose decoder layers stay in their
safetensors files until a forward (or a pass) needs them, so at most one decoder layer's
weights is resident at a time (the way sequential pruning / quantization pipelines calibrate
models larger than memory). `cscompile build --stream` runs the whole build on such a model.

`open_streamed(model_dir)` builds the model from its config with every parameter on `meta`
(accelerate's init_empty_weights), loads the embeddings, final norm and lm_head, and gives
each decoder-layer parameter a placeholder of the right shape that holds one NaN (4 bytes; a
pass that read an unloaded weight would get NaNs, never plausible numbers). A forward
pre-hook on each decoder layer loads its weights (the same conversion to the compute dtype as
`from_pretrained`, then any registered transform such as the build's channel permutation)
and a forward hook frees them, so the calibration activations flow layer to layer through
one resident layer. Passes that read weights outside a forward hold `resident(model, li)`.

Loading swaps each Parameter's `.data`, never the Parameter: modules the per-token path
swaps in, tied weights and id()-based byte accounting keep pointing at the same objects. A
layer computes on the same inputs and the same weights as in the fully loaded model, so
everything the build measures, and hence its bundle, is bit-identical (tests/test_stream.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import UnsupportedModelError
from .safetensors_io import TensorFile

_NAN = float("nan")


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` that stores one NaN."""
    return torch.full((1,), _NAN, dtype=dtype).expand(*shape)


class LayerStream:
    """The decoder layers of `model` (model.model.layers), read from `model_dir` on demand."""

    def __init__(self, model: nn.Module, model_dir: Path, where: dict[str, TensorFile],
                 dtype: torch.dtype):
        self.model, self.dir, self.where, self.dtype = model, Path(model_dir), where, dtype
        self.layers = model.model.layers
        self.n_layers = len(self.layers)
        self.prefix = "model.layers."
        # (name in the file, Parameter) per layer, fixed before any module is swapped
        self.params = [[(f"{self.prefix}{li}.{n}", p) for n, p in layer.named_parameters()]
                       for li, layer in enumerate(self.layers)]
        self.users = [0] * self.n_layers
        self.transforms: list[Callable[[int], None]] = []
        self.loads = 0  # layer reads from disk, and their seconds, for the build report
        self.read_s = 0.0
        for li, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda m, a, li=li: self._acquire(li))
            layer.register_forward_hook(lambda m, a, o, li=li: self._release(li),
                                        always_call=True)

    def add_transform(self, fn: Callable[[int], None]) -> None:
        """fn(li) edits layer li in place each time it is read (the build's permutation)."""
        if any(self.users):
            raise RuntimeError(f"layers {[i for i, u in enumerate(self.users) if u]} are "
                               f"resident: a transform would miss their current copy")
        self.transforms.append(fn)

    # ------------------------------------------------------------------ residency
    @contextmanager
    def resident(self, li: int):
        self._acquire(li)
        try:
            yield self.layers[li]
        finally:
            self._release(li)

    def _acquire(self, li: int) -> None:
        if self.users[li] == 0:
            self._load(li)
        self.users[li] += 1

    def _release(self, li: int) -> None:
        self.users[li] -= 1
        if self.users[li] == 0:
            for _, p in self.params[li]:
                p.data = placeholder(p.shape, p.dtype)
            _trim()

    def _load(self, li: int) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, p in self.params[li]:
                p.data = _read(self.where, name, p.shape, self.dtype, self.dir)
            for fn in self.transforms:
                fn(li)
        self.loads += 1
        self.read_s += time.perf_counter() - t0

    def layer_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """model.state_dict() in sorted name order with real values (each layer's names are
        contiguous in that order, so each layer is read once)."""
        held, ctx = None, nullcontext()
        try:
            for name in sorted(self.model.state_dict()):
                li = self.layer_of(name)
                if li is not None and li != held:
                    ctx.__exit__(None, None, None)
                    ctx, held = self.resident(li), li
                    ctx.__enter__()
                try:  # looked up now: state_dict() holds the placeholders of that moment
                    t = self.model.get_parameter(name)
                except AttributeError:
                    t = self.model.get_buffer(name)
                yield name, t.detach()
        finally:
            ctx.__exit__(None, None, None)


def stream_of(model: nn.Module) -> LayerStream | None:
    return getattr(model, "_cscompile_stream", None)


def resident(model: nn.Module, li: int):
    """Context in which decoder layer li's weights are real (a no-op for a loaded model)."""
    stream = stream_of(model)
    return stream.resident(li) if stream is not None else nullcontext()


def state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of model.state_dict(), sorted by name, streamed where the model is."""
    stream = stream_of(model)
    return stream.state_items() if stream is not None else iter(
        sorted(model.state_dict().items()))


def safetensors_index(model_dir: Path) -> dict[str, TensorFile]:
    where = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tf = TensorFile(f)
        where.update({k: tf for k in tf.keys()})
    return where


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: its allocator's own policy stands
        return None


_LIBC = _glibc()


def _return_layer_sized_blocks() -> None:
    """Have glibc's malloc map blocks of 2 MiB and more and unmap them when freed. By default
    it raises its mmap threshold to the largest block freed so far (up to 32 MiB), so once one
    layer is freed, every later layer's weights come from a heap that fragments: a streamed
    SmolLM2 process held 270 MB more after hashing its layers one at a time (measured).
    Activations below 2 MiB stay on the heap (a 1 MiB threshold slowed the build down)."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD; setting it also stops the raising


_TRIM_EVERY_S = 0.5
_last_trim = [0.0]


def _trim() -> None:
    """Return the heap's free pages to the system, at most every _TRIM_EVERY_S (after a
    layer is freed): the heap's free blocks otherwise stay resident; a streamed SmolLM2
    build's RSS grew by 240 MB over its 90 operator menus without trims, and stayed flat
    with them (measured). A trim at every release made the build 2.5x slower."""
    now = time.perf_counter()
    if _LIBC is not None and now - _last_trim[0] >= _TRIM_EVERY_S:
        _LIBC.malloc_trim(0)
        _last_trim[0] = time.perf_counter()


def _read(where: dict[str, TensorFile], name: str, shape, dtype: torch.dtype,
          model_dir: Path) -> torch.Tensor:
    """Tensor `name` in the compute dtype, always a fresh copy (transforms edit it in place)."""
    if name not in where:
        raise UnsupportedModelError(f"{model_dir}: no tensor {name} in its safetensors")
    t = where[name].get(name)
    if tuple(t.shape) != tuple(shape):
        raise UnsupportedModelError(f"{where[name].path}: {name} has shape {tuple(t.shape)}, "
                                    f"the config says {tuple(shape)}")
    return t.to(dtype, copy=True)


def open_streamed(model_dir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of a Hugging Face directory with its decoder layers streamed (see the
    module docstring); its LayerStream is `stream_of(model)`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    _return_layer_sized_blocks()
    where = safetensors_index(model_dir)
    if not (model_dir / "config.json").is_file() or not where:
        raise UnsupportedModelError(f"{model_dir}: layer streaming needs a Hugging Face "
                                    f"directory with config.json and .safetensors weights")
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inner = getattr(model, "model", None)
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise UnsupportedModelError(f"{model_dir}: layer streaming needs a Llama-style "
                                    f"model.model.layers stack")
    if any(True for _ in inner.layers.buffers()):
        raise UnsupportedModelError(f"{model_dir}: decoder layers hold buffers; layer "
                                    f"streaming loads parameters only")
    layer_prefix = "model.layers."
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        if name.startswith(layer_prefix):
            value = placeholder(p.shape, dtype)
        elif name in where:
            value = _read(where, name, p.shape, dtype, model_dir)
        elif tied and name == "lm_head.weight":
            continue  # tie_weights below
        else:
            raise UnsupportedModelError(f"{model_dir}: no tensor {name} in its safetensors")
        owner._parameters[attr] = nn.Parameter(value)
    if tied:
        model.tie_weights()
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.config.name_or_path = str(model_dir)
    model.eval()
    model._cscompile_stream = LayerStream(model, model_dir, where, dtype)
    return model
