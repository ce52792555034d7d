"""The trainer under several processes and on a device: kills and resumes, all-reduces, fp16, host syncs."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, wait_for


def _args(model, shards, out, *extra):
    return [f"model.path={model}", f"data.shards={shards}", f"out.dir={out}", "train.batch_size=2", "lora.rank=4",
            "lora.alpha=8", "validation.enabled=false", "train.lr=2e-3", *extra]


def _torchrun(n, *args, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "train", *args]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, found through /proc (children first seen, then killed)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent:
                    todo.append(int(entry))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _same_lora(a, b) -> bool:
    a, b = load_file(os.path.join(a, "pytorch_lora_weights.safetensors")), load_file(os.path.join(b, "pytorch_lora_weights.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every=2", "train.grad_accum=2", "train.log_every=3"]
FULL = ["train.mode=full", "train.max_steps=3", "checkpoint.every=2", "train.lr=1e-3"]
# Two processes at batch 2 against one at batch 2 with grad_accum 2: the same global batch of 4.
EQUAL_STEPS = 3
EQUAL = ["train.mode=full", f"train.max_steps={EQUAL_STEPS}", "checkpoint.every=0", "train.lr=1e-3",
         "loss.caption_dropout=0.5", "train.max_grad_norm=0.05"]
SHARDED = ["train.mode=full", "train.sharding=fsdp", "train.max_steps=4", "checkpoint.every=2", "train.lr=1e-3",
           "train.ema=0.9", "validation.enabled=true", "validation.every=2", "validation.steps=1"]
# The stopped run: until Ctrl-C, its first step logged as soon as it ends. The schedule is constant, so its
# max_steps and intervals change nothing it computes; the resumes finish it with COMMON's.
UNTIL_STOPPED = ["train.max_steps=100000", "checkpoint.every=0", "train.grad_accum=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def two_processes(tiny_model, shard_set_fp32, tmp_path_factory):
    """One torchrun launch of two processes (each launch costs ~35 s of CPU here, mostly imports) that counts
    the gradient all-reduces of three steps at grad_accum 1 and 4 through a DDP comm hook, trains the
    uninterrupted run the resumes are compared with, then starts the run a terminal's Ctrl-C stops: the
    signal goes to the whole foreground group, torchrun forwards it to its workers (they run in sessions of
    their own), and both must stop after the same step with one complete checkpoint. Returns the counts, the
    two runs' out.dirs and torchrun's stderr."""
    tmp = tmp_path_factory.mktemp("two")
    straight, stopped = tmp / "straight", tmp / "stopped"
    script = tmp / "count.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {REPO!r})
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from shards.common.config import load_config
from train.config import TrainConfig
from train.loop import build_run, run_accelerator, train

counts = {{}}
for accum in (1, 4):
    cfg = load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'o')!r} + [f"train.grad_accum={{accum}}"])
    accel = run_accelerator(cfg)
    run = build_run(cfg, accel)
    calls = []

    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    run.stepper.model.register_comm_hook(dist.group.WORLD, hook)
    run.stream.start()
    for _ in range(3):
        run.stepper.step(run.stream)
    run.stream.close()
    counts[accum] = len(calls)
if dist.get_rank() == 0:
    print("COUNTS", json.dumps(counts), flush=True)
# Full mode, one micro-batch per process and step: what each process was fed, and the weights they reached.
def fed_and_trained(sharding):
    cfg = load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'eq', *EQUAL)!r} + [f"train.sharding={{sharding}}"])
    run = build_run(cfg, run_accelerator(cfg))
    run.stream.start()
    fed = []

    def feed():
        fed.append(run.stream())
        return fed[-1]

    for _ in range({EQUAL_STEPS}):
        run.stepper.step(feed)
    run.stream.close()
    each = [None, None]
    dist.all_gather_object(each, fed)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in run.stepper.params)
    weights = run.stepper.trained_state()  # sharded: gathered whole, by every process
    if dist.get_rank() == 0:
        import torch
        torch.save({{"fed": each, "weights": weights, "held": held}}, {str(tmp)!r} + f"/equal-{{sharding}}.pt")

fed_and_trained("none")
fed_and_trained("fsdp")
# Sharded runs with checkpoints: one straight through, one stopped at a checkpoint and resumed.
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'fsdp-straight', *SHARDED)!r}))
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'fsdp-resumed', *SHARDED)!r} + ["train.max_steps=2"]))
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'fsdp-resumed', *SHARDED)!r}))
# bf16 weights, sharded, updates far below a bf16 step: only stochastic rounding of each shard moves them.
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'fsdp-bf16', *SHARDED)!r} + ["model.precision=bf16", "train.max_steps=2", "train.lr=1e-6"]))
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, straight, *COMMON)!r}))
train(load_config(TrainConfig, {_args(tiny_model, shard_set_fp32, tmp / 'full', *FULL)!r}))
from train.__main__ import command  # what `python -m train` runs, Ctrl-C's message and exit included
command({_args(tiny_model, shard_set_fp32, stopped, *UNTIL_STOPPED)!r})
""")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    drained = {}  # read as they come, so that neither pipe fills and blocks the workers
    readers = [threading.Thread(target=lambda n=n, f=f: drained.__setitem__(n, f.read()))
               for n, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    metrics, deadline = stopped / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and metrics.stat().st_size):
        assert proc.poll() is None and time.time() < deadline, "the stopped run ended before its first step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends the whole foreground group
    proc.wait(timeout=300)
    for t in readers:
        t.join()
    assert "COUNTS" in drained["out"], drained["err"][-3000:]
    return {"counts": json.loads(drained["out"].split("COUNTS", 1)[1].strip().splitlines()[0]),
            "straight": straight, "stopped": stopped, "stderr": drained["err"], "full": tmp / "full",
            "equal": tmp / "equal-none.pt", "equal_sharded": tmp / "equal-fsdp.pt",
            "fsdp": (tmp / "fsdp-straight", tmp / "fsdp-resumed"), "fsdp_bf16": tmp / "fsdp-bf16"}


