"""kohya-format SD3 LoRAs (what ComfyUI / Forge / sd-scripts use) <-> diffusers/peft SD3 transformer LoRAs.

kohya keys are `lora_unet_<original SD3 module, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(scale alpha / rank; no alpha means alpha = rank), with the original single-file module names of
merge/sd3_keys.py, e.g. `lora_unet_joint_blocks_0_x_block_attn_qkv`.

- A diffusers q/k/v triple becomes one fused qkv LoRA: down = cat(A_q, A_k, A_v), up = block-diagonal of
  B_q, B_k, B_v, each B multiplied by its scale over the fused scale (1 when all three scales agree, as in
  any peft LoRA without per-module alphas). The fused alpha is scale * fused rank, so a triple of rank r and
  alpha a becomes rank 3r, alpha 3a, and up @ down * scale holds exactly the three deltas. A triple with
  a member missing gets zero rows for it.
- A fused kohya qkv LoRA of rank R becomes three diffusers LoRAs of rank R sharing its down, with the
  three row blocks of up and its alpha: the same deltas, exactly.
- The adaLN modulations the original stores as (shift, scale) (`final_layer.adaLN_modulation.1` and the
  last block's `context_block.adaLN_modulation.1`) have their up rows swapped, like the base weights. The
  last block is recognised by shape: its context modulation (an AdaLayerNormContinuous) has 2 outputs per
  input, every other block's (AdaLayerNormZero) 6.

- sd-scripts' split_qkv layout (`<qkv name>.lora_down.0.weight` ... `.lora_up.2.weight`, one alpha; scale
  alpha / rank of one part) is read too. sd-scripts itself saves such LoRAs fused again, as above, but keeps
  the alpha of one part: a reader of the saved file (this one, ComfyUI, sd-scripts) divides it by the fused
  rank 3r, so the qkv deltas come out at 1/3 of their trained strength. `split_qkv_warning` says so.
- The conv LoRA sd-scripts puts on `x_embedder.proj` (`emb_dims`): a kh x kw down kernel and a 1x1 up kernel,
  folded as one conv kernel (LoraModule.delta).
- Text encoder LoRAs (`lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5, then the module path in the
  transformers model with '.' -> '_') are returned by sd-scripts prefix and kohya name, for
  merge/text_encoders.py to resolve against the encoders' own tensor names.
"""
import json
import re
from typing import Dict, List, Optional, Tuple

import torch

from shards.common.errors import DataError

from .lora_module import LoraModule, checked_pair, key_error
from .sd3_keys import BLOCK_KEYS, CAT, COPY, QKV_KEYS, SWAP, TOP_KEYS, original_name, swap_halves

KOHYA_PREFIX = "lora_unet_"
# sd-scripts' text encoder LoRAs: CLIP-L, CLIP-G, T5 (merge/text_encoders.py maps them to the encoders).
TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_")
_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
# sd-scripts' split_qkv modules hold q, k, v apart under the fused name (its saved files fuse them again).
_SPLIT_PARTS = tuple(f".lora_{d}.{i}.weight" for d in ("down", "up") for i in range(3))

# Original module paths (no prefix) -> (diffusers module path or q/k/v paths, rule), by kohya name.
_KOHYA_TOP = {orig.replace(".", "_"): (orig, diff, rule) for diff, (orig, rule) in TOP_KEYS.items()}
_KOHYA_BLOCK = {orig.replace(".", "_"): (orig, diff, COPY) for diff, orig in BLOCK_KEYS.items()}
_KOHYA_BLOCK.update({fused.replace(".", "_"): (fused, parts, CAT) for parts, fused in QKV_KEYS.values()})
_KOHYA_BLOCK_RE = re.compile(r"joint_blocks_(\d+)_(.+)")


def is_kohya(keys) -> bool:
    return any(k.startswith((KOHYA_PREFIX,) + TEXT_ENCODER_PREFIXES) for k in keys)


