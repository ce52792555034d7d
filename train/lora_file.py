"""Save the trained LoRA as diffusers' SD3 LoRA file (loads with StableDiffusion3Pipeline.load_lora_weights).

Keys are `transformer.<module>.lora_A.weight` / `lora_B.weight`. Each module's training scale
(alpha / rank) is folded into its lora_B and the header's peft config says `lora_alpha = r`, so every
loader applies the trained delta at full strength: diffusers reads the header (scale 1), while ComfyUI,
Forge and SwarmUI ignore safetensors headers and apply `B @ A` as it is. Folding into B alone, rather
than sqrt(scale) into each factor, keeps A as trained and is one multiply in fp32. The trained rank and
alpha stay in the `shardtune` header entry, with the folded scale, for model cards. Training checkpoints
keep peft's own form; only these release files are folded.
"""
import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import save

from shards.common.atomic import write_bytes
from shards.common.errors import DataError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"


def _jsonable(v):
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "value"):  # enums
        return v.value
    return v


def lora_state_dict(transformer) -> dict:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer)
    return {f"transformer.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def module_scales(transformer, adapter: str = "default") -> Dict[str, float]:
    """The scale peft multiplies each LoRA module's `B @ A` by in the forward (alpha / rank, or
    alpha / sqrt(rank) with rsLoRA, per-module patterns included), by module name."""
    return {name: float(m.scaling[adapter]) for name, m in transformer.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and adapter in m.scaling}


def release_state_dict(transformer) -> Tuple[Dict[str, torch.Tensor], Optional[float]]:
    """The LoRA with each module's scale folded into lora_B (fp32); returns it and the scale all modules
    share (None where they differ)."""
    state, scales = lora_state_dict(transformer), module_scales(transformer)
    for key in state:
        if key.endswith(".lora_B.weight"):
            state[key] = state[key] * scales[key[len("transformer."):-len(".lora_B.weight")]]
    common = set(scales.values())
    return state, common.pop() if len(common) == 1 else None


def released_adapter_config(transformer) -> dict:
    """peft's adapter config as a loader of the folded file must apply it: alpha = rank everywhere."""
    cfg = _jsonable(transformer.peft_config["default"].to_dict())
    cfg.update(lora_alpha=cfg["r"], alpha_pattern=dict(cfg.get("rank_pattern") or {}), use_rslora=False)
    return cfg


def save_lora(out_dir: str, transformer, info: dict, name: str = WEIGHT_NAME) -> str:
    """Atomically write `out_dir/pytorch_lora_weights.safetensors`; `info` = shardtune metadata."""
    os.makedirs(out_dir, exist_ok=True)
    state, folded = release_state_dict(transformer)
    adapter_meta = {f"transformer.{k}": v for k, v in released_adapter_config(transformer).items()}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True),
        "shardtune": json.dumps({**info, "scale_folded_into_lora_B": folded}, sort_keys=True),
    }
    path = os.path.join(out_dir, name)
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise DataError(f"the LoRA holds non-finite values ({broken[0]} and {len(broken) - 1} more); nothing was "
                        "saved: lower train.lr")
    write_bytes(path, save(state, metadata=metadata))
    return path
