"""Stage 2: stream a shard set into a LoRA on the frozen SD3 transformer."""
import json
import math
import os
import shutil
import time
from typing import Optional

import torch
from tqdm import tqdm

from shards import read_extras, read_manifest
from shards.config import resolve_device, to_dict
from shards.errors import DataError, UsageError
from shards.format import TORCH_DTYPES as _DTYPES
from shards.reader import check_shard_files
from shards.modelpath import resolve_model

from . import flow
from .config import LoraConfig, ModelConfig, TrainConfig
from .data import Prefetch, bucket_batches
from . import checkpoint
from .lora_file import EMA_WEIGHT_NAME, WEIGHT_NAME, save_lora
from .optim import Ema, make_optimizer, make_schedule
from .model import add_lora, check_shard_set, load_transformer, scheduler_config, warn_if_other_vae
from .plot import change_at_equal_sigma, loss_by_sigma_png, loss_curve_png
from .sampling import generate, load_vae_decoder, save_grid

# What the trainer reads from a pipeline folder: never a text encoder.
MODEL_FILES = ["model_index.json", "transformer/*", "scheduler/*", "vae/*"]


def _dtypes(cfg: TrainConfig, device: torch.device):
    weights = cfg.model.precision
    if weights == "auto":
        weights = "bf16" if device.type == "cuda" else "fp32"
    amp = cfg.train.mixed_precision
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "no"
    return _DTYPES[weights], (None if amp == "no" else _DTYPES[amp])


def prepare_lora(transformer, lora: LoraConfig, model: ModelConfig):
    """LoRA on the frozen transformer as training runs it; returns the trainable parameters."""
    params = add_lora(transformer, lora)
    for p in params:  # LoRA weights train in fp32 whatever the base precision
        p.data = p.data.float()
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if model.compile:
        for block in transformer.transformer_blocks:
            block.compile()
    transformer.train()
    return params


class Objective:
    """One micro-batch's loss; owns the generator so every random draw is reproducible."""

    def __init__(self, cfg: TrainConfig, manifest: dict, extras: dict, sched: dict, device, weight_dtype, amp_dtype,
                 rank: int = 0):
        self.cfg, self.device, self.weight_dtype, self.amp_dtype = cfg.loss, device, weight_dtype, amp_dtype
        self.flip = cfg.data.flip if manifest.get("flipped_latents") else 0.0
        shift = cfg.loss.shift if cfg.loss.shift is not None else sched.get("shift", 1.0)
        self.table = flow.sigma_table(sched.get("num_train_timesteps", 1000), shift)
        self.shift_factor = manifest["vae"]["shift_factor"]
        self.scaling_factor = manifest["vae"]["scaling_factor"]
        self.empty = tuple(extras[k].float().to(device) for k in ("empty_prompt_embeds", "empty_pooled_prompt_embeds"))
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1000003 * rank)  # each process its own noise

    def __call__(self, transformer, batch):
        c, g, dev = self.cfg, self.gen, self.device

        def put(name):  # stored dtype to the device first (asynchronous from the loader's pinned memory), then math
            return batch[name].to(dev, non_blocking=True)

        mean, std = put("latent_mean"), put("latent_std")
        n = mean.shape[0]
        if self.flip > 0 and "latent_mean_flip" in batch:  # the mirrored image's stored latent: a flip without a VAE
            use = (torch.rand(n, generator=g) < self.flip)[:, None, None, None].to(dev)
            mean = torch.where(use, put("latent_mean_flip"), mean)
            std = torch.where(use, put("latent_std_flip"), std)
        x0 = flow.model_latents(mean, std, g, self.shift_factor, self.scaling_factor)  # noise drawn on the CPU
        noise = torch.randn(x0.shape, generator=g).to(dev)
        sigma = flow.sigmas_for(flow.sample_u(c.timestep_sampling, n, g, c.logit_mean, c.logit_std,
                                              c.mode_scale), self.table).to(dev)
        noisy = flow.noisy_latents(x0, noise, sigma)
        embeds, pooled = put("prompt_embeds").float(), put("pooled_prompt_embeds").float()
        if c.caption_dropout > 0:
            drop = (torch.rand(n, generator=g) < c.caption_dropout).to(dev)  # the batch itself is left as it is
            embeds = torch.where(drop[:, None, None], self.empty[0], embeds)
            pooled = torch.where(drop[:, None], self.empty[1], pooled)
        with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = transformer(hidden_states=noisy.to(self.weight_dtype), timestep=sigma * 1000,
                              encoder_hidden_states=embeds.to(self.weight_dtype),
                              pooled_projections=pooled.to(self.weight_dtype), return_dict=False)[0]
        per_sample = flow.flow_matching_loss(out, x0, noise, noisy, sigma, c.weighting, c.precondition_outputs,
                                             reduce=False)
        if c.prior_weight != 1.0:  # class images of DreamBooth prior preservation
            prior = torch.tensor(batch["prior"], device=per_sample.device)
            per_sample = per_sample * torch.where(prior, c.prior_weight, 1.0)
        self.last_per_sample = per_sample.detach()
        return per_sample.mean(), sigma


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


