"""The frozen SD3 transformer with peft LoRA adapters; nothing else is loaded."""
import json
import os
import sys
from typing import Callable, Dict, List

import torch

from shards.common.errors import DataError, UsageError
from shards.common.hub import component_dir
from shards.manifest import Manifest

from .config import LoraConfig


def load_transformer(root: str, dtype: torch.dtype, device: torch.device, quantize: str = "none"):
    from diffusers import SD3Transformer2DModel

    folder = component_dir(root, "transformer")
    if quantize != "none":
        files = weight_files(folder)
        if files:
            return load_quantized(folder, files, quantize, dtype, device)
    t = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    return freeze_and_place(t, dtype, device, quantize)


def weight_files(folder: str) -> Dict[str, str]:
    """Tensor name -> safetensors file of a diffusers model folder (one file or an indexed set); {} if the
    folder has no safetensors weights."""
    from shards.tensorfile import TensorFile

    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.exists(single):
        with TensorFile(single) as tf:
            return dict.fromkeys(tf.keys(), single)
    return {}


def load_quantized(folder: str, files: Dict[str, str], kind: str, dtype: torch.dtype, device: torch.device):
    """The transformer with its block linears quantized, read one tensor at a time: each block linear's weight
    is quantized as it arrives (on `device`), everything else is placed there in `dtype`. The host never holds
    more than one full-precision tensor, where loading the whole model first would hold all of it (16 GB for
    SD3.5 Large in bf16). Same weights, module names and quantization as `from_pretrained` + `quantize_blocks`."""
    from diffusers import SD3Transformer2DModel

    from shards.tensorfile import TensorFile

    with torch.device("meta"):  # the skeleton: shapes and module names, no memory
        t = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder))
    t.requires_grad_(False)
    wanted = set(t.state_dict())
    missing = sorted(wanted - set(files))
    if missing:
        raise DataError(f"{folder} lacks {len(missing)} of the transformer's tensors ({', '.join(missing[:3])}"
                        f"{', …' if len(missing) > 3 else ''}); it is not a complete SD3 transformer folder")
    readers = {}

    def get(name: str) -> torch.Tensor:
        path = files[name]
        if path not in readers:
            readers[path] = TensorFile(path)
        x = readers[path].get(name)
        return x.to(dtype) if x.is_floating_point() else x

    try:
        fill(t, kind, dtype, device, lambda name, shape: get(name))
    finally:
        for r in readers.values():
            r.close()
    return t


