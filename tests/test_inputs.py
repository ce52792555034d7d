"""Stage 1 inputs: dataset layouts, captions, image modes and every kind of bad input."""
import csv
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from shards import read_manifest, read_rejected, read_samples
from conftest import precompute_cfg, write_tar

FAST = {"text.t5_precision": "none", "num_workers": 0}


def _run(model, data, out, **over):
    from precompute.run import run

    return run(precompute_cfg(model, data, out, **{**FAST, **over}))


def _captions(out):
    return {s["meta"]["source"]: s["meta"]["caption"] for s in read_samples(out)}


def _images(sample_data, dst, names=("astronaut.png", "chelsea.png", "rocket.jpg")):
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(sample_data, n), os.path.join(dst, n))
    return names


def test_metadata_jsonl_and_csv(tiny_model, sample_data, tmp_path):
    d = tmp_path / "jsonl"
    _images(sample_data, d)
    with open(d / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "astronaut.png", "prompt": "an astronaut"}) + "\n")
        f.write(json.dumps({"file_name": "chelsea.png", "prompt": "a cat"}) + "\n")
        f.write(json.dumps({"file_name": "gone.png", "prompt": "not there"}) + "\n")
    out = str(tmp_path / "o1")
    _run(tiny_model, str(d), out, **{"data.caption_column": "prompt", "data.caption_prefix": "sks,"})
    assert _captions(out) == {"astronaut.png": "sks, an astronaut", "chelsea.png": "sks, a cat"}
    reasons = {r["source"]: r["reason"] for r in read_rejected(out)}
    assert reasons["gone.png"].startswith("missing image: listed in metadata.jsonl")
    assert reasons["rocket.jpg"].startswith("missing caption: not listed in metadata.jsonl")

    c = tmp_path / "csv"
    _images(sample_data, c)
    with open(c / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerows([["astronaut.png", "an astronaut"], ["chelsea.png", "a cat"], ["rocket.jpg", "a rocket"]])
    out = str(tmp_path / "o2")
    _run(tiny_model, str(c), out)
    assert _captions(out) == {"astronaut.png": "an astronaut", "chelsea.png": "a cat", "rocket.jpg": "a rocket"}
    with pytest.raises(Exception, match="has no 'caption' column"):
        _run(tiny_model, str(c), str(tmp_path / "o3"), **{"data.caption_column": "caption"})


def test_dreambooth_instance_and_class_images(tiny_model, sample_data, tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    _images(sample_data, inst, ("chelsea.png",))
    _images(sample_data, cls, ("astronaut.png", "coffee.png"))
    out = str(tmp_path / "o")
    m = _run(tiny_model, str(inst), out, **{"data.caption_source": "instance", "data.instance_prompt": "a photo of sks cat",
                                            "data.class_path": str(cls), "data.class_prompt": "a photo of a cat"})
    metas = {s["meta"]["source"]: s["meta"] for s in read_samples(out)}
    assert metas["chelsea.png"]["caption"] == "a photo of sks cat" and metas["chelsea.png"]["prior"] is False
    assert metas["class/astronaut.png"]["caption"] == "a photo of a cat" and metas["class/astronaut.png"]["prior"] is True
    assert m.manifest.counts.written == 3


def test_image_modes_and_orientation(tiny_model, sample_data, tmp_path):
    d = tmp_path / "modes"
    d.mkdir()
    base = Image.open(os.path.join(sample_data, "astronaut.png")).convert("RGB").resize((96, 160))
    base.convert("L").save(d / "grey.png")
    base.convert("P").save(d / "palette.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(d / "transparent.png")
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "animated.webp", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    base.save(d / "rotated.jpg", exif=exif)
    for n in os.listdir(d):
        (d / (os.path.splitext(n)[0] + ".txt")).write_text("an astronaut")
    out = str(tmp_path / "o")
    _run(tiny_model, str(d), out, **{"buckets.min_size": 0})
    metas = {s["meta"]["source"]: s["meta"] for s in read_samples(out)}
    assert set(metas) == {"grey.png", "palette.png", "cmyk.jpg", "transparent.png", "animated.webp", "rotated.jpg"}
    assert metas["grey.png"]["original_size"] == [160, 96]
    assert metas["rotated.jpg"]["original_size"] == [96, 160]  # EXIF orientation applied
    from precompute.images import load_rgb
    im, _ = load_rgb(str(d / "transparent.png"))
    assert im.getpixel((5, 5)) == (255, 255, 255)  # transparent composited on white


def test_each_bad_input_lands_in_rejected_with_the_rest_intact(tiny_model, sample_data, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(sample_data, d)
    (d / "zero.png").write_bytes(b"")
    (d / "zero.txt").write_text("zero bytes")
    (d / "trunc.jpg").write_bytes((d / "rocket.jpg").read_bytes()[:3000])
    (d / "trunc.txt").write_text("truncated")
    (d / "fake.png").write_text("plain text")
    (d / "fake.txt").write_text("not an image")
    shutil.copy(d / "coffee.png", d / "nocap.png")
    (d / "empty.txt").write_text(" \n")
    shutil.copy(d / "camera.png", d / "empty.png")
    (d / "lonely.txt").write_text("no image")
    (d / "layers.psd").write_bytes(b"8BPS")
    out = str(tmp_path / "o")
    m = _run(tiny_model, str(d), out, **{"buckets.min_size": 0})
    reasons = {r["source"]: r["reason"] for r in read_rejected(out)}
    expected = {"zero.png": "unreadable image", "trunc.jpg": "unreadable image", "fake.png": "unreadable image",
                "nocap.png": "missing caption",
                "empty.png": "empty caption", "lonely.txt": "caption without an image",
                "layers.psd": "unsupported image format"}
    assert set(reasons) == set(expected)
    for source, start in expected.items():
        assert reasons[source].startswith(start), (source, reasons[source])
    # Every input is in exactly one place, and all 8 good photos are in the shards.
    written = {s["meta"]["source"] for s in read_samples(out)}
    assert not written & set(reasons)
    assert len(written) == 8 and m.manifest.counts.seen == len(written) + len(reasons)


def test_decompression_bombs_are_refused(tiny_model, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    d = tmp_path / "bombs"
    d.mkdir()
    for name, side in (("small", 40), ("warned", 90), ("refused", 120)):
        Image.new("RGB", (side, side), "red").save(d / f"{name}.png")
        (d / f"{name}.txt").write_text(name)
    # 90x90 is between PIL's limit and twice it (PIL would only warn), 120x120 beyond twice it.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 5000)
    out = str(tmp_path / "o")
    _run(tiny_model, str(d), out, **{"buckets.min_size": 0})
    reasons = {r["source"]: r["reason"] for r in read_rejected(out)}
    assert reasons == {"warned.png": "unreadable image: too many pixels (decompression bomb guard)",
                       "refused.png": "unreadable image: too many pixels (decompression bomb guard)"}
    assert _captions(out) == {"small.png": "small"}


def test_non_finite_encoder_output_is_rejected_per_sample(tiny_model, sample_data, tmp_path, monkeypatch):
    from precompute import encoders

    real = encoders.VaeEncoder.encode

    def poisoned(self, pixels):
        mean, std = real(self, pixels)
        if pixels.shape[-1] == 160:  # the landscape bucket
            mean[0, 0, 0, 0] = float("nan")
        return mean, std

    monkeypatch.setattr(encoders.VaeEncoder, "encode", poisoned)
    out = str(tmp_path / "o")
    _run(tiny_model, sample_data, out, **{"buckets.min_size": 0, "batch_size": 1})
    reasons = [r["reason"] for r in read_rejected(out)]
    assert reasons and all(r.startswith("non-finite values: in latent_mean") for r in reasons)
    assert read_manifest(out).counts.written == 8 - len(reasons)
    assert all(torch.isfinite(s["latent_mean"]).all() for s in read_samples(out))


def test_webdataset_tars_local_brace_and_pipe(tiny_model, sample_data, tmp_path):
    def img(name):
        return open(os.path.join(sample_data, name), "rb").read()

    src = tmp_path / "wds"
    src.mkdir()
    write_tar(src / "data-000.tar", [("000000.png", img("astronaut.png")), ("000000.txt", b"an astronaut"),
                                     ("000001.jpg", img("rocket.jpg")), ("000001.json", json.dumps({"text": "a rocket"}).encode())])
    write_tar(src / "data-001.tar", [("000002.png", img("chelsea.png")), ("000002.txt", b"a cat"),
                                     ("000003.png", img("coffee.png"))])
    (src / "data-002.tar").write_bytes(b"this is not a tar file at all" * 40)
    out = str(tmp_path / "o")
    m = _run(tiny_model, str(src / "data-{000..002}.tar"), out, **{"buckets.min_size": 0})
    caps = _captions(out)
    assert caps == {"data-000.tar/000000.png": "an astronaut", "data-000.tar/000001.jpg": "a rocket",
                    "data-001.tar/000002.png": "a cat"}
    reasons = {r["source"]: r["reason"] for r in read_rejected(out)}
    assert reasons["data-001.tar/000003.png"].startswith("missing caption")
    assert reasons["data-002.tar/"].startswith("unreadable tar")
    assert vars(m.manifest.counts) == {"seen": 5, "written": 3, "rejected": 2}
    # The same images from a folder give the same latents and embeddings.
    folder = tmp_path / "folder"
    _images(sample_data, folder, ("astronaut.png",))
    (folder / "astronaut.txt").write_text("an astronaut")
    _run(tiny_model, str(folder), str(tmp_path / "f"), **{"buckets.min_size": 0})
    ref = next(iter(read_samples(str(tmp_path / "f"))))
    got = next(s for s in read_samples(out) if s["meta"]["caption"] == "an astronaut")
    assert torch.equal(ref["latent_mean"], got["latent_mean"]) and torch.equal(ref["prompt_embeds"], got["prompt_embeds"])
    # Streamed through a command, as for remote storage.
    piped = str(tmp_path / "p")
    _run(tiny_model, f"pipe:cat {src}/data-000.tar", piped, **{"buckets.min_size": 0})
    assert sorted(_captions(piped).values()) == ["a rocket", "an astronaut"]
    # Rerun: complete tars are kept; a changed tar is detected.
    assert _run(tiny_model, str(src / "data-{000..002}.tar"), out, **{"buckets.min_size": 0}).up_to_date
    write_tar(src / "data-001.tar", [("000002.png", img("chelsea.png")), ("000002.txt", b"a cat, changed")])
    with pytest.raises(Exception, match="source files changed"):
        _run(tiny_model, str(src / "data-{000..002}.tar"), out, **{"buckets.min_size": 0})


def test_unreadable_file_is_rejected(tiny_model, sample_data, tmp_path, monkeypatch):
    # Tests run as root here, where chmod 000 does not stop a read; so the refusal is simulated.
    import builtins

    d = tmp_path / "perm"
    _images(sample_data, d, ("astronaut.png", "chelsea.png"))
    for n in ("astronaut", "chelsea"):
        (d / f"{n}.txt").write_text(n)
    real_open = builtins.open

    def guarded(path, *a, **k):
        if str(path).endswith("chelsea.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    out = str(tmp_path / "o")
    _run(tiny_model, str(d), out, **{"buckets.min_size": 0})
    monkeypatch.setattr(builtins, "open", real_open)
    assert {r["source"]: r["reason"] for r in read_rejected(out)} == {"chelsea.png": "unreadable image: permission denied"}
    assert _captions(out) == {"astronaut.png": "astronaut"}


def test_metadata_that_is_not_utf8_is_named(tiny_model, sample_data, tmp_path):
    from shards.common.errors import DataError

    d = tmp_path / "latin1"
    _images(sample_data, d, ("camera.png",))
    (d / "metadata.csv").write_bytes(b"file_name,text\ncamera.png,caf\xe9\n")
    with pytest.raises(DataError, match="metadata.csv is not UTF-8"):
        _run(tiny_model, str(d), str(tmp_path / "o"))
