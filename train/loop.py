"""Stage 2: stream a shard set into a LoRA on the frozen SD3 transformer, or into the transformer itself."""
import contextlib
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace
from typing import Optional

import torch
from tqdm import tqdm

from shards import read_extras, read_manifest
from shards.common.atomic import write_json
from shards.common.config import resolve_device, to_dict
from shards.common.errors import DataError, Interrupted, UsageError
from shards.common.lock import out_dir_lock
from shards.common.hub import resolve_model
from shards.manifest import combined_manifest
from shards.reader import check_shard_files

from . import checkpoint, resume
from .config import TrainConfig
from .data import BatchStream
from .prefetch import TrainStream
from .full import EMA_TRANSFORMER_DIR, TRANSFORMER_DIR
from .lora_file import EMA_WEIGHT_NAME, WEIGHT_NAME
from .model import base_fingerprint, check_shard_set, load_transformer, scheduler_config, warn_if_other_vae
from .objective import Objective, prepare_trainable, resolve_dtypes
from .outputs import Metrics, RunState, close_trackers, finish, init_trackers, keep_metrics_until
from .step import TrainStep, make_accelerator
from .stop import StopRequest
from .validation import Validator

# What the trainer reads from a pipeline folder: never a text encoder.
MODEL_FILES = ["model_index.json", "transformer/*", "scheduler/*", "vae/*"]
# Written when a run starts afresh: the files beside it are that run's (see prepare_out_dir).
RUN_MARKER = ".shardtune-train-run.json"
RUN_OUTPUTS = (WEIGHT_NAME, EMA_WEIGHT_NAME, TRANSFORMER_DIR, EMA_TRANSFORMER_DIR, "metrics.jsonl", "loss.png",
               "loss_by_sigma.png", "samples",
               "checkpoints", "trackers", RUN_MARKER)


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    accel = run_accelerator(cfg)
    # One writer per out.dir: the main process holds the lock for the whole run (the others write only
    # their own files inside its checkpoints).
    with out_dir_lock(cfg.out.dir, "train") if accel.is_main_process else contextlib.nullcontext(), \
            deterministic_kernels() if cfg.train.deterministic else contextlib.nullcontext():
        return _train(cfg, accel, t_start)


def _train(cfg: TrainConfig, accel, t_start: float) -> dict:
    resume_from = _resume_point(cfg, accel)
    if resume_from:
        done = _finished(cfg, resume_from)
        if done:
            return {"up_to_date": done, "steps": cfg.train.max_steps, "rank": accel.process_index}
    run = build_run(cfg, accel)
    try:
        if resume_from:
            saved = checkpoint.load(resume_from, accel, cfg, run.stepper, run.shared, run.per_rank)
            run.state.load_state_dict(saved["run"])
            lr_before = run.stepper.opt.param_groups[0]["lr"]
            run.stepper.apply_settings(cfg.train)  # the optimizer state carries the saved run's settings
            run.state.config_changes += resume.recorded(saved["changed"], run.state.step)
            if accel.is_main_process:
                keep_metrics_until(os.path.join(cfg.out.dir, "metrics.jsonl"), run.state.step)
                for line in resume.report(saved["changed"], run.state.step, resume_from, lr_before,
                                          run.stepper.opt.param_groups[0]["lr"]):
                    tqdm.write(line, file=sys.stderr)
                tqdm.write(f"train: resuming from {resume_from}")
        run.stream.start()
        _train_steps(run, t_start)
        save_checkpoint(run, cfg.train.max_steps)
        data_read = _check_ranks_agree_and_gather_reads(run)
        last_samples = _validate(run, cfg.train.max_steps)
        _gather_outputs(run)
        if not accel.is_main_process:
            return {"rank": accel.process_index, "steps": len(run.state.history)}
        return finish(cfg, run, os.path.join(cfg.out.dir, "metrics.jsonl"), last_samples, data_read,
                      time.time() - t_start)
    finally:
        run.stream.close()  # stops the prefetch thread, so the interpreter can exit cleanly on any error


