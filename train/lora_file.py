"""Save the trained LoRA as diffusers' SD3 LoRA file (loads with StableDiffusion3Pipeline.load_lora_weights).

Keys are `transformer.<module>.lora_A.weight` / `lora_B.weight`. The peft adapter config goes into the
safetensors header under `lora_adapter_metadata`, as diffusers writes it, so a loader applies
alpha / rank exactly as in training. shardtune's own facts go under `shardtune`.
"""
import json
import os

import torch
from safetensors.torch import save

from shards.atomic import write_bytes
from shards.errors import DataError

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


def save_lora(out_dir: str, transformer, info: dict, name: str = WEIGHT_NAME) -> str:
    """Atomically write `out_dir/pytorch_lora_weights.safetensors`; `info` = shardtune metadata."""
    os.makedirs(out_dir, exist_ok=True)
    peft_cfg = _jsonable(transformer.peft_config["default"].to_dict())
    adapter_meta = {f"transformer.{k}": v for k, v in peft_cfg.items()}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True),
        "shardtune": json.dumps(info, sort_keys=True),
    }
    path = os.path.join(out_dir, name)
    state = lora_state_dict(transformer)
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise DataError(f"the LoRA holds non-finite values ({broken[0]} and {len(broken) - 1} more); nothing was "
                        "saved: lower train.lr")
    write_bytes(path, save(state, metadata=metadata))
    return path
