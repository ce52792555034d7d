"""Reading shard sets: `read_manifest`, `read_samples`, `read_extras`, local or remote.

Shards are read as a stream (tar `r|` mode over a file or a webdataset `gopen` stream) and hashed on
the way; a shard whose bytes differ from the manifest's sha256 stops the reader with an error rather
than feeding silently corrupted tensors onward.
"""
import hashlib
import json
import math
import os
import queue
import sys
import tarfile
import threading
from typing import Dict, Iterator, List, Optional, Union

import numpy
import torch
from safetensors.torch import load as st_load

from . import format as F
from .common.dtypes import SAFETENSORS_DTYPES
from .common.errors import DataError
from .manifest import Manifest, SampleSpec, is_url, join, open_stream, read_bytes, read_manifest, set_files
from .samples import check_stored, unpack
from .tensorfile import parse_header


def shard_urls(path_or_url: str, manifest: Optional[Manifest] = None) -> List[str]:
    manifest = manifest or read_manifest(path_or_url)
    return [join(path_or_url, s.name) for s in manifest.shards]


def check_shard_files(path: str, manifest: Manifest) -> None:
    """Cheap pre-flight check of a local set: every shard and the extras exist with the right size."""
    if is_url(path):
        return
    for s in manifest.shards:
        f = os.path.join(path, s.name)
        if not os.path.exists(f):
            raise DataError(f"{f} is missing; the shard set is damaged: run `python -m shards verify {path}`")
        if os.path.getsize(f) != s.bytes:
            raise DataError(f"{f} has {os.path.getsize(f)} bytes, the manifest says {s.bytes}: "
                            f"the shard set is damaged; run `python -m shards verify {path}`")
    if not os.path.exists(os.path.join(path, F.EXTRAS)):
        raise DataError(f"{os.path.join(path, F.EXTRAS)} is missing; the shard set is damaged")
    # Of the other files only the extras are read by a trainer; the rest need not be copied to its machine.
    rec = set_files(manifest).get(F.EXTRAS, {})
    f = os.path.join(path, F.EXTRAS)
    if "bytes" in rec and os.path.getsize(f) != rec["bytes"]:
        raise DataError(f"{f} has {os.path.getsize(f)} bytes, the manifest says {rec['bytes']}: "
                        f"the shard set is damaged; run `python -m shards verify {path}`")


def load_tensors(data) -> Dict[str, torch.Tensor]:
    """A safetensors buffer -> tensors that view `data` instead of copying it (a 1024² sample is ~5 MB,
    and one copy fewer per sample is a large part of the stream's CPU time). A read-only buffer
    (`bytes`) or a dtype not in shards.common.dtypes.SAFETENSORS_DTYPES goes through `safetensors.torch.load`, which copies."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(mv[:8], "little")
    if n > len(mv) - 8:
        raise ValueError("safetensors header runs past the end of the data")
    base, size = 8 + n, len(mv) - 8 - n
    entries, _ = parse_header(bytes(mv[8:base]), size)
    if mv.readonly or sys.byteorder != "little" or any(e.dtype not in SAFETENSORS_DTYPES for e in entries.values()):
        return st_load(bytes(mv))
    out, spans = {}, []
    for name, e in entries.items():
        dtype, numel = SAFETENSORS_DTYPES[e.dtype], math.prod(e.shape)
        if (base + e.begin) % dtype.itemsize:  # valid, but torch cannot view it: safetensors copies it aligned
            return st_load(bytes(mv))
        spans.append((e.begin, e.end))
        out[name] = torch.frombuffer(mv, dtype=dtype, count=numel, offset=base + e.begin).reshape(e.shape) if numel \
            else torch.empty(e.shape, dtype=dtype)
    spans.sort()
    ends = [0] + [e for _, e in spans]
    if any(b != prev for (b, _), prev in zip(spans, ends)) or ends[-1] != size:  # what safetensors insists on too
        raise ValueError("safetensors entries overlap or leave bytes uncovered")
    return out


def decode_sample(members: Dict[str, bytes], spec: Optional[SampleSpec] = None, view: bool = True) -> dict:
    """One sample's tar members (by extension) -> tensors + `key` + `meta`; the tensors as the set's `spec`
    hands them out (`view`), or as stored and checked against it (the trainer builds each batch's
    prompt_embeds in place: shards.samples.write_prompt_embeds); None: as stored, unchecked."""
    tensors = load_tensors(members["safetensors"])
    if spec is not None:
        if view:
            tensors = unpack(spec, tensors)
        else:
            check_stored(spec, tensors)
    meta = json.loads(bytes(members["json"]))
    return {**tensors, "key": meta["key"], "meta": meta}


class _Sha256Thread:
    """sha256 of a byte stream, computed in a helper thread in the order the pieces were given.

    hashlib releases the GIL on large buffers, so on two cores hashing one sample runs alongside
    reading the next and decoding / batching the previous one; hashing is the largest single cost
    of the stream. `wait(n)` returns once the first n pieces are hashed, so a sample is handed on only
    after the hasher is done with its buffers (a consumer may then change them in place).
    """

    def __init__(self):
        self._h, self._q = hashlib.sha256(), queue.SimpleQueue()
        self._given = self._done = 0
        self._error = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            piece = self._q.get()
            if piece is None:
                return
            try:
                if self._error is None:
                    self._h.update(piece)
            except BaseException as e:  # reported by wait() / hexdigest() in the reading thread
                self._error = e
            with self._cv:
                self._done += 1
                self._cv.notify_all()

    @property
    def given(self) -> int:
        return self._given

    def update(self, piece) -> None:
        self._given += 1
        self._q.put(piece)

    def wait(self, n: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._done >= n)
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        self.wait(self._given)
        return self._h.hexdigest()

    def close(self) -> None:
        self._q.put(None)


class _HashedStream:
    """Reads a file or URL stream in whole pieces, handing each piece to a `_Sha256Thread`; also what
    `tarfile.TarInfo.fromtarfile` needs of a file (`read`, `tell`)."""

    def __init__(self, f, hasher: Optional[_Sha256Thread], pos: int = 0, stats: Optional[dict] = None):
        self.f, self.hasher, self.pos, self.stats = f, hasher, pos, stats
        self._readinto = getattr(f, "readinto", None)

    def read_buffer(self, n: int) -> memoryview:
        """Up to n bytes (fewer only at the end) in fresh, writable memory: read straight into it with
        `readinto` where the stream has it, and not zero-filled first as a bytearray would be."""
        mv = memoryview(numpy.empty(n, dtype=numpy.uint8)).cast("B")
        got = 0
        while got < n:
            if self._readinto is not None:
                k = self._readinto(mv[got:]) or 0
            else:  # a pipe: URL streams (webdataset gopen) offer only read
                b = self.f.read(n - got)
                k = len(b)
                mv[got:got + k] = b
            if not k:
                break
            got += k
        mv = mv[:got]
        self.pos += got
        if self.stats is not None:
            self.stats["bytes"] = self.stats.get("bytes", 0) + got
        if self.hasher is not None:
            self.hasher.update(mv)
        return mv

    def read(self, n: int) -> bytes:
        return bytes(self.read_buffer(n))

    def tell(self) -> int:
        return self.pos


class _TarHeaders:
    """The part of a `tarfile.TarFile` that `TarInfo.fromtarfile` uses: the standard library parses
    every header (ustar, GNU long names, pax) while the member data is read here, each member in one
    piece, instead of in tarfile's 10 KiB stream records joined and sliced again (two more copies)."""

    encoding, errors = tarfile.ENCODING, "surrogateescape"

    def __init__(self, stream: _HashedStream):
        self.fileobj, self.offset, self.pax_headers = stream, 0, {}