class Run:
    """Everything a training run holds: the model with its LoRA, objective, optimizer, data, validator."""

    def __init__(self, cfg: TrainConfig, accel=None):
        self.cfg, self.accel = cfg, accel
        self.rank, self.world = (accel.process_index, accel.num_processes) if accel else (0, 1)
        self.device = accel.device if accel else resolve_device("train.device", cfg.train.device)
        weight_dtype, amp_dtype = _dtypes(cfg, self.device)
        self.weight_dtype = weight_dtype
        torch.manual_seed(cfg.train.seed)  # peft's LoRA A init draws from the global generator
        sets = cfg.data.sets()
        manifests = [read_manifest(p) for p in sets]
        for path, m in zip(sets, manifests):
            check_shard_files(path, m)
            if not m["counts"]["written"]:
                raise DataError(f"shard set {path} holds no samples")
        self.manifest = combined_manifest(sets, manifests)
        largest = max(self.manifest["buckets"].values())
        if cfg.train.batch_size > largest:
            tqdm.write(f"train: train.batch_size {cfg.train.batch_size} is larger than the largest bucket "
                       f"({largest} samples); batches hold one bucket, so they will be smaller")
        extras = read_extras(sets[0])  # empty-prompt and validation embeddings: the first set's
        root = resolve_model(cfg.model.path, MODEL_FILES, cfg.model.revision)
        self.transformer = load_transformer(root, weight_dtype, self.device, cfg.model.quantize)
        check_shard_set(self.manifest, self.transformer.config)
        warn_if_other_vae(self.manifest, root)
        self.params = prepare_lora(self.transformer, cfg.lora, cfg.model)
        sched = scheduler_config(root)
        self.objective = Objective(cfg, self.manifest, extras, sched, self.device, weight_dtype, amp_dtype, self.rank)
        self.validate = Validator(cfg, self.manifest, extras, root, sched, self.device, weight_dtype,
                                  self.transformer.config)
        t = cfg.train
        self.opt = make_optimizer(self.params, t)
        self.schedule = make_schedule(self.opt, t)
        self.ema = Ema(self.params, t.ema) if t.ema > 0 else None
        self._batches = Prefetch(bucket_batches(sets, t.batch_size, t.seed, cfg.data.shuffle_buffer, self.rank,
                                                self.world, cfg.data.weights()), pin=self.device.type == "cuda")
        self.batches_drawn = 0
        # Under DDP the wrapped model averages the LoRA gradients across processes in backward.
        self.model = accel.prepare_model(self.transformer) if accel else self.transformer

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accel:
            self.accel.wait_for_everyone()

    def next_batch(self):
        self.batches_drawn += 1
        return next(self._batches)

    def skip_batches(self, n: int) -> None:
        """Resume: the stream is seeded, so replaying it to the saved position gives the same batches."""
        for _ in range(n):
            self.next_batch()

    def close(self) -> None:
        self._batches.close()

    def named_lora_params(self):
        return [(n, p) for n, p in self.transformer.named_parameters() if "lora_" in n]

    def step(self):
        """One optimizer step over grad_accum micro-batches; (loss, grad norm, sigmas), or None if skipped."""
        t = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        total, sigmas, self.last_keys, self.last_losses = 0.0, [], [], []
        for _ in range(t.grad_accum):
            batch = self.next_batch()
            self.last_keys += batch["keys"]
            loss, sigma = self.objective(self.model, batch)
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
            sigmas.append(sigma.detach().cpu())
            self.last_losses += self.objective.last_per_sample.float().cpu().tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm).item()
        sigmas = torch.cat(sigmas)
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.opt.zero_grad(set_to_none=True)
            self.schedule.step()  # the schedule follows steps taken or skipped
            return None, grad_norm, sigmas
        self.opt.step()
        self.schedule.step()
        if self.ema:
            self.ema.update()
        return total, grad_norm, sigmas


