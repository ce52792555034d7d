"""Diffusers SD3 transformer tensor names -> the original (single-file, SD3 / SD3.5 reference) layout.

The inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: pure name bookkeeping, no
tensors are read here. `plan(names)` groups the diffusers tensors into original tensors, each made by
one of three rules:

- `copy`: the one diffusers tensor, renamed;
- `swap`: the one diffusers tensor with its two halves along dim 0 exchanged (diffusers stores an
  AdaLayerNormContinuous as (scale, shift), the original as (shift, scale); the swap is its own inverse);
- `cat`: q, k, v concatenated along dim 0 into the fused `qkv` projection.

`vae_plan(names)` does the same for the VAE (diffusers AutoencoderKL -> LDM `first_stage_model.*`), whose
attention projections become 1x1 convolutions (rule `conv1x1`).
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from shards.common.errors import DataError

from shards.tensorfile import Span, slice_spans, spans_size

PREFIX = "model.diffusion_model."
COPY, SWAP, CAT = "copy", "swap", "cat"

# Non-block modules: diffusers module path -> (original module path, rule).
TOP_KEYS = {
    "pos_embed.proj": ("x_embedder.proj", COPY),
    "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", COPY),
    "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", COPY),
    "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", COPY),
    "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", COPY),
    "context_embedder": ("context_embedder", COPY),
    "proj_out": ("final_layer.linear", COPY),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAP),
}

# Inside transformer_blocks.i: diffusers module path -> original module path under joint_blocks.i.
BLOCK_KEYS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}

# Inside transformer_blocks.i: the projections fused into one qkv, in order q, k, v.
QKV_KEYS = {
    "attn": (("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
    "context": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
    "attn2": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv"),
}
_QKV_PART = {part: (fused, i) for parts, fused in QKV_KEYS.values() for i, part in enumerate(parts)}

_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Group:
    """One tensor of the original layout and the diffusers tensors it is made of."""
    key: str  # original name, with the model.diffusion_model. prefix
    sources: Tuple[str, ...]  # diffusers names: one for copy / swap, q, k, v for cat
    rule: str  # COPY, SWAP or CAT


def num_layers(names: Iterable[str]) -> int:
    """How many transformer blocks the names hold (highest block index + 1; 0 without blocks)."""
    found = [int(m.group(1)) for m in map(_BLOCK_RE.fullmatch, names) if m]
    return max(found) + 1 if found else 0


def original_name(name: str, layers: int) -> Tuple[str, str, Optional[int]]:
    """(original name without prefix, rule, position in the fused qkv or None) for one diffusers tensor name.

    `layers` is the transformer's block count: the last block's norm1_context is swapped.
    """
    if name == "pos_embed.pos_embed":
        return "pos_embed", COPY, None
    module, _, param = name.rpartition(".")
    if module in TOP_KEYS:
        new, rule = TOP_KEYS[module]
        return f"{new}.{param}", rule, None
    m = _BLOCK_RE.fullmatch(module)
    if m:
        i, inner = int(m.group(1)), m.group(2)
        if inner in _QKV_PART:
            fused, pos = _QKV_PART[inner]
            return f"joint_blocks.{i}.{fused}.{param}", CAT, pos
        if inner in BLOCK_KEYS:
            # The last block is context_pre_only: its context modulation is an AdaLayerNormContinuous.
            rule = SWAP if inner == "norm1_context.linear" and i == layers - 1 else COPY
            return f"joint_blocks.{i}.{BLOCK_KEYS[inner]}.{param}", rule, None
    raise DataError(f"the base transformer tensor '{name}' has no place in the original SD3 single-file "
                    "layout; out.format=single_file supports SD3 / SD3.5 transformers only")


def plan(names: Iterable[str]) -> List[Group]:
    """The original-layout tensors for a complete set of diffusers SD3 transformer tensor names, sorted by key.

    Refuses names it cannot place and fused projections that lack q, k or v.
    """
    names = sorted(names)
    layers = num_layers(names)
    singles: Dict[str, Group] = {}
    fused: Dict[str, List[Optional[str]]] = {}
    for name in names:
        new, rule, pos = original_name(name, layers)
        if rule == CAT:
            fused.setdefault(new, [None, None, None])[pos] = name
        else:
            singles[new] = Group(PREFIX + new, (name,), rule)
    groups = list(singles.values())
    for new, parts in fused.items():
        if None in parts:
            have = ", ".join(p for p in parts if p)
            raise DataError(f"the base transformer has {have} but not all of q, k and v, which the original "
                            f"layout fuses into '{new}'")
        groups.append(Group(PREFIX + new, tuple(parts), CAT))
    return sorted(groups, key=lambda g: g.key)


# The same tables backwards: original module path -> diffusers module path(s) and rule.
_TOP_BACK = {orig: (diff, rule) for diff, (orig, rule) in TOP_KEYS.items()}
_BLOCK_BACK = {orig: diff for diff, orig in BLOCK_KEYS.items()}
_QKV_BACK = {fused: parts for parts, fused in QKV_KEYS.values()}
_JOINT_RE = re.compile(r"joint_blocks\.(\d+)\.(.+)")
_LAST_CONTEXT_MODULATION = "context_block.adaLN_modulation.1"


def groups_from_original(keys: Iterable[str]) -> List[Group]:
    """The groups `plan` would make, from the keys of an original checkpoint (with PREFIX; others ignored).

    So an original file is read under diffusers names: each key's tensor is `split` into its sources."""
    keys = sorted(k for k in keys if k.startswith(PREFIX))
    found = [int(m.group(1)) for m in (_JOINT_RE.match(k[len(PREFIX):]) for k in keys) if m]
    layers = max(found) + 1 if found else 0
    groups = []
    for key in keys:
        name = key[len(PREFIX):]
        if name == "pos_embed":
            groups.append(Group(key, ("pos_embed.pos_embed",), COPY))
            continue
        module, _, param = name.rpartition(".")
        if module in _TOP_BACK:
            diff, rule = _TOP_BACK[module]
            groups.append(Group(key, (f"{diff}.{param}",), rule))
            continue
        m = _JOINT_RE.fullmatch(module)
        if m:
            i, inner = int(m.group(1)), m.group(2)
            if inner in _QKV_BACK:
                groups.append(Group(key, tuple(f"transformer_blocks.{i}.{p}.{param}" for p in _QKV_BACK[inner]), CAT))
                continue
            if inner in _BLOCK_BACK:
                rule = SWAP if inner == _LAST_CONTEXT_MODULATION and i == layers - 1 else COPY
                groups.append(Group(key, (f"transformer_blocks.{i}.{_BLOCK_BACK[inner]}.{param}",), rule))
                continue
        raise DataError(f"the checkpoint tensor '{key}' is not part of an SD3 / SD3.5 transformer this stage knows")
    return groups


