"""The shard stream benchmark (the stream row of `make bench`) and the reader pieces it made faster."""
import hashlib
import io
import json
import math
import tarfile
import warnings

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from shards.common.errors import DataError
from shards.reader import iter_tar, load_tensors, read_samples


def test_quick_row_streams_every_sample_through_the_trainer_pipeline():
    from bench.stream import rows

    (row,) = (r.to_json() for r in rows(quick=True))
    s = row["settings"]
    assert row["row"] == "stream" and s["resolution"] == 1024 and s["latent"] == [16, 128, 128]
    assert s["prompt_embeds"] == [333, 4096] and s["dtype"] == "bf16"
    assert row["samples_read"] == s["samples"] > 0
    numbers = [row["samples_per_s"], row["mb_per_s"], row["seconds"], row["ratio"],
               row["baseline"]["samples_per_s"], row["baseline"]["mb_per_s"]]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert row["samples_per_s"] == pytest.approx(s["samples"] / row["seconds"])
    assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline"]["seconds"])


def test_a_pipeline_that_loses_a_sample_fails_the_benchmark(monkeypatch):
    import bench.stream
    from bench.stream import stream_row

    real = bench.stream.bucket_batches

    def lossy(*args, **kw):
        for i, batch in enumerate(real(*args, **kw)):
            if i == 0:  # drop the first sample of the first batch
                batch = dict(batch, keys=batch["keys"][1:])
            yield batch

    monkeypatch.setattr(bench.stream, "bucket_batches", lossy)
    with pytest.raises(DataError, match="not each of the 6 written once"):
        stream_row(n=6, per_shard=4, batch_size=2, resolution=64, max_sequence_length=8)


def _member(tar, name, data, **info):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_stream_reads_what_tarfile_reads(tmp_path, fmt):
    long = "k" * 120 if fmt != tarfile.USTAR_FORMAT else "k" * 20  # pax / GNU long names; ustar has none
    tensors = {"latent_mean": torch.randn(2, 3), "ids": torch.arange(5)}
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        dir_info = tarfile.TarInfo("somedir")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        _member(tar, f"{long}.safetensors", st_save(tensors), mtime=1.5)  # a float mtime takes a pax header
        _member(tar, f"{long}.json", json.dumps({"key": long}).encode())
        _member(tar, "b.json", b"{}")
        _member(tar, "b.empty", b"")
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        cut = tar.getmember(f"{long}.safetensors").offset_data + 10
    got = list(iter_tar(str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    assert [(f"{s['__key__']}.{ext}", bytes(v)) for s in got for ext, v in s.items() if not ext.startswith("__")] == expected
    decoded = load_tensors(got[0]["safetensors"])
    assert all(torch.equal(decoded[k], v) for k, v in tensors.items())
    with pytest.raises(DataError, match="sha256 differs"):
        list(iter_tar(str(path), "0" * 64))
    path.write_bytes(path.read_bytes()[:cut])  # cut inside the tensors' member
    with pytest.raises(DataError, match="unreadable shard"):
        list(iter_tar(str(path)))


def test_tensors_view_the_member_bytes_and_stay_writable():
    tensors = {"a": torch.randn(4, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0, 3)}
    data = st_save(tensors, metadata={"m": "1"})
    buf = bytearray(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor is made over read-only memory
        out = load_tensors(buf)
        out["a"].add_(1)  # writable, and a view: the buffer changes, not a copy
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape for k, v in tensors.items())
    assert torch.equal(out["a"], (tensors["a"] + 1))
    assert torch.equal(st_load(bytes(buf))["a"], out["a"])
    assert torch.equal(load_tensors(data)["b"], tensors["b"])  # bytes: copied by safetensors instead
    header_len = int.from_bytes(data[:8], "little")
    bad = bytearray(data)
    bad[8:8 + header_len] = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}) \
        .encode().ljust(header_len)
    with pytest.raises(ValueError, match="lies outside the data"):
        load_tensors(bad)


def _raw_safetensors(header: dict, data: bytes, pad: bool) -> bytearray:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return bytearray(len(h).to_bytes(8, "little") + h + data)


def test_unaligned_data_is_copied_and_holes_are_refused_as_safetensors_does():
    data = torch.tensor([1.0, 2.0]).numpy().tobytes()
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    for pad in (False, True):  # unpadded: the data may start off a 4-byte boundary; valid, so it is read (copied)
        buf = _raw_safetensors(header, data, pad)
        assert torch.equal(load_tensors(buf)["x"], st_load(bytes(buf))["x"])
    holed = _raw_safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data, pad=True)
    with pytest.raises(Exception):
        st_load(bytes(holed))
    with pytest.raises(ValueError, match="uncovered"):
        load_tensors(holed)


def test_a_sample_handed_on_is_not_hashed_any_more(tmp_path):
    """Changing a yielded sample in place must not change the shard's hash (the hasher is done with it)."""
    from shards.writer import ShardSetWriter

    w = ShardSetWriter(str(tmp_path / "set"), dtype="fp32", samples_per_shard=10)
    for i in range(5):
        w.add(f"k{i}", {"latent_mean": torch.randn(4, 64, 64), "latent_std": torch.ones(4, 64, 64),
                        "prompt_embeds": torch.randn(20, 256), "pooled_prompt_embeds": torch.randn(32)},
              {"bucket": [512, 512]})
    w.write_extras({"empty_prompt_embeds": torch.zeros(1), "empty_pooled_prompt_embeds": torch.zeros(1),
                    "validation_prompt_embeds": torch.zeros(1), "validation_pooled_prompt_embeds": torch.zeros(1)})
    w.close({"model": {"path": "m"}, "vae": {"scaling_factor": 1.0, "shift_factor": 0.0, "downsample_factor": 8},
             "latent_channels": 4, "max_sequence_length": 10, "precisions": {}, "config": {},
             "embeddings": {"prompt_embeds_dim": 256, "clip_tokens": 10, "pooled_dim": 32}})
    keys = []
    for s in read_samples(str(tmp_path / "set")):  # would raise "sha256 differs" if it hashed changed bytes
        keys.append(s["key"])
        for name in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
            s[name].zero_()
    assert keys == [f"k{i}" for i in range(5)]


def test_cli_bench_quick_prints_the_row(capsys):
    """`python -m bench.stream --quick` (run as its own process by the driver's test in test_bench)."""
    from bench import stream

    stream.main(["--quick"])
    out = capsys.readouterr().out
    assert out.startswith("stream: ") and "samples/s" in out and "baseline, raw tar read" in out
