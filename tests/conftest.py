"""Shared fixtures: the tiny model, sample data and a shard set are built once per test session."""
import os
import shutil
import subprocess
import sys

import pytest

# One compute thread per process, for the test workers and every process they start (set before torch is
# imported): `-n auto` runs a worker per core and many tests start processes of their own, and with torch's
# default of a thread per core in each, OpenMP's spinning waits took 30% of the suite's CPU time here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The files that take longest start first: `--dist loadfile` hands each worker a whole file, in collection order
# (`--no-loadscope-reorder`, set in pyproject), and on two cores a long file started last leaves the other core
# idle until it ends. The rest follow in name order.
LONGEST_FIRST = ("test_demo.py", "test_train_scale.py", "test_train_runs.py", "test_precompute_runs.py",
                 "test_bench.py", "test_train.py", "test_memory_model.py", "test_train_faults.py",
                 "test_merge_release.py", "test_merge_single_file.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: a file's tests keep their order


def eval_loss(transformer, shards):
    """Loss over every sample at fixed sigmas and fixed noise: comparable before and after training."""
    import torch

    from shards import read_manifest, read_samples
    from train import flow

    m = read_manifest(shards)
    g = torch.Generator().manual_seed(0)
    table = flow.sigma_table(1000, 3.0)
    losses = []
    with torch.no_grad():
        for s in read_samples(shards):
            for u in (0.2, 0.4, 0.6, 0.8):
                eps = torch.randn(s["latent_mean"][None].shape, generator=g)
                x0 = flow.model_latents(s["latent_mean"][None], s["latent_std"][None], eps,
                                        m.vae.shift_factor, m.vae.scaling_factor)
                noise = torch.randn(x0.shape, generator=g)
                sigma = flow.sigmas_for(torch.tensor([u]), table)
                noisy = flow.noisy_latents(x0, noise, sigma)
                out = transformer(hidden_states=noisy, timestep=sigma * 1000,
                                  encoder_hidden_states=s["prompt_embeds"][None].float(),
                                  pooled_projections=s["pooled_prompt_embeds"][None].float(), return_dict=False)[0]
                losses.append(flow.flow_matching_loss(out, x0, noise, noisy, sigma).item())
    return sum(losses) / len(losses)


def wait_for(path, proc, what: str, timeout: float = 300) -> None:
    """Until `path` exists; fails if `proc` ends first ("<what> ended before it could be killed") or time runs out."""
    import time

    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, f"{what} ended before it could be killed"
        time.sleep(0.002)


def sigkill_when(path, proc, what: str) -> None:
    """SIGKILL `proc` as soon as `path` exists, and reap it."""
    import signal

    wait_for(path, proc, what)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_module(module: str, *args: str, cwd: str = REPO, timeout: int = 600):
    """Run `python -m module args...` as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args...` run in this process: the command's own parsing, output and exit status,
    without the 2-12 s a new interpreter spends importing torch and diffusers. Tests whose point is a separate
    process (a lock holder, a kill, a signal, what gets imported) use run_module."""
    import contextlib
    import importlib
    import io

    command = importlib.import_module(f"{module}.__main__").command
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            command(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def tiny_model_copy(tmp_path_factory, name: str, **layout) -> str:
    """A fresh copy of the tiny pipeline of `layout` (build_tiny_model's arguments): each layout is built once
    per test run, shared by the xdist workers (building one takes 5-12 s here, copying it well under one),
    and copied so that no test sees what another did to its model."""
    import fcntl
    import json

    from precompute.tiny import build_tiny_model

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    key = json.dumps(layout, sort_keys=True, default=list)
    cache = shared / ("tiny-cache-" + "".join(c if c.isalnum() else "_" for c in key))
    with open(f"{cache}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker builds it; the others wait for it
        if not (cache / "model_index.json").exists():
            build_tiny_model(str(cache), **layout)
    dst = tmp_path_factory.mktemp(name) / "tiny-sd3"
    shutil.copytree(cache, dst)
    return str(dst)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, "model")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from precompute.tiny import build_sample_dataset

    return build_sample_dataset(str(tmp_path_factory.mktemp("data") / "sample"))


def precompute_cfg(model, data, out, **over):
    from precompute.config import PrecomputeConfig
    from shards.common.config import load_config

    args = [f"model.path={model}", f"data.path={data}", f"out.dir={out}", "buckets.resolution=128",
            "buckets.step=32", "buckets.min_size=64", "validation.prompts=[a photo of a cat,a red apple]"]
    args += [f"{k}={v}" for k, v in over.items()]
    return load_config(PrecomputeConfig, args)


@pytest.fixture(scope="session")
def shard_set_fp32(tiny_model, sample_data, tmp_path_factory):
    """Full-precision shard set (fp32 T5 and storage) for exact comparisons with diffusers."""
    from precompute.run import run

    out = str(tmp_path_factory.mktemp("shards") / "fp32")
    run(precompute_cfg(tiny_model, sample_data, out, **{"text.t5_precision": "fp32", "out.dtype": "fp32",
                                                          "out.samples_per_shard": 3}))
    return out


@pytest.fixture(scope="session")
def model_without_text_encoders(tiny_model, tmp_path_factory):
    """A copy of the tiny pipeline with its text encoders and tokenizers deleted."""
    dst = str(tmp_path_factory.mktemp("noenc") / "tiny-sd3")
    shutil.copytree(tiny_model, dst)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(os.path.join(dst, name))
    return dst


def small_set(out, n: int, per_shard: int, buckets: int = 3, prefix: str = "s", seed: int = 0) -> dict:
    """A shard set of `n` small random samples in `buckets` buckets, written with the project's writer
    (no model needed): for tests of the data stream. Returns its manifest."""
    import torch

    from shards.writer import ShardSetWriter

    g = torch.Generator().manual_seed(seed)
    w = ShardSetWriter(str(out), dtype="fp32", samples_per_shard=per_shard, overwrite=True)
    for i in range(n):
        b = [16 + 8 * (i % buckets), 16]
        t = {"latent_mean": torch.randn(4, b[0] // 8, 2, generator=g), "latent_std": torch.rand(4, b[0] // 8, 2, generator=g),
             "prompt_embeds": torch.randn(5, 6, generator=g), "pooled_prompt_embeds": torch.randn(5, generator=g)}
        w.add(f"{prefix}{i:05d}", t, {"caption": f"c{i}", "source": f"{prefix}/{i}.png", "sha256": f"{prefix}{i:063x}",
                                     "original_size": b, "crop_top_left": [0, 0], "bucket": b})
    w.write_extras({"empty_prompt_embeds": torch.zeros(5, 6), "empty_pooled_prompt_embeds": torch.zeros(5),
                    "validation_prompt_embeds": torch.zeros(1, 5, 6), "validation_pooled_prompt_embeds": torch.zeros(1, 5)},
                   {"validation_prompts": ["p"]})
    return w.close({"model": {"path": "m", "components": {}}, "vae": {"scaling_factor": 1.5, "shift_factor": 0.1,
                    "downsample_factor": 8}, "latent_channels": 4, "embeddings": {"prompt_embeds_dim": 6, "clip_tokens": 2,
                    "pooled_dim": 5}, "max_sequence_length": 3, "precisions": {"t5": "fp32"}, "config": {}})


def write_tar(path, members) -> None:
    """A plain tar of (member name, bytes) pairs, in that order (webdataset input tars for tests)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def copy_of_set(src: str, out: str, rename=lambda key: key, spec="same") -> dict:
    """The samples, extras and facts of shard set `src` written again with the project's writer, in shards of
    the same sizes: keys (and sources) renamed by `rename`, stored as `spec` ("same": as `src` stores them;
    None: format v1). Returns the new manifest."""
    import torch

    from shards import read_extras, read_manifest, read_samples
    from shards.writer import ShardSetWriter

    m = read_manifest(src)
    per_shard = m.shards[0].samples
    assert all(s.samples == per_shard for s in m.shards[:-1])
    w = ShardSetWriter(out, dtype=m.dtype, samples_per_shard=per_shard, spec=m.spec if spec == "same" else spec)
    for s in read_samples(src):
        meta = {k: v for k, v in s["meta"].items() if k != "key"}
        meta["source"] = rename(meta["source"])
        w.add(rename(s["key"]), {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}, meta)
    w.write_extras(read_extras(src), {"validation_prompts": m.extras.validation_prompts})
    skip = ("format", "format_version", "producer", "stored", "dtype", "buckets", "shards", "counts", "extras",
            "files", "manifest_sha256", "rejected_reasons", "truncated_captions", "excluded", "numerics")
    return w.close({k: v for k, v in m.to_json().items() if k not in skip})


@pytest.fixture
def stages_in_process(monkeypatch, tmp_path):
    """`python -m bench` with each stage's module run in this process: the same `main(["--json", FILE, ...])`
    and rows file its own process would run and write, without the 10-15 s a new interpreter spends importing
    torch, diffusers and peft. One test runs a stage as the driver does, in a process of its own."""
    import contextlib
    import importlib
    import io

    from bench import driver
    from bench.results import load_results

    def stage_rows(module, *args):
        path = str(tmp_path / f"{module}.rows.json")
        with contextlib.redirect_stdout(io.StringIO()):  # the driver sends a stage's stdout to /dev/null
            importlib.import_module(module).main(["--json", path, *args])
        yield from load_results(path)[1]

    monkeypatch.setattr(driver, "stage_rows", stage_rows)
