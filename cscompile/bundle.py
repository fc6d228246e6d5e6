"""The bundle: a compiled model on disk, and the only thing the runtime trusts.

A bundle is a directory of plain data, never pickle:

    manifest.json        format_version, cscompile_version, build facts, and a `files`
                         table {relative_path: {"sha256", "bytes"}} covering every other file
    report.json          what the build measured
    *.safetensors        tensors (weights, router, per-class index sets, ...)
    kernels/*.py         generated kernel source: text the runtime hash-checks before use

Writing is atomic: everything goes into a temporary sibling directory, manifest.json last,
then one rename puts it in place, so a reader never sees a half-written bundle. Loading
re-hashes every listed file and refuses anything unlisted, modified or pickle-like.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import cscompile
from cscompile.errors import BuildError, BundleError, UserInputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"

# Suffixes that usually hold pickle (torch.save, joblib, HF .bin): never inside a bundle.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 opcode PROTO
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container: a zip holding a pickle


# ---------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not need RAM."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Stable content hash of a tensor dict: names, dtypes, shapes and raw bytes.

    Independent of dict order, device and memory layout (tensors are hashed as contiguous
    CPU data), so the same weights always give the same hash.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        header = json.dumps([name, str(t.dtype), list(t.shape)]) + "\n"
        digest.update(header.encode("utf-8"))
        # uint8 view exposes the raw bytes of any dtype (bf16 included) without a copy
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and Paths into plain JSON types."""
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):  # np.float32, np.int64, np.bool_, ...
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _json_key(key: Any) -> str:
    # sort_keys needs keys of one type; JSON keys are strings anyway
    key = key.item() if isinstance(key, np.generic) else key
    if not isinstance(key, (str, int, float, bool)) and key is not None:
        raise TypeError(f"cannot use {type(key).__name__} as a JSON key: {key!r}")
    return key if isinstance(key, str) else json.dumps(key)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- paths


def _check_relpath(relpath: str, error: type[Exception]) -> str:
    """A bundle path must be relative, POSIX, and stay inside the bundle."""
    if not isinstance(relpath, str) or not relpath:
        raise error(f"bundle path {relpath!r} is not a non-empty string")
    p = PurePosixPath(relpath)
    if p.is_absolute() or "\\" in relpath or ":" in relpath:
        raise error(f"bundle path {relpath!r} must be relative")
    if any(part in ("..", ".", "") for part in relpath.split("/")):
        raise error(f"bundle path {relpath!r} leaves the bundle or is not normalised")
    return relpath


def _looks_like_pickle(path: Path) -> bool:
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if not (head.startswith(PICKLE_MAGIC) or head.startswith(ZIP_MAGIC)):
        return False
    # a safetensors file starts with a little-endian header length, whose first byte may
    # be 0x80; a real one continues with its JSON header at byte 8, a pickle does not
    return not (path.suffix == ".safetensors" and head[8:9] == b"{")


def _version_major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


# ---------------------------------------------------------------------------- write


