"""Train config schema."""
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from shards.common.config import check, check_choices, check_ranges, one_of
from shards.common.hub import check_model_path
from shards.manifest import is_url

from .flow import LOSS_WEIGHTING, TIMESTEP_SAMPLING

# The joint attention's projections, as diffusers' SD3 LoRA script names them (not SD3.5's image-only attn2).
ATTN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out"]
IMAGE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
DUAL_ATTN = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]  # SD3.5 Medium's first blocks
# Named target sets (lora.targets: NAME); the names are module-name suffixes inside transformer blocks.
TARGET_PRESETS = {
    "attn": ATTN_TARGETS,
    "attn_image": IMAGE_ATTN + DUAL_ATTN,
    "all_linear": ATTN_TARGETS + DUAL_ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                              "ff_context.net.2", "norm1.linear", "norm1_context.linear"],
}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
SEEDS = "[0, 4294967295]"
# The values each numeric key can take (a test checks that every numeric key of the schema is here).
RANGES = {
    "data.shuffle_buffer": "[1, inf)", "data.flip": "[0, 1]",
    "train.max_steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.grad_accum": "[1, inf)",
    "train.lr": "(0, inf)", "train.weight_decay": "[0, inf)", "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)", "train.adam_eps": "(0, inf)", "train.max_grad_norm": "(0, inf)",
    "train.warmup_steps": "[0, inf)", "train.ema": "[0, 1)", "train.ema_every": "[0, inf)",
    "train.max_bad_steps": "[1, inf)", "train.seed": SEEDS,
    "train.log_every": "[1, inf)",
    "full.blocks": "[0, inf)",
    "lora.rank": "[1, inf)", "lora.alpha": "(0, inf)", "lora.dropout": "[0, 1)", "lora.blocks": "[0, inf)",
    "loss.logit_mean": "(-inf, inf)", "loss.logit_std": "(0, inf)", "loss.mode_scale": "(-inf, inf)",
    "loss.shift": "(0, inf)", "loss.caption_dropout": "[0, 1]", "loss.prior_weight": "[0, inf)",
    "validation.every": "[0, inf)", "validation.steps": "[1, inf)", "validation.guidance": "[0, inf)",
    "validation.height": "[0, inf)", "validation.width": "[0, inf)", "validation.seed": SEEDS,
    "checkpoint.every": "[0, inf)", "checkpoint.keep": "[1, inf)",
}

