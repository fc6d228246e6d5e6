"""Bundle I/O: round trip, determinism, atomic writes, and refusal of tampered bundles."""
import json
import pickle

import numpy as np
import pytest
import torch

import cscompile
import cscompile.bundle as bundle_mod
from cscompile.bundle import (
    FORMAT_VERSION,
    dumps_json,
    hash_tensors,
    load_bundle,
    sha256_file,
    to_jsonable,
    write_bundle,
)
from cscompile.errors import BuildError, BundleError, UserInputError


def _inputs():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=g)
    tensors = {
        "weights.safetensors": {
            "layers.0.w": weight.t(),  # non-contiguous view: must be made contiguous
            "layers.0.b": torch.arange(5, dtype=torch.bfloat16),
            "scale": torch.tensor(2.5),
        },
        "classes/c0.safetensors": {"heads": torch.tensor([0, 3, 5], dtype=torch.int32)},
    }
    manifest = {"model": "tiny", "classes": ["math", "code"], "budget": np.float32(0.5)}
    report = {"ppl": np.float64(12.25), "kept": np.array([1, 2, 3]), "n": np.int64(7)}
    texts = {"kernels/class_0.py": "import triton\n# kernel ü\n"}
    return manifest, tensors, report, texts


def _write(path, **kw):
    manifest, tensors, report, texts = _inputs()
    return write_bundle(path, manifest, tensors, report, texts, **kw)


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path):
    manifest, tensors, report, texts = _inputs()
    out = write_bundle(tmp_path / "b", manifest, tensors, report, texts)
    b = load_bundle(out)

    assert b.manifest["format_version"] == FORMAT_VERSION
    assert b.manifest["cscompile_version"] == cscompile.__version__
    assert b.manifest["model"] == "tiny" and b.manifest["budget"] == 0.5
    assert sorted(b.manifest["files"]) == [
        "classes/c0.safetensors", "kernels/class_0.py", "report.json", "weights.safetensors"
    ]
    for rel, entry in b.manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / rel)
        assert entry["bytes"] == (out / rel).stat().st_size
    assert b.report == {"ppl": 12.25, "kept": [1, 2, 3], "n": 7}
    for rel, expected in tensors.items():
        got = b.tensors(rel)
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    assert b.text("kernels/class_0.py") == texts["kernels/class_0.py"]
    with pytest.raises(BundleError, match="no file"):
        b.tensors("nope.safetensors")
    # manifest is written last, so no file in the bundle is newer than it
    assert (out / "manifest.json").stat().st_mtime_ns >= max(
        (out / r).stat().st_mtime_ns for r in b.manifest["files"]
    )


def test_same_inputs_give_identical_bytes(tmp_path):
    a = _all_bytes(_write(tmp_path / "a"))
    b = _all_bytes(_write(tmp_path / "b"))
    assert a.keys() == b.keys() and len(a) == 5
    assert a == b
    # dict insertion order does not matter either
    manifest, tensors, report, texts = _inputs()
    tensors = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(tensors.items()))}
    c = _all_bytes(write_bundle(tmp_path / "c", dict(reversed(list(manifest.items()))), tensors, report, texts))
    assert c == a


