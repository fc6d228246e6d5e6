"""safetensors one tensor at a time: a writer that never holds the whole file's tensors
(the layer-streamed build's weights) and a reader that reads a tensor's bytes with plain
file reads, not a memory map, so what a process has read does not stay in its resident
set (the file's pages stay in the page cache, which the kernel reclaims)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from cscompile.errors import BuildError, UnsupportedModelError

# safetensors' file order: its Rust writer ranks dtypes (this order, measured against
# save_file in tests/test_bundle.py), then names
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL"}


class StreamedTensors:
    """One safetensors file written as its tensors are produced, never all in memory: `specs`
    ({name: (dtype, shape)}) fixes the layout, `produce()` yields each (name, tensor) once, in
    any order. The file is byte-identical to save_file of the same tensors."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple]], produce):
        self.specs, self.produce = specs, produce

    def layout(self) -> tuple[bytes, dict[str, int], int]:
        """(header bytes, data offset of every tensor, data size)."""
        rank = list(_SAFETENSORS_DTYPES)
        header, offsets, at = {}, {}, 0
        for name in sorted(self.specs, key=lambda n: (rank.index(self.specs[n][0]), n)):
            dtype, shape = self.specs[name]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [at, at + size]}
            offsets[name], at = at, at + size
        text = json.dumps(header, separators=(",", ":"))
        text += " " * (-len(text) % 8)  # the data starts 8-aligned, padded as safetensors pads
        return struct.pack("<Q", len(text)) + text.encode(), offsets, at

    def write(self, path: Path) -> None:
        head, offsets, size = self.layout()
        done = set()
        with open(path, "wb") as f:
            f.write(head)
            for name, t in self.produce():
                dtype, shape = self.specs.get(name, (None, None))
                if name in done or dtype != t.dtype or tuple(shape) != tuple(t.shape):
                    raise BuildError(f"{path.name}: tensor {name!r} is not the one announced "
                                     f"({t.dtype}, {tuple(t.shape)})")
                f.seek(len(head) + offsets[name])
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                done.add(name)
            if done != set(self.specs):
                raise BuildError(f"{path.name}: tensors never produced: "
                                 f"{sorted(set(self.specs) - done)[:3]}")
            f.truncate(len(head) + size)



_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class TensorFile:
    """The tensors of one safetensors file, each read on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise UnsupportedModelError(f"{self.path}: not a readable safetensors file "
                                        f"({e})") from None
        header.pop("__metadata__", None)
        self.header, self.base = header, 8 + n
        self.fd = os.open(self.path, os.O_RDONLY)

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedModelError(f"{self.path}: {name} has dtype {info['dtype']}, "
                                        f"which torch cannot hold")
        buf = bytearray(end - start)
        if os.preadv(self.fd, [buf], self.base + start) != len(buf):
            raise UnsupportedModelError(f"{self.path}: {name} is cut short (file truncated?)")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        os.close(self.fd)