SCHEDULES = ("constant", "cosine", "linear")
CHOICES = {
    "model.precision": ("auto", "bf16", "fp16", "fp32"), "model.quantize": ("none", "nf4", "int8"),
    "train.mixed_precision": ("auto", "bf16", "fp16", "no"), "train.optimizer": OPTIMIZERS,
    "train.lr_schedule": SCHEDULES, "train.mode": ("lora", "full"),
    "train.ema_device": ("auto", "device", "cpu"), "train.sharding": ("none", "fsdp"), "loss.timestep_sampling": TIMESTEP_SAMPLING, "loss.weighting": LOSS_WEIGHTING,
}
REQUIRED = ("model.path", "data.shards", "out.dir")
# What each key means, as `--help` prints it (a test checks that every key has one, and that README.md's
# tables name the same keys with the same defaults).
HELP = {
    "model.path": "diffusers SD3 folder or hub id",
    "model.revision": "hub revision",
    "model.precision": "frozen transformer weights: auto (bf16 on GPUs that compute in it, fp16 on older ones "
                       "such as T4 and V100, fp32 on CPU), bf16, fp16, fp32",
    "model.quantize": "nf4 or int8: the linear layers inside the blocks in bitsandbytes (QLoRA)",
    "model.gradient_checkpointing": "trade compute for memory",
    "model.compile": "torch.compile each transformer block",
    "data.shards": "shard set folder, URL (http(s)://…, pipe:CMD) or brace pattern (sets/part-{0..7}); several: "
                   "a,b (read together as one set) or a@3,b@1 (mixed by weight, each set cycling its own "
                   "epochs); they must agree on model and text settings; validation prompts come from the first",
    "data.shuffle_buffer": "samples in the seeded shuffle buffer (each epoch also shuffles the shard order)",
    "data.flip": "probability of training on the stored flipped latent, when the set has them",
    "out.dir": "output folder",
    "out.overwrite": "start over: delete the LoRA, metrics, samples and checkpoints of an earlier run in "
                     "out.dir (other files stay)",
    "resume": "auto: continue from the newest complete checkpoint in out.dir; none; or a step-NNNNNN folder",
    "checkpoint.every": "steps between checkpoints (0: only the final one)",
    "checkpoint.keep": "how many complete checkpoints to keep",
    "train.mode": "lora: train LoRA adapters on the frozen transformer; full: train the transformer's own weights "
                  "(all of them, or those full.blocks and full.include choose), written as out.dir/transformer",
    "train.sharding": "full mode with several processes: none (DDP: every process holds the whole model, its "
                      "gradient and optimizer state) or fsdp (torch FSDP2: each holds 1/N of them)",
    "train.fused_step": "full mode: apply each weight's update inside backward as soon as its gradient is "
                        "complete, and free that gradient, so the whole model's gradient never exists at once; "
                        "train.max_grad_norm then clips each weight's gradient by its own norm; one process, "
                        "train.grad_accum=1, no fp16",
    "full.blocks": "full mode: only these transformer block indices train, e.g. [8,9,10] (default: all blocks "
                   "and every other weight, unless full.include names some)",
    "full.include": "full mode: weights outside the chosen blocks that train too, as name patterns, e.g. "
                    "[norm_out, context_embedder, pos_embed.*]; a pattern matching no weight is an error",
    "train.max_steps": "optimizer steps",
    "train.batch_size": "samples per micro-batch (one bucket per batch)",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.optimizer": "adamw, adamw8bit (bitsandbytes), adafactor; bf16 weights (full mode on a GPU) take "
                       "every update by stochastic rounding",
    "train.lr": "learning rate",
    "train.lr_schedule": "constant, cosine or linear (to 0 at max_steps), after the warmup",
    "train.warmup_steps": "steps of linear warmup from 0 to train.lr",
    "train.weight_decay": "AdamW / Adafactor weight decay of the LoRA weights",
    "train.adam_beta1": "Adam first-moment decay",
    "train.adam_beta2": "Adam second-moment decay",
    "train.adam_eps": "Adam epsilon",
    "train.max_grad_norm": "gradient clipping",
    "train.ema": "decay of an EMA of the trained weights (e.g. 0.999), saved as "
                 "pytorch_lora_weights_ema.safetensors (full mode: transformer_ema/); 0 = off",
    "train.ema_device": "where the EMA is kept, in fp32: auto (full mode: cpu, sparing the GPU a second copy of "
                        "the weights; LoRA: the training device), device, cpu",
    "train.ema_every": "applied steps between EMA updates; each averages in that many steps' worth (decay^N), so "
                       "a host-side EMA copies the weights from the GPU once per N steps; 0 (auto): 1 for an EMA "
                       "on the training device, 10 on the host",
    "train.max_bad_steps": "non-finite steps in a row before the run saves a checkpoint and stops",
    "train.trackers": "accelerate trackers, e.g. [tensorboard] (the trackers extra installs it) or [wandb]; "
                      "logs go to out.dir/trackers",
    "train.mixed_precision": "autocast through accelerate: auto (bf16 on GPUs that compute in it, fp16 on older "
                             "ones, off on CPU), bf16, fp16 (with a "
                             "gradient scaler, on CPU too: a step whose gradients overflow is skipped and the "
                             "scale lowered), no",
    "train.seed": "seeds LoRA init, noise, timesteps and data order",
    "train.log_every": "steps between bringing the logged values to the host (one transfer for the interval; "
                       "metrics.jsonl still gets a line per step, the trackers and the progress bar are updated "
                       "then)",
    "train.device": "cuda if available, else cpu; or cpu, cuda, cuda:N",
    "train.deterministic": "deterministic kernels only, so two runs (or a resumed one) give bit-identical weights "
                           "on the same GPU; slower",
    "lora.rank": "rank r of each LoRA pair (B: out x r, A: r x in)",
    "lora.alpha": "the LoRA output is scaled by alpha / rank (the released file holds it in lora_B, so every "
                  "loader applies it)",
    "lora.dropout": "dropout on the LoRA input during training",
    "lora.targets": "a preset — attn (the 8 joint-attention projections to_q, to_k, to_v, to_out.0, add_q_proj, "
                    "add_k_proj, add_v_proj, to_add_out), attn_image (to_q/k/v/out.0), all_linear (attention, "
                    "feed-forward, adaLN) — or a list of module names, e.g. [to_q,to_v]; a listed name matching "
                    "nothing is an error",
    "lora.blocks": "only these transformer block indices, e.g. [0,1,2] (diffusers' --lora_blocks)",
    "loss.timestep_sampling": "logit_normal, mode, cosmap, uniform",
    "loss.logit_mean": "mean of the logit-normal timestep density",
    "loss.logit_std": "its standard deviation",
    "loss.mode_scale": "scale of the mode timestep density",
    "loss.weighting": "none, sigma_sqrt, cosmap",
    "loss.precondition_outputs": "target x0 with pred = out·(−σ) + noisy; false: target noise − x0",
    "loss.shift": "timestep shift; null = the scheduler's (3.0 for SD3)",
    "loss.caption_dropout": "probability of training a sample on the stored empty-prompt embeddings",
    "loss.prior_weight": "loss weight of class (prior-preservation) samples",
    "validation.enabled": "images for the shard set's validation prompts",
    "validation.every": "steps between validations (0: only at the end); above 0 the run also "
                             "validates before its first step: the base model's images",
    "validation.steps": "sampler steps of each validation image",
    "validation.guidance": "classifier-free guidance scale",
    "validation.seed": "seed of the validation noise (the same every validation)",
    "validation.height": "image size; 0 = the most common bucket",
    "validation.width": "image size; 0 = the most common bucket",
}


