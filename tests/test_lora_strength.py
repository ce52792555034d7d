"""The released LoRA has the trained strength in every loader: diffusers (which reads the header's alpha) and
ComfyUI / Forge / SwarmUI (which ignore safetensors headers and apply `B @ A` as it is)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_merge import merge, merged_weights

RANK = 4


def _trainer_transformer(model, alpha, seed=3):
    """The tiny transformer with the trainer's own LoRA (rank 4, this alpha) and non-zero, random A and B."""
    from diffusers import SD3Transformer2DModel

    from train.config import LoraConfig
    from train.model import add_lora

    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(model, "transformer"))
    add_lora(transformer, LoraConfig(rank=RANK, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return transformer.eval()


def _probe(transformer):
    g = torch.Generator().manual_seed(11)
    cfg = transformer.config
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
                           encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                           pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                           timestep=torch.tensor([500.0]), return_dict=False)[0]


@pytest.mark.parametrize("alpha", [RANK / 2, RANK, 2 * RANK])
def test_released_lora_has_the_trained_strength_in_every_loader(alpha, tiny_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    from train.lora_file import save_lora

    trained = _trainer_transformer(tiny_model, alpha)
    path = save_lora(str(tmp_path / "new"), trained, {"rank": RANK, "alpha": alpha})
    with safe_open(path, "pt") as f:
        header = f.metadata()
    adapter, info = json.loads(header["lora_adapter_metadata"]), json.loads(header["shardtune"])
    assert adapter["transformer.lora_alpha"] == adapter["transformer.r"] == RANK
    assert info["alpha"] == alpha and info["scale_folded_into_lora_B"] == alpha / RANK

    # (b) B @ A of the file, the rule of a loader that reads no header, is the trained delta alpha/rank * B @ A.
    released = load_file(path)
    peft_state = get_peft_model_state_dict(trained)
    a_keys = [k for k in peft_state if k.endswith(".lora_A.weight")]
    assert len(a_keys) == 15
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        want = alpha / RANK * peft_state[b_key] @ peft_state[a_key]
        got = released[f"transformer.{b_key}"] @ released[f"transformer.{a_key}"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(released[f"transformer.{a_key}"], peft_state[a_key])  # A as trained

    # (a) diffusers' load_lora_weights gives the trainer's own model.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(os.path.dirname(path))
    torch.testing.assert_close(_probe(pipe.transformer), _probe(trained), rtol=1e-5, atol=1e-6)

    # (c) merging the file equals merging the file diffusers' own save_lora_weights writes (alpha in the header).
    old = tmp_path / "old"
    StableDiffusion3Pipeline.save_lora_weights(
        str(old), transformer_lora_layers=peft_state,
        transformer_lora_adapter_metadata=trained.peft_config["default"].to_dict())
    new_w, old_w = (merged_weights(merge(tiny_model, p, tmp_path / f"m-{n}")) for n, p in (("new", path), ("old", old)))
    assert new_w.keys() == old_w.keys()
    for k in new_w:
        torch.testing.assert_close(new_w[k], old_w[k], rtol=1e-6, atol=1e-7)
    if alpha != RANK:  # the old file without its header, as ComfyUI reads it, would be off by alpha / rank
        legacy = load_file(os.path.join(old, "pytorch_lora_weights.safetensors"))
        b_key = f"transformer.{a_keys[0].replace('.lora_A.', '.lora_B.')}"
        assert not torch.allclose(legacy[b_key], released[b_key])
