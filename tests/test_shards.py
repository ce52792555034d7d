"""Shard set format v1: round trip, manifest fields, verification, refusing broken sets."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from shards import ShardSetWriter, read_extras, read_manifest, read_rejected, read_samples
from shards import format as F
from shards.common.errors import DataError
from shards.manifest import Counts, Manifest
from shards.verify import verify


def _fields():
    return {"model": {"path": "m", "components": {"vae": "abc"}}, "vae": {"scaling_factor": 1.5, "shift_factor": 0.1,
            "downsample_factor": 8}, "latent_channels": 4, "embeddings": {"prompt_embeds_dim": 6, "clip_tokens": 2,
            "pooled_dim": 5}, "max_sequence_length": 3, "precisions": {"t5": "fp32"}, "config": {"a": 1}}


def _write(out, n=5, dtype="fp32", per_shard=2):
    g = torch.Generator().manual_seed(0)
    w = ShardSetWriter(out, dtype=dtype, samples_per_shard=per_shard)
    written = {}
    for i in range(n):
        t = {"latent_mean": torch.randn(4, 2, 3, generator=g), "latent_std": torch.rand(4, 2, 3, generator=g),
             "prompt_embeds": torch.randn(5, 6, generator=g), "pooled_prompt_embeds": torch.randn(5, generator=g)}
        meta = {"caption": f"caption {i}", "source": f"img{i}.png", "original_size": [20, 30],
                "crop_top_left": [0, i], "bucket": [16, 24]}
        w.add(f"k{i:03d}", t, meta)
        written[f"k{i:03d}"] = (t, meta)
    w.reject("bad.png", "unreadable image: broken")
    w.write_extras({"empty_prompt_embeds": torch.zeros(5, 6), "empty_pooled_prompt_embeds": torch.ones(5),
                    "validation_prompt_embeds": torch.ones(2, 5, 6), "validation_pooled_prompt_embeds": torch.ones(2, 5)},
                   {"validation_prompts": ["p1", "p2"]})
    return w.close(_fields()), written


def test_round_trip_is_exact(tmp_path):
    manifest, written = _write(str(tmp_path))
    got = list(read_samples(str(tmp_path)))
    assert [s["key"] for s in got] == sorted(written)
    for s in got:
        t, meta = written[s["key"]]
        for name, tensor in t.items():
            assert s[name].dtype == torch.float32 and torch.equal(s[name], tensor)
        assert s["meta"] == {"key": s["key"], **meta}
    assert read_extras(str(tmp_path))["validation_prompt_embeds"].shape == (2, 5, 6)
    assert read_rejected(str(tmp_path)) == [{"source": "bad.png", "reason": "unreadable image: broken"}]
    assert read_manifest(str(tmp_path)) == manifest


def test_manifest_is_typed_and_written_as_its_json(tmp_path):
    manifest, _ = _write(str(tmp_path))
    with open(tmp_path / F.MANIFEST) as f:
        on_disk = json.load(f)
    assert manifest.to_json() == on_disk and Manifest.from_json(on_disk) == manifest
    assert F.manifest_digest(on_disk) == on_disk[F.MANIFEST_HASH] == manifest.manifest_sha256
    assert manifest.format_version == 1 and manifest.dtype == "fp32"
    assert manifest.counts == Counts(seen=6, written=5, rejected=1)
    assert manifest.buckets == {"16x24": 5}
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    for s in manifest.shards:
        assert os.path.getsize(tmp_path / s.name) == s.bytes
    assert manifest.extras.validation_prompts == ["p1", "p2"]
    assert manifest.spec.view_shapes() == {"prompt_embeds": (5, 6), "pooled_prompt_embeds": (5,)}
    assert manifest.spec is manifest.spec and "spec" not in manifest.to_json()  # built once, not per sample read
    # The last thing written is the manifest; no temp files are left.
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert manifest.excluded == {}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("counts"), "lacks counts"),
    (lambda m: m["vae"].pop("shift_factor"), "vae lacks shift_factor"),
    (lambda m: m.update(colour="red"), r"does not know \(colour\)"),
    (lambda m: m["shards"][1].update(rows=3), r"shards\[1\] has fields this shardtune does not know \(rows\)"),
    (lambda m: m.update(format_version=9), "format version 9"),
    (lambda m: m.update(format_version=2), "'stored' in format version 2"),
    (lambda m: m.update(model=[]), "model is not a JSON object"),
])
def test_a_manifest_missing_or_adding_a_field_is_one_error_naming_it(tmp_path, edit, message):
    manifest, _ = _write(str(tmp_path))
    data = manifest.to_json()
    edit(data)
    with pytest.raises(DataError, match=message):
        Manifest.from_json(data)
    # The same edit on disk, with the self-hash made to fit it, reads to the same error.
    data[F.MANIFEST_HASH] = F.manifest_digest(data)
    with open(tmp_path / F.MANIFEST, "w") as f:
        json.dump(data, f)
    with pytest.raises(DataError, match=message):
        read_manifest(str(tmp_path))


def test_bf16_storage_and_webdataset_layout(tmp_path):
    _write(str(tmp_path), dtype="bf16")
    s = next(iter(read_samples(str(tmp_path))))
    assert s["latent_mean"].dtype == torch.bfloat16
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["k000.safetensors", "k000.json", "k001.safetensors", "k001.json"]


def test_same_samples_give_the_same_bytes(tmp_path):
    a, _ = _write(str(tmp_path / "a"))
    b, _ = _write(str(tmp_path / "b"))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_verify_finds_corruption(tmp_path):
    _write(str(tmp_path))
    assert verify(str(tmp_path)) == []
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\xff\xff")
    problems = verify(str(tmp_path), deep=False)
    assert problems == ["shard-000001.tar: sha256 differs from the manifest (corrupt or replaced)"]


def test_incomplete_set_is_refused(tmp_path):
    _write(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(DataError, match="incomplete"):
        read_manifest(str(tmp_path))


def test_keys_must_be_unique_and_webdataset_safe(tmp_path):
    w = ShardSetWriter(str(tmp_path))
    t = {"latent_mean": torch.zeros(1), "latent_std": torch.zeros(1), "prompt_embeds": torch.zeros(1),
         "pooled_prompt_embeds": torch.zeros(1)}
    with pytest.raises(ValueError, match="must not contain"):
        w.add("a.b", t, {"bucket": [8, 8]})
    w.add("ab", t, {"bucket": [8, 8]})
    with pytest.raises(ValueError, match="duplicate"):
        w.add("ab", t, {"bucket": [8, 8]})
    w.abort()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_cli_inspect_and_verify(shard_set_fp32, tmp_path):
    from conftest import REPO, cli, run_module

    r = cli("shards", "inspect", shard_set_fp32)
    assert r.returncode == 0 and "8 written" in r.stdout and "128x128" in r.stdout
    # inspect reads JSON: the command, as a user runs it, starts without importing torch
    check = ("import runpy, sys; sys.argv = ['shards', 'inspect', sys.argv[1]]\n"
             "try:\n    runpy.run_module('shards', run_name='__main__')\n"
             "finally:\n    print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", check, shard_set_fp32], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and "8 written" in r.stdout and r.stderr.strip().endswith("no torch"), r.stderr
    assert cli("shards", "verify", shard_set_fp32).returncode == 0
    broken = tmp_path / "broken"
    shutil.copytree(shard_set_fp32, broken)
    os.remove(broken / "shard-000001.tar")
    r = run_module("shards", "verify", str(broken))  # the command itself, as a user runs it
    assert r.returncode == 1 and "shard-000001.tar: missing" in r.stderr and "Traceback" not in r.stderr


def test_damage_is_reported_not_raised_as_a_traceback(tmp_path):
    _write(str(tmp_path))
    # Same size, different bytes inside the tensor data: decodes fine, so only the hash can tell.
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0]
    data = bytearray(shard.read_bytes())
    data[first.offset_data + first.size - 4] ^= 0xFF  # inside the last tensor's bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 differs"):
        list(read_samples(str(tmp_path)))
    assert any("sha256 differs" in p for p in verify(str(tmp_path)))
    # Truncated: verify (deep) lists it instead of failing.
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.truncate(1000)
    problems = verify(str(tmp_path))
    assert any(p.startswith("shard-000001.tar: 1000 bytes") for p in problems)
    os.remove(tmp_path / "extras.safetensors")
    with pytest.raises(DataError, match="extras.safetensors is missing"):
        read_extras(str(tmp_path))


def test_a_folder_that_is_not_a_shard_set_is_named_as_such(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a shard set"):
        read_manifest(str(tmp_path))


def test_webdataset_reads_the_shards_as_its_own_tars(shard_set_fp32):
    """The set's tars are webdataset tars: webdataset's own WebDataset yields each sample's members under its
    key, and their tensors are what shards.read_samples hands out (after the format's view)."""
    import webdataset as wds
    from safetensors.torch import load as st_load

    from shards.reader import shard_urls
    from shards.samples import unpack

    spec = read_manifest(shard_set_fp32).spec
    ours = {s["key"]: s for s in read_samples(shard_set_fp32)}
    theirs = list(wds.WebDataset(shard_urls(shard_set_fp32), shardshuffle=False, empty_check=False))
    assert [t["__key__"] for t in theirs] == list(ours) and len(theirs) == 8
    for t in theirs:
        assert set(t) >= {"__key__", "safetensors", "json"}
        view = unpack(spec, st_load(t["safetensors"]))
        s = ours[t["__key__"]]
        assert view.keys() == {k for k, v in s.items() if isinstance(v, torch.Tensor)}
        assert all(torch.equal(view[k], s[k]) for k in view)
        assert json.loads(t["json"]) == s["meta"]