def fill(t, kind: str, dtype: torch.dtype, device: torch.device, tensor: Callable[[str, tuple], torch.Tensor]):
    """Give a transformer built on the meta device its tensors, one at a time, from `tensor(name, shape)`: each
    block linear quantized (`kind` nf4 / int8; "none": kept) as its weight arrives, everything else placed on
    `device`. Used by the loader (tensors from files) and the benchmarks (random tensors)."""
    for name, module in list(t.named_modules()):  # the block linears, each quantized as it is made
        replaced = False
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if kind != "none" and _quantized(full) and type(child) is torch.nn.Linear:
                bias = tensor(f"{full}.bias", tuple(child.bias.shape)) if child.bias is not None else None
                weight = tensor(f"{full}.weight", tuple(child.weight.shape))
                setattr(module, child_name, quantized_linear(kind, weight, bias, dtype, device))
                replaced = True
        if replaced:
            release_host_heap()
    for name, module in t.named_modules():  # everything else, in `dtype` on `device`
        prefix = name + "." if name else ""
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[pname] = torch.nn.Parameter(tensor(prefix + pname, tuple(p.shape)).to(device),
                                                               requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[bname] = tensor(prefix + bname, tuple(b.shape)).to(device)
    return t


def _quantized(module_name: str) -> bool:
    return module_name.startswith("transformer_blocks.")


def quantized_linear(kind: str, weight: torch.Tensor, bias, compute_dtype: torch.dtype, device: torch.device):
    """A frozen bitsandbytes nf4 / int8 layer holding `weight`, quantized as it moves to `device`. Built on the
    meta device first, so no full-precision weight of its own is ever allocated."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    with torch.device("meta"):
        if kind == "nf4":
            q = linear4bit_in_compute_dtype()(in_features, out_features, bias=bias is not None,
                                              compute_dtype=compute_dtype, quant_type="nf4")
        else:
            # threshold 6: LLM.int8()'s outlier columns in 16-bit, as transformers' default; 0 would quantize them too.
            q = linear8bit_saving_no_input()(in_features, out_features, bias=bias is not None,
                                             has_fp16_weights=False, threshold=6.0)
            q.compute_dtype = compute_dtype
    if kind == "nf4":
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        q.bias = torch.nn.Parameter(bias, requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes as the weight moves


def base_fingerprint(transformer, dtype: torch.dtype) -> dict:
    """The base transformer's content fingerprint (shards.common.fingerprint) as training holds it, taken before any LoRA
    is added; the LoRA file records it so that merge can tell when it folds the LoRA into another base."""
    from shards.common.fingerprint import transformer_fingerprint
    from shards.common.dtypes import STORAGE_DTYPES

    name = next(k for k, v in STORAGE_DTYPES.items() if v == dtype)
    return transformer_fingerprint(dict(transformer.named_parameters()).get, name)


def freeze_and_place(t, dtype: torch.dtype, device: torch.device, quantize: str = "none"):
    """Freeze the base, quantize its blocks if asked, move it to `device` (also used by bench.train_step)."""
    t.requires_grad_(False)
    if quantize != "none":
        quantize_blocks(t, quantize, dtype, device)  # before .to(device): only 4/8-bit weights reach the GPU
    return t.to(device)


def quantize_blocks(transformer, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the linear layers inside transformer blocks with bitsandbytes nf4 / int8 layers (QLoRA) on
    `device`, of a transformer already in memory (`load_transformer` reads and quantizes tensor by tensor).

    Done here rather than through diffusers' quantizer, which refuses to run without a GPU; layers
    outside the blocks (embedders, final layer) stay in `compute_dtype`, where precision matters most.
    """
    n = 0
    for parent_name, parent in list(transformer.named_modules()):
        if not _quantized(parent_name):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            bias = child.bias.data if child.bias is not None else None
            setattr(parent, child_name, quantized_linear(kind, child.weight.data, bias, compute_dtype, device))
            n += 1
    return n


def release_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`). Reading and quantizing tensor after
    tensor frees buffers of tens of MiB that glibc keeps for reuse but cannot reuse for the next, larger one:
    measured on SD3 Medium nf4, 1.6 GiB of the loader's 3.2 GiB peak RSS was such kept memory."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None
_LINEAR4BIT = None


def linear4bit_in_compute_dtype():
    """bitsandbytes' Linear4bit, returning its output in the compute dtype. Linear4bit casts its output back to
    its input's dtype, and under autocast that input is a LayerNorm's fp32 output: every activation after a
    quantized layer (and the LoRA branch beside it) would then be fp32, twice the bytes of bf16. The matmul
    itself already runs in the compute dtype, so the values are the same."""
    global _LINEAR4BIT
    if _LINEAR4BIT is None:
        import bitsandbytes as bnb

        class Linear4bitInComputeDtype(bnb.nn.Linear4bit):
            def forward(self, x):
                return super().forward(x.to(self.compute_dtype) if self.compute_dtype is not None else x)

        _LINEAR4BIT = Linear4bitInComputeDtype
    return _LINEAR4BIT


_LINEAR8BIT = None


def linear8bit_saving_no_input():
    """bitsandbytes' Linear8bitLt, computing in the model's compute dtype and keeping nothing of its input for
    backward. bitsandbytes' int8 matmul keeps each input (and its outlier columns) on its autograd context for
    the weight gradient a frozen base never needs, where gradient checkpointing cannot see or free them:
    a checkpointed int8 run then holds every linear's input of the whole model. Here the int8 matmul runs
    without autograd, and backward multiplies by the dequantized weight (int8 rows times their scales / 127),
    the same product bitsandbytes' backward computes for the input's gradient."""
    global _LINEAR8BIT
    if _LINEAR8BIT is None:
        import bitsandbytes as bnb

        class Int8Linear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, layer):
                ctx.layer = layer
                with torch.no_grad():
                    return bnb.nn.Linear8bitLt.forward(layer, x)

            @staticmethod
            def backward(ctx, grad):
                layer = ctx.layer
                scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
                w = layer.weight.data.to(grad.dtype) * (scales.to(grad.dtype)[:, None] / 127)
                return grad @ w, None

        class Linear8bitLtNoSavedInput(bnb.nn.Linear8bitLt):
            compute_dtype = None

            def forward(self, x):
                if self.compute_dtype is not None:
                    x = x.to(self.compute_dtype)
                if torch.is_grad_enabled() and x.requires_grad:
                    return Int8Linear.apply(x, self)
                return super().forward(x)

        _LINEAR8BIT = Linear8bitLtNoSavedInput
    return _LINEAR8BIT


def scheduler_config(root: str) -> dict:
    path = os.path.join(component_dir(root, "scheduler"), "scheduler_config.json")
    with open(path) as f:
        return json.load(f)


def lora_module_names(transformer, cfg: LoraConfig) -> List[str]:
    """Full names of the linear layers inside transformer blocks that the targets (and blocks) select."""
    targets = cfg.target_names()
    found, used = [], set()
    for name, m in transformer.named_modules():
        if not name.startswith("transformer_blocks.") or not hasattr(m, "weight") or m.weight is None:
            continue
        if not isinstance(m, torch.nn.Linear) and type(m).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        if cfg.blocks is not None and int(name.split(".")[1]) not in cfg.blocks:
            continue
        hit = [t for t in targets if name.endswith("." + t)]
        if hit:
            found.append(name)
            used.update(hit)
    # An explicit list is checked name by name; a preset only as a whole (the last block, for one,
    # has no to_add_out, so `attn` on lora.blocks=[last] is still fine).
    unmatched = [t for t in targets if t not in used] if not isinstance(cfg.targets, str) or not found else []
    if unmatched:
        known = sorted({".".join(n.split(".")[2:]) for n, m in transformer.named_modules()
                        if n.startswith("transformer_blocks.0.") and hasattr(m, "weight")
                        and (isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear"))})
        where = f" in blocks {cfg.blocks}" if cfg.blocks is not None else ""
        raise UsageError(f"lora.targets: {', '.join(unmatched)} match(es) no linear layer{where}; "
                         f"names that do: {', '.join(known)}")
    return found


def add_lora(transformer, cfg: LoraConfig) -> List[torch.nn.Parameter]:
    """Add LoRA (B = 0) to every selected module; returns the trainable parameters."""
    from peft import LoraConfig as PeftLoraConfig

    if cfg.blocks is not None:
        n = len(transformer.transformer_blocks)
        bad = [b for b in cfg.blocks if not 0 <= b < n]
        if bad:
            raise UsageError(f"lora.blocks: {bad} outside 0..{n - 1} (the transformer has {n} blocks)")
    names = lora_module_names(transformer, cfg)
    # peft wraps bitsandbytes layers with its own LoRA layers (whose merge dequantizes, adds and requantizes)
    # only when the model says it is quantized; otherwise a plain LoRA layer would merge into packed bytes.
    kinds = {c.__name__ for m in transformer.modules() for c in type(m).__mro__}
    if "Linear4bit" in kinds:
        transformer.is_loaded_in_4bit = True
    if "Linear8bitLt" in kinds:
        transformer.is_loaded_in_8bit = True
    transformer.add_adapter(PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
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


def check_shard_set(manifest: Manifest, transformer_config) -> None:
    """Refuse a shard set that was computed for another model family, naming the value that differs."""
    c = transformer_config
    emb = manifest.embeddings
    wrong = []
    if manifest.latent_channels != c.in_channels:
        wrong.append(f"latent channels {manifest.latent_channels} vs transformer in_channels {c.in_channels}")
    if emb.prompt_embeds_dim != c.joint_attention_dim:
        wrong.append(f"prompt embedding width {emb.prompt_embeds_dim} vs joint_attention_dim {c.joint_attention_dim}")
    if emb.pooled_dim != c.pooled_projection_dim:
        wrong.append(f"pooled width {emb.pooled_dim} vs pooled_projection_dim {c.pooled_projection_dim}")
    f = manifest.vae.downsample_factor * c.patch_size
    too_big = [b for b in manifest.buckets if max(int(x) for x in b.split("x")) // f > c.pos_embed_max_size]
    if too_big:
        wrong.append(f"buckets {', '.join(too_big)} exceed the transformer's position grid "
                     f"({c.pos_embed_max_size} patches = {c.pos_embed_max_size * f} px a side)")
    if wrong:
        raise DataError(f"shard set was made for another model ({manifest.model.path}): "
                        + "; ".join(wrong) + "; run precompute with this model.path")


def warn_if_other_vae(manifest: Manifest, root: str) -> None:
    """Latents from another VAE fit the shapes but not the model; the fingerprints tell."""
    from shards.common.fingerprint import folder_fingerprint

    recorded = manifest.model.components.get("vae")
    vae = os.path.join(root, "vae")
    if recorded and os.path.isdir(vae) and folder_fingerprint(vae) != recorded:
        print(f"train: warning: the shard set's latents come from another VAE than {vae} "
              f"(shard set made from {manifest.model.path}); check that this is intended", file=sys.stderr)