def kohya_name(original: str) -> str:
    """'joint_blocks.0.x_block.attn.qkv' -> 'lora_unet_joint_blocks_0_x_block_attn_qkv'."""
    return KOHYA_PREFIX + original.replace(".", "_")


def split_qkv_warning(path: str, header: Dict[str, str], fused_qkv: int, others: int, scale: float) -> Optional[str]:
    """One warning line for a file saved by sd-scripts with `split_qkv` (recorded in ss_network_args), or None.

    Trained, each of q, k, v has rank r and the scale alpha / r; the saved file fuses them into rank 3r with
    the same alpha, so alpha / rank readers apply alpha / 3r: a third. lora.scale x 3 gives the qkv deltas back
    their trained strength, and also triples every other module of the file, which was saved right."""
    try:
        args = json.loads(header.get("ss_network_args") or "{}")
    except ValueError:
        return None
    # sd-scripts' own test is the string "True" (network_args are strings); a JSON true means the same.
    if not isinstance(args, dict) or args.get("split_qkv") not in ("True", True) or not fused_qkv:
        return None
    line = (f"merge: warning: {path} was saved by sd-scripts with split_qkv, whose saved alpha makes every "
            f"alpha / rank reader (this merge, ComfyUI, sd-scripts itself) apply its {fused_qkv} fused qkv "
            f"LoRA{'s' if fused_qkv != 1 else ''} at 1/3 of the trained strength; lora.scale={3 * scale:g} for this "
            f"file (3 x {scale:g}) restores {'them' if fused_qkv != 1 else 'it'}")
    if others:
        line += f", but also triples its {others} other LoRA module{'s' if others != 1 else ''}"
    return line


def _is_last_context_modulation(module: str, down: torch.Tensor, up: torch.Tensor) -> bool:
    return module.endswith("norm1_context.linear") and up.shape[0] == 2 * down.shape[1]


def parse_kohya_module(name: str) -> Tuple[str, object, str]:
    """kohya module name (no part suffix) -> (original module, diffusers module or (q, k, v) modules, rule).

    The rule is COPY, SWAP or CAT; the last block's context modulation is COPY here (see module docs)."""
    rest = name[len(KOHYA_PREFIX):]
    if rest in _KOHYA_TOP:
        return _KOHYA_TOP[rest]
    m = _KOHYA_BLOCK_RE.fullmatch(rest)
    if m and m.group(2) in _KOHYA_BLOCK:
        i = m.group(1)
        orig, diff, rule = _KOHYA_BLOCK[m.group(2)]
        if rule == CAT:
            return f"joint_blocks.{i}.{orig}", tuple(f"transformer_blocks.{i}.{p}" for p in diff), CAT
        return f"joint_blocks.{i}.{orig}", f"transformer_blocks.{i}.{diff}", rule
    raise DataError(f"'{name}' is not an SD3 transformer module kohya LoRAs use (expected names like "
                    "lora_unet_joint_blocks_0_x_block_attn_qkv)")


