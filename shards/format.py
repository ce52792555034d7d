"""Shard set format: names and fields shared by writer, reader and verifier (README, "The shard set").

v2 stores a sample's text embeddings at their own widths (CLIP's [77, 768+1280], T5's [T, 4096], no T5 at all
without it) and may leave out the latent std; readers hand out v1's view (`prompt_embeds` [77+T, width],
bit-identical to what v1 stored). Sets of both versions are read."""
import hashlib
import json

FORMAT_NAME = "shardtune-shards"
FORMAT_VERSION = 2  # what is written
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
EXTRAS = "extras.safetensors"
REJECTED = "rejected.jsonl"
RUN_STATE = "run.json"  # what an unfinished run was started with: config, model and plan fingerprints
SHARD_PATTERN = "shard-{:06d}.tar"
SIDECAR_PATTERN = "shard-{:06d}.json"  # a shard's record: what makes it complete, and what resume compares
MANIFEST_HASH = "manifest_sha256"


def is_run_state(name: str) -> bool:
    """run.json and the shard records: precompute's, for resuming and `shards combine`; a copy of the set made
    only for training may leave them out."""
    return name == RUN_STATE or (name.startswith("shard-") and name.endswith(".json"))

# Tensors every sample hands out (v1's view, whatever version stored it; `latent_std` unless the set left it
# out), and the optional flipped pair.
SAMPLE_TENSORS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")
OPTIONAL_TENSORS = ("latent_mean_flip", "latent_std_flip")
# What v2 stores in place of prompt_embeds.
V2_TEXT_TENSORS = ("clip_embeds", "t5_embeds")
SAMPLE_META = ("key", "caption", "source", "original_size", "crop_top_left", "bucket")

# Tensors of extras.safetensors.
EXTRAS_TENSORS = (
    "empty_prompt_embeds", "empty_pooled_prompt_embeds",
    "validation_prompt_embeds", "validation_pooled_prompt_embeds",
)


def producer() -> str:
    try:
        from importlib.metadata import version
        return f"shardtune {version('shardtune')}"
    except Exception:
        return "shardtune (not installed)"


def manifest_digest(manifest: dict) -> str:
    """The manifest's hash of its own content: sha256 of its canonical JSON without the `manifest_sha256`
    field (keys sorted, no whitespace, ASCII escapes), so it does not depend on how the file was indented."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
