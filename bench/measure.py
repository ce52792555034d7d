"""What every stage's benchmark (`make bench`) measures with: device sync, peak memory (CUDA allocator
or the process's peak RSS), out-of-memory detection, timing of repeated calls, and the published SD3
configs the benchmarks build at full size with random weights. It imports no stage, so each stage's
benchmark module can use it.
"""
import gc
import re
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from shards.gpu_margins import MIB

# Exact SD3Transformer2DModel configs of the published models; `tiny` is precompute/tiny.py's.
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048)
TRANSFORMER_CONFIGS = {
    "sd3-medium": dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192, qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(_SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=()),
    "tiny": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=80,
                 pos_embed_max_size=32, qk_norm=None, dual_attention_layers=()),
}


# Full-size configs of SD3's other components (transformers' CLIPTextModelWithProjection and T5EncoderModel,
# diffusers' AutoencoderKL), for the benchmarks that build them with random weights.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device, collect: bool = True) -> None:
    """Give back what the last measurement held (cycles too, unless `collect` is off: a full collection takes
    about 0.3 s with diffusers and transformers loaded), so the next one starts from an empty device."""
    if collect:
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def unless_oom(fn: Callable, device):
    """`fn()`, or None if the device ran out of memory; the device is emptied after either."""
    try:
        out = fn()
    except Exception as e:
        if not is_oom(e):
            raise
        out = None
    release(device)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux VmHWM (resettable, see `PeakMemory`), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MIB if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak memory since `reset()`: the CUDA allocator's peaks on a GPU, else the process's peak RSS
    (Linux VmHWM, which writing 5 to /proc/self/clear_refs resets; elsewhere the lifetime peak)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.since = "reset"
        except OSError:
            self.since = "process start"

    def read(self) -> Dict[str, float]:
        if self.device.type == "cuda":
            return {"peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / MIB,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / MIB}
        out = {"peak_rss_mb": peak_rss_mb()}
        if self.since != "reset":
            out["peak_rss_since"] = self.since
        return out


def timed_calls(fn: Callable, device, warmup: int, steps: int) -> List[float]:
    """Seconds of each of `steps` calls of `fn` after `warmup` untimed ones, the device synced around each."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def device_name(device) -> str:
    """`cpu` or the GPU's name as a file-name part, e.g. nvidia-h100-80gb-hbm3."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_peak(*peaks: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Key-wise maximum of several `PeakMemory.read()` results."""
    peaks = [p for p in peaks if p]
    return {k: max(p[k] for p in peaks if k in p) for k in peaks[0] if isinstance(peaks[0][k], (int, float))}
