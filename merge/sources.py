"""Where tensors come from, one at a time: a diffusers/transformers model folder, or an original single-file SD3
checkpoint read under diffusers names.

A `Source` names its tensors and reads one on request (shape and dtype without reading the data). The
original layout is turned into diffusers names on the fly by the groups of merge/sd3_keys.py run backwards:
a fused qkv is read once and split into q, k, v; swapped (shift, scale) halves are swapped back. So folding
and verifying work on diffusers names whichever layout the base or the release has.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from shards.common.errors import DataError

from .sd3_keys import CAT, PREFIX, Group, groups_from_original, split, split_spans
from shards.tensorfile import Span, TensorFile

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers models (transformer, vae)
TRANSFORMERS_WEIGHTS = "model.safetensors"  # transformers models (the text encoders)


def tensor_files(model_dir: str, what: str, weights_name: str = DIFFUSERS_WEIGHTS) -> Dict[str, str]:
    """Tensor name -> file holding it, for a single-file or sharded model folder (`what`, for messages)."""
    index = os.path.join(model_dir, weights_name + ".index.json")
    single = os.path.join(model_dir, weights_name)
    try:
        if os.path.isfile(index):  # diffusers and transformers prefer the index when both are present
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            where = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            where = {name: single for name in file_keys(single, what)}
        else:
            raise DataError(f"{model_dir} holds neither {weights_name} nor its .index.json; merge needs the {what} "
                            "in safetensors")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read the {what} in {model_dir}: {e!r}") from None
    for file in sorted(set(where.values())):
        if not os.path.isfile(file):
            raise DataError(f"{index} names {os.path.basename(file)}, which is not in {model_dir}")
    return where


class Source:
    """Named tensors read one at a time. `names` is sorted; subclasses fill `_shape`, `_dtype`, `_get`."""

    def __init__(self, names: List[str], what: str):
        self.names = sorted(names)
        self.what = what
        self._handles: Dict[str, object] = {}

    def _open(self, file: str) -> TensorFile:
        if file not in self._handles:
            try:
                self._handles[file] = TensorFile(file)
            except OSError as e:
                raise DataError(f"cannot read the {self.what} ({file}): {e.strerror or e}") from None
        return self._handles[file]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shape(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (F32, BF16, ...)."""
        return self._dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def spans(self, name: str) -> Optional[List[Span]]:
        """Where the tensor's bytes lie, as stored (row-major, its `dtype`), if they can be copied as they are."""
        return None


class FileSource(Source):
    """Tensors under their stored names, from files given by name -> file (`prefix` is added to every name)."""

    def __init__(self, where: Dict[str, str], what: str, prefix: str = ""):
        super().__init__([prefix + n for n in where], what)
        self._where = {prefix + n: (file, n) for n, file in where.items()}

    def _entry(self, name):
        file, stored = self._where[name]
        return self._open(file).entries[stored]

    def _shape(self, name):
        return self._entry(name).shape

    def _dtype(self, name):
        return self._entry(name).dtype

    def _get(self, name):
        file, stored = self._where[name]
        return self._open(file).get(stored)

    def spans(self, name):
        file, stored = self._where[name]
        return self._open(file).spans(stored)


def folder_source(model_dir: str, what: str, weights_name: str = DIFFUSERS_WEIGHTS, prefix: str = "") -> FileSource:
    return FileSource(tensor_files(model_dir, what, weights_name), what, prefix)


def file_keys(path: str, what: str) -> List[str]:
    try:
        with TensorFile(path) as f:
            return f.keys()
    except OSError as e:
        raise DataError(f"cannot read the {what} {path}: {e.strerror or e}") from None


class OriginalSource(Source):
    """The transformer of an original single-file checkpoint (model.diffusion_model.*), under diffusers names.

    The last group read stays split in memory, so q, k and v of one fused qkv cost one read."""

    def __init__(self, path: str, what: str = "base checkpoint"):
        keys = [k for k in file_keys(path, what) if k.startswith(PREFIX)]
        if not keys:
            raise DataError(f"{path} holds no SD3 transformer (no '{PREFIX}*' tensors); is it an SD3 / SD3.5 "
                            "single-file checkpoint?")
        self.path = path
        self.groups = groups_from_original(keys)
        self._part: Dict[str, Tuple[Group, int]] = {s: (g, i) for g in self.groups for i, s in enumerate(g.sources)}
        super().__init__(list(self._part), what)
        self._cache: Tuple[Optional[str], List[torch.Tensor]] = (None, [])

    def _entry(self, name):
        g, _ = self._part[name]
        return self._open(self.path).entries[g.key]

    def _shape(self, name):
        g, _ = self._part[name]
        shape = self._entry(name).shape
        if g.rule == CAT:
            if not shape or shape[0] % len(g.sources):
                raise DataError(f"'{g.key}' of the {self.what} has shape {shape}, which does not split into q, k, v")
            return (shape[0] // len(g.sources),) + shape[1:]
        return shape

    def _dtype(self, name):
        return self._entry(name).dtype

    def _get(self, name):
        g, i = self._part[name]
        if self._cache[0] != g.key:
            self._cache = (None, [])  # drop the previous group before reading the next
            self._cache = (g.key, split(g, self._open(self.path).get(g.key)))
        return self._cache[1][i]

    def spans(self, name):
        g, i = self._part[name]
        self._shape(name)  # a fused tensor that does not split is refused here, as when read
        return split_spans(g, self._open(self.path).spans(g.key), i)


class OtherKeys(FileSource):
    """Every tensor of a single file that is not under `PREFIX` (a bundled VAE and text encoders), unchanged."""

    def __init__(self, path: str, what: str = "base checkpoint"):
        names = [k for k in file_keys(path, what) if not k.startswith(PREFIX)]
        super().__init__({n: path for n in names}, what)