def test_ctrl_c_under_torchrun_saves_one_checkpoint_for_both_processes(two_processes):
    err = two_processes["stderr"]
    stopped = [line for line in err.splitlines() if "stopped at step" in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    ckpt = two_processes["stopped"] / "checkpoints" / f"step-{step:06d}"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "rank-0.pt").exists() and (ckpt / "rank-1.pt").exists()
    assert json.load(open(ckpt / "state.json"))["step"] == step
    assert os.listdir(ckpt.parent) == [ckpt.name]


def test_two_processes_resume_after_ctrl_c_and_sigkill_bit_identical_and_resume_with_one(tiny_model, shard_set_fp32,
                                                                                     tmp_path, two_processes):
    """The stopped run resumed under torchrun, SIGKILLed after its next checkpoint, resumed again to the end:
    its LoRA equals the uninterrupted run's bit for bit."""
    straight, run = two_processes["straight"], two_processes["stopped"]
    lines = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    for line in lines:  # each step: two micro-batches per process (an epoch's last batch may be short)
        assert all(2 <= len(keys) <= 4 for keys in line["keys"])
    rank0, rank1 = lines[0]["keys"]  # in their first epoch the processes read disjoint shares
    assert not set(rank0) & set(rank1)
    (stop,) = os.listdir(run / "checkpoints")
    after = int(stop.split("-")[1]) // 2 * 2 + 2  # the first periodic checkpoint after the stop
    assert after < STEPS, f"the stop came at {stop}, too late to be killed before the end"
    proc = _torchrun(2, *_args(tiny_model, shard_set_fp32, run, *COMMON), wait=False)
    wait_for(run / "checkpoints" / f"step-{after:06d}" / "COMPLETE", proc, "training")
    _kill_tree(proc.pid)  # torchrun's workers run in sessions of their own: a kill of its group misses them
    proc.wait()
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    r = _torchrun(2, *_args(tiny_model, shard_set_fp32, run, *COMMON))
    assert r.returncode == 0 and "resuming from" in r.stderr + r.stdout, r.stderr[-3000:]
    assert _same_lora(straight, run)
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == list(range(1, STEPS + 1))
    # A checkpoint of the two processes resumed by one: it takes over both processes' share of the data.
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    r = train(load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path / "one", *COMMON,
                                             f"resume={straight / 'checkpoints' / 'step-000008'}")))
    assert r["steps"] == STEPS
    read = r["data_read"][0]
    assert read["resume_samples"] >= 0 and read["bytes"] > 0 and read["rchar"] >= read["bytes"]
    assert not _same_lora(straight, tmp_path / "one")  # one process trains on half the data per step