def _finished(cfg: TrainConfig, resume_from: str) -> Optional[str]:
    """The output (LoRA, or transformer folder) of a finished run this command would only repeat; refuses what
    resuming cannot honour."""
    step = checkpoint.step_of(resume_from)
    if step > cfg.train.max_steps:  # resuming would re-save an earlier step with this later state
        raise UsageError(f"resume: {resume_from} is at step {step}, past train.max_steps {cfg.train.max_steps}; "
                         f"raise train.max_steps, resume from an earlier checkpoint (resume=PATH), or choose "
                         "another out.dir")
    lora = final_output(cfg)
    if step < cfg.train.max_steps or not os.path.exists(lora):
        return None
    with open(os.path.join(resume_from, "state.json")) as f:
        found = [c for c in resume.changes(json.load(f)["config"], cfg, resume_from) if c[3] != "quiet"]
    if found:
        raise UsageError(f"out.dir {cfg.out.dir} holds a finished run made with other settings "
                         f"({'; '.join(f'{k} {a} -> {b}' for k, a, b, _ in found[:4])}); set out.overwrite=true "
                         "to train again with these, raise train.max_steps to continue it, or choose another out.dir")
    return lora


def final_output(cfg: TrainConfig) -> str:
    """What a finished run leaves: the LoRA file, or (full mode) the transformer folder, swapped in whole."""
    if cfg.train.mode == "full":
        return os.path.join(cfg.out.dir, TRANSFORMER_DIR)
    return os.path.join(cfg.out.dir, WEIGHT_NAME)


def _train_steps(run, t_start: float) -> None:
    """The steps from the run's current one to max_steps, with logging, validation and checkpoints."""
    cfg, accel, state, t = run.cfg, run.accel, run.state, run.cfg.train
    init_trackers(cfg, accel)
    metrics = Metrics(cfg, accel, state, t_start)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    if state.step == 0 and cfg.validation.every:
        _validate(run, 0)  # B starts at zero: the base model's images, the strip's first column
    bar = tqdm(range(state.step + 1, t.max_steps + 1), desc="train", unit="step", dynamic_ncols=True,
               initial=state.step, total=t.max_steps, disable=not accel.is_main_process)
    try:
        with StopRequest(accel) as stop:
            for step in bar:
                _one_step(run, step, metrics, bar)
                if step != t.max_steps and stop.should_stop():
                    metrics.flush(bar)
                    saved = checkpoint.complete_at(cfg.out.dir, step) or save_checkpoint(run, step)
                    raise Interrupted(f"stopped at step {step} of {t.max_steps}; the checkpoint is {saved}: "
                                      "run the same command to resume from there")
        metrics.flush(bar)
    finally:
        bar.close()
        metrics.close()
        close_trackers(accel)


def _one_step(run, step: int, metrics: Metrics, bar) -> None:
    cfg, state, t = run.cfg, run.state, run.cfg.train
    lr = run.stepper.opt.param_groups[0]["lr"]  # the rate this step uses (the step moves it to the next one's)
    t0 = time.time()
    out = run.stepper.step(run.stream)
    state.step_seconds += time.time() - t0
    state.steps_timed += 1
    state.samples += out["samples"] * run.accel.num_processes
    state.step = step
    if not out["applied"]:
        _skipped(run, out, step, metrics)
        return
    state.bad_in_a_row = 0
    metrics.add(step, out, lr)
    validate = cfg.validation.every and step % cfg.validation.every == 0 and step != t.max_steps
    save = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != t.max_steps
    if step % t.log_every == 0 or validate or save:
        metrics.flush(bar)
    if validate:
        _validate(run, step)
    if save:
        save_checkpoint(run, step)


def _validate(run, step: int) -> Optional[str]:
    """Validation images on the main process, which writes them. A sharded model runs only with every process
    taking part in each forward: the others sample too, and write nothing."""
    if run.accel.is_main_process:
        return run.validate(run.transformer, step)
    if run.stepper.sharded:
        run.validate(run.transformer, step, write=False)
    return None


def _gather_outputs(run) -> None:
    """Sharded: the trained transformer (and its EMA) gathered whole for the main process, which writes them;
    every process takes part. Not sharded: nothing to do."""
    stepper = run.stepper
    run.ema_transformer = None
    if not stepper.sharded:
        return
    if stepper.ema:
        with stepper.ema.swapped():
            run.ema_transformer = stepper.whole_transformer()
    run.transformer = stepper.whole_transformer()


def run_accelerator(cfg: TrainConfig):
    device = resolve_device("train.device", cfg.train.device)
    _, amp = resolve_dtypes(cfg, device)
    return make_accelerator(str(device), amp, cfg.train.grad_accum, cfg.train.trackers, cfg.out.dir)