@dataclass
class ModelConfig:
    path: str = ""  # diffusers SD3 folder or hub id; only transformer/ and scheduler/ are read
    revision: Optional[str] = None
    precision: str = "auto"  # weights of the frozen transformer (HELP says how auto decides)
    quantize: str = "none"  # none | nf4 | int8: the frozen base in bitsandbytes (QLoRA)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer blocks


@dataclass
class DataConfig:
    shards: str = ""  # shard set folder or URL; several: "a,b" (read as one set) or "a@3,b@1" (mixed by weight)

    def weighted(self) -> List[tuple]:
        """(set, weight or None) for every set; brace patterns (sets-{00..07}) expand into several."""
        from braceexpand import braceexpand

        out = []
        for part in _split_outside_braces(self.shards):
            path, _, w = part.rpartition("@")
            try:  # an "@" not followed by a number belongs to the path (user@host in a URL)
                weight = float(w)
            except ValueError:
                path, weight = part, None
            out += [(p, weight) for p in braceexpand(path) if p]
        return out

    def sets(self) -> List[str]:
        return [p for p, _ in self.weighted()]

    def weights(self) -> Optional[List[float]]:
        """Sampling weights when any set has one (the others count 1), else None."""
        ws = [w for _, w in self.weighted()]
        return None if all(w is None for w in ws) else [1.0 if w is None else w for w in ws]
    shuffle_buffer: int = 256
    flip: float = 0.5  # probability of training on the stored flipped latent (when the set has them)


def _split_outside_braces(text: str) -> List[str]:
    """Split on commas that are not inside {...} (brace patterns use commas too)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


@dataclass
class OutConfig:
    dir: str = ""
    overwrite: bool = False  # replace the LoRA, metrics and samples of an earlier run in out.dir


@dataclass
class TrainLoopConfig:
    mode: str = "lora"  # lora | full
    fused_step: bool = False  # full mode: each weight's update applied in backward, as soon as its gradient is done
    sharding: str = "none"  # full mode under torchrun: none (each process a whole copy, DDP) | fsdp (1/N each)
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | adafactor
    lr_schedule: str = "constant"  # constant | cosine | linear (to 0 at max_steps), after warmup
    warmup_steps: int = 0
    ema: float = 0.0  # decay of an EMA of the trained weights, saved beside the raw ones (0 = off)
    ema_device: str = "auto"  # where the EMA lives: auto (full mode: cpu; LoRA: the training device) | device | cpu
    ema_every: int = 0  # applied steps between EMA updates, each averaging in that many; 0: 1 on device, 10 on host
    max_bad_steps: int = 5  # non-finite steps in a row before the run saves a checkpoint and stops
    trackers: List[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow, ...
    mixed_precision: str = "auto"  # autocast: auto (bf16 or fp16 on CUDA, none on CPU), bf16, fp16, no
    seed: int = 0
    log_every: int = 10  # steps between bringing logged values to the host (one transfer per interval)
    device: str = "auto"
    deterministic: bool = False  # deterministic kernels only: bit-identical runs on the same GPU


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0  # LoRA output is scaled by alpha / rank
    dropout: float = 0.0
    targets: Any = "attn"  # a preset (attn, attn_image, all_linear) or a list of module-name suffixes
    blocks: Optional[List[int]] = None  # only these transformer block indices (None: all)

    def target_names(self) -> List[str]:
        return list(TARGET_PRESETS[self.targets]) if isinstance(self.targets, str) else [str(t) for t in self.targets]


@dataclass
class FullConfig:
    """Which of the transformer's own weights train in full mode (the rest stay frozen)."""
    blocks: Optional[List[int]] = None  # these transformer block indices (None: all, unless include is given)
    include: List[str] = field(default_factory=list)  # name patterns of weights outside the blocks

    def everything(self) -> bool:
        return self.blocks is None and not self.include


