"""The GGUF container: header, metadata and tensor index, read without the gguf package's
reader. That reader turns every token string into numpy views (about 5 s for a 49k
vocabulary on a small CPU); reading the header with struct takes a few hundred ms. Tensor
data stays memory-mapped until dequantized.

Layout (little-endian, versions 2 and 3): b"GGUF", u32 version, u64 tensor count,
u64 metadata count, metadata (string key, u32 type, value), tensor infos (string name,
u32 dims, u64 x dims sizes, u32 type, u64 offset), padding to `general.alignment`, data.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file that is not one, is truncated, or holds a model we do not run."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]     # GGUF order: ne0 (the contiguous dimension) first
    type_id: int               # a gguf.GGMLQuantizationType value
    data_offset: int           # absolute, in the file
    n_bytes: int
    _file: GGUFFile = field(repr=False)

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"unknown type {self.type_id}"

    def raw(self) -> np.ndarray:
        """The tensor's bytes (memory-mapped, read-only)."""
        # A plain ndarray view: numpy's memmap subclass costs a Python call on every slice.
        return self._file.mmap[self.data_offset:self.data_offset + self.n_bytes].view(np.ndarray)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    mmap: np.ndarray = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)


class _Cursor:
    def __init__(self, buf: np.ndarray, name: str) -> None:
        self.buf, self.pos, self.name = memoryview(buf), 0, name

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.name} is truncated: its header runs past the end of the "
                            f"file ({len(self.buf)} bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return str(raw, "utf-8", errors="replace")  # some vocabularies hold raw bytes

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize
                return np.frombuffer(self.take(n * size), dtype=_NUMPY[item]).tolist()
            return [self.value(item) for _ in range(n)]
        raise GGUFError(f"{self.name}: unknown metadata value type {kind} (corrupt header?)")


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and index a GGUF file; GGUFError names the file and what is wrong with it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"no GGUF file at {p}")
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{p.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    mmap = np.memmap(p, dtype=np.uint8, mode="r")
    c = _Cursor(mmap, p.name)
    c.take(4)
    version = c.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{p.name}: GGUF version {version} is not supported (2 or 3; a huge "
                        "number means a big-endian file)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > size or n_kv > size:
        raise GGUFError(f"{p.name} is corrupt: it announces {n_tensors} tensors and {n_kv} "
                        "metadata entries")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
        infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    align = meta.get("general.alignment", 32)
    start = (c.pos + align - 1) // align * align
    g = GGUFFile(p, version, meta, [], mmap)
    for name, dims, kind, offset in infos:
        if kind not in GGML_QUANT_SIZES and kind not in {t.value for t in GGMLQuantizationType}:
            raise GGUFError(f"{p.name}: tensor {name} has unknown type id {kind}")
        block, type_size = GGML_QUANT_SIZES.get(GGMLQuantizationType(kind), (1, 0))
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = count // block * type_size
        t = GGUFTensor(name, dims, kind, start + offset, n_bytes, g)
        if t.data_offset + n_bytes > size:
            raise GGUFError(f"{p.name} is truncated: tensor {name} ends at byte "
                            f"{t.data_offset + n_bytes}, the file has {size}")
        g.tensors.append(t)
    return g
