"""The run's Accelerator and one LoRA optimizer step through it.

One Accelerator serves every run, one process included: it holds the process group (DDP when launched with
several processes), mixed precision (autocast in the prepared model's forward; fp16 with its gradient
scaler), gradient accumulation (only the last micro-batch of a step all-reduces) and the trackers.
"""
import contextlib
import os
import re
import warnings
from typing import Callable, Dict, List, Optional

import torch

from shards.common.errors import UsageError

from .bf16_optim import WeightByWeight
from .optim import Ema, lr_factor, make_optimizer, make_schedule
from .sharded import load_whole, whole


def make_accelerator(device: str = "auto", mixed_precision: str = "no", grad_accum: int = 1,
                     trackers: Optional[List[str]] = None, project_dir: Optional[str] = None):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate keeps its settings in process-wide singletons; a second run in the same process (tests,
    # notebooks) starts from the settings it asks for, not from the previous run's.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # `accelerate launch --use_fsdp` / `--use_deepspeed` (or their config files) say so through these. Their
    # sharded state would bypass this trainer's checkpoints and outputs, and accelerate's FSDP runs on GPUs only,
    # where no run has checked it: refused, pointing to train.sharding, which shards with torch's FSDP2 itself.
    sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(var, "false").lower() == "true"]
    if sharded:
        raise UsageError(f"accelerate's {sharded[0]} launch is not supported; launch with torchrun or `accelerate "
                         "launch` without it: each process then trains a whole copy (DDP), or with "
                         "train.mode=full train.sharding=fsdp 1/N of it (torch FSDP2)")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if not cpu and device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        torch.cuda.set_device(torch.device(device))
    trackers = list(trackers or [])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no supported trackers are currently installed")
            # The transformer's buffers (the position-embedding grid, 108-171 MiB at SD3 sizes) are constants,
            # identical in every process: DDP need not broadcast them before every forward.
            accel = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                                log_with=trackers or None, project_dir=project_dir,
                                kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    except ValueError as e:
        key = "train.trackers" if trackers and "logging" in str(e) else "train.mixed_precision"
        raise UsageError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    if trackers and not accel.log_with:  # accelerate drops trackers whose package is missing, with a warning
        raise UsageError(f"config key 'train.trackers': {trackers} is not installed "
                         "(install the tracker's package, e.g. pip install tensorboard)")
    if mixed_precision == "fp16" and accel.scaler is None:
        # Accelerate gives the CPU neither fp16 autocast nor a scaler; torch has both. Without the scaler
        # small fp16 gradients would underflow to zero silently.
        accel.native_amp = True
        accel.scaler = torch.amp.GradScaler(accel.device.type)
    return accel


def ema_device(t) -> Optional[torch.device]:
    """Where the EMA lives (None: beside each weight). Full mode's auto is the host: in fp32 on the GPU it would
    be twice the bf16 weights again (7.6 GiB for SD3 Medium)."""
    if t.ema_device == "cpu" or (t.ema_device == "auto" and t.mode == "full"):
        return torch.device("cpu")
    return None


def ema_every(t) -> int:
    """train.ema_every, where 0 (auto) is 1 for an EMA on the training device and 10 on the host, where each
    update copies every trained weight from the GPU."""
    if t.ema_every:
        return t.ema_every
    return 10 if ema_device(t) is not None else 1


def non_finite_inputs(batches: List[Dict]) -> List[str]:
    """'KEY (tensor name)' for every sample of the batches holding NaN or infinity (the batches are on the host)."""
    bad = []
    for batch in batches:
        for name, t in batch.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                rows = (~torch.isfinite(t.float())).flatten(1).any(1).tolist()
                bad += [f"{batch['keys'][i]} ({name})" for i, row in enumerate(rows) if row]
    return bad


class FusedUpdates:
    """The optimizer step fused into backward: a hook on each trained weight runs as soon as backward has
    finished its gradient, clips that gradient by its own norm, applies the weight's update
    (`optimizer.step_weight`) and frees the gradient. So at most the gradients backward is still filling exist
    at once, never the model's whole gradient. A weight whose gradient is not finite keeps its value (its
    optimizer moments move as for a zero gradient); nothing here waits for the device."""

    def __init__(self, optimizer, params: List[torch.nn.Parameter], max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm
        group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        self.squares = []  # each weight's squared gradient norm this step, on the device: no host sync
        for p in params:
            p.register_post_accumulate_grad_hook(lambda w, g=group_of[p]: self._update(w, g))

    @torch.no_grad()
    def _update(self, p: torch.nn.Parameter, group: dict) -> None:
        square = p.grad.float().square().sum()
        self.squares.append(square)
        norm = square.sqrt()
        ok = torch.isfinite(norm)
        scale = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)  # clipped by its own norm
        p.grad.copy_(torch.where(ok, p.grad * scale.to(p.grad.dtype), torch.zeros_like(p.grad)))
        # Deciding on the host whether to step would wait for the device: the update lands where `ok` says.
        self.optimizer.step_weight(p, group, ok)
        p.grad = None

    def finish(self) -> torch.Tensor:
        """The step's gradient norm (over every weight, before clipping); resets for the next step."""
        norm = torch.stack(self.squares).sum().sqrt() if self.squares else torch.tensor(0.0)
        self.squares = []
        return norm