RUN_OUTPUTS = (WEIGHT_NAME, EMA_WEIGHT_NAME, "metrics.jsonl", "loss.png", "loss_by_sigma.png", "samples",
               "checkpoints", "trackers")


def prepare_out_dir(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix into an earlier one)."""
    d = cfg.out.dir
    if not cfg.out.overwrite:
        found = checkpoint.find(d, cfg.resume) if (os.path.isdir(d) or cfg.resume not in ("auto", "none")) else None
        if found:
            _make_dir(d)
            return found
    ours = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(d, n))]
    if ours and not cfg.out.overwrite:
        raise UsageError(f"out.dir {d} holds an earlier run ({', '.join(ours)}) with no checkpoint to resume; "
                         "choose another out.dir or set out.overwrite=true")
    for n in ours:
        path = os.path.join(d, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    _make_dir(d)
    return None


def _make_dir(d: str) -> None:
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UsageError(f"config key 'out.dir': cannot create {d} ({e.strerror})") from None


def _metric_lines(path: str):
    """Parsed metrics lines; a torn last line (full disk, power loss) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _keep_metrics_until(path: str, step: int) -> None:
    """After a resume, drop the lines of steps that will be trained again."""
    if not os.path.exists(path):
        return
    kept = [r for r in _metric_lines(path) if r.get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


class Trackers:
    """TensorBoard, Weights & Biases, ... through accelerate's trackers, when train.trackers names them."""

    def __init__(self, cfg: TrainConfig, main: bool):
        self.accel = None
        if not cfg.train.trackers or not main:
            return
        from accelerate import Accelerator

        try:
            self.accel = Accelerator(log_with=list(cfg.train.trackers), project_dir=cfg.out.dir)
            flat = {}
            for section, values in to_dict(cfg).items():
                for k, v in values.items() if isinstance(values, dict) else [("", values)]:
                    flat[f"{section}.{k}" if k else section] = v if isinstance(v, (int, float, str, bool)) else str(v)
            self.accel.init_trackers("trackers", config=flat)  # logs in out.dir/trackers
        except (ImportError, ValueError) as e:
            raise UsageError(f"train.trackers {list(cfg.train.trackers)}: {str(e).splitlines()[0]} "
                             "(install the tracker's package, e.g. pip install tensorboard)") from None

    def log(self, values: dict, step: int) -> None:
        if self.accel:
            self.accel.log(values, step=step)

    def close(self) -> None:
        # Each tracker's own finish: accelerate's end_training would also tear down a DDP process group.
        if self.accel:
            for tracker in self.accel.trackers:
                tracker.finish()
            self.accel = None


def _accelerator(cfg: TrainConfig):
    """accelerate's process group when launched with several processes (accelerate launch, torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.train.device == "cpu" or not torch.cuda.is_available())


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    accel = _accelerator(cfg)
    main = accel is None or accel.is_main_process
    resume_from = prepare_out_dir(cfg) if main else None
    if accel:
        accel.wait_for_everyone()
        if not main:  # the main process has cleared or kept out.dir by now; read its decision
            resume_from = None if cfg.out.overwrite else checkpoint.find(cfg.out.dir, cfg.resume)
    run = Run(cfg, accel)
    try:
        return _train(cfg, run, main, resume_from, t_start)
    finally:
        run.close()  # stops the prefetch thread, so the interpreter can exit cleanly on any error


def _train(cfg: TrainConfig, run, main: bool, resume_from: Optional[str], t_start: float) -> dict:
    t = cfg.train
    trackers = Trackers(cfg, main)
    metrics_path = os.path.join(cfg.out.dir, "metrics.jsonl")
    state = {"step": 0, "batches_drawn": 0, "history": [], "bad_in_a_row": 0}
    if resume_from:
        state = checkpoint.load(resume_from, run)
        run.skip_batches(state["batches_drawn"])
        if main:
            _keep_metrics_until(metrics_path, state["step"])
            tqdm.write(f"train: resuming from {resume_from}")
    history, samples, step_seconds = state["history"], 0, 0.0

    def save_checkpoint(step):
        snapshot = {"step": step, "batches_drawn": run.batches_drawn, "history": history,
                    "bad_in_a_row": state["bad_in_a_row"], "config": to_dict(cfg)}
        return checkpoint.save(cfg.out.dir, step, run, snapshot, cfg.checkpoint.keep)

    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    metrics = open(metrics_path, "a") if main else None
    bar = tqdm(range(state["step"] + 1, t.max_steps + 1), desc="train", unit="step", dynamic_ncols=True,
               initial=state["step"], total=t.max_steps, disable=not main)
    try:
        for step in bar:
            t0 = time.time()
            loss, grad_norm, sigmas = run.step()
            step_seconds += time.time() - t0
            samples += len(sigmas) * run.world
            if loss is None:
                state["bad_in_a_row"] += 1
                tqdm.write(f"train: step {step}: non-finite loss or gradient norm {grad_norm}; step skipped")
                if state["bad_in_a_row"] >= t.max_bad_steps:
                    saved = save_checkpoint(step)
                    advice = "lower train.lr" if run.weight_dtype == torch.float32 else \
                        "lower train.lr or use model.precision=fp32"
                    raise DataError(f"loss or gradients were non-finite for {t.max_bad_steps} steps in a row "
                                    f"(last at step {step}); {advice}; the state is saved in {saved}")
                continue
            state["bad_in_a_row"] = 0
            history.append(loss)
            lr = run.opt.param_groups[0]["lr"]
            if step % t.log_every == 0 or step == t.max_steps:
                keys = run.accel.gather_for_metrics([run.last_keys], use_gather_object=True) if run.accel \
                    else [run.last_keys]
                if main:
                    metrics.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                              "sigmas": [round(x, 5) for x in sigmas.tolist()],
                                              "losses": [round(x, 6) for x in run.last_losses], "keys": keys,
                                              "seconds": round(time.time() - t_start, 3)}) + "\n")
                    metrics.flush()
                    trackers.log({"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "samples_per_second": samples / max(step_seconds, 1e-9)}, step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples / max(step_seconds, 1e-9):.1f}",
                            refresh=False)
            if main and cfg.validation.every and step % cfg.validation.every == 0 and step != t.max_steps:
                run.validate(run.transformer, step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != t.max_steps:
                save_checkpoint(step)
    finally:
        bar.close()
        trackers.close()
        if metrics:
            metrics.close()
    save_checkpoint(t.max_steps)
    _check_ranks_agree(run)
    if not main:
        return {"rank": run.rank, "steps": len(history)}
    last_samples = run.validate(run.transformer, t.max_steps)
    return _finish(cfg, run, history, metrics_path, last_samples, samples, step_seconds, time.time() - t_start)


def _check_ranks_agree(run) -> None:
    """The processes of a DDP run must end with the same LoRA; a checksum from each proves it."""
    if not run.accel:
        return
    checksum = sum(float(p.detach().double().sum()) for _, p in run.named_lora_params())
    sums = run.accel.gather_for_metrics([checksum], use_gather_object=True)
    if len(set(sums)) != 1:
        raise DataError(f"the {run.world} processes ended with different LoRA weights (checksums {sums})")
    run.checksums = sums


def _data_config(manifest: dict) -> dict:
    """The precompute data section the shard set was made with ({} for a set that does not record it)."""
    data = manifest.get("config", {}).get("data", {})
    return data if isinstance(data, dict) else {}


def _finish(cfg, run, history, metrics_path, last_samples, samples, step_seconds, seconds) -> dict:
    info = {
        "base_model": cfg.model.path, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
        "targets": cfg.lora.target_names(), "blocks": cfg.lora.blocks, "steps": cfg.train.max_steps,
        "shard_sets": [{"path": p, "manifest_sha256": _manifest_hash(p)} for p in cfg.data.sets()],
        "shard_set_model": run.manifest["model"]["path"],
        "validation_prompts": run.manifest["extras"].get("validation_prompts", []),
        # What the captions were built from, for the release's model card (merge): the trigger words.
        "instance_prompt": _data_config(run.manifest).get("instance_prompt"),
        "caption_prefix": _data_config(run.manifest).get("caption_prefix") or None,
        "config": to_dict(cfg),
    }
    lora_path = save_lora(cfg.out.dir, run.transformer, info)
    if run.ema:
        with run.ema.swapped():
            save_lora(cfg.out.dir, run.transformer, {**info, "ema": cfg.train.ema}, EMA_WEIGHT_NAME)
    curve = loss_curve_png(history, os.path.join(cfg.out.dir, "loss.png"))
    by_sigma = loss_by_sigma_png(metrics_path, os.path.join(cfg.out.dir, "loss_by_sigma.png"))
    change = change_at_equal_sigma(metrics_path)
    tenth = max(1, len(history) // 10)
    result = {"lora": lora_path, "metrics": metrics_path, "loss_curve": curve, "loss_by_sigma": by_sigma,
              "loss_change_at_equal_sigma": change,
              "samples": last_samples,
              "steps": len(history),
              "first_loss": sum(history[:tenth]) / tenth if history else float("nan"),
              "last_loss": sum(history[-tenth:]) / tenth if history else float("nan"),
              "seconds": seconds, "mean_step_seconds": step_seconds / max(len(history), 1),
              "samples_per_second": samples / max(step_seconds, 1e-9)}
    if run.device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    result["transformer"] = run.transformer  # for callers in the same process (tests, notebooks)
    return result


def combined_manifest(paths, manifests) -> dict:
    """One view of several shard sets, which must agree on everything that shapes a sample."""
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        for key in ("latent_channels", "embeddings", "max_sequence_length", "vae"):
            if m[key] != first[key]:
                raise DataError(f"shard sets {paths[0]} and {path} differ in {key} ({first[key]} vs {m[key]}); "
                                "sets trained together must come from the same model and text settings")
    buckets = {}
    for m in manifests:
        for b, n in m["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
    return {**first, "buckets": buckets,
            "counts": {"written": sum(m["counts"]["written"] for m in manifests)}}


def _manifest_hash(path: str) -> str:
    import hashlib
    from shards.reader import _join, _read_bytes
    return hashlib.sha256(_read_bytes(_join(path, "manifest.json"))).hexdigest()


def summary(r: dict) -> str:
    lines = [f"LoRA: {r['lora']}",
             f"  {r['steps']} steps, {r['mean_step_seconds'] * 1000:.0f} ms/step ({r['samples_per_second']:.2f} samples/s), "
             f"{r['seconds']:.1f} s in all, "
             f"mean loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} (first/last tenth of the steps)"
             + (f"; at equal sigma the second half's loss is {r['loss_change_at_equal_sigma']:+.1%} vs the first"
                if r.get("loss_change_at_equal_sigma") is not None else ""),
             f"  metrics: {r['metrics']}   loss curves: {r['loss_curve']}, {r['loss_by_sigma']}"]
    if r["samples"]:
        lines.append(f"  validation images: {r['samples']}")
    if "peak_gpu_memory_gb" in r:
        lines.append(f"  peak GPU memory: {r['peak_gpu_memory_gb']:.2f} GiB")
    return "\n".join(lines)