def kohya_file(tensors: Dict[str, torch.Tensor], path: str, scale: float = 1.0
               ) -> Tuple[Dict[str, LoraModule], Dict[str, Dict[str, LoraModule]], int]:
    """A kohya SD3 LoRA state dict as (diffusers-named transformer LoraModules, text encoder LoraModules by
    sd-scripts prefix and kohya module name, how many fused qkv modules it has); scale = lora scale * alpha / rank."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        part = next((p for p in _PARTS + _SPLIT_PARTS if key.endswith(p)), None)
        ours = key.startswith((KOHYA_PREFIX,) + TEXT_ENCODER_PREFIXES)
        if not ours or part is None:
            if ours:
                raise DataError(f"{path}: '{key}' is not a kohya LoRA weight (expected .lora_down.weight, "
                                ".lora_up.weight or .alpha; DoRA, LoHa and LoKr are not supported)")
            raise key_error(path, key, kohya=True)
        groups.setdefault(key[: -len(part)], {})[part] = tensors[key]
    modules: Dict[str, LoraModule] = {}
    text: Dict[str, Dict[str, LoraModule]] = {}
    fused = 0
    for name, parts in groups.items():
        alpha = _alpha(path, name, parts)
        prefix = next((p for p in TEXT_ENCODER_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            if any(p in parts for p in _SPLIT_PARTS):
                raise DataError(f"{path}: '{name}.lora_down.0.weight': split parts are for fused qkv "
                                "transformer modules, not text encoder ones")
            down, up = _pair(path, name, parts)
            text.setdefault(prefix, {})[name] = LoraModule(name, down, up, _scale(scale, alpha, down))
            continue
        try:
            _, diff, rule = parse_kohya_module(name)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        if any(p in parts for p in _SPLIT_PARTS):
            modules.update(_split_qkv(path, name, parts, diff, rule, alpha, scale))
            continue
        down, up = _pair(path, name, parts)
        strength = _scale(scale, alpha, down)
        if rule == CAT:
            if up.shape[0] % 3:
                raise DataError(f"{path}: kohya module '{name}' has lora_up {tuple(up.shape)}, which has no "
                                "q, k, v row blocks")
            fused += 1
            for sub, block in zip(diff, up.chunk(3, dim=0)):
                modules[sub] = LoraModule(sub, down, block.contiguous(), strength)
            continue
        if rule == SWAP or _is_last_context_modulation(diff, down, up):
            if up.shape[0] % 2:
                raise DataError(f"{path}: kohya module '{name}' has lora_up {tuple(up.shape)}, which has no "
                                "(shift, scale) halves")
            up = swap_halves(up).contiguous()
        modules[diff] = LoraModule(diff, down, up, strength)
    return dict(sorted(modules.items())), {p: dict(sorted(m.items())) for p, m in sorted(text.items())}, fused


def _alpha(path: str, name: str, parts: Dict[str, torch.Tensor]) -> Optional[float]:
    alpha = parts.get(".alpha")
    if alpha is None:
        return None
    if alpha.numel() != 1 or not torch.isfinite(alpha).all():
        raise DataError(f"{path}: kohya module '{name}' has an alpha that is not one finite number")
    return float(alpha.float().reshape(()))


def _pair(path: str, name: str, parts: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    for needed in _PARTS[:2]:
        if needed not in parts:
            raise DataError(f"{path}: kohya module '{name}' has no {needed[1:]}")
    return checked_pair(path, name, parts[".lora_down.weight"], parts[".lora_up.weight"], "lora_down", "lora_up")


def _scale(scale: float, alpha: Optional[float], down: torch.Tensor) -> float:
    """lora.scale * alpha / rank, with kohya's rule that no alpha means alpha = rank."""
    rank = down.shape[0]
    return scale * (rank if alpha is None else alpha) / rank


def _split_qkv(path, name, parts, diff, rule, alpha, scale) -> Dict[str, LoraModule]:
    """sd-scripts' split_qkv layout: q, k, v each with its own down `.lora_down.<i>` and up `.lora_up.<i>`
    under the fused qkv name, one alpha, and the scale alpha / (rank of one part) as sd-scripts applies it."""
    if rule != CAT:
        raise DataError(f"{path}: kohya module '{name}' has split parts (.lora_down.0 ...) but is no fused qkv")
    missing = [p for p in _SPLIT_PARTS if p not in parts]
    if missing or any(p in parts for p in _PARTS[:2]):
        raise DataError(f"{path}: kohya module '{name}' mixes or lacks split-qkv parts "
                        f"({'no ' + missing[0][1:] if missing else 'fused and split weights'})")
    out = {}
    for i, sub in enumerate(diff):
        down, up = checked_pair(path, f"{name} part {i}", parts[f".lora_down.{i}.weight"], parts[f".lora_up.{i}.weight"],
                                "lora_down", "lora_up")
        out[sub] = LoraModule(sub, down, up, _scale(scale, alpha, down))
    return out