def write_bundle(
    out_dir: str | os.PathLike,
    manifest: dict,
    tensors: dict[str, dict[str, torch.Tensor]],
    report: dict,
    texts: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a bundle atomically and return its path.

    `tensors` maps relative file names ("weights.safetensors", "classes/c0.safetensors")
    to tensor dicts; `texts` maps relative paths ("kernels/class_0.py") to text.
    The same inputs always give byte-identical files.
    """
    out_dir = Path(out_dir)
    texts = texts or {}
    if out_dir.exists() and not force:
        raise UserInputError(f"output directory {out_dir} exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"output path {out_dir} exists and is not a directory")
    _check_inputs(manifest, tensors, texts)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files: dict[str, dict] = {}
        for relpath in sorted(tensors):
            target = _prepare(tmp, relpath)
            save_file(_contiguous_unshared(tensors[relpath]), str(target), metadata=None)
        for relpath in sorted(texts):
            _prepare(tmp, relpath).write_text(texts[relpath], encoding="utf-8", newline="\n")
        (tmp / REPORT).write_text(dumps_json(report), encoding="utf-8")
        for relpath in sorted([*tensors, *texts, REPORT]):
            target = tmp / relpath
            files[relpath] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
        full_manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "cscompile_version": cscompile.__version__,
            "files": files,
        }
        (tmp / MANIFEST).write_text(dumps_json(full_manifest), encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_inputs(manifest: dict, tensors: dict, texts: dict) -> None:
    for key in ("format_version", "cscompile_version", "files"):
        if key in manifest:
            raise BuildError(f"manifest key {key!r} is written by write_bundle, not the caller")
    for relpath, tensor_dict in tensors.items():
        _check_relpath(relpath, BuildError)
        if not relpath.endswith(".safetensors"):
            raise BuildError(f"tensor file {relpath!r} must end in .safetensors")
        for name, t in tensor_dict.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise BuildError(f"{relpath}: entry {name!r} is not a str -> torch.Tensor pair")
    for relpath in texts:
        _check_relpath(relpath, BuildError)
        if relpath.lower().endswith(PICKLE_SUFFIXES + (".safetensors",)):
            raise BuildError(f"text file {relpath!r} has a binary/pickle suffix")
    reserved = {MANIFEST, REPORT} & (set(tensors) | set(texts))
    if reserved or set(tensors) & set(texts):
        raise BuildError(f"bundle paths clash: {sorted(reserved or set(tensors) & set(texts))}")


def _prepare(root: Path, relpath: str) -> Path:
    target = root / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _contiguous_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses views and tensors sharing storage: give each its own buffer."""
    out, seen = {}, set()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place; an old one is removed only once the new is in."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()  # we only wanted a unique name
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- load


@dataclass
class Bundle:
    """A verified bundle on disk; tensors and texts are read on demand."""

    path: Path
    manifest: dict
    report: dict = field(default_factory=dict)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    def tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self._listed(name)), device=device)

    def text(self, relpath: str) -> str:
        return self._listed(relpath).read_text(encoding="utf-8")

    def has(self, relpath: str) -> bool:
        return relpath in self.files

    def _listed(self, relpath: str) -> Path:
        if relpath not in self.files:
            raise BundleError(f"bundle {self.path} has no file {relpath!r}")
        return self.path / relpath


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle, refusing anything that is not exactly what write_bundle produced.

    verify=False skips re-hashing file contents (slow for big bundles); the version,
    layout, unlisted-file and pickle checks always run.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no bundle at {path}: {MANIFEST} missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"bundle {path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: {MANIFEST} is not a JSON object")

    _check_versions(path, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: {MANIFEST} has no 'files' table")
    for relpath, entry in files.items():
        _check_relpath(relpath, BundleError)
        if relpath == MANIFEST or not isinstance(entry, dict) or "sha256" not in entry:
            raise BundleError(f"bundle {path}: bad 'files' entry for {relpath!r}")

    present = {
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()
    }
    for relpath in sorted(present):
        full = path / relpath
        if full.is_symlink():
            raise BundleError(f"bundle file {relpath} is a symlink: refusing to load")
        if _looks_like_pickle(full):
            raise BundleError(f"bundle file {relpath} looks like pickle: refusing to load")
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise BundleError(
            f"bundle {path} holds files not in its manifest ({', '.join(unlisted)}): "
            "possible tampering, refusing to load"
        )
    for relpath, entry in sorted(files.items()):
        full = path / relpath
        if relpath not in present:
            raise BundleError(f"bundle file {relpath} is missing from {path}")
        size_changed = full.stat().st_size != entry.get("bytes", full.stat().st_size)
        if size_changed or (verify and sha256_file(full) != entry["sha256"]):
            raise BundleError(
                f"bundle file {relpath} was modified (sha256 mismatch): refusing to load"
            )

    report = {}
    if REPORT in files:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
    return Bundle(path=path, manifest=manifest, report=report)


def _check_versions(path: Path, manifest: dict) -> None:
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format_version {found!r}; this cscompile "
            f"{cscompile.__version__} reads format_version {FORMAT_VERSION}"
        )
    built_with = manifest.get("cscompile_version")
    if _version_major_minor(built_with) != _version_major_minor(cscompile.__version__):
        raise BundleError(
            f"bundle {path} was built by cscompile {built_with}, this is "
            f"{cscompile.__version__} (version mismatch): rebuild the bundle"
        )
