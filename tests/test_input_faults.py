"""Stage 1 inputs at their edges: pixel formats, caption text, every kind of folder entry, streamed tars
that fail, and what a part's summary tells the user."""
import io
import json
import os
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import precompute_cfg, write_tar
from shards import read_manifest, read_rejected, read_samples
from shards.common.errors import DataError

FAST = {"text.t5_precision": "none", "num_workers": 0, "buckets.min_size": 0}


def _run(model, data, out, **over):
    from precompute.run import run

    return run(precompute_cfg(model, data, out, **{**FAST, **over}))


def _png(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes 16-bit greyscale only), so PIL's reader is tested, not its writer."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a))


def test_every_pixel_mode_becomes_8bit_rgb_with_its_real_range():
    """16-bit integer samples keep their high byte (v >> 8, what PIL does for 16-bit RGB PNGs), floats are
    0..1; references are computed here with numpy, never with PIL's convert()."""
    from precompute.images import decode_rgb, why_unreadable

    rng = np.random.RandomState(0)
    ramp = (np.arange(64 * 8, dtype=np.int64).reshape(8, 64) * 128 + 37).astype(np.uint16)  # 37 .. 65445
    rgb16 = rng.randint(0, 65536, (8, 16, 3)).astype(np.uint16)
    alpha16 = rng.randint(0, 65536, (8, 16)).astype(np.uint16)
    grey_ref = np.repeat((ramp >> 8)[..., None], 3, axis=2)
    cases = {
        "I;16 png": (_saved(Image.fromarray(ramp), "PNG"), grey_ref),
        "I;16B tiff": (_saved(Image.fromarray(ramp.astype(">u2")), "TIFF"), grey_ref),
        "I tiff": (_saved(Image.fromarray(ramp.astype(np.int32)), "TIFF"), grey_ref),
        "16-bit RGB png": (_png(rgb16, 2), rgb16 >> 8),
        "16-bit RGBA png": (_png(np.dstack([rgb16, alpha16]), 6), _on_white(rgb16 >> 8, alpha16 >> 8)),
        "16-bit LA png": (_png(np.dstack([ramp[:, :16], alpha16]), 4),
                          _on_white(np.repeat((ramp[:, :16] >> 8)[..., None], 3, axis=2), alpha16 >> 8)),
        "F tiff": (_saved(Image.fromarray((ramp / 65535).astype(np.float32)), "TIFF"),
                   np.repeat(np.rint(ramp / 65535 * 255)[..., None], 3, axis=2)),
    }
    rgb8 = rng.randint(0, 256, (8, 16, 3)).astype(np.uint8)
    a8 = rng.randint(0, 256, (8, 16)).astype(np.uint8)
    cases["RGBA png"] = (_saved(Image.fromarray(np.dstack([rgb8, a8]), "RGBA"), "PNG"), _on_white(rgb8, a8))
    cases["LA png"] = (_saved(Image.fromarray(np.dstack([rgb8[..., 0], a8]), "LA"), "PNG"),
                       _on_white(np.repeat(rgb8[..., :1], 3, axis=2), a8))
    palette = rng.randint(0, 256, (256, 3)).astype(np.uint8)
    idx = rng.randint(0, 256, (8, 16)).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.tobytes())
    cases["P png"] = (_saved(p, "PNG"), palette[idx])
    trns = _saved(p, "PNG", transparency=int(idx[0, 0]))
    ref = palette[idx].astype(np.float64)
    ref[idx == idx[0, 0]] = 255
    cases["P png with a transparent index"] = (trns, ref)
    cmyk = rng.randint(0, 256, (8, 16, 4)).astype(np.uint8)
    cases["CMYK tiff"] = (_saved(Image.fromarray(cmyk, "CMYK"), "TIFF"),
                          np.rint((255 - cmyk[..., :3]).astype(np.float64) * (255 - cmyk[..., 3:]) / 255))
    bits = rng.randint(0, 2, (8, 16)).astype(bool)
    cases["1 png"] = (_saved(Image.fromarray(bits), "PNG"), np.repeat(bits[..., None] * 255, 3, axis=2))
    for name, (data, ref) in cases.items():
        im, _ = decode_rgb(data)
        got = np.asarray(im).astype(np.int64)
        assert im.mode == "RGB" and got.shape == ref.shape, name
        assert np.abs(got - ref).max() <= (1 if "A" in name or "CMYK" in name else 0), name

    # Samples with no single meaning are refused with the range that was found, not clipped.
    for data, start in ((_saved(Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF"), "values 0..70000"),
                        (_saved(Image.fromarray(np.array([[0, 2.5]], np.float32)), "TIFF"), "values 0..2.5"),
                        (_saved(Image.fromarray(np.array([[0, np.nan]], np.float32)), "TIFF"), "NaN")):
        with pytest.raises(ValueError) as e:
            decode_rgb(data)
        reason = why_unreadable(e.value)
        assert reason.startswith("unsupported pixel values:") and start in reason, reason


def _cfg(**data):
    from precompute.config import DataConfig

    return DataConfig(**data)


def _items(cfg):
    from precompute.data import list_inputs

    return {it.source: (it.caption, it.reject) for it in list_inputs(cfg)}


def test_caption_text_is_decoded_one_way_for_folders_metadata_and_tars(tmp_path):
    from precompute.tars import stream_items

    png = _saved(Image.new("RGB", (8, 8), "red"), "PNG")
    d = tmp_path / "txt"
    d.mkdir()
    for n in ("bom", "bad", "fine"):
        (d / f"{n}.png").write_bytes(png)
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbfa cat")
    (d / "bad.txt").write_bytes(b"caf\xe9")
    (d / "fine.txt").write_bytes(b"  a   dog \n")
    got = _items(_cfg(path=str(d)))
    assert got["bom.png"] == ("a cat", None) and got["fine.png"] == ("a dog", None)
    assert got["bad.png"][1] == "unreadable caption: bad.txt is not UTF-8 text (byte 3); save it as UTF-8"

    m = tmp_path / "meta"
    m.mkdir()
    names = ("a", "b", "c", "d", "e", "f")
    for n in names:
        (m / f"{n}.png").write_bytes(png)
    rows = [{"file_name": "a.png", "text": "one"}, {"file_name": "b.png", "text": ["a", "list"]},
            {"file_name": "c.png", "text": 3}, {"file_name": "d.png", "text": {"en": "x"}},
            {"file_name": "e.png", "text": "first"}, {"file_name": "./e.png", "text": "second"},
            {"file_name": "f.png", "text": "same"}, {"file_name": "f.png", "text": " same "}]
    (m / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    got = _items(_cfg(path=str(m)))
    assert got["a.png"] == ("one", None) and got["f.png"] == ("same", None)  # a repeated identical line is harmless
    assert got["b.png"][1] == "unreadable caption: the 'text' of line 2 in metadata.jsonl is a list, not a string"
    assert got["c.png"][1].endswith("line 3 in metadata.jsonl is a number, not a string")
    assert got["d.png"][1].endswith("line 4 in metadata.jsonl is a object, not a string")
    assert got["e.png"] == (None, "conflicting captions: e.png is listed on lines 5, 6 of metadata.jsonl with "
                                  "different captions; keep one line")
    (m / "metadata.jsonl").unlink()
    (m / "metadata.csv").write_bytes(b"\xef\xbb\xbffile_name,text\r\na.png,\xef\xbb\xbfone\r\n")
    got = _items(_cfg(path=str(m)))
    assert got["a.png"] == ("one", None) and got["b.png"][1].startswith("missing caption: not listed in metadata.csv")

    t = tmp_path / "in.tar"
    write_tar(t, [("0.png", png), ("0.txt", b"\xef\xbb\xbfa cat"), ("1.png", png), ("1.txt", b"caf\xe9"),
             ("2.png", png), ("2.json", json.dumps({"text": ["x"]}).encode()), ("3.png", png), ("3.json", b"[1]"),
             ("4.png", png), ("4.json", b"\xef\xbb\xbf" + json.dumps({"text": "a dog"}).encode())])
    got = {it.source: (it.caption, it.reject) for it in stream_items(str(t), _cfg(path=str(t)))}
    assert got == {"in.tar/0.png": ("a cat", None),
                   "in.tar/1.png": (None, "unreadable caption: 1.txt is not UTF-8 text (byte 3); save it as UTF-8"),
                   "in.tar/2.png": (None, "unreadable caption: the 'text' of 2.json is a list, not a string"),
                   "in.tar/3.png": (None, "unreadable caption: 3.json is not a JSON object"),
                   "in.tar/4.png": ("a dog", None)}
    (tmp_path / "folder.tar").mkdir()
    assert [(it.source, it.reject) for it in stream_items(str(tmp_path / "folder.tar"), _cfg(path=str(t)))] == \
        [("folder.tar/", "unreadable tar: Is a directory")]


def test_caption_prefix_is_not_put_on_class_images(tmp_path):
    png = _saved(Image.new("RGB", (8, 8), "red"), "PNG")
    inst = tmp_path / "inst"
    cls = inst / "reg"  # inside the instance folder: listed once, as a class image
    cls.mkdir(parents=True)
    (inst / "me.png").write_bytes(png)
    (cls / "dog.png").write_bytes(png)
    got = _items(_cfg(path=str(inst), caption_source="instance", instance_prompt="a photo of a dog",
                      caption_prefix="sks,", class_path=str(cls), class_prompt="a photo of a dog"))
    assert got == {"me.png": ("sks, a photo of a dog", None), "class/dog.png": ("a photo of a dog", None)}


def test_every_file_under_the_data_folder_is_in_the_shards_or_rejected_once(tiny_model, tmp_path):
    """A folder holding every kind of entry; nothing hangs, nothing raises, nothing is lost or doubled."""
    from precompute.inputs import display_name

    d = tmp_path / "data"
    (d / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.RandomState(1)

    def picture():
        return Image.fromarray(rng.randint(0, 256, (64, 48, 3), dtype=np.uint8))

    formats = {".jpg": "JPEG", ".JPG": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG",
               ".PNG": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
    for ext, fmt in formats.items():
        name = "img_" + ext.strip(".").swapcase() + ext
        picture().save(d / name, fmt)
        (d / f"{os.path.splitext(name)[0]}.txt").write_text(f"a picture {ext}")
    picture().save(d / "nested" / "deeper" / "n.png")
    (d / "nested" / "deeper" / "n.txt").write_text("nested")
    picture().save(d / "no_caption.png")  # no .txt and no instance_prompt
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "corrupt.txt").write_text("corrupt")
    (d / "empty.jpg").write_bytes(b"")
    (d / "empty.txt").write_text("empty")
    (d / "layers.psd").write_bytes(b"8BPS")
    (d / "notes.md").write_text("not an input")
    (d / "Makefile").write_text("all:")
    (d / "orphan.txt").write_text("no image")
    os.mkfifo(d / "fifo.png")  # opening it for reading would block the run forever
    os.symlink(d / "gone.png", d / "broken.png")
    os.symlink("..", d / "nested" / "up")  # a loop
    os.symlink(d / "nested", d / "again")  # the same folder a second way
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    picture().save(elsewhere / "linked.png")
    (elsewhere / "linked.txt").write_text("through a link")
    os.symlink(elsewhere, d / "linked_dir")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / ".hidden").mkdir()
    picture().save(d / ".hidden" / "copy.png")
    odd = os.path.join(os.fsencode(str(d)), b"caf\xe9.png")  # a Latin-1 file name: not UTF-8
    picture().save(odd, "PNG")
    with open(os.path.join(os.fsencode(str(d)), b"caf\xe9.txt"), "w") as f:
        f.write("a latin-1 name")

    out = tmp_path / "out"
    m = _run(tiny_model, str(d), str(out), **{"out.samples_per_shard": 8})

    written = [s["meta"]["source"] for s in read_samples(str(out))]
    rejected = {r["source"]: r["reason"] for r in read_rejected(str(out))}
    assert len(rejected) == m.manifest.counts.rejected and len(written) == m.manifest.counts.written
    # What the walk should account for: every entry, except caption files next to an image, and the
    # contents of folders that are not entered (the hidden folder, the loop, the second link).
    expected = set()
    for root, dirs, files in os.walk(str(d)):
        rel_root = os.path.relpath(root, str(d))
        for n in dirs + files:
            rel = os.path.normpath(os.path.join(rel_root, n))
            stem, ext = os.path.splitext(rel)
            if ext == ".txt" and any(os.path.exists(os.path.join(str(d), stem + e)) or os.path.islink(
                    os.path.join(str(d), stem + e)) for e in formats):
                continue
            if n in dirs and not os.path.islink(os.path.join(root, n)) and not n.startswith("."):
                continue  # a plain folder: its files are listed instead
            expected.add(display_name(rel))
        dirs[:] = [x for x in dirs if not x.startswith(".")]
    expected -= {"linked_dir"}
    expected |= {"linked_dir/linked.png"}
    assert sorted(written + list(rejected)) == sorted(expected)  # each exactly once
    assert set(written) == {f"img_{e.strip('.').swapcase()}{e}" for e in formats} | {
        "nested/deeper/n.png", "linked_dir/linked.png", "caf\\xe9.png"}
    starts = {"no_caption.png": "missing caption", "corrupt.png": "unreadable image", "empty.jpg": "unreadable image",
              "layers.psd": "unsupported image format", "notes.md": "not an image", "Makefile": "not an image",
              "orphan.txt": "caption without an image", "fifo.png": "not a regular file: a FIFO",
              "broken.png": "broken symlink", "nested/up": "symlink loop", "again": "already included",
              ".DS_Store": "hidden file", ".hidden": "hidden folder"}
    assert set(rejected) == set(starts)
    for source, start in starts.items():
        assert rejected[source].startswith(start), (source, rejected[source])
    caption = {s["meta"]["source"]: s["meta"]["caption"] for s in read_samples(str(out))}
    assert caption["caf\\xe9.png"] == "a latin-1 name" and caption["linked_dir/linked.png"] == "through a link"
    # With data.instance_prompt the caption-less image is used, and the accounting is the same.
    with_prompt = _items(_cfg(path=str(d), instance_prompt="a photo"))
    assert sorted(with_prompt) == sorted(expected) and with_prompt["no_caption.png"] == ("a photo", None)


def _flaky_command(tmp_path, tar_path, plan: str) -> str:
    """A pipe: command that plays `plan` (one word per try: trunc, fail, ok) and then succeeds."""
    script = tmp_path / "flaky.sh"
    script.write_text(f"""n=$(cat {tmp_path}/tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > {tmp_path}/tries
case "$(echo "{plan}" | cut -d' ' -f$n)" in
  trunc) head -c 1500 {tar_path} ;;
  fail) echo "curl: (56) Recv failure: Connection reset by peer" >&2; exit 56 ;;
  *) cat {tar_path} ;;
esac
""")
    return f"pipe:sh {script}"


def _two_tars(tmp_path):
    rng = np.random.RandomState(2)
    paths = []
    for t in range(2):
        members = []
        for k in range(3):
            members += [(f"{t}{k}.png", _saved(Image.fromarray(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG")),
                        (f"{t}{k}.txt", f"picture {t}{k}".encode())]
        write_tar(tmp_path / f"part-{t}.tar", members)
        paths.append(tmp_path / f"part-{t}.tar")
    return paths


def test_streamed_tar_failures_are_retried_then_left_undone(tiny_model, tmp_path, monkeypatch):
    from precompute import tars

    monkeypatch.setattr(tars, "RETRY_DELAY_S", 0.01)
    a, b = _two_tars(tmp_path)
    # Truncated once, then a failing command, then a good read: one complete shard, nothing doubled.
    flaky = _flaky_command(tmp_path, b, "trunc fail ok")
    out = tmp_path / "o1"
    m = _run(tiny_model, f"pipe:cat {a}::{flaky}", str(out))
    assert (tmp_path / "tries").read_text().strip() == "3"
    assert sorted(s["meta"]["source"] for s in read_samples(str(out))) == \
        sorted([f"part-0.tar/0{k}.png" for k in range(3)] + [f"flaky.sh/1{k}.png" for k in range(3)])
    assert vars(m.manifest.counts) == {"seen": 6, "written": 6, "rejected": 0}

    # Failing every time: the run ends with one line naming the tar and why; the other shard is kept.
    (tmp_path / "tries").unlink()
    always = _flaky_command(tmp_path, b, "fail fail fail fail")
    out = tmp_path / "o2"
    with pytest.raises(DataError) as e:
        _run(tiny_model, f"pipe:cat {a}::{always}", str(out))
    msg = str(e.value)
    assert "\n" not in msg and always in msg and "exited with status 56: curl: (56) Recv failure" in msg
    assert "(4 tries)" in msg and "run the same command again" in msg
    assert os.path.exists(out / "shard-000000.json") and not os.path.exists(out / "shard-000001.json")
    assert not os.path.exists(out / "manifest.json") and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # The next run redoes exactly that shard once the source reads again.
    (tmp_path / "tries").write_text("4")
    m = _run(tiny_model, f"pipe:cat {a}::{always}", str(out))
    assert m.progress["shards_done_here"] == 1 and m.manifest.counts.written == 6


def test_url_failures_are_one_readable_line():
    from precompute.tars import StreamError, _open

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(StreamError, match=r"^cannot reach the server: Connection refused$"):
        _open(f"http://127.0.0.1:{port}/x.tar")

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def short_answer():
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
        conn.close()

    threading.Thread(target=short_answer, daemon=True).start()
    f = _open(f"http://127.0.0.1:{srv.getsockname()[1]}/x.tar")
    with pytest.raises(StreamError, match=r"^the download ended early"):
        while f.read(1 << 16):
            pass
    f.close()
    srv.close()


def test_a_part_summary_says_how_its_set_completes(tiny_model, tmp_path):
    from precompute.run import summary

    d = tmp_path / "data"
    d.mkdir()
    for k in range(3):
        Image.new("RGB", (40, 40), (k * 80, 0, 0)).save(d / f"{k}.png")
        (d / f"{k}.txt").write_text(f"red {k}")
    shared = str(tmp_path / "shared")
    first = summary(_run(tiny_model, str(d), shared, part=0, parts=3, **{"out.samples_per_shard": 1}), shared)
    assert "1 of 3 shards are in" in first and f"python -m shards combine SET_DIR {shared} OTHER_PART_DIR" in first
    second = summary(_run(tiny_model, str(d), shared, part=1, parts=3, **{"out.samples_per_shard": 1}), shared)
    assert "2 of 3 shards are in" in second and "completes when the other parts finish writing into this folder" in second
    assert "combine" not in second
    last = summary(_run(tiny_model, str(d), shared, part=2, parts=3, **{"out.samples_per_shard": 1}), shared)
    assert last.startswith(f"shard set: {shared}  (3 samples in 3 shard(s)")
    assert read_manifest(shared).counts.written == 3
