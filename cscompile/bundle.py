"""The bundle: a compiled model on disk, and the only thing the runtime trusts.

A bundle is a directory of plain data, never pickle:

    manifest.json        format_version, cscompile_version, build facts, and a `files`
                         table {relative_path: {"sha256", "bytes"}} covering every other file
    report.json          what the build measured
    *.safetensors        tensors (weights, router, per-class index sets, ...)
    kernels/*.py         generated kernel source: text the runtime hash-checks before use

Writing is atomic: everything goes into a temporary sibling directory, manifest.json last,
then one rename puts it in place, so a reader never sees a half-written bundle. Writers of one
output path are serialised by a sibling lock file (`.<name>.lock`, flock): a second concurrent
build fails with one clear line instead of racing. `--force` renames the old bundle aside, the
new one in, then deletes the old; temp and set-aside directories left by a killed writer are
cleaned up (or the set-aside bundle restored) by the next writer of that path.

manifest.json seals itself: it must be exactly the canonical JSON write_bundle produces, with
`manifest_sha256` the sha256 of that text without the key, so any byte changed in it is
refused just like a byte changed in a listed file. Loading re-hashes every listed file and
refuses anything unlisted, modified, not a regular file, a symlink, or pickle-like; nothing
in a bundle is ever unpickled or imported by the loader.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cscompile
from cscompile.errors import BuildError, BundleError, CsError, OutputWriteError, UserInputError
from cscompile.safetensors_io import StreamedTensors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
SEAL_KEY = "manifest_sha256"  # sha256 of the canonical manifest text without this key
MAX_PATH_CHARS = 1024  # a listed bundle path longer than this is refused, not stat()ed

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
    if len(relpath) > MAX_PATH_CHARS or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in relpath):
        raise error(f"bundle path {relpath[:80]!r} is too long or holds control characters")
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


# ---------------------------------------------------------------------------- manifest seal


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical manifest text without its seal key."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return hashlib.sha256(dumps_json(body).encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its `manifest_sha256` seal (what write_bundle writes)."""
    return {**{k: v for k, v in manifest.items() if k != SEAL_KEY},
            SEAL_KEY: manifest_digest(manifest)}


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
    The same inputs always give byte-identical files. A failure to write (disk full,
    read-only, ...) raises OutputWriteError and leaves the previous state of `out_dir`.
    """
    texts = texts or {}
    _check_inputs(tensors, texts)

    def fill(tmp: Path) -> list[str]:
        for relpath in sorted(tensors):
            target = _prepare(tmp, relpath)
            if isinstance(tensors[relpath], StreamedTensors):
                tensors[relpath].write(target)
            else:
                save_file(_contiguous_unshared(tensors[relpath]), str(target), metadata=None)
        for relpath in sorted(texts):
            _prepare(tmp, relpath).write_text(texts[relpath], encoding="utf-8", newline="\n")
        (tmp / REPORT).write_text(dumps_json(report), encoding="utf-8")
        return [*tensors, *texts, REPORT]

    return write_sealed_dir(out_dir, manifest, fill, force)


def write_sealed_dir(out_dir: str | os.PathLike, manifest: dict,
                     fill: Callable[[Path], Iterable[str]], force: bool = False,
                     what: str = "bundle") -> Path:
    """The atomic, locked, sealed directory write behind write_bundle (also ONNX exports).

    `fill(tmp)` writes the files into the temporary directory and returns their relative
    paths; each is hashed into the sealed manifest.json, written last; then one rename puts
    the directory in place (see the module docstring). load_bundle reads the result back.
    """
    out_dir = Path(out_dir)
    _check_output(out_dir, force)
    for key in ("format_version", "cscompile_version", "files", SEAL_KEY):
        if key in manifest:
            raise BuildError(f"manifest key {key!r} is written by write_bundle, not the caller")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create {out_dir.parent}: {_reason(e)}") from None
    with _output_lock(out_dir):
        _clean_leftovers(out_dir)
        _check_output(out_dir, force)  # again: another writer may have finished meanwhile
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        except OSError as e:
            raise OutputWriteError(f"cannot write {what} {out_dir}: {_reason(e)}") from None
        try:
            files: dict[str, dict] = {}
            for relpath in sorted(set(fill(tmp))):
                target = tmp / _check_relpath(relpath, BuildError)
                files[relpath] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
            full_manifest = seal_manifest({
                **manifest,
                "format_version": FORMAT_VERSION,
                "cscompile_version": cscompile.__version__,
                "files": files,
            })
            (tmp / MANIFEST).write_text(dumps_json(full_manifest), encoding="utf-8")
            _fsync_tree(tmp)
            _move_into_place(tmp, out_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, CsError):
                raise OutputWriteError(f"cannot write {what} {out_dir}: {_reason(e)}") from e
            if isinstance(e, SafetensorError):  # safetensors reports its I/O errors this way
                raise OutputWriteError(f"cannot write {what} {out_dir}: "
                                       f"{_one_line(str(e))}") from e
            raise
    return out_dir


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.is_symlink() and not out_dir.exists():
        raise UserInputError(f"output path {out_dir} is a dangling symlink")
    if out_dir.exists() and not force:
        raise UserInputError(f"output directory {out_dir} exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"output path {out_dir} exists and is not a directory")


def _reason(e: OSError) -> str:
    text = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        text = f"{text} (disk full)"
    return _one_line(text)


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return (lines[0] if lines else "")[:300]


def _lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextmanager
def _output_lock(out_dir: Path):
    """Hold an exclusive flock on `.<name>.lock` beside `out_dir`; fail at once if taken.

    The lock file is removed on release. A writer that opened the file before it was removed
    notices (its inode is no longer the one at the path) and retries on the new file.
    The kernel drops the lock when a writer dies, even by SIGKILL.
    """
    lock_path = _lock_path(out_dir)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputWriteError(f"cannot create the lock file {lock_path}: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserInputError(
                    f"another cscompile is writing {out_dir} right now (lock {lock_path} is "
                    f"held); wait for it to finish or choose another output directory") from None
            raise OutputWriteError(f"cannot lock {lock_path}: {_reason(e)}") from None
        mine = os.fstat(fd)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the new one
    try:
        yield lock_path
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    """`.<name>.tmp-XXXXXXXX` / `.<name>.old-XXXXXXXX` siblings (tempfile's 8-char names)."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.{kind}-[a-z0-9_]{{8}}")
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return []
    found = [p for p in entries if pattern.fullmatch(p.name) and not p.is_symlink() and p.is_dir()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _clean_leftovers(out_dir: Path) -> None:
    """Under the lock: what a killed writer of `out_dir` left behind.

    Temp directories are incomplete: removed. A set-aside old bundle exists without `out_dir`
    only if the writer died between its two renames: it is the complete previous bundle,
    so it is put back; otherwise it is removed.
    """
    for tmp in _leftovers(out_dir, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = _leftovers(out_dir, "old")
    if olds and not out_dir.exists() and not out_dir.is_symlink() and (olds[-1] / MANIFEST).is_file():
        try:
            os.rename(olds.pop(), out_dir)
        except OSError as e:
            raise OutputWriteError(f"cannot restore the previous bundle into {out_dir}: "
                                   f"{_reason(e)}") from None
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory of the finished temp bundle before it is renamed in."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_inputs(tensors: dict, texts: dict) -> None:
    for relpath, tensor_dict in tensors.items():
        _check_relpath(relpath, BuildError)
        if not relpath.endswith(".safetensors"):
            raise BuildError(f"tensor file {relpath!r} must end in .safetensors")
        if isinstance(tensor_dict, StreamedTensors):
            continue  # checked tensor by tensor as it is written
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
    """Rename the finished bundle into place; an old one is removed only once the new is in.

    With an old bundle: rename it aside to `.<name>.old-*`, rename the new one in, delete the
    old. A writer killed between the two renames leaves the complete old bundle aside (and
    the complete new one in its temp directory), never a partial bundle at `out_dir`; the next
    writer puts the old one back before doing anything else (_clean_leftovers).
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()  # we only wanted a unique name
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous bundle back
        raise
    _fsync_dir(out_dir.parent)
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
        path = self._listed(name)
        try:
            return load_file(str(path), device=device)
        except BundleError:
            raise
        except BaseException as e:  # SafetensorError, OSError, and the Rust PanicException
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            raise BundleError(f"bundle file {name} is not a readable safetensors file "
                              f"({_one_line(str(e)) or type(e).__name__})") from None

    def text(self, relpath: str) -> str:
        path = self._listed(relpath)
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"bundle file {relpath} is not UTF-8 text") from None
        except OSError as e:
            raise BundleError(f"cannot read bundle file {relpath}: {_reason(e)}") from None

    def has(self, relpath: str) -> bool:
        return relpath in self.files

    def _listed(self, relpath: str) -> Path:
        if not isinstance(relpath, str) or relpath not in self.files:
            raise BundleError(f"bundle {self.path} has no file {relpath!r}")
        return self.path / relpath


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle, refusing anything that is not exactly what write_bundle produced.

    verify=False skips re-hashing file contents (slow for big bundles); the version,
    seal, layout, unlisted-file and pickle checks always run. Every refusal is a
    BundleError; the loader never unpickles, imports or writes anything.
    """
    path = Path(path)
    try:
        return _load_bundle(path, verify)
    except (BundleError, KeyboardInterrupt):
        raise
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {_reason(e)}") from None
    except RecursionError:
        raise BundleError(f"bundle {path}: manifest nests too deeply") from None


def _load_bundle(path: Path, verify: bool) -> Bundle:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise BundleError(f"no bundle at {path}: {MANIFEST} missing{_aside_hint(path)}")
    raw = manifest_path.read_bytes()
    manifest = _parse_json(raw, f"bundle {path}: {MANIFEST}")
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: {MANIFEST} is not a JSON object")

    _check_versions(path, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: {MANIFEST} has no 'files' table")
    for relpath, entry in files.items():
        _check_relpath(relpath, BundleError)
        if (relpath == MANIFEST or not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)):
            raise BundleError(f"bundle {path}: bad 'files' entry for {relpath!r}")

    present = set()
    for p in sorted(path.rglob("*")):
        relpath = p.relative_to(path).as_posix()
        mode = os.lstat(p).st_mode
        if stat.S_ISDIR(mode):
            continue
        if stat.S_ISLNK(mode):
            raise BundleError(f"bundle file {relpath} is a symlink: refusing to load")
        if not stat.S_ISREG(mode):
            raise BundleError(f"bundle file {relpath} is not a regular file: refusing to load")
        if _looks_like_pickle(p):
            raise BundleError(f"bundle file {relpath} looks like pickle: refusing to load")
        present.add(relpath)
    _check_seal(path, raw, manifest)
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f", ... ({len(unlisted)} in all)" if len(unlisted) > 5 else "")
        raise BundleError(
            f"bundle {path} holds files not in its manifest ({shown}): "
            "possible tampering, refusing to load"
        )
    for relpath, entry in sorted(files.items()):
        full = path / relpath
        if relpath not in present:
            raise BundleError(f"bundle file {relpath} is missing from {path}")
        size = full.stat().st_size
        size_changed = size != entry.get("bytes", size)
        if size_changed or (verify and sha256_file(full) != entry["sha256"]):
            raise BundleError(
                f"bundle file {relpath} was modified (sha256 mismatch): refusing to load"
            )

    report = {}
    if REPORT in files:
        report = _parse_json((path / REPORT).read_bytes(), f"bundle {path}: {REPORT}")
        if not isinstance(report, dict):
            raise BundleError(f"bundle {path}: {REPORT} is not a JSON object")
    return Bundle(path=path, manifest=manifest, report=report)


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # 5000-digit integers, 100000 nested brackets
        raise BundleError(f"{what} is not valid JSON ({type(e).__name__}: "
                          f"{_one_line(str(e))[:100]})") from None


def _check_seal(path: Path, raw: bytes, manifest: dict) -> None:
    """The manifest must be the canonical text write_bundle wrote, with a matching seal."""
    seal = manifest.get(SEAL_KEY)
    if not isinstance(seal, str):
        raise BundleError(f"bundle {path}: {MANIFEST} has no {SEAL_KEY} seal (modified, or "
                          f"written by an older cscompile): refusing to load")
    try:
        canonical = dumps_json(manifest).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        canonical = None
    if canonical != raw or manifest_digest(manifest) != seal:
        raise BundleError(f"bundle {path}: {MANIFEST} was modified (its {SEAL_KEY} seal or "
                          f"canonical form does not match): refusing to load")


def _aside_hint(path: Path) -> str:
    """Name a complete previous bundle that an interrupted --force build set aside."""
    olds = _leftovers(path, "old") if path.name else []
    olds = [p for p in olds if (p / MANIFEST).is_file()]
    if not olds:
        return ""
    return (f" (an interrupted --force build left the previous bundle at {olds[-1]}; the next "
            f"build to {path} restores it)")


def _check_versions(path: Path, manifest: dict) -> None:
    found = manifest.get("format_version")
    if type(found) is not int or found != FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format_version {repr(found)[:40]}; this cscompile "
            f"{cscompile.__version__} reads format_version {FORMAT_VERSION}"
        )
    built_with = manifest.get("cscompile_version")
    if (not isinstance(built_with, str)
            or _version_major_minor(built_with) != _version_major_minor(cscompile.__version__)):
        raise BundleError(
            f"bundle {path} was built by cscompile {str(built_with)[:40]}, this is "
            f"{cscompile.__version__} (version mismatch): rebuild the bundle"
        )
