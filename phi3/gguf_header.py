"""GGUF headers, read without trusting them: metadata and the tensor table of a llama.cpp file.

`gguf.GGUFReader` memory-maps the file and trusts every count, length, type and offset in it, so a
hostile or truncated file could make it crash, allocate without bound or loop for hours (and it
takes seconds to parse a vocabulary). This bounded reader validates every field against the bytes
left; `phi3.gguf` reads the tensors at the offsets it returns.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["GGUFError", "read_metadata"]


class GGUFError(ValueError):
    """A GGUF file is malformed or not loadable; the message names the file and what is wrong."""


# Value types of the GGUF spec: id -> numpy dtype (little-endian); 8 is a string, 9 an array.
_NUMERIC = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_UINT32, _UINT64 = 4, 10
_U64 = struct.Struct("<Q")
_MAX_KEY = 1 << 16  # the spec's limit on key length
_MAX_STRING = 1 << 24  # a chat template is kilobytes; 16 MiB is far beyond any real value
_MAX_NAME = 1 << 10  # llama.cpp caps tensor names at 64 bytes
# GGUFReader keeps one numpy view per array element (~25 µs each); the largest real vocabularies
# need < 1M elements (tokens + scores + types + merges), so this bounds its work on hostile files.
_MAX_ITEMS = 1 << 21


class _Tensor(NamedTuple):
    shape: tuple[int, ...]  # torch order, (out, in): GGUF lists the contiguous dimension first
    ggml_type: GGMLQuantizationType
    offset: int = 0  # of its data from the start of the file, validated against the file size
    nbytes: int = 0


class _Header:
    """Walks a GGUF header in `buf` without trusting any count, length, type or offset in it."""

    def __init__(self, path: Path, buf: Any):
        self.path, self.buf, self.pos, self.items = path, buf, 0, 0

    def fail(self, what: str) -> None:
        raise GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        left = len(self.buf) - self.pos
        if n > left:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, {left} left in the file")
        self.pos += n
        return self.pos - n

    def nums(self, vtype: int, count: int, what: str) -> list:
        dt = np.dtype(_NUMERIC[vtype])
        start = self.take(count * dt.itemsize, what)
        return np.frombuffer(self.buf, dt, count, start).tolist()

    def u32(self, what: str) -> int:
        return self.nums(_UINT32, 1, what)[0]

    def u64(self, what: str) -> int:
        return self.nums(_UINT64, 1, what)[0]

    def string(self, what: str, cap: int = _MAX_STRING) -> str:
        n = self.u64(f"length of {what}")
        if n > cap:
            self.fail(f"{what} claims {n} bytes (limit {cap})")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _NUMERIC:
            return self.nums(vtype, 1, what)[0]
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        itype, n = self.u32(f"element type of {what}"), self.u64(f"length of {what}")
        if itype not in _NUMERIC and itype != _STRING:  # arrays of arrays occur in no model file
            self.fail(f"{what} is an array of unsupported element type {itype}")
        # every element takes at least one byte, so a length past the bytes left is a lie
        if n > len(self.buf) - self.pos or self.items + n > _MAX_ITEMS:
            self.fail(f"{what} claims {n} elements, more than the file can hold (or over {_MAX_ITEMS})")
        self.items += n
        if itype in _NUMERIC:
            return self.nums(itype, n, what)
        return self.strings(n, what)

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row: a tight loop over well-formed ones (a vocabulary has ~10^5); the first
        that is not is re-read by `string`, which says what is wrong with it."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        length_at = _U64.unpack_from
        try:
            for _ in range(n):
                (length,) = length_at(buf, pos)
                end = pos + 8 + length
                if length > _MAX_STRING or end > size:
                    break
                out.append(str(buf[pos + 8 : end], "utf-8"))
                pos = end
        except (struct.error, UnicodeDecodeError):
            pass
        self.pos = pos
        out += [self.string(f"{what}[{i}]") for i in range(len(out), n)]
        return out


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    """Validate the whole header and tensor table of `path`; return (metadata, tensors by name)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:  # mmap refuses empty files
            return _parse(_Header(path, b""))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(_Header(path, m))


def _parse(h: _Header) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    size = len(h.buf)
    magic = bytes(h.buf[h.take(4, "magic") : 4])
    if magic != b"GGUF":
        h.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = h.u32("version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        h.fail("big-endian GGUF files are not supported" if swapped in (2, 3) else f"unsupported GGUF version {version}")
    n_tensors, n_kv = h.u64("tensor count"), h.u64("metadata count")
    # smallest possible entries: a key/value is 8+4+1 bytes, a tensor info 8+4+8+4+8
    if n_kv * 13 + n_tensors * 32 > size - h.pos:
        h.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than {size} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string("metadata key", _MAX_KEY)
        vtype = h.u32(f"type of {key!r}")
        if key in metadata:
            h.fail(f"duplicate metadata key {key!r}")
        if key == "general.alignment" and vtype != _UINT32:
            h.fail(f"general.alignment has value type {vtype}, expected uint32")
        metadata[key] = h.value(vtype, repr(key))
    align = metadata.get("general.alignment", 32)
    if align <= 0 or align & (align - 1):
        h.fail(f"general.alignment {align} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = h.string("tensor name", _MAX_NAME)
        n_dims = h.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= 4:
            h.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to 4)")
        dims = h.nums(_UINT64, n_dims, f"dimensions of {name!r}")
        raw_type, offset = h.u32(f"type of {name!r}"), h.u64(f"offset of {name!r}")
        if raw_type not in GGML_QUANT_SIZES:
            h.fail(f"tensor {name!r} has unknown ggml type {raw_type}")
        infos.append((name, dims, GGMLQuantizationType(raw_type), offset))
    data_start = -(-h.pos // align) * align
    tensors: dict[str, _Tensor] = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        if name in tensors:
            h.fail(f"duplicate tensor {name!r}")
        if min(dims) < 1 or dims[0] % block:
            h.fail(f"tensor {name!r} of type {qtype.name} has invalid shape {dims} (rows of {block}-element blocks)")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        if offset % align or data_start + offset + nbytes > size:
            h.fail(f"tensor {name!r} ({qtype.name}, shape {dims}) at data offset {offset} needs {nbytes} bytes "
                   f"from byte {data_start + offset}, but the file has {size} bytes (alignment {align})")
        tensors[name] = _Tensor(tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return metadata, tensors


def read_metadata(path) -> dict[str, Any]:
    """All key/value metadata of the GGUF file at `path` as Python values, after validating the header.

    Raises GGUFError for any malformed file (truncated, wrong magic, absurd counts or lengths, ...).
    """
    return _read_header(Path(path))[0]
