"""Tamper and crash safety of stories260K bundles.

* any single flipped byte in any bundle file (manifest.json included) is refused on load;
* a writer killed with SIGKILL at any step (and `cscompile build` killed at random points)
  leaves the old bundle or none, never a partial one, and the next build succeeds and removes
  the leftovers;
* two builds to the same -o at once: one complete bundle and one clear error;
* a full disk: one clear line, no partial output, the old bundle intact;
* no code from data: a modified kernel, an added .py or a pickle is refused before anything
  from the bundle is imported or unpickled (payloads that would write a marker never run).

The stories260K bundle is built once (tests/fuzz_targets.stories_bundle, shared with the fuzz
tests in the same session) and copied for each case.
"""
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_targets as F  # noqa: E402

import cscompile.bundle as bundle_mod  # noqa: E402
from cscompile.bundle import (MANIFEST, REPORT, SEAL_KEY, dumps_json, load_bundle,  # noqa: E402
                              seal_manifest, sha256_file, write_bundle)
from cscompile.errors import BundleError, OutputWriteError, UserInputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(stories_dir) -> Path:
    return F.stories_bundle()


@pytest.fixture(scope="module")
def calib6(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib6.jsonl"
    path.write_text("".join(F.CALIB.read_text().splitlines(keepends=True)[:6]))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _inputs_of(bundle: Path, **extra):
    """write_bundle arguments that reproduce `bundle` (plus manifest fields `extra`)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = manifest.pop("files")
    for key in ("format_version", "cscompile_version", SEAL_KEY):
        manifest.pop(key)
    tensors = {f: load_file(str(bundle / f)) for f in files if f.endswith(".safetensors")}
    texts = {f: (bundle / f).read_text() for f in files
             if not f.endswith(".safetensors") and f != REPORT}
    report = json.loads((bundle / REPORT).read_text())
    return {**manifest, **extra}, tensors, report, texts


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


# ---------------------------------------------------------------------------- flipped bytes


def test_any_flipped_byte_is_refused(built, tmp_path):
    b = _copy(built, tmp_path / "b")
    load_bundle(b)  # the copy itself is fine
    files = sorted(p for p in b.rglob("*") if p.is_file())
    assert MANIFEST in {p.name for p in files} and len(files) >= 8
    checked = 0
    for f in files:
        original = f.read_bytes()
        for pos in sorted({0, len(original) // 2, len(original) - 1}):
            for mask in (0x01, 0x80):
                data = bytearray(original)
                data[pos] ^= mask
                f.write_bytes(bytes(data))
                with pytest.raises(BundleError) as info:
                    load_bundle(b)
                assert "\n" not in str(info.value)
                checked += 1
        f.write_bytes(original)
    assert checked >= 6 * len(files)
    load_bundle(b)  # restored: loads again


def test_flipped_manifest_value_refused_even_without_hashing(built, tmp_path):
    """A flipped digit keeps manifest.json valid JSON; the seal still refuses it."""
    b = _copy(built, tmp_path / "b")
    data = bytearray((b / MANIFEST).read_bytes())
    pos = data.index(b'"density": 0.') + len(b'"density": 0.')
    data[pos] = ord("1") if data[pos] != ord("1") else ord("2")
    (b / MANIFEST).write_bytes(bytes(data))
    json.loads(data)  # still valid JSON
    with pytest.raises(BundleError, match="manifest.json was modified"):
        load_bundle(b, verify=False)
    # reformatting alone (same content, other whitespace) is refused as well
    manifest = json.loads((built / MANIFEST).read_text())
    (b / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match="canonical form"):
        load_bundle(b)


def test_runtime_refuses_flipped_weights(built, tmp_path):
    import cscompile.runtime as runtime

    b = _copy(built, tmp_path / "b")
    w = b / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 3] ^= 0x04
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors was modified"):
        runtime.load(b, backend="torch")


# ---------------------------------------------------------------------------- SIGKILL


class _Killed(Exception):
    pass


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill_point(point: str):
    """In a forked child: SIGKILL this process at `point` of write_bundle."""
    kind, _, nth = point.partition("#")
    nth = int(nth or 1)
    counter = {"n": 0}

    def after_nth(real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            counter["n"] += 1
            if counter["n"] == nth:
                _kill_self()
            return result
        return wrapper

    if kind == "save_file":
        bundle_mod.save_file = after_nth(bundle_mod.save_file)
    elif kind == "text":
        real_write_text = Path.write_text
        Path.write_text = after_nth(real_write_text)
    elif kind == "before_rename":
        bundle_mod._fsync_tree = lambda root: _kill_self()
    elif kind == "rename":
        os.rename = after_nth(os.rename)
    elif kind == "rmtree_old":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if ".old-" in str(path):  # delete part of the old bundle, then die
                victims = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for p in victims[: len(victims) // 2]:
                    p.unlink()
                _kill_self()
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
    else:  # pragma: no cover
        raise ValueError(point)


def _write_in_killed_child(out: Path, inputs, point: str) -> int:
    """fork; the child writes the bundle and is SIGKILLed at `point`; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            _install_kill_point(point)
            write_bundle(out, *inputs, force=True)
        finally:
            os._exit(3)  # reached only if the kill point was never hit
    _, status = os.waitpid(pid, 0)
    return status


KILL_POINTS = ["save_file#1", "save_file#2", "text#3", "before_rename", "rename#1", "rename#2",
               "rmtree_old"]


@pytest.mark.parametrize("with_old", [True, False], ids=["replace", "fresh"])
def test_sigkill_at_every_write_step(built, tmp_path, with_old):
    old_inputs = _inputs_of(built, generation="old")
    new_inputs = _inputs_of(built, generation="new")
    for point in KILL_POINTS:
        if not with_old and point in ("rename#2", "rmtree_old"):  # one rename, nothing to delete
            continue
        root = tmp_path / point.replace("#", "_")
        root.mkdir()
        out = root / "bundle"
        if with_old:
            write_bundle(out, *old_inputs)
        status = _write_in_killed_child(out, new_inputs, point)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)

        if out.exists():  # whatever is there is complete: the old bundle or the new one
            generation = load_bundle(out).manifest["generation"]
            assert generation in (("old", "new") if with_old else ("new",)), point
        else:  # none at all is allowed only where no bundle was complete yet ...
            aside = [p for p in root.iterdir() if ".old-" in p.name]
            assert not with_old or point == "rename#1", point
            if with_old:  # ... or the old one is set aside, complete, and named in the error
                assert len(aside) == 1 and load_bundle(aside[0]).manifest["generation"] == "old"
                with pytest.raises(BundleError, match="interrupted --force build left the "
                                                      "previous bundle"):
                    load_bundle(out)
        # the next build succeeds and leaves nothing else behind
        write_bundle(out, *new_inputs, force=True)
        assert load_bundle(out).manifest["generation"] == "new"
        assert _siblings(out) == ["bundle"], point