def test_full_mode_under_two_processes(two_processes, tiny_model):
    """train.mode=full under DDP: the processes end with the same weights (the run checks a checksum of every
    process's trained weights), each saves its own stream state, and the main process writes the transformer."""
    from diffusers import SD3Transformer2DModel

    run = two_processes["full"]
    ckpt = run / "checkpoints" / "step-000002"
    assert {"rank-0.pt", "rank-1.pt", "transformer.safetensors", "COMPLETE"} <= set(os.listdir(ckpt))
    trained = SD3Transformer2DModel.from_pretrained(str(run / "transformer"))
    base = SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer"))
    b = dict(base.named_parameters())
    assert sum(not torch.equal(p, b[n]) for n, p in trained.named_parameters()) > len(b) // 2


def test_two_processes_give_one_process_result_at_the_same_global_batch(two_processes, tiny_model, shard_set_fp32,
                                                                         tmp_path):
    """Full mode under DDP: two processes at batch 2 reach the weights one process reaches at batch 2 and
    grad_accum 2 when it is fed the same micro-batches (each step: process 0's, then process 1's). Noise, sigma and
    caption dropout follow each sample wherever it trains; the gradients are averaged and clipped (hard, here)
    alike. Bit for bit: two processes' all-reduce adds the same two halves that one process accumulates."""
    saved = torch.load(two_processes["equal"], weights_only=False)
    assert len({k for b in saved["fed"][0] + saved["fed"][1] for k in b["keys"]}) > 4
    run = _one_process_on(saved["fed"], tiny_model, shard_set_fp32, tmp_path / "one")
    base = _base_weights(tiny_model)
    one, two = run.stepper.trained_state(), saved["weights"]
    assert torch.cat([(two[n] - base[n]).flatten() for n in base]).norm() > 1e-3
    assert all(torch.equal(one[n], two[n]) for n in base)


def _one_process_on(fed, tiny_model, shard_set_fp32, out):
    """One process, grad_accum 2, fed the micro-batches two processes drew (each step: process 0's, then 1's)."""
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import build_run, run_accelerator

    cfg = load_config(TrainConfig, _args(tiny_model, shard_set_fp32, out, *EQUAL, "train.grad_accum=2"))
    run = build_run(cfg, run_accelerator(cfg))
    feed = iter(b for pair in zip(*fed) for b in pair)
    for _ in range(EQUAL_STEPS):
        run.stepper.step(lambda: next(feed))
    return run


def test_fsdp_shards_the_model_and_matches_one_process_at_the_same_global_batch(two_processes, tiny_model,
                                                                               shard_set_fp32, tmp_path):
    """train.sharding=fsdp (torch FSDP2 over gloo): each process holds half the weights, and three clipped steps
    reach what one process reaches on the same micro-batches, to float rounding (the gradient norm sums over
    shards in another order)."""
    saved = torch.load(two_processes["equal_sharded"], weights_only=False)
    run = _one_process_on(saved["fed"], tiny_model, shard_set_fp32, tmp_path / "one")
    one, two = run.stepper.trained_state(), saved["weights"]
    total = sum(p.numel() for p in run.stepper.params)
    assert abs(saved["held"] - total / 2) <= 0.01 * total  # each of two processes: half of every weight
    base = {n: p for n, p in _base_weights(tiny_model).items()}
    moved = torch.cat([(two[n] - base[n]).flatten() for n in base]).norm()
    apart = torch.cat([(two[n] - one[n]).flatten() for n in base]).norm()
    assert moved > 1e-3 and apart < 1e-5 * moved, (float(apart), float(moved))