def test_refuses_existing_dir_without_force(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(UserInputError, match="exists; pass --force"):
        _write(tmp_path / "b")
    out = _write(tmp_path / "b", force=True)
    assert load_bundle(out).manifest["model"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # old copy and temp removed


def test_force_replaces_old_bundle(tmp_path):
    manifest, tensors, report, texts = _inputs()
    write_bundle(tmp_path / "b", manifest, tensors, report, texts)
    write_bundle(tmp_path / "b", {"model": "second"}, {"w.safetensors": {"x": torch.ones(2)}}, {}, force=True)
    b = load_bundle(tmp_path / "b")
    assert b.manifest["model"] == "second" and sorted(b.files) == ["report.json", "w.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _failing_save(calls):
    real = bundle_mod.save_file

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # fail after the first file is already on disk
            raise OSError("disk full (simulated)")
        return real(tensors, filename, metadata=metadata)

    return save


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bundle_mod, "save_file", _failing_save(calls))
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "b")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a temporary directory


def test_failed_force_write_keeps_old_bundle(tmp_path, monkeypatch):
    _write(tmp_path / "b")
    before = _all_bytes(tmp_path / "b")
    monkeypatch.setattr(bundle_mod, "save_file", _failing_save([]))
    with pytest.raises(OSError):
        _write(tmp_path / "b", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert _all_bytes(tmp_path / "b") == before
    load_bundle(tmp_path / "b")


def test_failed_rename_restores_old_bundle(tmp_path, monkeypatch):
    _write(tmp_path / "b")
    before = _all_bytes(tmp_path / "b")
    real_rename = bundle_mod.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(bundle_mod.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _write(tmp_path / "b", force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert _all_bytes(tmp_path / "b") == before


def test_bad_tensor_input_leaves_nothing(tmp_path):
    with pytest.raises(BuildError, match="not a str -> torch.Tensor"):
        write_bundle(tmp_path / "b", {}, {"w.safetensors": {"x": [1, 2]}}, {})
    with pytest.raises(BuildError, match="must end in .safetensors"):
        write_bundle(tmp_path / "b", {}, {"w.pt": {"x": torch.ones(1)}}, {})
    with pytest.raises(BuildError, match="leaves the bundle"):
        write_bundle(tmp_path / "b", {}, {}, {}, texts={"../evil.py": "x"})
    with pytest.raises(BuildError, match="written by write_bundle"):
        write_bundle(tmp_path / "b", {"files": {}}, {}, {})
    with pytest.raises(TypeError, match="cannot write object"):
        write_bundle(tmp_path / "b", {"x": object()}, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_shared_storage_tensors_are_saved(tmp_path):
    base = torch.arange(6.0)
    write_bundle(tmp_path / "b", {}, {"w.safetensors": {"a": base, "b": base.view(2, 3)}}, {})
    got = load_bundle(tmp_path / "b").tensors("w.safetensors")
    assert torch.equal(got["a"], base) and torch.equal(got["b"], base.view(2, 3))


# ---------------------------------------------------------------------------- tampering


@pytest.fixture
def bundle_dir(tmp_path):
    return _write(tmp_path / "b")


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle at .*manifest.json missing"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json missing"):
        load_bundle(tmp_path / "empty")


def test_one_modified_byte_is_refused(bundle_dir):
    f = bundle_dir / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors was modified \\(sha256 mismatch\\)"):
        load_bundle(bundle_dir)
    load_bundle(bundle_dir, verify=False)  # same size, hashing skipped: documented trade-off


def test_modified_kernel_text_is_refused(bundle_dir):
    (bundle_dir / "kernels/class_0.py").write_text("import os\nos.system('rm -rf /')\n")
    with pytest.raises(BundleError, match="kernels/class_0.py was modified"):
        load_bundle(bundle_dir, verify=False)  # size changed: caught even without hashing
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle_dir)


def test_extra_file_is_refused(bundle_dir):
    (bundle_dir / "kernels" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(BundleError, match="not in its manifest \\(kernels/extra.py\\).*tampering"):
        load_bundle(bundle_dir)


def test_deleted_file_is_refused(bundle_dir):
    (bundle_dir / "classes" / "c0.safetensors").unlink()
    with pytest.raises(BundleError, match="classes/c0.safetensors is missing"):
        load_bundle(bundle_dir)


def _edit_manifest(bundle_dir, **changes):
    """Change manifest fields as a legitimate writer would: canonical text, fresh seal."""
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m.update(changes)
    (bundle_dir / "manifest.json").write_text(dumps_json(bundle_mod.seal_manifest(m)))
    return m


def test_format_version_mismatch(bundle_dir):
    _edit_manifest(bundle_dir, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match=f"format_version {FORMAT_VERSION + 1}.*reads format_version {FORMAT_VERSION}"):
        load_bundle(bundle_dir)


def test_cscompile_version_mismatch(bundle_dir):
    major, minor, *_ = cscompile.__version__.split(".")
    _edit_manifest(bundle_dir, cscompile_version=f"{major}.{int(minor) + 1}.0")
    with pytest.raises(BundleError, match="version mismatch"):
        load_bundle(bundle_dir)
    _edit_manifest(bundle_dir, cscompile_version=f"{major}.{minor}.99")  # patch level is fine
    load_bundle(bundle_dir)


def test_manifest_not_json(bundle_dir):
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["model.pt", "state.pkl", "pytorch_model.bin"])
def test_pickle_file_is_refused(bundle_dir, name):
    (bundle_dir / name).write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(BundleError, match=f"{name} looks like pickle"):
        load_bundle(bundle_dir)


def test_pickle_listed_in_manifest_is_refused(bundle_dir):
    # an attacker who also rewrites the manifest hashes still cannot smuggle pickle in
    target = bundle_dir / "kernels" / "class_0.py"
    target.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["files"]["kernels/class_0.py"] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="class_0.py looks like pickle"):
        load_bundle(bundle_dir)


def test_safetensors_header_starting_with_0x80_is_not_pickle(tmp_path):
    # the 8-byte header length can begin with byte 0x80; that must not look like pickle
    for k in range(1, 300):  # vary the name length until the header length is 128 mod 256
        out = write_bundle(tmp_path / f"b{k}", {}, {"w.safetensors": {"x" * k: torch.zeros(1)}}, {})
        if (out / "w.safetensors").read_bytes()[:1] == b"\x80":
            assert load_bundle(out).tensors("w.safetensors")["x" * k].shape == (1,)
            return
    pytest.fail("no header length starting with 0x80 was produced")


@pytest.mark.parametrize("bad", ["../outside.json", "/etc/passwd", "a/../../x", "./report.json"])
def test_path_traversal_in_manifest(bundle_dir, bad):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="must be relative|leaves the bundle"):
        load_bundle(bundle_dir)


# ---------------------------------------------------------------------------- helpers


def test_hash_tensors_is_stable_and_sensitive():
    a = {"x": torch.arange(6.0).view(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    h = hash_tensors(a)
    assert hash_tensors(dict(reversed(list(a.items())))) == h  # order-independent
    assert hash_tensors({"x": a["x"].t().contiguous().t(), "y": a["y"]}) == h  # layout-independent
    assert hash_tensors({"x": a["x"].reshape(3, 2), "y": a["y"]}) != h  # shape
    assert hash_tensors({"x": a["x"].double(), "y": a["y"]}) != h  # dtype
    assert hash_tensors({"z": a["x"], "y": a["y"]}) != h  # name
    changed = a["x"].clone()
    changed[1, 2] += 1
    assert hash_tensors({"x": changed, "y": a["y"]}) != h  # bytes
    assert hash_tensors({"s": torch.tensor(1.0)}) != hash_tensors({"s": torch.tensor([1.0])})
    assert len(h) == 64


def test_to_jsonable_and_dumps():
    obj = {np.int64(3): np.float32(0.5), "a": (np.bool_(True), np.array([[1, 2]])), "t": torch.tensor([1.5])}
    assert to_jsonable(obj) == {"3": 0.5, "a": [True, [[1, 2]]], "t": [1.5]}
    text = dumps_json({"b": 1, "a": [1, 2]})
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