def test_next_plain_build_restores_a_set_aside_bundle(built, tmp_path):
    out = tmp_path / "bundle"
    write_bundle(out, *_inputs_of(built, generation="old"))
    status = _write_in_killed_child(out, _inputs_of(built, generation="new"), "rename#1")
    assert os.WIFSIGNALED(status) and not out.exists()
    with pytest.raises(UserInputError, match="exists; pass --force"):  # restored, so it exists
        write_bundle(out, *_inputs_of(built, generation="other"))
    assert load_bundle(out).manifest["generation"] == "old"
    assert _siblings(out) == ["bundle"]


def test_stale_leftovers_are_cleaned_and_foreign_ones_kept(built, tmp_path):
    out = tmp_path / "bundle"
    write_bundle(out, *_inputs_of(built, generation="old"))
    for name in (".bundle.tmp-abcd1234", ".bundle.old-zz_y9x8w"):
        (tmp_path / name / "kernels").mkdir(parents=True)
        (tmp_path / name / "kernels" / "half.py").write_text("partial")
    (tmp_path / ".bundle.lock").write_text("")  # left by a killed writer: not locked
    (tmp_path / ".other.tmp-abcd1234").mkdir()  # another output's temp dir: not ours
    (tmp_path / ".bundle.tmp-notmine").mkdir()  # not a tempfile name: left alone
    write_bundle(out, *_inputs_of(built, generation="new"), force=True)
    assert load_bundle(out).manifest["generation"] == "new"
    assert _siblings(out) == [".bundle.tmp-notmine", ".other.tmp-abcd1234", "bundle"]


