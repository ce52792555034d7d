"""Every file of a shard set is covered by a hash in its manifest, and the manifest by a hash of itself."""
import json
import os

import pytest

from conftest import cli
from shards import format as F
from shards import read_extras, read_manifest
from shards.common.errors import DataError
from shards.reader import check_shard_files
from shards.verify import verify


def _flip(path, at=-3):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.fixture
def set_dir(tmp_path):
    """Two shards and a reject, through the same writer as precompute."""
    import torch

    from shards.writer import ShardSetWriter

    out = str(tmp_path / "set")
    w = ShardSetWriter(out, dtype="fp32", samples_per_shard=4)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        w.add(f"s{i}", {"latent_mean": torch.randn(4, 2, 2, generator=g), "latent_std": torch.rand(4, 2, 2, generator=g),
                        "prompt_embeds": torch.randn(5, 6, generator=g), "pooled_prompt_embeds": torch.randn(5, generator=g)},
              {"caption": f"c{i}", "source": f"{i}.png", "original_size": [16, 16], "crop_top_left": [0, 0],
               "bucket": [16, 16]})
    w.reject("bad.png", "unreadable image: truncated")
    w.write_extras({"empty_prompt_embeds": torch.zeros(5, 6), "empty_pooled_prompt_embeds": torch.zeros(5),
                    "validation_prompt_embeds": torch.ones(1, 5, 6), "validation_pooled_prompt_embeds": torch.ones(1, 5)},
                   {"validation_prompts": ["p"]})
    w.close({"model": {"path": "m", "components": {}}, "vae": {"scaling_factor": 1.5, "shift_factor": 0.1,
             "downsample_factor": 8}, "latent_channels": 4, "embeddings": {"prompt_embeds_dim": 6, "clip_tokens": 2,
             "pooled_dim": 5}, "max_sequence_length": 3, "precisions": {"t5": "fp32"}, "config": {}})
    return out


def test_manifest_hashes_every_file_and_itself(set_dir):
    m = read_manifest(set_dir)
    assert set(m.files) == {F.EXTRAS, F.REJECTED, "shard-000000.json", "shard-000001.json"}
    for name, rec in m.files.items():
        assert rec["bytes"] == os.path.getsize(os.path.join(set_dir, name)) and len(rec["sha256"]) == 64
    assert m.manifest_sha256 == F.manifest_digest(m.to_json())
    assert verify(set_dir) == []


def test_edited_vae_factor_is_refused_in_one_line(set_dir):
    path = os.path.join(set_dir, F.MANIFEST)
    m = json.load(open(path))
    m["vae"]["scaling_factor"] = 1.0
    json.dump(m, open(path, "w"), indent=2)
    with pytest.raises(DataError, match="manifest.json was edited after it was written"):
        read_manifest(set_dir)
    r = cli("shards", "verify", set_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "manifest.json was edited after it was written" in r.stderr
    # Indentation is not content: the same manifest written another way still reads.
    m["vae"]["scaling_factor"] = 1.5
    json.dump(m, open(path, "w"))
    assert read_manifest(set_dir).vae.scaling_factor == 1.5


@pytest.mark.parametrize("name", [F.EXTRAS, F.REJECTED, "shard-000001.json"])
def test_a_flipped_byte_in_any_set_file_is_named(set_dir, name):
    _flip(os.path.join(set_dir, name))
    assert verify(set_dir, deep=False) == [f"{name}: sha256 differs from the manifest (corrupt or replaced)"]
    r = cli("shards", "verify", "--quick", set_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0] == f"{name}: sha256 differs from the manifest (corrupt or replaced)"


def test_extras_are_checked_where_the_trainer_reads_them(set_dir):
    manifest = read_manifest(set_dir)
    assert read_extras(set_dir, manifest)["empty_prompt_embeds"].shape == (5, 6)
    _flip(os.path.join(set_dir, F.EXTRAS))  # inside the tensor data: it still decodes
    for call in (lambda: read_extras(set_dir), lambda: read_extras(set_dir, manifest)):
        with pytest.raises(DataError, match="extras.safetensors: its sha256 differs from the manifest"):
            call()


def test_preflight_finds_truncated_extras(set_dir):
    manifest = read_manifest(set_dir)
    size = manifest.files[F.EXTRAS]["bytes"]
    with open(os.path.join(set_dir, F.EXTRAS), "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataError, match=rf"extras.safetensors has {size - 2} bytes, the manifest says {size}"):
        check_shard_files(set_dir, manifest)
    assert f"{F.EXTRAS}: {size - 2} bytes, manifest says {size}" in verify(set_dir)


def test_a_copy_for_training_may_leave_out_the_run_state_but_not_set_files(set_dir):
    for name in ("shard-000000.json", "shard-000001.json"):
        os.remove(os.path.join(set_dir, name))
    check_shard_files(set_dir, read_manifest(set_dir))
    assert verify(set_dir) == []
    r = cli("shards", "verify", set_dir)
    assert r.returncode == 0 and "2 precompute run-state file(s) not in this copy" in r.stdout
    os.remove(os.path.join(set_dir, F.REJECTED))
    assert verify(set_dir, deep=False) == [f"{F.REJECTED}: missing"]


def test_a_manifest_from_before_the_hashes_still_reads_and_says_what_it_cannot_check(set_dir):
    path = os.path.join(set_dir, F.MANIFEST)
    m = json.load(open(path))
    del m["files"], m[F.MANIFEST_HASH]
    json.dump(m, open(path, "w"))
    assert read_manifest(set_dir).counts.written == 6
    assert verify(set_dir) == []
    r = cli("shards", "verify", set_dir)
    assert r.returncode == 0 and "not checked" in r.stdout and "manifest.json itself" in r.stdout
    _flip(os.path.join(set_dir, F.EXTRAS))  # its sha256 was in the extras record all along
    assert verify(set_dir, deep=False) == [f"{F.EXTRAS}: sha256 differs from the manifest (corrupt or replaced)"]
