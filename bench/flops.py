"""FLOPs of the SD3 transformer's forward and of a LoRA training step, and a device's measured matmul peak: what
the benchmark's MFU is made of."""
import time
from typing import Dict, Optional

import torch

from shards.common.errors import UsageError

from .measure import sync

TEXT_TOKENS = 77 + 256  # CLIP's 77 + T5's 256 (the SD3 pipeline's max_sequence_length)
MFU_DEFINITION = ("MFU = B·(2·F_dense + 3·F_attn) / (t_step · peak): F per sample from bench.flops.flop_parts "
                  "(2 FLOPs per multiply-add); the frozen base needs only activation gradients (one matmul per "
                  "linear, two per attention matmul); full fine-tuning rows: B·3·(F_dense + F_attn), the weights' "
                  "gradients included; LoRA and checkpoint recompute not counted; peak = "
                  "a measured square matmul on this device")



def flop_parts(config, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> Dict[str, int]:
    """Forward FLOPs per sample of diffusers' SD3Transformer2DModel, split into "dense" (linear layers and
    the patchify conv) and "attention" (the two batched matmuls QKᵀ and softmax·V); 2 FLOPs per multiply-add.

    Norms, activations, softmax, the position-table add and qk_norm are elementwise and not counted.
    """
    c = dict(config)
    p, d = c["patch_size"], c["num_attention_heads"] * c["attention_head_dim"]
    if height <= 0 or width <= 0 or height % (8 * p) or width % (8 * p):
        raise UsageError(f"image size {height}x{width} must be positive multiples of {8 * p} "
                         f"(VAE factor 8 × patch size {p})")
    n_img = (height // 8 // p) * (width // 8 // p)  # image tokens
    n_txt, s = text_tokens, n_img + text_tokens  # text tokens; the joint sequence
    dual = set(c.get("dual_attention_layers") or ())
    out_channels = c.get("out_channels") or c["in_channels"]

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    dense = (linear(n_img, c["in_channels"] * p * p, d)  # patchify conv = one linear per p×p patch
             + linear(n_txt, c["joint_attention_dim"], c["caption_projection_dim"])  # context_embedder
             + linear(1, 256, d) + linear(1, d, d)  # timestep MLP on the 256-wide sinusoidal embedding
             + linear(1, c["pooled_projection_dim"], d) + linear(1, d, d))  # pooled-text MLP
    attention = 0
    for i in range(c["num_layers"]):
        last = i == c["num_layers"] - 1  # context_pre_only: no to_add_out, no ff_context
        dense += linear(1, d, (9 if i in dual else 6) * d)  # norm1: AdaLayerNormZero (SD35 ...ZeroX: 9 chunks)
        dense += linear(1, d, (2 if last else 6) * d)  # norm1_context: AdaLayerNormContinuous in the last block
        dense += linear(n_img, d, 4 * d)  # to_q, to_k, to_v, to_out.0
        dense += linear(n_txt, d, (3 if last else 4) * d)  # add_q/k/v_proj (+ to_add_out)
        dense += 2 * linear(n_img, d, 4 * d)  # ff: d -> 4d -> d
        if not last:
            dense += 2 * linear(n_txt, d, 4 * d)  # ff_context
        attention += 2 * 2 * s * s * d  # QKᵀ and softmax·V over the joint sequence, all heads together
        if i in dual:  # attn2: image-only self-attention
            dense += linear(n_img, d, 4 * d)
            attention += 2 * 2 * n_img * n_img * d
    dense += linear(1, d, 2 * d) + linear(n_img, d, p * p * out_channels)  # norm_out modulation, proj_out
    return {"dense": dense, "attention": attention}


def forward_flops(config, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> int:
    """Forward FLOPs per sample (matmuls and attention, 2 per multiply-add); SD3 Medium, 1024², 154 text
    tokens: 8.44 TFLOP."""
    return sum(flop_parts(config, height, width, text_tokens).values())


def train_step_flops(config, height: int, width: int, text_tokens: int = TEXT_TOKENS, batch: int = 1,
                     full: bool = False) -> int:
    """Model FLOPs of one LoRA training step: forward + backward of the frozen base, B·(2·F_dense + 3·F_attn);
    `full` (every weight trained): the weights' gradients add one matmul per linear layer, B·3·(F_dense + F_attn).

    The base weights get no gradient, so backward costs one matmul per linear layer (the activation
    gradient) and, for attention, the four matmuls of dQ, dK, dV and dP against the forward's two. This is
    the work a step must do however it is run: LoRA's own FLOPs (about 2·rank/width of the targeted layers)
    and the forward that gradient checkpointing runs again are not counted, as MFU conventionally does.
    (The "3 × forward" rule of full fine-tuning would count weight gradients this step never computes.)
    """
    f = flop_parts(config, height, width, text_tokens)
    return batch * ((3 if full else 2) * f["dense"] + 3 * f["attention"])


def matmul_peak_flops(device, dtype: Optional[torch.dtype] = None, size: Optional[int] = None,
                      repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul on `device`: the best of `repeats` timed batches after a warm-up.

    CUDA: bf16 (the dtype of the train rows) at 8192², ten matmuls per timed batch. CPU: fp32 (what the
    trainer uses there) at 1024², one per batch, so it takes well under a second.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n, inner = size or (8192 if cuda else 1024), 10 if cuda else 1
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2 if cuda else 1):  # warm-up: kernel choice, clocks, allocator
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * inner / best
