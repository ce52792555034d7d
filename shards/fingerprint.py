"""Content fingerprints of files and model folders, cheap enough for multi-GB weights."""
import hashlib
import os

_FULL_HASH_LIMIT = 256 << 20  # files above this are fingerprinted by size, head, middle and tail
_CHUNK = 4 << 20


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_fingerprint(path: str, h) -> None:
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        # A safetensors header (offsets, shapes, dtypes) sits in the head; sampled chunks catch
        # weights that were changed in place.
        for offset in (0, size // 2, size - _CHUNK):
            f.seek(offset)
            h.update(f.read(_CHUNK))


def folder_fingerprint(path: str) -> str:
    """sha256 over the relative names and contents of every file under `path` (or one file)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        _file_fingerprint(path, h)
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            _file_fingerprint(full, h)
    return h.hexdigest()