def test_a_sharded_run_resumes_exactly_and_writes_the_whole_transformer(two_processes, tiny_model):
    """Sharded checkpoints hold the whole trained weights and each process's shard of the optimizer state and
    EMA: the run stopped at step 2 and resumed ends where the one run straight through does, bit for bit, EMA
    included; its transformer folders load whole in diffusers, and every process took part in validation."""
    from diffusers import SD3Transformer2DModel

    straight, resumed = two_processes["fsdp"]
    ckpt = straight / "checkpoints" / "step-000004"
    assert {"rank-0.pt", "rank-1.pt", "transformer.safetensors", "COMPLETE"} <= set(os.listdir(ckpt))
    assert {"step-000000.png", "step-000002.png", "step-000004.png"} <= set(os.listdir(straight / "samples"))
    for folder in ("transformer", "transformer_ema"):
        a = SD3Transformer2DModel.from_pretrained(str(straight / folder))
        b = SD3Transformer2DModel.from_pretrained(str(resumed / folder))
        assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters()), folder
    a = SD3Transformer2DModel.from_pretrained(str(straight / "transformer"))
    ema = dict(SD3Transformer2DModel.from_pretrained(str(straight / "transformer_ema")).named_parameters())
    base = _base_weights(tiny_model)
    assert sum(not torch.equal(p, ema[n]) for n, p in a.named_parameters()) > len(base) // 2
    assert sum(not torch.equal(p, base[n]) for n, p in a.named_parameters()) > len(base) // 2
    assert [json.loads(x)["step"] for x in open(resumed / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_sharded_checkpoint_resumes_only_with_its_number_of_processes(two_processes, tiny_model, shard_set_fp32):
    from types import SimpleNamespace

    from shards.common.config import load_config
    from shards.common.errors import UsageError
    from train import checkpoint
    from train.config import TrainConfig

    straight = two_processes["fsdp"][0]
    cfg = load_config(TrainConfig, _args(tiny_model, shard_set_fp32, straight, *SHARDED))
    three = SimpleNamespace(num_processes=3, process_index=0, is_main_process=True)
    with pytest.raises(UsageError, match=r"saved by 2 processes with train.sharding=fsdp.*resume it with 2 processes "
                                         r"\(torchrun --nproc-per-node=2\), not 3"):
        checkpoint.load(str(straight / "checkpoints" / "step-000004"), three, cfg, None, {}, {"training": None})


def test_a_sharded_bf16_run_steps_each_shard_by_stochastic_rounding(two_processes, tiny_model):
    from diffusers import SD3Transformer2DModel

    folder = two_processes["fsdp_bf16"] / "transformer"
    assert {t.dtype for t in load_file(str(folder / "diffusion_pytorch_model.safetensors")).values()} == {torch.bfloat16}
    trained = dict(SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16).named_parameters())
    base = {n: p.to(torch.bfloat16) for n, p in _base_weights(tiny_model).items()}
    # At lr 1e-6 an update is ~1e-6, under a hundredth of the bf16 step of these weights (~2e-4 at 0.02): rounded
    # to nearest, nothing would move. Rounded stochastically, a weight moves one bf16 step with probability
    # update/step, so ~1% of them do, and by one step.
    changed = sum(int((trained[n] != base[n]).sum()) for n in base)
    total = sum(p.numel() for p in base.values())
    assert 0.001 * total < changed < 0.2 * total, (changed, total)


def _base_weights(tiny_model):
    from diffusers import SD3Transformer2DModel

    return dict(SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer")).named_parameters())


def test_only_the_last_micro_batch_of_a_step_all_reduces(two_processes):
    """With grad_accum=4 the all-reduces a DDP comm hook counts equal those of grad_accum=1."""
    counts = two_processes["counts"]
    assert counts["1"] >= 3 and counts["4"] == counts["1"], counts  # per optimizer step, not per micro-batch


def test_fp16_on_cpu_trains_with_a_gradient_scaler(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    r = train(load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=3",
                                             "train.mixed_precision=fp16")))
    shared = torch.load(tmp_path / "checkpoints" / "step-000003" / "shared.pt", weights_only=False)
    scaler = shared["training"]["scaler"]
    assert scaler is not None and scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    lora = load_file(r["lora"])
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    fp32 = train(load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path / "fp32", "train.max_steps=3")))
    ref = load_file(fp32["lora"])
    assert any(not torch.equal(ref[k], lora[k]) for k in ref)  # autocast ran the matmuls in fp16


