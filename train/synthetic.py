"""The trainer's inputs without a model folder or a shard set, for train.fake_gpu (the tests of the CUDA paths)
and the benchmarks (bench.train_step, bench.memory): the config sections the step reads (at the trainer's
defaults), SD3's manifest and scheduler constants, and random batches of the real shapes."""
from types import SimpleNamespace

import torch

from shards.manifest import Counts, EmbeddingFacts, ExtrasEntry, Manifest, ModelFacts, VaeFacts

LORA_RANK = 16
# The manifest of an SD3 shard set holding no shard (what the objective reads from it: the VAE's factors, no
# flipped latents) and SD3's scheduler config.
BENCH_MANIFEST = Manifest(
    format_version=2, producer="shardtune benchmarks", model=ModelFacts(path="stabilityai/stable-diffusion-3-medium"),
    vae=VaeFacts(scaling_factor=1.5305, shift_factor=0.0609, downsample_factor=8), latent_channels=16,
    embeddings=EmbeddingFacts(prompt_embeds_dim=4096, clip_tokens=77, pooled_dim=2048), max_sequence_length=77,
    precisions={}, dtype="bf16", buckets={}, shards=[], counts=Counts(seen=0, written=0, rejected=0),
    extras=ExtrasEntry(), config={}, stored={"clip_dim": 2048, "t5": True, "latent_std": True})
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def bench_config(quantize: str = "none", checkpointing: bool = False, batch: int = 1, rank: int = LORA_RANK,
                 seed: int = 0) -> SimpleNamespace:
    """The sections of a TrainConfig that `TrainStep`, `Objective`, `prepare_lora` and `resolve_dtypes` read, at the
    trainer's defaults (a TrainConfig itself insists on a model folder and a shard set)."""
    from .config import DataConfig, FullConfig, LoraConfig, LossConfig, ModelConfig, TrainLoopConfig

    return SimpleNamespace(model=ModelConfig(quantize=quantize, gradient_checkpointing=checkpointing),
                           train=TrainLoopConfig(batch_size=batch, seed=seed), lora=LoraConfig(rank=rank), full=FullConfig(),
                           loss=LossConfig(), data=DataConfig())


def random_batch(config, resolution: int, batch: int, text_tokens: int, seed: int = 0, pin: bool = False) -> dict:
    """One batch as the trainer's loader yields it: bf16 tensors (the shard set's storage dtype) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    latent = (batch, config.in_channels, side, side)
    shapes = {"latent_mean": latent, "latent_std": latent, "prompt_embeds": (batch, text_tokens, config.joint_attention_dim),
              "pooled_prompt_embeds": (batch, config.pooled_projection_dim)}
    out = {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, shape in shapes.items()}
    out["latent_std"] = out["latent_std"].abs() * 0.1
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    out["keys"] = [f"random-{i}" for i in range(batch)]
    return out
