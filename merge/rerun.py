"""What a release was made from, recorded in it, so that the same merge command run again (a retried job)
finds it up to date instead of refusing or redoing the work.

The record is `shardtune-merge.json` in the release: the content settings (every key but those that only
say where or how files are placed), a fingerprint of the base as merge reads it (shards.common.fingerprint:
whole small files, sampled multi-GB ones) and the sha256 of every LoRA file.
"""
import json
import os
from typing import Optional, Sequence

from shards.common.atomic import write_bytes
from shards.common.config import flat_keys, to_dict
from shards.common.fingerprint import file_sha256, folder_fingerprint

from .config import MergeConfig

INPUTS_FILE = "shardtune-merge.json"
# Keys that change neither the release's bytes nor which inputs it is made of.
NOT_CONTENT = ("model.path", "out.dir", "out.overwrite", "out.link", "merge.verify", "merge.probe_max_params")


def merge_inputs(cfg: MergeConfig, base_path: str, lora_files: Sequence[str]) -> dict:
    """This merge's inputs: `base_path` is the local base (a single file, or the resolved pipeline folder)."""
    paths = ("lora.path", "transformer.path")  # their content is fingerprinted below, not their names
    config = {k: v for k, v in flat_keys(to_dict(cfg)).items() if k not in NOT_CONTENT and k not in paths}
    inputs = {"config": config, "base": folder_fingerprint(base_path), "loras": [file_sha256(p) for p in lora_files]}
    if cfg.transformer.path:  # a fully fine-tuned transformer replaces the base's: its content is an input too
        inputs["transformer"] = folder_fingerprint(cfg.transformer.folder())
    return inputs


def write_inputs(release_dir: str, inputs: dict) -> None:
    write_bytes(os.path.join(release_dir, INPUTS_FILE), json.dumps(inputs, indent=2, sort_keys=True).encode())


def recorded_inputs(out_dir: str) -> Optional[dict]:
    """The inputs an earlier release in out_dir recorded; None when it has no (readable) record."""
    try:
        with open(os.path.join(out_dir, INPUTS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
