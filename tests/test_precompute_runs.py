"""Stage 1 as a long job: killed and restarted, rerun with changes, split into parts, augmented."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from shards import read_manifest, read_rejected, read_samples
from conftest import REPO, precompute_cfg, sigkill_when

FAST = {"text.t5_precision": "none", "num_workers": 0}


def _run(model, data, out, **over):
    from precompute.run import run

    return run(precompute_cfg(model, data, out, **{**FAST, **over}))


def _tensors(out):
    return {s["key"]: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in read_samples(out)}


def _same_set(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert ta[k].keys() == tb[k].keys()
        for name in ta[k]:
            assert torch.equal(ta[k][name], tb[k][name]), (k, name)
    ma, mb = read_manifest(a), read_manifest(b)
    for field in ("shards", "counts", "buckets", "excluded", "extras", "rejected_reasons"):
        assert getattr(ma, field) == getattr(mb, field), field


@pytest.fixture(scope="module")
def many_images(sample_data, tmp_path_factory):
    """40 distinct real photos: the sample set at five sizes each (different content, same captions)."""
    d = tmp_path_factory.mktemp("many")
    for name in sorted(os.listdir(sample_data)):
        stem, ext = os.path.splitext(name)
        if ext == ".txt":
            continue
        img = Image.open(os.path.join(sample_data, name)).convert("RGB")
        caption = open(os.path.join(sample_data, stem + ".txt")).read()
        for k, scale in enumerate((1.0, 0.9, 0.8, 0.7, 0.6)):
            img.resize((round(img.width * scale), round(img.height * scale))).save(d / f"{stem}-{k}.png")
            (d / f"{stem}-{k}.txt").write_text(caption)
    return str(d)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tiny_model, many_images, tmp_path):
    # The killed run is a process of its own; the uninterrupted run and the rerun run here, the rerun with
    # nothing of the killed run but what it left on disk. Float results depend on the CPU thread count, so the
    # killed run uses this process's.
    def argv(out):
        return [f"model.path={tiny_model}", f"data.path={many_images}", f"out.dir={out}", "buckets.resolution=128",
                "buckets.step=32", "buckets.min_size=64", "validation.prompts=[a photo of a cat,a red apple]",
                "text.t5_precision=none", "num_workers=0", "out.samples_per_shard=2", "batch_size=1"]

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    from conftest import cli

    whole = str(tmp_path / "whole")
    assert cli("precompute", *argv(whole)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *argv(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(out / "shard-000003.json", proc, "precompute")
    assert not (out / "manifest.json").exists()
    done = sorted(n for n in os.listdir(out) if n.endswith(".json") and n.startswith("shard-"))
    assert 4 <= len(done) < 20
    kept = {n: os.stat(out / n).st_ino for n in done}
    r = cli("precompute", *argv(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(os.stat(out / n).st_ino == ino for n, ino in kept.items())  # finished shards were not redone
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    _same_set(whole, str(out))


def test_changes_are_detected_and_only_affected_shards_redone(tiny_model, sample_data, tmp_path):
    from shards.common.errors import UsageError

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    out = str(tmp_path / "out")
    _run(tiny_model, str(data), out, **{"out.samples_per_shard": 2})
    with pytest.raises(UsageError, match=r"config buckets.resolution \(128 -> 96\)"):
        _run(tiny_model, str(data), out, **{"out.samples_per_shard": 2, "buckets.resolution": 96})
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = json.load(open(model / "vae" / "config.json"))
    cfg["scaling_factor"] = 1.0
    json.dump(cfg, open(model / "vae" / "config.json", "w"))
    with pytest.raises(UsageError, match="model components vae"):
        _run(str(model), str(data), out, **{"out.samples_per_shard": 2})
    # Touching a file without changing it is not a change; changing its pixels is.
    os.utime(data / "camera.png")
    assert _run(tiny_model, str(data), out, **{"out.samples_per_shard": 2}).up_to_date
    img = Image.open(data / "camera.png")
    img.putpixel((0, 0), 255 - img.getpixel((0, 0)))
    img.save(data / "camera.png")
    with pytest.raises(UsageError, match="source files changed"):
        _run(tiny_model, str(data), out, **{"out.samples_per_shard": 2})
    before = {n: os.stat(os.path.join(out, n)).st_ino for n in os.listdir(out) if n.endswith(".tar")}
    _run(tiny_model, str(data), out, **{"out.samples_per_shard": 2, "out.overwrite": "true"})
    after = {n: os.stat(os.path.join(out, n)).st_ino for n in os.listdir(out) if n.endswith(".tar")}
    redone = [n for n in before if before[n] != after[n]]
    assert redone == ["shard-000000.tar"]  # camera.png is the 2nd input (sorted): shard 0 of 2-input shards
    fresh = str(tmp_path / "fresh")
    _run(tiny_model, str(data), fresh, **{"out.samples_per_shard": 2})
    _same_set(fresh, out)


def test_parts_together_equal_one_run(tiny_model, sample_data, tmp_path):
    from conftest import cli

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    shutil.copy(data / "coffee.png", data / "zz-copy-of-coffee.png")  # a duplicate in another shard
    (data / "zz-copy-of-coffee.txt").write_text("the same coffee")
    one = str(tmp_path / "one")
    m = _run(tiny_model, str(data), one, **{"out.samples_per_shard": 3})
    assert list(m.manifest.excluded.values()) == ["duplicate: same content as coffee.png"]
    assert len(list(read_samples(one))) == 8 and vars(m.manifest.counts) == {"seen": 9, "written": 8, "rejected": 1}
    # Same folder, parts one after the other: the last part completes the set.
    shared = str(tmp_path / "shared")
    progress = _run(tiny_model, str(data), shared, **{"out.samples_per_shard": 3, "part": 1, "parts": 2})
    assert progress.manifest is None and not os.path.exists(os.path.join(shared, "manifest.json"))
    _run(tiny_model, str(data), shared, **{"out.samples_per_shard": 3, "part": 0, "parts": 2})
    _same_set(one, shared)
    # Separate folders, combined afterwards.
    for part in (0, 1):
        _run(tiny_model, str(data), str(tmp_path / f"p{part}"), **{"out.samples_per_shard": 3, "part": part, "parts": 2})
    r = cli("shards", "combine", str(tmp_path / "combined"), str(tmp_path / "p0"), str(tmp_path / "p1"))
    assert r.returncode == 0, r.stderr
    _same_set(one, str(tmp_path / "combined"))
    assert cli("shards", "verify", str(tmp_path / "combined")).returncode == 0
    r = cli("shards", "combine", str(tmp_path / "half"), str(tmp_path / "p0"))
    assert r.returncode == 1 and "missing" in r.stderr


def test_flip_random_crop_and_min_size(tiny_model, sample_data, tmp_path):
    from diffusers import AutoencoderKL

    from precompute.buckets import resize_and_crop
    from precompute.images import load_rgb

    out = str(tmp_path / "aug")
    over = {"augment.flip": "true", "buckets.crop": "random", "out.dtype": "fp32", "buckets.min_size": 400}
    m = _run(tiny_model, sample_data, out, **over)
    assert m.manifest.flipped_latents is True
    small = {r["source"] for r in read_rejected(out) if r["reason"].startswith("too small")}
    assert small == {"chelsea.png", "coins.png"}  # 300 and 303 px on the short side
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_model, "vae"))
    moved = 0
    for s in read_samples(out):
        img, _ = load_rgb(os.path.join(sample_data, s["meta"]["source"]))
        center, _ = resize_and_crop(img, tuple(s["meta"]["bucket"]))
        pixels, crop = resize_and_crop(img, tuple(s["meta"]["bucket"]), random.Random(f"0:{s['meta']['source']}"))
        assert list(crop) == s["meta"]["crop_top_left"]
        moved += not torch.equal(center, pixels)
        with torch.no_grad():
            flipped = vae.encode(pixels.flip(-1)[None]).latent_dist
        assert torch.allclose(s["latent_mean_flip"], flipped.mean[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(s["latent_mean_flip"], s["latent_mean"])
    assert moved > 0
    again = str(tmp_path / "again")
    _run(tiny_model, sample_data, again, **over)
    _same_set(out, again)  # random crops are seeded per image
    kept = _run(tiny_model, sample_data, str(tmp_path / "up"), **{**over, "buckets.upscale": "true"})
    assert kept.manifest.counts.written == 8


def test_an_edited_caption_is_a_change(tiny_model, sample_data, tmp_path):
    from shards.common.errors import UsageError

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    out = str(tmp_path / "out")
    _run(tiny_model, str(data), out)
    (data / "astronaut.txt").write_text("an astronaut, recaptioned")
    with pytest.raises(UsageError, match="source files changed"):
        _run(tiny_model, str(data), out)
    _run(tiny_model, str(data), out, **{"out.overwrite": "true"})
    assert "an astronaut, recaptioned" in {s["meta"]["caption"] for s in read_samples(out)}


def test_combine_does_not_replace_a_set_silently(tiny_model, sample_data, tmp_path):
    from conftest import cli

    for part in (0, 1):
        _run(tiny_model, sample_data, str(tmp_path / f"p{part}"), **{"out.samples_per_shard": 3, "part": part, "parts": 2})
    other = str(tmp_path / "other")
    _run(tiny_model, sample_data, other, **{"out.samples_per_shard": 5})
    r = cli("shards", "combine", other, str(tmp_path / "p0"), str(tmp_path / "p1"))
    assert r.returncode == 2 and "already holds a complete shard set" in r.stderr
    r = cli("shards", "combine", other, str(tmp_path / "p0"), str(tmp_path / "p1"), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(read_manifest(other).shards) == 3 and cli("shards", "verify", other).returncode == 0
    # The combined manifest hashes the combined set's own files, as a single run's does.
    files = read_manifest(other).files
    assert set(files) == {"extras.safetensors", "rejected.jsonl", "run.json"} | {f"shard-00000{i}.json" for i in range(3)}
    with open(os.path.join(other, "run.json"), "a") as f:
        f.write(" ")
    r = cli("shards", "verify", "--quick", other)
    size = files["run.json"]["bytes"]
    assert r.returncode == 1 and r.stderr.startswith(f"run.json: {size + 1} bytes, manifest says {size}\n")
    assert read_manifest(other).format_version == 2 and read_manifest(other).stored is not None
    # A part made by a shardtune writing another format version is not joined with this one.
    state = json.loads((tmp_path / "p1" / "run.json").read_text())
    (tmp_path / "p1" / "run.json").write_text(json.dumps({**state, "format_version": 1}))
    r = cli("shards", "combine", str(tmp_path / "joined"), str(tmp_path / "p0"), str(tmp_path / "p1"))
    assert r.returncode == 1 and "made with other settings" in r.stderr


def test_vae_max_pixels_bounds_each_vae_call(tiny_model, sample_data, tmp_path, monkeypatch):
    """vae.max_pixels splits a bucket's batch into VAE calls of at most that many pixels (one image at least);
    the latents are those of the whole-batch run up to batched-convolution rounding, and a changed value is
    a change of content (a rerun into the same set refuses)."""
    from precompute.encoders import VaeEncoder, vae_batch

    assert [vae_batch(4, 1024 * 1024, s, s) for s in (1024, 768, 512, 256)] == [1, 1, 4, 4]
    assert vae_batch(4, 1, 64, 64) == 1 and vae_batch(3, 10 ** 9, 64, 64) == 3
    calls = []
    real = VaeEncoder._encode
    monkeypatch.setattr(VaeEncoder, "_encode", lambda self, pixels: calls.append(tuple(pixels.shape)) or real(self, pixels))
    _run(tiny_model, sample_data, tmp_path / "whole", batch_size=4)
    whole = list(calls)
    calls.clear()
    _run(tiny_model, sample_data, tmp_path / "split", batch_size=4, **{"vae.max_pixels": 2 * 96 * 96})
    assert max(n for n, _, _, _ in whole) > 1
    assert all(n * h * w <= 2 * 96 * 96 or n == 1 for n, _, h, w in calls) and len(calls) > len(whole)
    a, b = _tensors(str(tmp_path / "whole")), _tensors(str(tmp_path / "split"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        for name in a[k]:
            assert torch.allclose(a[k][name].float(), b[k][name].float(), rtol=1e-2, atol=1e-3), (k, name)
    with pytest.raises(Exception, match="vae.max_pixels"):
        _run(tiny_model, sample_data, tmp_path / "whole", batch_size=4, **{"vae.max_pixels": 64 * 64})


def _precompute(model, data, out, threads, *over):
    """The precompute command with torch on `threads` CPU threads, in this process (a subprocess per run cost
    most of these tests' time); the thread count is what the run's numerics record reads."""
    from conftest import cli

    argv = [f"model.path={model}", f"data.path={data}", f"out.dir={out}", "buckets.resolution=128", "buckets.step=32",
            "buckets.min_size=64", "validation.prompts=[a photo of a cat,a red apple]", "text.t5_precision=none",
            "num_workers=0", "out.samples_per_shard=3", *over]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return cli("precompute", *argv)
    finally:
        torch.set_num_threads(before)


def test_a_resume_with_other_cpu_threads_is_refused(tiny_model, sample_data, tmp_path):
    """The CPU thread count changes float results (measured on the tiny model: latents up to 2.3e-6 apart in
    fp32, one bf16 step, 2e-3, after storage), so a resume with another count would make a set that is
    neither run's: it is refused in one line that says what to set."""
    out = tmp_path / "set"
    r = _precompute(tiny_model, sample_data, out, 1)
    assert r.returncode == 0, r.stderr[-2000:]
    first = read_manifest(str(out))
    assert [g["settings"]["threads"] for g in first.numerics] == [1] and first.numerics[0]["shards"] == [0, 1, 2]
    assert first.extras.numerics == first.numerics[0]["settings"]
    for name in ("shard-000002.tar", "shard-000002.json", "manifest.json"):  # as a run killed in its last shard leaves it
        os.remove(out / name)
    state = (out / "run.json").read_bytes()
    r = _precompute(tiny_model, sample_data, out, 2)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "shards 0, 1 were computed with other numerics than this run (threads 1 -> 2)" in r.stderr
    assert "rerun with OMP_NUM_THREADS=1, or set out.overwrite=true" in r.stderr
    assert (out / "run.json").read_bytes() == state and not (out / "shard-000002.json").exists()
    r = _precompute(tiny_model, sample_data, out, 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(str(out)).shards == first.shards  # the same bytes as the uninterrupted run
    kept = os.stat(out / "shard-000000.tar").st_ino
    # The same command again (a retried array task; num_workers does not change what is written) says it is
    # up to date, exits 0 and leaves the set as it was (run.json is one of the hashed files).
    state = (out / "run.json").read_bytes()
    r = _precompute(tiny_model, sample_data, out, 1, "num_workers=1")
    assert r.returncode == 0 and r.stdout.startswith(f"precompute: up to date: {out} holds the complete shard set"), \
        r.stdout + r.stderr
    assert (out / "run.json").read_bytes() == state and cli_ok("shards", "verify", "--quick", str(out))
    r = _precompute(tiny_model, sample_data, out, 2, "out.overwrite=true")
    assert r.returncode == 0, r.stderr[-2000:]
    redone = read_manifest(str(out))
    assert [(g["settings"]["threads"], g["shards"]) for g in redone.numerics] == [(2, [0, 1, 2])]
    assert os.stat(out / "shard-000000.tar").st_ino != kept


def test_parts_on_other_settings_are_kept_and_reported(tiny_model, sample_data, tmp_path):
    """Parts are the user's own split of the work, possibly over machines that compute differently: each
    part's shards are kept, and the manifest and `shards inspect` say which settings computed which."""
    from conftest import cli

    out = tmp_path / "set"
    for part, threads in ((0, 1), (1, 2)):
        r = _precompute(tiny_model, sample_data, out, threads, f"part={part}", "parts=2")
        assert r.returncode == 0, r.stderr[-2000:]
    m = read_manifest(str(out))
    assert [(g["settings"]["threads"], g["shards"]) for g in m.numerics] == [(1, [0, 2]), (2, [1])]
    r = cli("shards", "inspect", str(out))
    assert r.returncode == 0 and "numerics    2 different settings" in r.stdout
    assert "shards 0, 2 (2): cpu" in r.stdout and "1 thread)" in r.stdout and "2 threads)" in r.stdout


def cli_ok(*args) -> bool:
    from conftest import cli

    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return True


def test_idle_encoders_wait_on_the_host_and_write_the_same_set(tiny_model, sample_data, tmp_path, monkeypatch):
    """`offload: idle`: the VAE encodes each batch as it comes and the text encoders take turns over a group's
    captions (groups never cross a shard's end). The set is the same tensor for tensor as with every encoder
    resident, and offload is not part of the set's identity (a rerun with the other setting is up to date)."""
    from precompute.encoders import TextEncoders

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    (data / "broken.png").write_bytes(b"not a png")  # rejects found on reading, between samples
    shutil.copy(data / "coffee.png", data / "coffee-again.png")
    sample_data = str(data)
    t5 = {"text.t5_precision": "bf16", "out.samples_per_shard": 3, "batch_size": 2,
          "validation.prompts": ["a photo of a cat"]}
    resident = str(tmp_path / "resident")
    m = _run(tiny_model, sample_data, resident, offload="none", **t5)
    rejects = {k: v for k, v in m.manifest.files.items() if k != "run.json"}  # run.json records the offload asked for
    assert m.manifest.counts.rejected == 2
    assert m.progress["offload"] == "none" and m.progress["encoder_switches"] == 0
    calls = []
    real = TextEncoders.encode_batches
    monkeypatch.setattr(TextEncoders, "encode_batches",
                        lambda self, batches, on_host=True: calls.append([len(b) for b in batches]) or
                        real(self, batches, on_host))
    idle = str(tmp_path / "idle")
    m = _run(tiny_model, sample_data, idle, offload="idle", offload_group=3, **t5)
    extras, *groups = calls
    assert extras == [1, 1] and sum(map(sum, groups)) == 8 and all(sum(g) <= 3 for g in groups)
    assert m.progress["offload"] == "idle" and m.progress["encoder_switches"] == 3 + 4 * len(groups)
    _same_set(resident, idle)
    assert {k: v for k, v in m.manifest.files.items() if k != "run.json"} == rejects  # same records, same order
    assert _run(tiny_model, sample_data, idle, offload="none", **t5).up_to_date


def test_offload_auto_keeps_every_encoder_on_a_device_they_fit(tiny_model, sample_data, tmp_path):
    """offload auto weighs the loaded encoders and one VAE call's activations (with the margins) against the
    device: all stay on one they fit, else they stay idle on the host."""
    from precompute.encoders import (Residency, TextEncoders, VaeEncoder, encoders_fit, vae_activation_bytes,
                                     weight_bytes)
    from precompute.run import _largest_vae_call, settle_offload

    cfg = precompute_cfg(tiny_model, sample_data, str(tmp_path), **FAST)
    assert vae_activation_bytes(1000, torch.bfloat16) * 2 == vae_activation_bytes(1000, torch.float32)
    assert encoders_fit(2**30, 2**30, int(3.25 * 2**30)) and not encoders_fit(2**30, 2**30, int(3.15 * 2**30))  # 2.2 + 1 GiB
    need = None
    for total, stays in ((2**40, True), (2**30, False)):  # tiny encoders: well under 1 TiB, not under 1 GiB + margins
        residency = Residency(torch.device("cpu"), idle=True)
        text = TextEncoders.load(tiny_model, "none", torch.float32, torch.device("cpu"), 77, residency)
        vae = VaeEncoder.load(tiny_model, torch.float32, torch.device("cpu"), residency=residency)
        need = sum(map(weight_bytes, [*text.modules, vae.vae])) + vae_activation_bytes(_largest_vae_call(cfg), vae.dtype)
        assert settle_offload(cfg, text, vae, total) is stays and residency.idle is not stays
    assert 0 < need < 2**30