def split(group: Group, t: torch.Tensor) -> List[torch.Tensor]:
    """The inverse of `combine`: the source tensors (in group.sources order) of an original tensor."""
    if group.rule == CAT:
        if t.dim() == 0 or t.shape[0] % len(group.sources):
            raise DataError(f"'{group.key}' has shape {tuple(t.shape)}, which does not split into q, k, v")
        return [p.contiguous() for p in t.chunk(len(group.sources), dim=0)]
    if group.rule == CONV1X1:
        return [t[:, :, 0, 0] if t.dim() == 4 else t]
    if group.rule == SWAP:
        if t.dim() == 0 or t.shape[0] % 2:
            raise DataError(f"'{group.key}' has shape {tuple(t.shape)}, which has no (shift, scale) halves")
        return [swap_halves(t).contiguous()]
    return [t]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' (scale, shift) <-> the original's (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def combine(group: Group, tensors: List[torch.Tensor]) -> torch.Tensor:
    """The original tensor of `group` from its source tensors (in group.sources order)."""
    if group.rule == CAT:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise DataError(f"{', '.join(group.sources)} have different dtypes ({', '.join(map(str, dtypes))}) "
                            f"and cannot be fused into '{group.key}'; set out.dtype")
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    if group.rule == CONV1X1:
        return t[:, :, None, None] if t.dim() == 2 else t
    return swap_halves(t).contiguous() if group.rule == SWAP else t


def split_spans(group: Group, spans: List[Span], i: int) -> List[Span]:
    """`split`, on bytes: where source i's bytes lie within the original tensor's (row-major, so a dim-0 chunk
    or half is a byte range)."""
    n = spans_size(spans)
    if group.rule == CAT:
        k = len(group.sources)
        return slice_spans(spans, i * n // k, (i + 1) * n // k)
    return _swapped(spans) if group.rule == SWAP else list(spans)


def combine_spans(group: Group, parts: List[List[Span]]) -> List[Span]:
    """`combine`, on bytes: the original tensor's bytes from its sources' (dim-0 concatenation = byte concatenation;
    a 1x1 convolution holds a linear weight's bytes as they are)."""
    if group.rule == CAT:
        return [sp for part in parts for sp in part]
    (spans,) = parts
    return _swapped(spans) if group.rule == SWAP else list(spans)


def _swapped(spans: List[Span]) -> List[Span]:
    half = spans_size(spans) // 2
    return slice_spans(spans, half, 2 * half) + slice_spans(spans, 0, half)


def output_shape(group: Group, shapes: List[Tuple[int, ...]]) -> Tuple[int, ...]:
    """The original tensor's shape from its sources' shapes (what `combine` gives, without the data)."""
    if group.rule == CAT:
        rest = {tuple(s[1:]) for s in shapes}
        if len(rest) > 1 or any(len(s) == 0 for s in shapes):
            raise DataError(f"{', '.join(group.sources)} have shapes {shapes} and cannot be fused into '{group.key}'")
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    (shape,) = shapes
    if group.rule == CONV1X1:
        return tuple(shape) + (1, 1) if len(shape) == 2 else tuple(shape)
    if group.rule == SWAP and (len(shape) == 0 or shape[0] % 2):
        raise DataError(f"'{group.sources[0]}' has shape {tuple(shape)}, which has no (scale, shift) halves")
    return tuple(shape)


def to_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole diffusers SD3 transformer state dict in the original layout (prefixed), all in memory."""
    return {g.key: combine(g, [state_dict[s] for s in g.sources]) for g in plan(state_dict)}


# --- The VAE (out.include=[vae]): diffusers AutoencoderKL -> the LDM layout under first_stage_model.
# The inverse of diffusers' `convert_ldm_vae_checkpoint`.

VAE_PREFIX = "first_stage_model."
CONV1X1 = "conv1x1"  # a diffusers Linear (2-D weight) stored as the LDM's 1x1 Conv2d (4-D weight)

_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RE = re.compile(r"(encoder|decoder)\.(?:(down_blocks|up_blocks)\.(\d+)\.(resnets\.\d+|downsamplers\.0|upsamplers\.0)"
                     r"|mid_block\.(resnets\.\d+|attentions\.0)|(conv_in|conv_out|conv_norm_out))\.(.+)")


def vae_up_blocks(names: Iterable[str]) -> int:
    found = [int(m.group(3)) for m in map(_VAE_RE.fullmatch, names) if m and m.group(2) == "up_blocks"]
    return max(found) + 1 if found else 0


def vae_original_name(name: str, up_blocks: int) -> Tuple[str, str]:
    """(LDM name without prefix, rule) for one diffusers AutoencoderKL tensor name; `up_blocks` is the decoder's count."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name, COPY
    m = _VAE_RE.fullmatch(name)
    if m:
        part, blocks, i, inner, mid, top, rest = m.groups()
        if top:
            return f"{part}.{_VAE_TOP[top]}.{rest}", COPY
        if mid and mid.startswith("resnets."):
            k = int(mid.split(".")[1])
            return f"{part}.mid.block_{k + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", COPY
        if mid:
            module, _, param = rest.rpartition(".")
            if module in _VAE_ATTN:
                rule = CONV1X1 if module != "group_norm" and param == "weight" else COPY
                return f"{part}.mid.attn_1.{_VAE_ATTN[module]}.{param}", rule
        elif blocks == "down_blocks":
            if inner.startswith("resnets."):
                j = inner.split(".")[1]
                return f"{part}.down.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", COPY
            if inner == "downsamplers.0":
                return f"{part}.down.{i}.downsample.{rest}", COPY
        else:  # the LDM numbers the decoder's up blocks from the lowest resolution: reversed
            n = up_blocks - 1 - int(i)
            if inner.startswith("resnets."):
                j = inner.split(".")[1]
                return f"{part}.up.{n}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", COPY
            if inner == "upsamplers.0":
                return f"{part}.up.{n}.upsample.{rest}", COPY
    raise DataError(f"the base VAE tensor '{name}' has no place in the LDM single-file layout; "
                    "out.include=[vae] supports the SD3 AutoencoderKL only")


def vae_plan(names: Iterable[str]) -> List[Group]:
    """The LDM-layout tensors (prefixed first_stage_model.) for a diffusers AutoencoderKL's tensor names, sorted."""
    names = sorted(names)
    up = vae_up_blocks(names)
    groups = []
    for name in names:
        new, rule = vae_original_name(name, up)
        groups.append(Group(VAE_PREFIX + new, (name,), rule))
    return sorted(groups, key=lambda g: g.key)


def vae_to_original(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole diffusers AutoencoderKL state dict in the LDM layout (prefixed), all in memory."""
    return {g.key: combine(g, [state_dict[s] for s in g.sources]) for g in vae_plan(state_dict)}