def _resume_point(cfg: TrainConfig, accel) -> Optional[str]:
    resume_from = prepare_out_dir(cfg) if accel.is_main_process else None
    accel.wait_for_everyone()
    if not accel.is_main_process:  # the main process has cleared or kept out.dir by now; read its decision
        resume_from = None if cfg.out.overwrite else checkpoint.find(cfg.out.dir, cfg.resume)
    return resume_from


@contextlib.contextmanager
def deterministic_kernels():
    """Only kernels that add in a fixed order, for the run: PyTorch's deterministic algorithms (an op without
    one raises, naming itself), cuBLAS with a fixed workspace (read when its first handle is made, before the
    first matmul), no cuDNN autotuning, and no flash attention, whose backward accumulates with atomics; SDPA
    then uses memory-efficient attention, which has a deterministic backward. The process's settings come
    back after."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.flash_sdp_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.backends.cuda.enable_flash_sdp(saved[2])
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def build_run(cfg: TrainConfig, accel) -> SimpleNamespace:
    """The run's parts: model with LoRA (or its own weights trainable), objective, step, data stream, validator,
    counters."""
    device, rank, world = accel.device, accel.process_index, accel.num_processes
    weight_dtype, _ = resolve_dtypes(cfg, device)
    torch.manual_seed(cfg.train.seed)  # peft's LoRA A init draws from the global generator
    sets = cfg.data.sets()
    manifests = [read_manifest(p) for p in sets]
    for path, m in zip(sets, manifests):
        check_shard_files(path, m)
        if not m.counts.written:
            raise DataError(f"shard set {path} holds no samples")
    manifest = combined_manifest(sets, manifests, warn=lambda msg: tqdm.write(msg, file=sys.stderr))
    largest = max(manifest.buckets.values())
    if cfg.train.batch_size > largest:
        tqdm.write(f"train: train.batch_size {cfg.train.batch_size} is larger than the largest bucket "
                   f"({largest} samples); batches hold one bucket, so they will be smaller")
    extras = read_extras(sets[0])  # empty-prompt and validation embeddings: the first set's
    root = resolve_model(cfg.model.path, MODEL_FILES, cfg.model.revision)
    # Sharded, the weights wait on the host: sharding moves one block at a time to the GPU, so no process ever
    # holds the whole model there (SD3.5 Large: 15 GiB in bf16).
    sharded = cfg.train.sharding == "fsdp"
    transformer = load_transformer(root, weight_dtype, torch.device("cpu") if sharded else device, cfg.model.quantize)
    base = base_fingerprint(transformer, weight_dtype)  # before the LoRA is added or any weight trains
    check_shard_set(manifest, transformer.config)
    warn_if_other_vae(manifest, root)
    params = prepare_trainable(transformer, cfg)
    sched = scheduler_config(root)
    objective = Objective(cfg, manifest, extras, sched, device, weight_dtype)
    stepper = TrainStep(accel, transformer, params, objective, cfg.train)
    stream = TrainStream(BatchStream(sets, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle_buffer, rank,
                                     world, cfg.data.weights(), manifests), pin=device.type == "cuda")
    state = RunState()
    return SimpleNamespace(
        cfg=cfg, accel=accel, device=device, manifest=manifest, transformer=transformer, base_fingerprint=base,
        stepper=stepper,
        objective=objective, stream=stream, state=state, weight_dtype=weight_dtype,
        set_bytes=manifest.shard_bytes,
        validate=Validator(cfg, manifest, extras, root, sched, device, weight_dtype, transformer.config),
        # Sharded, each process's optimizer state is its own shard: saved per process, not once.
        shared={} if stepper.sharded else {"training": stepper},
        per_rank={"stream": stream, "rng": checkpoint.GlobalRng(), **({"training": stepper} if stepper.sharded else {})})


def save_checkpoint(run, step: int) -> str:
    cfg = run.cfg
    return checkpoint.save(cfg.out.dir, step, run.accel, run.stepper.trained_state(), run.shared, run.per_rank,
                           {"step": step, "run": run.state.state_dict(), "config": to_dict(cfg)}, cfg.checkpoint.keep,
                           checkpoint.weights_name(cfg))


def _skipped(run, out: dict, step: int, metrics: Metrics) -> None:
    """A step not taken: an fp16 overflow (the scaler lowered its scale) or a non-finite loss or gradient.
    Every process skips the same steps, and each stops on any one's damaged sample, not only the one holding it."""
    if run.accel.num_processes > 1:
        found = run.accel.gather_for_metrics([out["non_finite_inputs"]], use_gather_object=True)
        out = {**out, "non_finite_inputs": [k for each in found for k in each]}
    t = run.cfg.train
    bad_inputs = out["non_finite_inputs"]
    if bad_inputs:  # the data, not the training, is at fault: no setting of the run would help
        sets = ", ".join(run.cfg.data.sets())
        raise DataError(f"step {step}: the shard data holds non-finite values: sample {bad_inputs[0]}"
                        + (f" and {len(bad_inputs) - 1} more" if len(bad_inputs) > 1 else "")
                        + f"; check the set with `python -m shards verify` ({sets}) and rebuild it with precompute")
    if out["overflow"]:
        tqdm.write(f"train: step {step}: fp16 gradients overflowed; step skipped, loss scale lowered to "
                   f"{run.accel.scaler.get_scale():g}")
        return
    run.state.bad_in_a_row += 1
    tqdm.write(f"train: step {step}: non-finite loss or gradient norm {float(out['grad_norm'])}; step skipped")
    if run.state.bad_in_a_row >= t.max_bad_steps:
        metrics.flush()
        saved = save_checkpoint(run, step)
        advice = "lower train.lr" if run.weight_dtype == torch.float32 else "lower train.lr or use model.precision=fp32"
        raise DataError(f"loss or gradients were non-finite for {t.max_bad_steps} steps in a row "
                        f"(last at step {step}) though the data was finite; {advice}; the state is saved in {saved}")