@dataclass
class LossConfig:
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    precondition_outputs: bool = True
    shift: Optional[float] = None  # None: the scheduler config's shift (3.0 for SD3)
    caption_dropout: float = 0.0  # probability of training on the empty-prompt embeddings
    prior_weight: float = 1.0  # loss weight of class (prior-preservation) samples


@dataclass
class ValidationConfig:
    """Images for the validation prompts stored in the shard set's extras."""
    enabled: bool = True
    every: int = 0  # steps between validations; 0 = only at the end
    steps: int = 28  # sampling steps
    guidance: float = 7.0  # the SD3 pipeline default
    height: int = 0  # 0 = the shard set's most common bucket
    width: int = 0
    seed: int = 42


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0: none); a final one is always written
    keep: int = 2  # newest complete checkpoints kept


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: OutConfig = field(default_factory=OutConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto: continue from the newest complete checkpoint in out.dir; none; or a step-NNNNNN folder

    def __post_init__(self):
        p = []
        check_model_path("model.path", self.model.path, p)
        if not self.data.shards:
            p.append("config key 'data.shards' is required (a shard set folder from precompute)")
        weighted = self.data.weighted()
        if not all(w is None or (math.isfinite(w) and w > 0) for _, w in weighted):
            p.append("config key 'data.shards': set weights must be positive numbers")
        for path, _ in weighted:
            if not is_url(path) and not os.path.isdir(path):
                p.append(f"config key 'data.shards': no such folder: {path}")
        if not self.out.dir:
            p.append("config key 'out.dir' is required")
        check_ranges(self, RANGES, p)
        check_choices(self, CHOICES, p)
        if isinstance(self.lora.targets, str):
            one_of(p, "lora.targets", self.lora.targets, tuple(TARGET_PRESETS))
        elif not self.lora.targets:
            p.append("config key 'lora.targets' must be a preset name or a non-empty list of module names")
        if self.train.fused_step and (self.train.mode != "full" or self.train.grad_accum != 1):
            p.append("config key 'train.fused_step' needs train.mode=full and train.grad_accum=1 (a weight's update "
                     "is applied as soon as its gradient is complete, which with accumulation is only after the "
                     "last micro-batch)")
        if self.train.sharding == "fsdp" and (self.train.mode != "full" or self.train.fused_step):
            bad = "train.mode" if self.train.mode != "full" else "train.fused_step"
            p.append(f"config key 'train.sharding': fsdp needs train.mode=full and train.fused_step=false "
                     f"(LoRA is small enough for every process to hold, and a sharded weight's gradient is "
                     f"complete only after the reduce-scatter); {bad} is set otherwise")
        if self.train.mode == "full" and self.model.quantize != "none":
            p.append(f"config key 'model.quantize': {self.model.quantize} weights cannot train in train.mode=full "
                     "(bitsandbytes' packed weights take no updates); use model.quantize=none, or train.mode=lora")
        v = self.validation
        if (v.height or v.width) and (v.height % 16 or v.width % 16 or v.height <= 0 or v.width <= 0):
            p.append("config keys 'validation.height'/'validation.width' must both be positive multiples of 16")
        check(p)
