"""The shard set format: writer, reader, manifest, verification (see DESIGN.md)."""
from .format import FORMAT_VERSION
from .reader import read_extras, read_manifest, read_rejected, read_samples
from .writer import ShardSetWriter

__all__ = ["FORMAT_VERSION", "ShardSetWriter", "read_extras", "read_manifest", "read_rejected", "read_samples"]
