"""A sample's tensors as stored (per the set's `SampleSpec`) and as handed out: `pack` for the writer,
`unpack` for every reader. v1 stores the view itself; v2 drops CLIP's zero padding, T5's zeros when the set
has no T5, and the latent std when asked to."""
from typing import Dict

import torch

from . import format as F
from .manifest import SampleSpec


def pack(spec: SampleSpec, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The view's tensors -> what `spec` stores. Refuses (ValueError) what the layout would lose: CLIP values
    outside clip_dim, or T5 values in a set stored without T5."""
    if spec.version == 1:
        return dict(tensors)
    out = {k: v for k, v in tensors.items() if k != "prompt_embeds"}
    if not spec.latent_std:
        out.pop("latent_std", None)
        out.pop("latent_std_flip", None)
    embeds = tensors["prompt_embeds"]
    clip, t5 = embeds[:spec.clip_tokens], embeds[spec.clip_tokens:]
    if clip[:, spec.clip_dim:].count_nonzero():
        raise ValueError(f"prompt_embeds: CLIP tokens have values beyond the set's clip_dim {spec.clip_dim}")
    out["clip_embeds"] = clip[:, :spec.clip_dim]
    if spec.t5:
        out["t5_embeds"] = t5
    elif t5.count_nonzero():
        raise ValueError("prompt_embeds: T5 tokens hold values, but the set is stored without T5")
    return out


def check_stored(spec: SampleSpec, stored: Dict[str, torch.Tensor]) -> None:
    """ValueError unless `stored` holds the text tensors `spec` stores, in its shapes (a wrong shape could
    otherwise broadcast into the view)."""
    if spec.version == 1:
        shape = spec.view_shapes()["prompt_embeds"]
        if "prompt_embeds" not in stored or tuple(stored["prompt_embeds"].shape) != shape:
            got = tuple(stored["prompt_embeds"].shape) if "prompt_embeds" in stored else "missing"
            raise ValueError(f"prompt_embeds is {got}, the manifest says {shape}")
        return
    shapes = {"clip_embeds": (spec.clip_tokens, spec.clip_dim), "t5_embeds": (spec.t5_tokens, spec.width)}
    for name, shape in shapes.items():
        if (name in stored) != (name == "clip_embeds" or spec.t5):
            raise ValueError(f"{name} is {'missing' if name not in stored else 'present in a set stored without it'}")
        if name in stored and tuple(stored[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(stored[name].shape)}, the manifest says {shape}")


def write_prompt_embeds(spec: SampleSpec, stored: Dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """Fill `out` [clip_tokens + t5_tokens, width] with the sample's prompt_embeds (a row of a batch, so a batch
    is built with one copy of each part, as stacking v1's tensors copies them)."""
    if "prompt_embeds" in stored:
        out.copy_(stored["prompt_embeds"])
        return
    ct, cd = spec.clip_tokens, spec.clip_dim
    out[:ct, :cd] = stored["clip_embeds"]
    out[:ct, cd:] = 0
    if spec.t5:
        out[ct:] = stored["t5_embeds"]
    else:
        out[ct:] = 0


def unpack(spec: SampleSpec, stored: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What `spec` stored -> the view (prompt_embeds bit-identical to what v1 stored)."""
    if spec.version == 1:
        return stored
    check_stored(spec, stored)
    out = {k: v for k, v in stored.items() if k not in F.V2_TEXT_TENSORS}
    embeds = torch.empty(spec.clip_tokens + spec.t5_tokens, spec.width, dtype=stored["clip_embeds"].dtype)
    write_prompt_embeds(spec, stored, embeds)
    out["prompt_embeds"] = embeds
    return out