def test_host_syncs_one_per_step_and_one_transfer_per_log_interval(tiny_model, shard_set_fp32, tmp_path, monkeypatch):
    from shards.common.config import load_config
    from train.config import TrainConfig
    import train.loop as loop

    main = threading.get_ident()
    counts = {"steps": 0, "syncs": 0, "by": {}}
    in_step = [False]

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            if in_step[0] and threading.get_ident() == main:
                where = sys._getframe(1).f_code.co_filename
                counts["by"][where] = counts["by"].get(where, 0) + 1
                # AdamW reads its per-parameter step counters, CPU tensors also when training on CUDA.
                if not where.endswith(os.path.join("torch", "optim", "optimizer.py")):
                    counts["syncs"] += 1
            return real(self, *a, **kw)
        return wrapper

    for name in ("item", "cpu", "tolist", "__bool__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_step, real_flush = loop.TrainStep.step, loop.Metrics.flush

    def step(self, next_batch):
        in_step[0] = True
        try:
            return real_step(self, next_batch)
        finally:
            in_step[0] = False
            counts["steps"] += 1

    def flush(self, bar=None):
        in_step[0] = True
        try:
            return real_flush(self, bar)
        finally:
            in_step[0] = False

    monkeypatch.setattr(loop.TrainStep, "step", step)
    monkeypatch.setattr(loop.Metrics, "flush", flush)
    loop.train(load_config(TrainConfig, _args(tiny_model, shard_set_fp32, tmp_path, "train.max_steps=10",
                                              "train.log_every=5", "train.grad_accum=2", "checkpoint.every=0")))
    assert counts["steps"] == 10
    # One per step (whether the step's loss and gradients were finite), two transfers per log interval.
    assert counts["syncs"] == 10 + 2 * 2, counts
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, 11)) and all(len(x["losses"]) == 4 for x in lines)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    from train import outputs

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 11)))
    real = json.dumps
    calls = []

    def failing(obj, *a, **kw):
        calls.append(obj)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(obj, *a, **kw)

    monkeypatch.setattr(outputs.json, "dumps", failing)
    with pytest.raises(OSError):
        outputs.keep_metrics_until(str(path), 5)
    monkeypatch.setattr(outputs.json, "dumps", real)
    assert [json.loads(x)["step"] for x in open(path)] == list(range(1, 11))  # the history is whole
    outputs.keep_metrics_until(str(path), 5)
    assert [json.loads(x)["step"] for x in open(path)] == list(range(1, 6))
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_a_tracker_that_cannot_log_is_refused_with_its_key():
    import importlib.util

    from shards.common.errors import UsageError
    from train.step import make_accelerator

    with pytest.raises(UsageError, match="'train.trackers'.*nosuch"):
        make_accelerator("cpu", "no", 1, ["nosuch"])
    if importlib.util.find_spec("wandb") is None:  # a known tracker whose package is missing
        with pytest.raises(UsageError, match="'train.trackers'.*not installed"):
            make_accelerator("cpu", "no", 1, ["wandb"])
    assert make_accelerator("cpu", "no", 1, ["tensorboard"], "/tmp").log_with


def test_auto_precision_follows_the_gpu_and_ddp_never_rebroadcasts_buffers(tiny_model, shard_set_fp32, monkeypatch):
    """bf16 where the GPU computes in it, fp16 (with the scaler) on T4 / V100 class GPUs that only emulate it;
    DDP without the per-forward broadcast of the constant position-embedding buffer."""
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.objective import resolve_dtypes
    from train.step import make_accelerator

    cfg = load_config(TrainConfig, _args(tiny_model, shard_set_fp32, "o"))
    for capability, want in (((7, 5), (torch.float16, "fp16")), ((7, 0), (torch.float16, "fp16")),
                             ((8, 0), (torch.bfloat16, "bf16")), ((9, 0), (torch.bfloat16, "bf16"))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_dtypes(cfg, torch.device("cuda")) == want, capability
    assert resolve_dtypes(cfg, torch.device("cpu")) == (torch.float32, "no")
    assert make_accelerator("cpu").ddp_handler.broadcast_buffers is False
