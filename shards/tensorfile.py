"""safetensors files read and written one tensor at a time, with plain file reads and writes.

The safetensors library maps a file into memory; every tensor read through the mapping stays in the
process's resident set until the file is closed, so reading a whole 16 GB checkpoint that way shows
16 GB of RSS. Here a tensor is read with one positioned read into its own buffer and freed when dropped,
and a file is written header first (every shape and dtype is known up front), then tensor by tensor.
Peak memory is then the largest tensor or two, whatever the model's size. A tensor that goes out
byte-for-byte as it came in (no LoRA on it, same dtype: most of a checkpoint) is not read at all: it is
given as `Span`s of its input file and copied by the kernel (`os.copy_file_range`), which on this
project's CPU machine is three times faster than reading and writing the same bytes.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__":
{str: str}}, padded with spaces to 8 bytes, then the raw little-endian tensor bytes.
"""
import errno
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from shards.common.errors import DataError
from shards.common.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES

MAX_HEADER = 100_000_000  # what the safetensors library accepts


@dataclass(frozen=True)
class Entry:
    dtype: str  # safetensors dtype string
    shape: Tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True)
class Span:
    """`size` bytes at absolute `offset` of the file at `path`."""
    path: str
    offset: int
    size: int


def slice_spans(spans: List[Span], begin: int, end: int) -> List[Span]:
    """Bytes [begin, end) of the byte string the spans make, as spans."""
    out, at = [], 0
    for sp in spans:
        lo, hi = max(begin, at), min(end, at + sp.size)
        if lo < hi:
            out.append(Span(sp.path, sp.offset + lo - at, hi - lo))
        at += sp.size
    return out


def spans_size(spans: List[Span]) -> int:
    return sum(sp.size for sp in spans)


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
        if e.dtype not in SAFETENSORS_DTYPES:
            raise DataError(f"{self.path}: '{name}' has dtype {e.dtype}, which shardtune cannot read")
        if not buf:
            return torch.empty(e.shape, dtype=SAFETENSORS_DTYPES[e.dtype])
        return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[e.dtype]).reshape(e.shape)

    def spans(self, name: str) -> List[Span]:
        """Where `name`'s bytes lie in the file."""
        e = self.entries[name]
        return [Span(self.path, self._data + e.begin, e.end - e.begin)] if e.end > e.begin else []

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_header(header: bytes, data_size: int) -> Tuple[Dict[str, Entry], Dict[str, str]]:
    """A safetensors JSON header -> ({name: Entry}, metadata), every entry checked against a data section of
    `data_size` bytes: inside it, and (for a dtype shardtune knows) exactly its shape's bytes. The one header
    parser of the project: merge's tensor files and the shard reader's samples. ValueError says what is wrong."""
    try:
        raw = json.loads(header)
        metadata = raw.pop("__metadata__", None) or {}
        entries = {name: Entry(v["dtype"], tuple(int(d) for d in v["shape"]), int(v["data_offsets"][0]),
                               int(v["data_offsets"][1])) for name, v in raw.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"a broken safetensors header ({e!r})") from None
    for name, e in entries.items():
        if min(e.shape, default=0) < 0 or not 0 <= e.begin <= e.end <= data_size:
            raise ValueError(f"'{name}' lies outside the data")
        if e.dtype in SAFETENSORS_DTYPES and e.end - e.begin != nbytes(SAFETENSORS_DTYPES[e.dtype], e.shape):
            raise ValueError(f"'{name}' holds {e.end - e.begin} bytes, not the {e.dtype} {list(e.shape)} its header says")
    return entries, metadata


def _read_header(f, path: str):
    raw = f.read(8)
    size = os.fstat(f.fileno()).st_size
    if len(raw) != 8:
        raise DataError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise DataError(f"{path} is not a safetensors file or is truncated (header of {n} bytes)")
    try:
        entries, metadata = parse_header(f.read(n), size - 8 - n)
    except ValueError as e:
        raise DataError(f"{path} is truncated or corrupt: {e}") from None
    return entries, metadata, 8 + n


def read_metadata(path: str) -> Dict[str, str]:
    with TensorFile(path) as f:
        return dict(f.metadata)