def _tar_members(stream: _HashedStream, stop=None) -> Iterator[tuple]:
    """(name, data, header offset) of each regular file in a tar stream, in file order; ends like
    `tarfile` in `r|` mode, or before reading the data of a member for which `stop(name, offset)` holds."""
    headers = _TarHeaders(stream)
    while True:
        at = stream.tell()
        try:
            info = tarfile.TarInfo.fromtarfile(headers)
        except tarfile.EOFHeaderError:  # the end-of-archive block
            return
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if at == 0:
                raise tarfile.ReadError("empty file" if isinstance(e, tarfile.EmptyHeaderError) else str(e)) from None
            return
        if info.sparse is not None:
            raise tarfile.ReadError(f"{info.name}: sparse members are not supported")
        if stop is not None and stop(info.name, at):
            return
        size = headers.offset - stream.tell()  # data and padding up to the next header
        data = stream.read_buffer(size) if size > 0 else memoryview(b"")
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        if info.isfile():
            yield info.name, data[:info.size], at


def iter_tar(url: str, sha256: Optional[str] = None, stats: Optional[dict] = None) -> Iterator[Dict[str, memoryview]]:
    """Raw samples of one shard (`{"__key__", "__offset__": byte offset of its first header, ext: writable
    buffer}`) in file order; checks `sha256` at the end; adds the bytes it reads to `stats["bytes"]`."""
    name = os.path.basename(url)
    hasher = _Sha256Thread()
    try:
        with open_stream(url) as raw:
            stream = _HashedStream(raw, hasher, stats=stats)
            sample = {}
            for member, data, at in _tar_members(stream):
                key, _, ext = member.partition(".")
                if sample and key != sample["__key__"]:
                    # This member's bytes are queued behind the previous sample's: once those are hashed,
                    # that sample can go (and is hashed while the consumer works on it, or the next is read).
                    hasher.wait(hasher.given - 1)
                    yield sample
                    sample = {}
                if not sample:
                    sample["__offset__"] = at
                sample["__key__"] = key
                sample[ext] = data
            if sample:
                hasher.wait(hasher.given)
                yield sample
            while stream.read_buffer(1 << 20):  # tar end padding still counts towards the hash
                pass
            digest = hasher.hexdigest()
    except FileNotFoundError:
        raise DataError(f"{url} is missing; the shard set is damaged: run `python -m shards verify`") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{url}: unreadable shard ({type(e).__name__}: {str(e)[:120]}); "
                        "the shard set is damaged: run `python -m shards verify` and precompute it again") from None
    finally:
        hasher.close()
    if sha256 is not None and digest != sha256:
        raise DataError(f"{name}: its sha256 differs from the manifest (corrupt or replaced); "
                        "run `python -m shards verify` and precompute the set again")


