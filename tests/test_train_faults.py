"""Stage 2 under faults: one writer per out.dir, Ctrl-C and kills before a checkpoint, resumes with changed
settings, damaged data, a full disk while checkpointing."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from conftest import REPO, cli
from test_train import TEXT_ENCODER_MODULES, train_args

ENV = {**os.environ, "PYTHONPATH": REPO}


def _command(model, shards, out, *extra):
    return [sys.executable, "-m", "train", *train_args(model, shards, str(out), "validation.enabled=false",
                                                        "train.log_every=1", *extra)]


def _wait_for(predicate, proc, what: str, limit: float = 120):
    deadline = time.time() + limit
    while not predicate():
        assert proc.poll() is None, f"training ended before {what}: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
        assert time.time() < deadline, f"no {what} within {limit} s"
        time.sleep(0.05)


def _logged_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def _started(out):
    return (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0


def test_killed_before_a_checkpoint_restarts_and_ctrl_c_saves_one_to_resume_from(model_without_text_encoders,
                                                                                  shard_set_fp32, tmp_path):
    """One run's life: SIGKILL before its first checkpoint, the same command starts it again; Ctrl-C saves a
    checkpoint; the command resumes from it to the end; run again, it is up to date. The killed and stopped runs
    are processes of their own; the resumes after them run in this process, from what those left on disk.

    The model folder has no text encoders or tokenizers, as on a training machine, and the stopped run's
    process, which validated at step 0, shows it never imported their code either."""
    model = model_without_text_encoders
    assert not any(n.startswith(("text_encoder", "tokenizer")) for n in os.listdir(model))
    out = tmp_path / "run"
    # validation.every > 0: each fresh start validates at step 0, so the import check below covers sampling too.
    validate = ("validation.enabled=true", "validation.every=100000", "validation.steps=1")
    cmd = _command(model, shard_set_fp32, out, "train.max_steps=100000", "checkpoint.every=0", *validate)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _started(out), proc, "a logged step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints").exists() and (out / ".shardtune.lock").exists()  # a dead holder's lock file
    marker = out / ".shardtune-train-run.json"

    def restarted():  # the new run has marked out.dir as its own and logged a step
        try:
            return json.loads(marker.read_text())["pid"] == proc.pid and _started(out)
        except (OSError, ValueError):
            return False

    # `python -m train` with the names of every module it imported written out at exit (-X importtime misses
    # modules that transformers' lazy loader imports).
    modules = tmp_path / "modules.json"
    record = (f"import atexit, json, runpy, sys\natexit.register(lambda: open({str(modules)!r}, 'w').write("
              "json.dumps(sorted(sys.modules))))\nrunpy.run_module('train', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([cmd[0], "-c", record, *cmd[3:]], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(restarted, proc, "a logged step of the restarted run")
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert "stopped before its first checkpoint" in stdout and "starting it again from step 0" in stdout
    assert proc.returncode == 130, err[-2000:]
    line = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("train: stopped at step")][0]
    step = int(line.split("stopped at step ")[1].split()[0])
    assert 1 <= step < 100000 and f"step-{step:06d}" in line and "run the same command" in line
    assert (out / "checkpoints" / f"step-{step:06d}" / "COMPLETE").exists()
    imported = json.loads(modules.read_text())
    assert "train.loop" in imported and (out / "samples" / "step-000000.png").exists()
    assert [m for m in imported if any(t in m for t in TEXT_ENCODER_MODULES)] == []
    # Shortened to the stop step plus a few, the command resumes where the stop saved.
    finish = _command(model, shard_set_fp32, out, f"train.max_steps={step + 3}", "checkpoint.every=0", *validate)[3:]
    r = cli("train", *finish)
    assert r.returncode == 0 and f"resuming from {out / 'checkpoints' / f'step-{step:06d}'}" in r.stdout + r.stderr, \
        r.stderr[-2000:]
    assert _logged_steps(out) == list(range(1, step + 4))  # the killed run's lines are gone, none twice
    assert "train: up to date" in cli("train", *finish).stdout


def test_a_second_train_into_the_same_out_dir_is_refused(tiny_model, shard_set_fp32, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shards.common.lock import out_dir_lock\n"
                               f"with out_dir_lock({str(out)!r}, 'train'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("train", *_command(tiny_model, shard_set_fp32, out, "train.max_steps=2")[3:])  # a lock is per process
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
        assert f"out.dir {out} is in use by train (pid {holder.pid} on " in err[0]
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def _train(*argv):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    return train(load_config(TrainConfig, list(argv)))


def _lora_info(path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["shardtune"])


def test_resume_decides_per_key_and_the_lora_records_what_ran(tiny_model, shard_set_fp32, tmp_path, capsys):
    from shards.common.errors import UsageError
    from train.config import TrainConfig
    from train.optim import lr_factor
    from shards.common.config import flat_keys
    from train.resume import rule

    from omegaconf import OmegaConf

    keys = flat_keys(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    assert len(keys) > 50 and all(rule(k) for k in keys)  # every key of the schema has a rule
    out = str(tmp_path / "run")
    base = train_args(tiny_model, shard_set_fp32, out, "validation.enabled=false", "checkpoint.every=2",
                      "train.lr_schedule=cosine")
    _train(*base, "train.max_steps=4")
    capsys.readouterr()
    r = _train(*base, "train.max_steps=8", "train.lr=1e-3", "train.adam_beta2=0.99",
               f"resume={out}/checkpoints/step-000002")
    err = capsys.readouterr().err
    assert "train.lr 0.0001 -> 0.001" in err and "train.adam_beta2 0.999 -> 0.99" in err and "from step 3 on" in err
    assert "the learning rate of step 3 is" in err  # cosine over 8 steps at lr 1e-3, not over 4 at 1e-4
    third = json.loads(open(r["metrics"]).read().splitlines()[2])
    assert third["step"] == 3 and abs(third["lr"] - 1e-3 * lr_factor(2, "cosine", 0, 8)) < 1e-12
    # The summary's rates cover the whole run, steps before the resume included: samples per step = batch size.
    assert r["steps"] == 8 and abs(r["samples_per_second"] * r["mean_step_seconds"] - 2) < 1e-9
    changes = _lora_info(r["lora"])["config_changes"]
    assert changes[0]["step"] == 2
    assert {"key": "train.lr", "from": 1e-4, "to": 1e-3} in changes[0]["changes"]
    from merge.card import lora_header, training_facts

    facts = training_facts(lora_header(r["lora"]))  # what the release's model card shows
    assert facts["learning rate"] == 1e-3 and "after step 2: " in facts["changed on resume"]
    assert "train.lr 0.0001 -> 0.001" in facts["changed on resume"]
    with pytest.raises(UsageError, match=r"train.optimizer adamw -> adafactor"):
        _train(*base, "train.max_steps=10", "train.optimizer=adafactor")
    finished = [*base, "train.max_steps=8", "train.lr=1e-3", "train.adam_beta2=0.99"]
    assert "up_to_date" in _train(*finished)
    with pytest.raises(UsageError, match=r"holds a finished run made with other settings \(train.lr 0.001 -> 0.01\)"):
        _train(*finished, "train.lr=1e-2")
    with pytest.raises(UsageError, match=r"step-000008 is at step 8, past train.max_steps 6"):
        _train(*base, "train.max_steps=6")  # it would re-save step 6 with step 8's state
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-000006", "step-000008"]


def test_files_not_marked_as_a_runs_own_are_never_restarted_over(tmp_path):
    from shards.common.config import load_config
    from shards.common.errors import UsageError
    from train.config import TrainConfig
    from train.loop import prepare_out_dir

    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "my_photo.png").write_bytes(b"mine")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    cfg = load_config(TrainConfig, [f"model.path={tmp_path}", f"data.shards={tmp_path}", f"out.dir={tmp_path}"])
    with pytest.raises(UsageError, match="holds an earlier run"):
        prepare_out_dir(cfg)
    assert (tmp_path / "samples" / "my_photo.png").read_bytes() == b"mine"


def test_non_finite_shard_data_is_named_not_blamed_on_the_learning_rate(tiny_model, shard_set_fp32, tmp_path, capsys):
    import torch

    from shards import read_extras, read_manifest, read_samples
    from shards.common.config import run_cli
    from shards.writer import ShardSetWriter
    from train.__main__ import main

    m = read_manifest(shard_set_fp32)
    damaged = tmp_path / "damaged"
    w = ShardSetWriter(str(damaged), dtype="fp32")
    for i, s in enumerate(read_samples(shard_set_fp32)):
        tensors = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        if i == 0:
            tensors["latent_mean"] = torch.full_like(tensors["latent_mean"], float("nan"))
            bad_key = s["key"]
        w.add(s["key"], tensors, s["meta"])
    w.write_extras(read_extras(shard_set_fp32), {"validation_prompts": m.extras.validation_prompts})
    w.close({k: m.to_json()[k] for k in ("model", "vae", "latent_channels", "embeddings", "max_sequence_length", "precisions",
                               "config")})
    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, str(damaged), str(tmp_path / "run"), "train.max_steps=40",
                                          "validation.enabled=false", "data.flip=0"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and f"sample {bad_key} (latent_mean)" in err and "shards verify" in err
    assert "train.lr" not in err


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(
        tiny_model, shard_set_fp32, tmp_path, capsys, monkeypatch):
    from shards.common.config import run_cli
    from train import checkpoint
    from train.__main__ import main

    def full(*a, **k):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli("train", main, train_args(tiny_model, shard_set_fp32, str(out), "train.max_steps=3",
                                          "checkpoint.every=2", "validation.enabled=false"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("train: error: writing the checkpoint ")
    assert "step-000002" in err[-1] and "free some space" in err[-1]
    assert os.listdir(out / "checkpoints") == []


def test_a_second_signal_quits_at_once_and_old_saved_keys_are_not_changes(tmp_path):
    import signal as sig
    from types import SimpleNamespace

    from shards.common.config import load_config, to_dict
    from shards.common.errors import UsageError
    from train.config import TrainConfig
    from train.resume import changes
    from train.stop import StopRequest

    stop = StopRequest(SimpleNamespace(is_main_process=False, num_processes=1))
    stop._handle(sig.SIGTERM, None)
    assert stop.should_stop()
    with pytest.raises(KeyboardInterrupt):
        stop._handle(sig.SIGINT, None)
    cfg = load_config(TrainConfig, [f"model.path={tmp_path}", f"data.shards={tmp_path}", f"out.dir={tmp_path}",
                                    "train.optimizer=adafactor"])
    saved = to_dict(cfg)
    saved["train"] = {**saved["train"], "a_key_this_version_dropped": 3, "adam_beta1": 0.5}
    assert changes(saved, cfg, "ckpt") == []  # a dropped key is past; Adafactor has no Adam betas
    # A key added since the checkpoint was written had its default then: neither a change nor a refusal.
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k not in ("sharding", "ema_every")}}
    assert changes(older, cfg, "ckpt") == []
    with pytest.raises(UsageError, match=r"train.sharding none -> fsdp"):
        changes(older, load_config(TrainConfig, [f"model.path={tmp_path}", f"data.shards={tmp_path}",
                                                 f"out.dir={tmp_path}", "train.optimizer=adafactor",
                                                 "train.mode=full", "train.sharding=fsdp"]), "ckpt")