class TrainStep:
    """The trained parameters (LoRA adapters, or the transformer's own weights in full mode) on the
    transformer, their optimizer, LR schedule and EMA; `step` runs one optimizer step over `grad_accum`
    micro-batches. `state_dict` holds what a checkpoint must restore besides the weights."""

    def __init__(self, accel, transformer, params: List[torch.nn.Parameter], objective, t):
        self.accel, self.transformer, self.params, self.objective = accel, transformer, params, objective
        self.grad_accum, self.max_grad_norm = t.grad_accum, t.max_grad_norm
        self.sharded = t.sharding == "fsdp"
        self.model_class = type(transformer)
        if self.sharded:
            if accel.num_processes < 2:
                raise UsageError("config key 'train.sharding': fsdp splits the model across processes; launch "
                                 "with torchrun --nproc-per-node=N (N >= 2), or set train.sharding=none")
            if accel.scaler is not None:
                raise UsageError("config key 'train.sharding': fsdp does not train with fp16 autocast (each "
                                 "process's loss scaler would judge only its own shards' overflow); set "
                                 "train.mixed_precision=no (fp32 weights) or use a GPU that computes in bf16")
            from .sharded import shard

            # FSDP2 reduce-scatters the gradients in backward: the model is not wrapped again for DDP.
            self.params = params = shard(transformer, accel.device)
            self.model = transformer
        else:
            # Under DDP the prepared model averages the trained parameters' gradients across processes in backward.
            self.model = accel.prepare_model(transformer, device_placement=False)
        self.opt = accel.prepare_optimizer(make_optimizer(params, t), device_placement=False)
        # The schedule drives the wrapped optimizer itself: accelerate's scheduler wrapper would advance it
        # once per process and step.
        self.schedule = make_schedule(self.opt.optimizer, t)
        # DDP replicas hold the same weights, so only the main process (whose EMA is saved) keeps one; sharded,
        # each process averages its own shard.
        keeps_ema = t.ema > 0 and (self.sharded or accel.is_main_process)
        self.ema = Ema(params, t.ema, ema_every(t), ema_device(t)) if keeps_ema else None
        self.fused = FusedUpdates(self.opt.optimizer, params, t.max_grad_norm) if t.fused_step else None
        if self.fused and (accel.num_processes > 1 or accel.scaler is not None):
            raise UsageError("config key 'train.fused_step' runs in one process without fp16 (its updates happen "
                             "inside backward, before DDP averages gradients or the fp16 scaler unscales them); "
                             "set train.fused_step=false")

    def _everywhere(self, flag: torch.Tensor) -> torch.Tensor:
        """A flag true in every process (each process's loss is its own): all take a step, or none does."""
        if self.accel.num_processes == 1:
            return flag
        return self.accel.reduce(flag.to(torch.float32), reduction="sum") == self.accel.num_processes

    def named_trained_params(self):
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    def step(self, next_batch: Callable[[], Dict]) -> dict:
        """One optimizer step. Everything returned stays on the device except `keys` and `applied`.

        Host syncs: one, `applied` (whether the loss and gradients were finite, i.e. whether to take the
        step); with fp16 the gradient scaler makes its own (it reads whether gradients overflowed); an EMA on
        the host copies the weights once per `train.ema_every` steps."""
        accel = self.accel
        losses, sigmas, per_sample, keys, batches = [], [], [], [], []
        index = self.schedule.last_epoch  # steps taken or skipped before this one, restored on resume
        for _ in range(self.grad_accum):
            batch = next_batch()
            batches.append(batch)
            # No all-reduce until the step's last micro-batch (DDP); the prepared model autocasts itself.
            with accel.accumulate(self.model), accel.autocast() if self.sharded else contextlib.nullcontext():
                loss, sigma, each = self.objective(self.model, batch, index)
                accel.backward(loss)  # divided by grad_accum; scaled under fp16
            losses.append(loss.detach())
            sigmas.append(sigma.detach())
            per_sample.append(each)
            keys += batch["keys"]
        loss = torch.stack(losses).mean()
        overflow = False
        if self.fused:  # every update happened in backward; a weight whose gradient was not finite kept its value
            grad_norm = self.fused.finish()
            applied = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        elif accel.scaler is not None:
            grad_norm = accel.clip_grad_norm_(self.params, self.max_grad_norm)  # unscales fp16 gradients first
            finite_loss = bool(self._everywhere(torch.isfinite(loss)))
            self.opt.step()  # the scaler skips a step whose gradients overflowed and lowers its scale
            overflow = finite_loss and self.opt.step_was_skipped
            applied = finite_loss and not overflow
        else:
            grad_norm = whole(accel.clip_grad_norm_(self.params, self.max_grad_norm))  # sharded: summed over shards
            finite = self._everywhere(torch.isfinite(loss) & torch.isfinite(grad_norm))
            applied = bool(finite)
            if applied:
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The scaler swaps the optimizer's step method while it steps, which torch's scheduler takes for
            # a step called out of order; the order here is right.
            warnings.filterwarnings("ignore", message=re.escape("Seems like `optimizer.step()` has been overridden"))
            # The fused step updates through `step_weight`, which the scheduler's check does not see.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.schedule.step()  # the schedule follows steps taken or skipped
        if applied and self.ema:
            self.ema.update()
        return {"loss": loss, "grad_norm": grad_norm.detach().float(), "sigmas": torch.cat(sigmas),
                "losses": torch.cat(per_sample), "keys": keys, "applied": applied, "overflow": overflow,
                "samples": len(keys),
                # Only for a step not taken: damaged data needs another fix than a lower learning rate.
                "non_finite_inputs": [] if applied or overflow else non_finite_inputs(batches)}

    def state_dict(self) -> dict:
        optimizer = self.opt.state_dict()
        if self.sharded:  # each process saves its own shard of the moments
            from .sharded import local_optimizer_state

            optimizer = local_optimizer_state(optimizer)
        return {"optimizer": optimizer, "schedule": self.schedule.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.accel.scaler.state_dict() if self.accel.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.sharded and not isinstance(self.opt.optimizer, WeightByWeight):  # those keep plain shards
            from .sharded import restore_sharded_state

            restore_sharded_state(self.opt.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        elif self.ema:  # EMA switched on at resume: it starts from the weights trained so far
            self.ema.restart()
        if self.accel.scaler is not None and state.get("scaler"):
            self.accel.scaler.load_state_dict(state["scaler"])

    def apply_settings(self, t) -> None:
        """This config's optimizer and schedule settings on restored state (which holds the saved run's)."""
        groups = self.opt.optimizer.param_groups
        for g in groups:
            g["initial_lr"] = t.lr
            if "weight_decay" in g:
                g["weight_decay"] = t.weight_decay
            if "betas" in g:
                g["betas"] = (t.adam_beta1, t.adam_beta2)
            if isinstance(g.get("eps"), float):  # Adafactor's eps is a pair of its own, not train.adam_eps
                g["eps"] = t.adam_eps
        self.schedule.base_lrs = [t.lr] * len(groups)
        lr = t.lr * lr_factor(self.schedule.last_epoch, t.lr_schedule, t.warmup_steps, t.max_steps)
        for g in groups:
            g["lr"] = lr
        self.schedule._last_lr = [lr] * len(groups)

    def trained_state(self) -> Dict[str, torch.Tensor]:
        """The trained parameters on the host, in their own dtype (LoRA: fp32; full mode: the weights'), for the
        main process, which writes them (the others get {}). Sharded: each weight gathered whole, a collective
        every process takes part in."""
        main = self.accel.is_main_process
        out = {}
        for n, p in self.named_trained_params():
            full = whole(p.detach()) if self.sharded else p.detach()
            if main:
                out[n] = full.cpu().contiguous()
        return out

    def checksum(self) -> Optional[float]:
        """A sum over every trained weight, which DDP replicas must agree on; None when sharded (no replicas)."""
        if self.sharded:
            return None
        return sum(float(p.detach().double().sum()) for _, p in self.named_trained_params())

    def whole_transformer(self):
        """The transformer as the run trained it, unsharded (for the main process; None for the others). Not
        sharded: the transformer itself."""
        if not self.sharded:
            return self.transformer
        from .sharded import gathered

        return gathered(self.transformer, self.model_class, self.accel.is_main_process)

    def load_trained_state(self, lora: Dict[str, torch.Tensor], path: str) -> None:
        params = dict(self.named_trained_params())
        if set(lora) != set(params):
            raise UsageError(f"resume: {path} holds trained weights of other modules than this run's lora / full "
                             "settings")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(p.shape) != tuple(lora[name].shape):
                    raise UsageError(f"resume: {name} has shape {tuple(lora[name].shape)} in {path}, "
                                     f"{tuple(p.shape)} now")
                load_whole(p, lora[name])
