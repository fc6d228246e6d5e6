"""cscompile.safetensors_io: the streamed writer writes save_file's bytes, in any production
order; the reader reads what save_file wrote; both refuse what does not fit in one line."""
import pytest
import torch
from safetensors.torch import save_file

from cscompile.errors import BuildError, UnsupportedModelError
from cscompile.safetensors_io import StreamedTensors, TensorFile


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(3, 4, generator=g).bfloat16(), "a.w": torch.randn(5, generator=g),
            "z": torch.arange(7, dtype=torch.int32), "m": torch.zeros(2, 3, dtype=torch.uint8),
            "c": torch.randn(1, generator=g).half(), "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(3.0), "flags": torch.tensor([True, False]),
            "i64": torch.ones(3, dtype=torch.int64), "f64": torch.ones(2, dtype=torch.float64),
            "i8": torch.tensor([-3, 4], dtype=torch.int8)}


def test_streamed_tensors_write_what_save_file_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    # produced in another order than the file's: each lands at its own offset
    StreamedTensors(specs, lambda: reversed(list(tensors.items()))).write(tmp_path / "s.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_streamed_tensors_refuse_what_was_not_announced(tmp_path):
    specs = {"a": (torch.float32, (2,))}
    with pytest.raises(BuildError, match="not the one announced"):
        StreamedTensors(specs, lambda: iter([("a", torch.zeros(3))])).write(tmp_path / "x")
    with pytest.raises(BuildError, match="never produced"):
        StreamedTensors(specs, lambda: iter([])).write(tmp_path / "y")


def test_the_reader_reads_what_save_file_wrote(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    f = TensorFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for name, t in tensors.items():
        got = f.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    f.close()


def test_the_reader_refuses_damaged_files_in_one_line(tmp_path):
    save_file({"w": torch.ones(64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-16])
    with pytest.raises(UnsupportedModelError, match="cut short"):
        TensorFile(tmp_path / "cut.safetensors").get("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(UnsupportedModelError, match="not a readable safetensors"):
        TensorFile(tmp_path / "junk.safetensors")