def _check_ranks_agree_and_gather_reads(run) -> list:
    """What each process read of the shard data; under DDP also a checksum of each process's trained weights,
    which must agree (sharded, there are no replicas to compare)."""
    accel, stats = run.accel, run.stream.stats
    checksum = run.stepper.checksum()
    mine = {"rank": accel.process_index, "checksum": checksum, "bytes": stats.get("bytes", 0),
            "rchar": stats.get("rchar"), "samples": stats.get("samples", 0),
            "resume_samples": stats.get("resume_samples", 0), "resume_bytes": stats.get("resume_bytes", 0),
            "share": stats.get("bytes", 0) / max(run.set_bytes, 1)}
    reads = accel.gather_for_metrics([mine], use_gather_object=True)
    sums = [r["checksum"] for r in reads]
    if len(set(sums)) != 1:
        raise DataError(f"the {accel.num_processes} processes ended with different trained weights (checksums {sums})")
    return reads


def prepare_out_dir(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix into an earlier one)."""
    d = cfg.out.dir
    if not cfg.out.overwrite:
        found = checkpoint.find(d, cfg.resume) if (os.path.isdir(d) or cfg.resume not in ("auto", "none")) else None
        if found:
            _make_dir(d)
            return found
    ours = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(d, n))]
    # Every finished run leaves a final checkpoint and its LoRA; with neither, a run that marked out.dir as
    # its own stopped before its first checkpoint, and nothing there can be continued: the same command
    # starts it again. Without the marker the files may be anyone's, and are refused as before.
    unfinished = ours and RUN_MARKER in ours and WEIGHT_NAME not in ours and TRANSFORMER_DIR not in ours \
        and not checkpoint.complete_checkpoints(d)
    if ours and unfinished and not cfg.out.overwrite and cfg.resume == "auto":
        tqdm.write(f"train: out.dir {d} holds a run stopped before its first checkpoint ({', '.join(ours)}); "
                   "starting it again from step 0")
    elif ours and not cfg.out.overwrite:
        raise UsageError(f"out.dir {d} holds an earlier run ({', '.join(ours)}) with no checkpoint to resume; "
                         "choose another out.dir or set out.overwrite=true")
    for n in ours:
        path = os.path.join(d, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    _make_dir(d)
    write_json(os.path.join(d, RUN_MARKER), {"stage": "train", "pid": os.getpid(),
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                             "max_steps": cfg.train.max_steps})
    return None


def _make_dir(d: str) -> None:
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UsageError(f"config key 'out.dir': cannot create {d} ({e.strerror})") from None
