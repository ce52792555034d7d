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


# Tensors of every SD3 / SD3.5 transformer that training never quantizes (nf4 / int8 replace only the linear
# weights inside transformer_blocks) and that a LoRA never targets, by diffusers name. norm_out.linear is stored
# with its halves swapped in the original single-file layout, so a layout mix-up would show here too.
BASE_FINGERPRINT_TENSORS = (
    "context_embedder.bias",
    "norm_out.linear.bias",
    "pos_embed.proj.bias",
    "pos_embed.proj.weight",
    "proj_out.bias",
    "proj_out.weight",
    "time_text_embed.text_embedder.linear_1.bias",
    "time_text_embed.text_embedder.linear_2.bias",
    "time_text_embed.timestep_embedder.linear_1.bias",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.timestep_embedder.linear_2.bias",
)


def transformer_fingerprint(get, dtype: str) -> dict:
    """Which base transformer this is, by content, comparable across layouts and storage dtypes.

    `get(diffusers name)` returns the tensor (or None where the model lacks it); `dtype` ("bf16", "fp16", "fp32")
    is the precision training held the base in. Each tensor of BASE_FINGERPRINT_TENSORS is cast to that dtype
    (the cast training's loader made, replayed, so the base files themselves give the training's value), then
    rounded to bf16 (so a bf16 copy of a wider base gives it too), and hashed with its name and shape. A base
    converted to fp16 from a wider one, or to bf16 for an fp16 training, rounds differently and reads as another.
    """
    import torch

    from .dtypes import STORAGE_DTYPES

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (one of {', '.join(STORAGE_DTYPES)})")
    h = hashlib.sha256()
    for name in BASE_FINGERPRINT_TENSORS:
        t = get(name)
        h.update(name.encode() + b"\0")
        if t is None:
            h.update(b"absent\0")
            continue
        values = t.detach().to("cpu", STORAGE_DTYPES[dtype]).to(torch.bfloat16).float().contiguous()
        h.update(str(list(values.shape)).encode() + b"\0")
        h.update(values.numpy().tobytes())
    return {"sha256": h.hexdigest(), "dtype": dtype}
