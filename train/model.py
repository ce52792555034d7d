"""The frozen SD3 transformer with peft LoRA adapters; nothing else is loaded."""
import json
import os
import sys
from typing import List

import torch

from shards.errors import DataError, UsageError
from shards.modelpath import component_dir

from .config import LoraConfig


def load_transformer(root: str, dtype: torch.dtype, device: torch.device):
    from diffusers import SD3Transformer2DModel

    t = SD3Transformer2DModel.from_pretrained(component_dir(root, "transformer"), torch_dtype=dtype)
    t.requires_grad_(False)
    return t.to(device)


def scheduler_config(root: str) -> dict:
    path = os.path.join(component_dir(root, "scheduler"), "scheduler_config.json")
    with open(path) as f:
        return json.load(f)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def add_lora(transformer, cfg: LoraConfig) -> List[torch.nn.Parameter]:
    """Add LoRA (B = 0) to every module matching a target; returns the trainable parameters."""
    from peft import LoraConfig as PeftLoraConfig

    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    unmatched = [t for t in cfg.targets if not any(_matches(n, t) for n in names)]
    if unmatched:
        known = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()} | {"to_out.0"})
        raise UsageError(f"lora.targets: {', '.join(unmatched)} match(es) no linear layer of the transformer; "
                         f"names that do: {', '.join(known)}")
    transformer.add_adapter(PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
        init_lora_weights="gaussian",
    ))
    params = []
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params.append(p)
        elif p.requires_grad:
            raise AssertionError(f"{name} is trainable but is not a LoRA parameter")
    return params


def check_shard_set(manifest: dict, transformer_config) -> None:
    """Refuse a shard set that was computed for another model family, naming the value that differs."""
    c = transformer_config
    emb = manifest["embeddings"]
    wrong = []
    if manifest["latent_channels"] != c.in_channels:
        wrong.append(f"latent channels {manifest['latent_channels']} vs transformer in_channels {c.in_channels}")
    if emb["prompt_embeds_dim"] != c.joint_attention_dim:
        wrong.append(f"prompt embedding width {emb['prompt_embeds_dim']} vs joint_attention_dim {c.joint_attention_dim}")
    if emb["pooled_dim"] != c.pooled_projection_dim:
        wrong.append(f"pooled width {emb['pooled_dim']} vs pooled_projection_dim {c.pooled_projection_dim}")
    f = manifest["vae"]["downsample_factor"] * c.patch_size
    too_big = [b for b in manifest["buckets"] if max(int(x) for x in b.split("x")) // f > c.pos_embed_max_size]
    if too_big:
        wrong.append(f"buckets {', '.join(too_big)} exceed the transformer's position grid "
                     f"({c.pos_embed_max_size} patches = {c.pos_embed_max_size * f} px a side)")
    if wrong:
        raise DataError(f"shard set was made for another model ({manifest['model']['path']}): "
                        + "; ".join(wrong) + "; run precompute with this model.path")


def warn_if_other_vae(manifest: dict, root: str) -> None:
    """Latents from another VAE fit the shapes but not the model; the fingerprints tell."""
    from shards.fingerprint import folder_fingerprint

    recorded = manifest["model"].get("components", {}).get("vae")
    vae = os.path.join(root, "vae")
    if recorded and os.path.isdir(vae) and folder_fingerprint(vae) != recorded:
        print(f"train: warning: the shard set's latents come from another VAE than {vae} "
              f"(shard set made from {manifest['model']['path']}); check that this is intended", file=sys.stderr)
