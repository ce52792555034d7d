"""The shard set format: writer, reader, manifest, verification (README, "The shard set").

The names below load their modules when first used, so that importing the package (as `python -m shards
inspect` does) costs no torch import."""
from .format import FORMAT_VERSION

_LAZY = {"read_extras": "reader", "read_samples": "reader", "read_manifest": "manifest", "read_rejected": "manifest",
         "ShardSetWriter": "writer"}
__all__ = ["FORMAT_VERSION", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
