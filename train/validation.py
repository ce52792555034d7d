"""Validation images during training: the shard set's validation prompts, sampled and saved as a PNG grid."""
import os

from tqdm import tqdm

from shards.errors import UsageError

from .config import TrainConfig
from .sampling import generate, load_vae_decoder, save_grid


class Validator:
    """Sample images for the shard set's validation prompts and save them as a PNG grid."""

    def __init__(self, cfg: TrainConfig, manifest: dict, extras: dict, root: str, sched: dict, device, dtype,
                 transformer_config):
        self.cfg, self.sched, self.dtype = cfg.validation, sched, dtype
        self.prompts = manifest["extras"].get("validation_prompts", [])
        self.embeds = (extras["validation_prompt_embeds"].float(), extras["validation_pooled_prompt_embeds"].float())
        self.empty = (extras["empty_prompt_embeds"].float()[None], extras["empty_pooled_prompt_embeds"].float()[None])
        self.enabled = self.cfg.enabled and bool(self.prompts)
        if self.cfg.enabled and not self.prompts:
            tqdm.write("train: the shard set has no validation prompts (precompute validation.prompts), "
                       "so no sample images will be made")
        if self.enabled:
            h, w = self.cfg.height, self.cfg.width
            if not h:
                common = max(manifest["buckets"].items(), key=lambda kv: kv[1])[0]
                h, w = (int(x) for x in common.split("x"))
            limit = transformer_config.pos_embed_max_size * transformer_config.patch_size * \
                manifest["vae"]["downsample_factor"]
            if max(h, w) > limit:
                raise UsageError(f"validation size {h}x{w} is larger than this transformer's position grid "
                                 f"allows ({limit} px a side); lower validation.height/width")
            self.size = (h, w)
            self.vae = load_vae_decoder(root, device)
            self.dir = os.path.join(cfg.out.dir, "samples")

    def __call__(self, transformer, step: int):
        if not self.enabled:
            return None
        v = self.cfg
        images = generate(transformer, self.vae, self.sched, *self.embeds, *self.empty, *self.size, v.steps,
                          v.guidance, v.seed, self.dtype)
        return save_grid(images, self.prompts, os.path.join(self.dir, f"step-{step:06d}.png"),
                         f"training step {step}; sampler: {v.steps} Euler steps, guidance {v.guidance}, seed {v.seed}")