def _cli(*args, cwd, **kwargs):
    env = dict(os.environ, CSCOMPILE_DEBUG="", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "cscompile.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_cli_build_at_random_points(built, stories_dir, calib6, tmp_path):
    """`cscompile build --force` SIGKILLed after random delays, and the moment it starts writing."""
    out = _copy(built, tmp_path / "bundle")
    before = (out / MANIFEST).read_bytes()
    rng = random.Random(11)
    args = ("build", str(stories_dir), "--calib", str(calib6), "-o", str(out), "--force",
            "--classes", "2", "--seed", "1", "--static-only")
    for mode in ("random", "random", "writing"):
        proc = _cli(*args, cwd=tmp_path)
        deadline = time.monotonic() + (rng.uniform(0.2, 4.0) if mode == "random" else 400)
        while time.monotonic() < deadline and proc.poll() is None:
            if mode == "writing" and any(".tmp-" in p.name for p in tmp_path.iterdir()):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, (mode, proc.returncode)
        # a complete bundle is in place: the old one untouched (or, had the kill come after
        # the swap, the complete new one)
        assert out.is_dir(), mode
        b = load_bundle(out)
        assert (out / MANIFEST).read_bytes() == before or b.manifest["build_args"]["seed"] == 1
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the last kill left its temp dir
    # the next build succeeds and removes what the killed ones left
    from cscompile.build import run_build

    run_build(str(stories_dir), calib6, out, classes=2, seed=1, force=True, progress=False,
              pertoken=False)
    assert load_bundle(out).manifest["build_args"]["seed"] == 1
    assert _siblings(out) == ["bundle"]


# ---------------------------------------------------------------------------- concurrency


def test_second_writer_gets_a_clear_error_while_locked(built, tmp_path):
    out = tmp_path / "bundle"
    inputs = _inputs_of(built, generation="new")
    with bundle_mod._output_lock(out) as lock:
        assert lock.exists()
        with pytest.raises(UserInputError, match="another cscompile is writing .* right now") as e:
            write_bundle(out, *inputs)
        assert "\n" not in str(e.value)
        assert not out.exists()
    assert not lock.exists()  # released and removed
    write_bundle(out, *inputs)
    assert _siblings(out) == ["bundle"]


def _racing_writer(out: Path, inputs, force: bool, go_r: int, result_w: int) -> None:
    """Forked child: wait for the start signal, write slowly, report 'ok' or the error line."""
    try:
        real = bundle_mod.save_file

        def slow_save(*args, **kwargs):  # keep each writer inside write_bundle for a while
            time.sleep(0.3)
            return real(*args, **kwargs)

        bundle_mod.save_file = slow_save
        os.read(go_r, 1)
        try:
            write_bundle(out, *inputs, force=force)
            msg = "ok"
        except UserInputError as e:
            msg = f"error: {e}"
        os.write(result_w, msg.encode()[:4000])
    finally:
        os._exit(0)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_two_writers_at_once_one_bundle_one_clear_error(built, tmp_path, force):
    out = tmp_path / "bundle"
    inputs = [_inputs_of(built, generation=g) for g in ("a", "b")]
    if force:
        write_bundle(out, *_inputs_of(built, generation="old"))
    go_r, go_w = os.pipe()
    children = []
    for i in range(2):
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _racing_writer(out, inputs[i], force, go_r, result_w)
        os.close(result_w)
        children.append((pid, result_r))
    os.write(go_w, b"xx")  # start both at once
    results = []
    for pid, result_r in children:
        os.waitpid(pid, 0)
        with os.fdopen(result_r) as f:
            results.append(f.read())
    assert sorted(r == "ok" for r in results) == [False, True], results
    error = next(r for r in results if r != "ok")
    assert "\n" not in error and "another cscompile is writing" in error, error
    winner = "ab"[results.index("ok")]
    assert load_bundle(out).manifest["generation"] == winner
    assert _siblings(out) == ["bundle"]


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (the stories bundle needs ~1.4 MB), or None where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _simulated_enospc(monkeypatch):
    real = bundle_mod.save_file
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(bundle_mod, "save_file", save)


def test_full_disk_gives_one_line_and_no_partial_output(built, small_disk, tmp_path, monkeypatch):
    root = small_disk or tmp_path / "disk"
    root.mkdir(exist_ok=True)
    if small_disk is None:
        _simulated_enospc(monkeypatch)
    out = root / "bundle"
    with pytest.raises(OutputWriteError) as info:
        write_bundle(out, *_inputs_of(built, generation="new"))
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and str(out) in msg
    assert isinstance(info.value, OSError) and isinstance(info.value, UserInputError)
    assert list(root.iterdir()) == []  # no bundle, no temp dir, no lock file


def test_full_disk_keeps_the_old_bundle(built, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    write_bundle(out, *_inputs_of(built, generation="old"))
    _simulated_enospc(monkeypatch)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        write_bundle(out, *_inputs_of(built, generation="new"), force=True)
    assert load_bundle(out).manifest["generation"] == "old"
    assert _siblings(out) == ["bundle"]


def test_full_disk_cli_build(stories_dir, calib6, small_disk, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cscompile.cli import main

    root = small_disk or tmp_path / "disk"
    root.mkdir(exist_ok=True)
    if small_disk is None:
        _simulated_enospc(monkeypatch)
    r = CliRunner().invoke(main, ["build", str(stories_dir), "--calib", str(calib6), "-o",
                                  str(root / "bundle"), "--classes", "2", "--static-only"],
                               catch_exceptions=False)
    assert r.exit_code == 2, r.stderr[-1000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write bundle") and "No space left" in lines[-1]
    assert not any(line.startswith(("Traceback", "internal error")) for line in lines)
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------------------- no code from data

MARKER_CODE = "open({marker!r}, 'w').write('ran')\n"


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=self.marker),))


def _reseal(b: Path, manifest: dict) -> None:
    (b / MANIFEST).write_text(dumps_json(seal_manifest(manifest)))


def _relist(b: Path, relpath: str) -> None:
    """What an attacker who knows the format does: list the file with its true hash, reseal."""
    m = json.loads((b / MANIFEST).read_text())
    m["files"][relpath] = {"sha256": sha256_file(b / relpath), "bytes": (b / relpath).stat().st_size}
    _reseal(b, m)


def _kernel_modules():
    return {m for m in sys.modules if m.startswith("cscompile_class_")}


@pytest.mark.parametrize("attacker", ["edits", "edits_and_reseals"])
def test_modified_kernel_never_runs(built, tmp_path, attacker):
    import cscompile.runtime as runtime
    from cscompile.codegen.generate import load_class_module

    marker = tmp_path / "kernel-ran"
    modules_before = _kernel_modules()
    b = _copy(built, tmp_path / "b")
    kernel = b / "kernels" / "class_0.py"
    kernel.write_text(MARKER_CODE.format(marker=str(marker)) + kernel.read_text())
    if attacker == "edits":
        with pytest.raises(BundleError, match="kernels/class_0.py was modified"):
            load_bundle(b)
        with pytest.raises(BundleError, match="kernels/class_0.py was modified"):
            runtime.load(b, backend="torch")
    else:
        _relist(b, "kernels/class_0.py")
        bundle = load_bundle(b)  # hashes and seal are consistent now: the bytes look genuine
        entry = bundle.manifest["classes"][0]["kernel"]
        entry_sha = bundle.manifest["files"]["kernels/class_0.py"]["sha256"]
        with pytest.raises(BundleError, match="differs from the code generated from its spec"):
            load_class_module(bundle.text(entry["file"]), entry_sha, entry["spec"])
        runtime.load(b, backend="torch")  # the runtime never imports kernel files itself
    assert not marker.exists()
    assert _kernel_modules() == modules_before  # nothing new was imported


@pytest.mark.parametrize("where", ["kernels/evil.py", "evil.py", "tokenizer/__init__.py"])
def test_added_python_file_is_refused(built, tmp_path, where):
    import cscompile.runtime as runtime

    marker = tmp_path / "py-ran"
    b = _copy(built, tmp_path / "b")
    (b / where).write_text(MARKER_CODE.format(marker=str(marker)))
    with pytest.raises(BundleError, match=f"not in its manifest \\({where}\\)"):
        load_bundle(b)
    with pytest.raises(BundleError, match="not in its manifest"):
        runtime.load(b, backend="torch")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["extra_pkl", "as_safetensors_listed", "as_json_listed",
                                  "torch_save_listed"])