def decode_raw(url: str, raw: dict, spec: Optional[SampleSpec] = None, view: bool = True) -> dict:
    try:
        return decode_sample(raw, spec, view)
    except Exception as e:  # a damaged member decodes to garbage before the hash check can run
        raise DataError(f"{url}: sample {raw.get('__key__')} cannot be decoded ({type(e).__name__}); "
                        "the shard set is damaged: run `python -m shards verify`") from None


def _decoded(url: str, sha256: Optional[str], spec: Optional[SampleSpec] = None) -> Iterator[Dict]:
    for raw in iter_tar(url, sha256):
        yield decode_raw(url, raw, spec)


def read_samples_at(url: str, wanted: List[tuple], stats: Optional[dict] = None,
                    spec: Optional[SampleSpec] = None, view: bool = True) -> Dict[int, dict]:
    """Samples of one shard by the byte offsets `iter_tar` reported for them: {offset: sample}.

    `wanted` holds (offset, key) pairs. A local shard is read only at those offsets (a seek, then the
    sample's own members); a URL stream cannot seek and is read from its start up to the last one. The
    shard's sha256 is not checked (only part of it is read): each sample must carry the recorded key.
    """
    wanted = sorted(wanted)
    found = {}
    try:
        if is_url(url):
            with open_stream(url) as raw:
                _collect(_HashedStream(raw, None, stats=stats), dict(wanted), found, last=wanted[-1][0] if wanted else -1)
        else:
            with open(url, "rb") as f:
                for offset, key in wanted:
                    f.seek(offset)
                    _collect(_HashedStream(f, None, pos=offset, stats=stats), {offset: key}, found, last=offset)
    except FileNotFoundError:
        raise DataError(f"{url} is missing; the shard set is damaged: run `python -m shards verify`") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{url}: unreadable shard ({type(e).__name__}: {str(e)[:120]}); "
                        "the shard set is damaged: run `python -m shards verify` and precompute it again") from None
    out = {}
    for offset, key in wanted:
        raw = found.get(offset)
        if raw is None or raw["__key__"] != key:
            raise DataError(f"{url}: sample {key} is no longer at byte {offset}; the shard set changed since the "
                            "checkpoint was written: resume with the set it was made with, or resume=none")
        out[offset] = decode_raw(url, raw, spec, view)
    return out


def _collect(stream: _HashedStream, wanted: Dict[int, str], found: Dict[int, dict], last: int) -> None:
    """Gather the members of the samples that begin at the `wanted` offsets; stop at the header after the
    last one's members, without reading that member's data."""
    current = None

    def past_the_last(name: str, at: int) -> bool:
        return at > last and (current is None or name.partition(".")[0] != current["__key__"])

    for member, data, at in _tar_members(stream, past_the_last):
        key, _, ext = member.partition(".")
        if current is not None and key != current["__key__"]:
            current = None
        if current is None and at in wanted:
            current = found[at] = {"__key__": key, "__offset__": at}
        if current is not None:
            current[ext] = data


def read_samples(path_or_url: Union[str, List[str]]) -> Iterator[Dict]:
    """Every sample of a shard set (folder or URL), or of one tar / a list of tars, in order.

    For a set, each shard's bytes are checked against the manifest's sha256 as they stream past, and the
    tensors are handed out as every version of the format reads (`prompt_embeds`, shards.samples); tars
    given without their set's manifest yield their tensors as stored.
    """
    excluded, spec = {}, None
    if isinstance(path_or_url, (list, tuple)):
        shards = [(u, None) for u in path_or_url]
    elif path_or_url.endswith(".tar"):
        shards = [(path_or_url, None)]
    else:
        manifest = read_manifest(path_or_url)
        shards = [(join(path_or_url, s.name), s.sha256) for s in manifest.shards]
        excluded, spec = manifest.excluded, manifest.spec
    for url, sha in shards:
        for sample in _decoded(url, sha, spec):
            if sample["key"] not in excluded:  # later copies of an image found in another shard
                yield sample


def read_extras(path_or_url: str, manifest: Optional[Manifest] = None) -> Dict[str, torch.Tensor]:
    """Empty-prompt and validation-prompt embeddings; prompts' text is in the manifest. The file is checked
    against the manifest's sha256 (read from the set when `manifest` is not given): it is small, and a
    changed byte would otherwise reach every caption-dropout step and validation image unnoticed."""
    manifest = manifest if manifest is not None else read_manifest(path_or_url)
    where = join(path_or_url, F.EXTRAS)
    data = read_bytes(where)
    expected = set_files(manifest).get(F.EXTRAS, {}).get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{where}: its sha256 differs from the manifest (corrupt or replaced); the shard set "
                        "is damaged: run `python -m shards verify` and precompute the set again")
    try:
        return st_load(data)
    except Exception as e:
        raise DataError(f"{where} cannot be read ({type(e).__name__}); the shard set is damaged") from None
