"""Every shipped YAML loads into its stage's schema (unknown keys and wrong types would fail here)."""
import glob
import os

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))


def _schema(stage):
    if stage == "precompute":
        from precompute.config import PrecomputeConfig
        return PrecomputeConfig
    if stage == "train":
        from train.config import TrainConfig
        return TrainConfig
    from merge.config import MergeConfig
    return MergeConfig


def test_every_stage_has_a_tiny_and_a_real_preset():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS}
    for preset in ("tiny", "sd3-medium"):
        for stage in ("precompute", "train", "merge"):
            assert f"{preset}/{stage}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_shipped_config_loads(path, tiny_model, tmp_path):
    from omegaconf import OmegaConf

    from shards.config import load_config
    from shards.modelpath import looks_like_hub_id

    stage = os.path.splitext(os.path.basename(path))[0]
    # Paths in the presets point at outputs that need not exist yet; every other value must load as is.
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    overrides = {"precompute": [f"data.path={tmp_path}"], "train": [f"data.shards={tmp_path}"],
                 "merge": [f"lora.path={lora}"]}[stage]
    if not looks_like_hub_id(OmegaConf.load(path).model.path):
        overrides.append(f"model.path={tiny_model}")
    cfg = load_config(_schema(stage), ["--config", path, *overrides])
    assert cfg.out.dir