def test_pickle_inside_is_refused_and_never_unpickled(built, tmp_path, case):
    import torch

    import cscompile.runtime as runtime

    marker = tmp_path / "pickle-ran"
    b = _copy(built, tmp_path / "b")
    payload = pickle.dumps(_Evil(marker))
    if case == "extra_pkl":
        (b / "state.pkl").write_bytes(payload)
        expected = "state.pkl looks like pickle"
    elif case == "as_safetensors_listed":
        (b / "router.safetensors").write_bytes(payload)
        _relist(b, "router.safetensors")
        expected = "router.safetensors looks like pickle"
    elif case == "as_json_listed":
        (b / "report.json").write_bytes(payload)
        _relist(b, "report.json")
        expected = "report.json looks like pickle"
    else:
        torch.save({"x": _Evil(marker)}, b / "classes.safetensors")  # a zip holding a pickle
        _relist(b, "classes.safetensors")
        expected = "classes.safetensors looks like pickle"
    with pytest.raises(BundleError, match=expected):
        load_bundle(b)
    with pytest.raises(BundleError, match="looks like pickle"):
        runtime.load(b, backend="torch")
    assert not marker.exists()


def test_symlink_out_of_the_bundle_is_refused(built, tmp_path):
    b = _copy(built, tmp_path / "b")
    outside = tmp_path / "outside.json"
    shutil.copy(b / "report.json", outside)
    (b / "report.json").unlink()
    (b / "report.json").symlink_to(outside)
    with pytest.raises(BundleError, match="report.json is a symlink"):
        load_bundle(b)
    shutil.rmtree(b / "tokenizer")
    (b / "tokenizer").symlink_to(tmp_path)  # a directory symlink pointing out
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(b)
