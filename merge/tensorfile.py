"""safetensors files read and written one tensor at a time, with plain file reads and writes.

The safetensors library maps a file into memory; every tensor read through the mapping stays in the
process's resident set until the file is closed, so reading a whole 16 GB checkpoint that way shows
16 GB of RSS. Here a tensor is read with one positioned read into its own buffer and freed when dropped,
and a file is written header first (every shape and dtype is known up front), then tensor by tensor.
Peak memory is then the largest tensor or two, whatever the model's size.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__":
{str: str}}, padded with spaces to 8 bytes, then the raw little-endian tensor bytes.
"""
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from shards.errors import DataError

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # what the safetensors library accepts


@dataclass(frozen=True)
class Entry:
    dtype: str  # safetensors dtype string
    shape: Tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


class TensorFile:
    """A safetensors file open for reading single tensors."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")
        try:
            self.entries, self.metadata, self._data = _read_header(self._f, path)
        except BaseException:
            self._f.close()
            raise

    def keys(self) -> List[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        buf = bytearray(e.end - e.begin)
        self._f.seek(self._data + e.begin)
        if self._f.readinto(buf) != len(buf):
            raise DataError(f"{self.path} is truncated: '{name}' ends past the end of the file")
        if e.dtype not in TORCH_DTYPES:
            raise DataError(f"{self.path}: '{name}' has dtype {e.dtype}, which merge cannot read")
        if not buf:
            return torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype])
        return torch.frombuffer(buf, dtype=TORCH_DTYPES[e.dtype]).reshape(e.shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_header(f, path: str):
    raw = f.read(8)
    size = os.fstat(f.fileno()).st_size
    if len(raw) != 8:
        raise DataError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise DataError(f"{path} is not a safetensors file or is truncated (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        entries = {name: Entry(v["dtype"], tuple(int(d) for d in v["shape"]), int(v["data_offsets"][0]),
                               int(v["data_offsets"][1])) for name, v in header.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise DataError(f"{path} has a broken safetensors header ({e!r})") from None
    data = 8 + n
    for name, e in entries.items():
        if not 0 <= e.begin <= e.end or data + e.end > size:
            raise DataError(f"{path} is truncated or corrupt: '{name}' lies outside the file")
    return entries, metadata, data


def read_metadata(path: str) -> Dict[str, str]:
    with TensorFile(path) as f:
        return dict(f.metadata)


# A tensor to write: name, dtype, shape, and how to make it (called once, in file order).
Planned = Tuple[str, torch.dtype, Tuple[int, ...], Callable[[], torch.Tensor]]


def nbytes(dtype: torch.dtype, shape: Tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def write_tensor_file(path: str, tensors: List[Planned], metadata: Optional[Dict[str, str]] = None,
                      check: Optional[Callable[[str, torch.Tensor], None]] = None) -> int:
    """Write the planned tensors, sorted by name, into a new safetensors file; returns the data bytes.

    Each tensor is made, checked against its planned dtype and shape, written and dropped before the next."""
    tensors = sorted(tensors, key=lambda t: t[0])
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes too
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for name, dtype, shape, make in tensors:
                t = make()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):  # a bug, not bad input
                    raise AssertionError(f"{name}: made {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
                if check is not None:
                    check(name, t)
                t = t.contiguous().reshape(-1)
                if t.numel():
                    out.write(t.view(torch.uint8).numpy().data)  # no copy: the tensor's own bytes
                del t
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    return offset