# A tensor to write: name, dtype, shape, and how to make it (called once, in file order): a tensor, or the spans
# of an input file that hold its bytes unchanged.
Planned = Tuple[str, torch.dtype, Tuple[int, ...], Callable[[], Union[torch.Tensor, List[Span]]]]
COPY_CHUNK = 64 << 20


def nbytes(dtype: torch.dtype, shape: Tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _pwrite_all(fd: int, data, at: int) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        k = os.pwrite(fd, mv, at)
        mv, at = mv[k:], at + k


class _SpanCopier:
    """Copies input-file spans to given offsets of an output fd: `os.copy_file_range` (in the kernel, no user
    memory), or positioned reads and writes where the platform or filesystem pair does not offer it. Spans that
    continue each other in both files (unchanged neighbours) are joined into one copy; `flush` copies what is held.

    (Copying in a thread of its own, alongside the making of changed tensors, measured no faster here: the
    disk is the limit.)"""

    def __init__(self, out_fd: int):
        self._fds: Dict[str, int] = {}
        self._kernel = hasattr(os, "copy_file_range")
        self._out = out_fd
        self._run: Optional[Tuple[Span, int]] = None

    def add(self, span: Span, at: int) -> None:
        """Copy `span` to byte `at` of the output (at the latest when `flush` is called)."""
        if self._run is not None:
            run, run_at = self._run
            if run.path == span.path and run.offset + run.size == span.offset and run_at + run.size == at:
                self._run = (Span(run.path, run.offset, run.size + span.size), run_at)
                return
            self.flush()
        self._run = (span, at)

    def flush(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            self.copy(*run)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def copy(self, span: Span, at: int) -> None:
        if span.path not in self._fds:
            self._fds[span.path] = os.open(span.path, os.O_RDONLY)
        fd, offset, left = self._fds[span.path], span.offset, span.size
        while left and self._kernel:
            try:
                k = os.copy_file_range(fd, self._out, min(left, 1 << 30), offset, at)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                self._kernel = False
                break
            if k == 0:
                raise DataError(f"{span.path} is truncated: it ends inside a tensor (byte {offset})")
            offset, at, left = offset + k, at + k, left - k
        while left:
            data = os.pread(fd, min(left, COPY_CHUNK), offset)
            if not data:
                raise DataError(f"{span.path} is truncated: it ends inside a tensor (byte {offset})")
            _pwrite_all(self._out, data, at)
            offset, at, left = offset + len(data), at + len(data), left - len(data)


def _write_one(fd: int, copier: _SpanCopier, at: int, name: str, dtype: torch.dtype, shape, t) -> None:
    if isinstance(t, list):
        if spans_size(t) != nbytes(dtype, shape):  # a bug, not bad input
            raise AssertionError(f"{name}: spans of {spans_size(t)} bytes, planned {dtype} {tuple(shape)}")
        for span in t:
            copier.add(span, at)
            at += span.size
        return
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):  # a bug, not bad input
        raise AssertionError(f"{name}: made {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
    t = t.contiguous().reshape(-1)
    if t.numel():
        _pwrite_all(fd, t.view(torch.uint8).numpy().data, at)  # no copy: the tensor's own bytes


def write_tensor_file(path: str, tensors: List[Planned], metadata: Optional[Dict[str, str]] = None,
                      done: Optional[Callable[[str], None]] = None) -> int:
    """Write the planned tensors, sorted by name, into a new safetensors file; returns the data bytes.

    Each tensor is made, checked against its planned dtype and shape (or byte count, for spans), written at its
    offset and dropped before the next; `done(name)` is called after each."""
    tensors = sorted(tensors, key=lambda t: t[0])
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes too
    data_start = 8 + len(raw)
    try:
        with open(path, "wb", buffering=0) as out:
            fd = out.fileno()
            _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            copier = _SpanCopier(fd)
            try:
                for name, dtype, shape, make in tensors:
                    _write_one(fd, copier, data_start + header[name]["data_offsets"][0], name, dtype, shape, make())
                    if done is not None:
                        done(name)
                copier.flush()
            finally:
                copier.close()
            if os.fstat(fd).st_size != data_start + offset:  # a bug, not bad input
                raise AssertionError(f"{path}: {os.fstat(fd).st_size} bytes written, planned {data_start + offset}")
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    return offset