def _to_original(module: str) -> Tuple[str, str, Optional[int]]:
    try:
        orig, rule, pos = original_name(module + ".weight", 0)
    except DataError:
        raise DataError(f"the LoRA module '{module}' has no place in the original SD3 layout kohya LoRAs "
                        "use") from None
    return orig[: -len(".weight")], rule, pos


def to_kohya(modules: Dict[str, LoraModule]) -> Dict[str, torch.Tensor]:
    """diffusers-named LoraModules (scale = alpha / rank, e.g. read_lora(path)) -> a kohya state dict."""
    singles: List[Tuple[str, LoraModule, str]] = []
    fused: Dict[str, List[Optional[LoraModule]]] = {}
    for name, mod in sorted(modules.items()):
        orig, rule, pos = _to_original(name)
        if rule == CAT:
            fused.setdefault(orig, [None, None, None])[pos] = mod
        else:
            if _is_last_context_modulation(name, mod.down, mod.up):
                rule = SWAP
            singles.append((orig, mod, rule))
    out: Dict[str, torch.Tensor] = {}
    for orig, mod, rule in singles:
        up = swap_halves(mod.up).contiguous() if rule == SWAP else mod.up
        _put(out, kohya_name(orig), mod.down, up, mod.scale)
    for orig, parts in fused.items():
        present = [p for p in parts if p is not None]
        dtypes = {t.dtype for p in present for t in (p.down, p.up)}
        if len(dtypes) > 1 or len({p.down.shape[1] for p in present}) > 1:
            raise DataError(f"the q, k, v LoRAs of '{orig}' differ in dtype or input width and cannot be fused")
        dtype, height = dtypes.pop(), present[0].up.shape[0]
        scale = present[0].scale
        down = torch.cat([p.down for p in present], dim=0)
        up = torch.zeros(height * 3, down.shape[0], dtype=dtype)
        col = 0
        for i, p in enumerate(parts):
            if p is None:
                continue
            if p.up.shape[0] != height:
                raise DataError(f"the q, k, v LoRAs of '{orig}' have different output widths and cannot be fused")
            r = p.down.shape[0]
            block = p.up if p.scale == scale else (p.up.float() * (p.scale / scale)).to(dtype)
            up[i * height:(i + 1) * height, col:col + r] = block
            col += r
        _put(out, kohya_name(orig), down, up, scale)
    return dict(sorted(out.items()))


def _put(out, name, down, up, scale):
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)


def to_diffusers(modules: Dict[str, LoraModule]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """LoraModules -> (diffusers state dict, safetensors header) loadable by load_lora_weights.

    Each module's scale is folded into its lora_B and the header says alpha = rank, so loaders that ignore
    the header (ComfyUI, Forge) apply the same delta as diffusers. The most common rank becomes r; other
    ranks go into rank_pattern, with an equal alpha_pattern."""
    if not modules:
        raise DataError("the LoRA holds no transformer modules")
    state: Dict[str, torch.Tensor] = {}
    ranks = {}
    for name, mod in sorted(modules.items()):
        state[f"transformer.{name}.lora_A.weight"] = mod.down.clone()  # fused q, k, v share one down
        up = mod.up.clone() if mod.scale == 1.0 else (mod.up.float() * mod.scale).to(mod.up.dtype)
        state[f"transformer.{name}.lora_B.weight"] = up
        ranks[name] = mod.down.shape[0]
    counts: Dict[int, int] = {}
    for v in ranks.values():
        counts[v] = counts.get(v, 0) + 1
    r = max(counts, key=lambda v: (counts[v], v))
    others = {k: v for k, v in ranks.items() if v != r}
    config = {
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(modules),
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    meta = {f"transformer.{k}": v for k, v in config.items()}
    return state, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}
