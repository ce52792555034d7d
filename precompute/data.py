"""Dataset reading: find images and captions, load images as RGB, report what cannot be used.

Every reason is "category: detail", so summaries can count by category.
"""
import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

from shards.errors import DataError

from .config import IMAGE_EXTS, OTHER_IMAGE_EXTS, DataConfig

# A decompression bomb is rejected rather than decoded.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


@dataclass
class Item:
    source: str  # path relative to data.path ("class/..." for class images)
    path: str
    caption: Optional[str] = None
    reject: Optional[str] = None  # known to be unusable before decoding, and why
    prior: bool = False  # a class (regularisation) image for prior preservation
    data: Optional[bytes] = None  # the file's bytes when it comes from a stream (tar inputs)
    size: int = -1
    mtime_ns: int = -1

    def signature(self) -> list:
        """What identifies this input's state between runs (content is checked when this differs)."""
        return [self.source, self.size, self.mtime_ns, self.reject, self.caption]


def list_inputs(cfg: DataConfig) -> List[Item]:
    """Every input, usable or not, in a fixed order: instance images, then class images, each sorted."""
    items = _scan(cfg.path, cfg, "", prompt=cfg.instance_prompt, always=cfg.caption_source == "instance")
    if cfg.class_path:
        items += _scan(cfg.class_path, cfg, CLASS_PREFIX, prompt=cfg.class_prompt, always=True, prior=True)
    for it in items:
        if it.caption is not None and cfg.caption_prefix:
            it.caption = f"{cfg.caption_prefix.rstrip()} {it.caption}"
        try:
            st = os.stat(it.path)
            it.size, it.mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    return items


CLASS_PREFIX = "class/"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _metadata(folder: str, column: str) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """file_name -> caption from a Hugging Face imagefolder metadata file, if the folder has one."""
    for name in METADATA_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        rows = []
        try:
            with open(path, encoding="utf-8", newline="") as f:
                if name.endswith(".jsonl"):
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except ValueError:
                                raise DataError(f"{path}: line {n} is not JSON") from None
                            if not isinstance(rows[-1], dict):
                                raise DataError(f"{path}: line {n} is not a JSON object")
                else:
                    rows = list(csv.DictReader(f))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
        out = {}
        for n, row in enumerate(rows, 1):
            if "file_name" not in row:
                raise DataError(f"{path}: row {n} has no file_name column")
            if column not in row:
                raise DataError(f"{path}: row {n} has no '{column}' column; set data.caption_column "
                                f"(it has {', '.join(sorted(row))})")
            out[os.path.normpath(row["file_name"])] = "" if row[column] is None else str(row[column])
        return out, name
    return None, None


def _scan(folder: str, cfg: DataConfig, prefix: str, prompt: Optional[str], always: bool,
          prior: bool = False) -> List[Item]:
    """Images under `folder` (recursive) with captions, as Items (rejected ones carry the reason)."""
    meta, meta_name = _metadata(folder, cfg.caption_column)
    items, stems, captions = [], set(), []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            source = prefix + rel
            ext = os.path.splitext(name)[1].lower()
            if rel in METADATA_FILES:
                continue
            if ext == cfg.caption_ext and meta is None:
                captions.append(rel)
            elif ext in OTHER_IMAGE_EXTS:
                items.append(Item(source, path, reject=f"unsupported image format: {ext} (use {', '.join(IMAGE_EXTS)})"))
            elif ext in IMAGE_EXTS:
                stems.add(os.path.splitext(rel)[0])
                if always:
                    caption, why = prompt, None
                elif meta is not None:
                    caption, why = _caption_from_metadata(meta, rel, meta_name, prompt)
                else:
                    caption, why = _caption_for(path, cfg, prompt)
                items.append(Item(source, path, caption=caption, reject=why, prior=prior))
    for rel in captions:
        if os.path.splitext(rel)[0] not in stems:
            items.append(Item(prefix + rel, os.path.join(folder, rel),
                              reject="caption without an image: no image file of the same name"))
    if meta is not None:
        listed = set(meta) - {os.path.normpath(it.source[len(prefix):]) for it in items}
        for rel in sorted(listed):
            items.append(Item(prefix + rel, os.path.join(folder, rel),
                              reject=f"missing image: listed in {meta_name} but not found"))
    return sorted(items, key=lambda it: it.source)


def _caption_from_metadata(meta: Dict[str, str], rel: str, meta_name: str, prompt: Optional[str]):
    caption = meta.get(os.path.normpath(rel))
    if caption is None:
        return (prompt, None) if prompt else (None, f"missing caption: not listed in {meta_name} and no data.instance_prompt")
    caption = " ".join(caption.split())
    return (caption, None) if caption else (None, f"empty caption: blank in {meta_name}")


def _caption_for(image_path: str, cfg: DataConfig, prompt: Optional[str]):
    txt = os.path.splitext(image_path)[0] + cfg.caption_ext
    if not os.path.exists(txt):
        if prompt:
            return prompt, None
        return None, f"missing caption: no {os.path.basename(txt)} and no data.instance_prompt"
    try:
        with open(txt, encoding="utf-8") as f:
            caption = " ".join(f.read().split())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable caption: {os.path.basename(txt)}: {type(e).__name__}"
    if not caption:
        return None, f"empty caption: {os.path.basename(txt)} is blank"
    return caption, None


def load_rgb(path: str) -> Tuple[Image.Image, str]:
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def decode_rgb(data: bytes) -> Tuple[Image.Image, str]:
    """Decode fully (so truncated files fail here), honour EXIF orientation, convert to RGB.

    Returns the image and the sha256 of the bytes.
    """
    if not data:
        raise ValueError("empty file")
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x its pixel limit; an image that large is refused here too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # first frame of animated images
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                im = im.convert("RGB")
    return im, digest


def why_unreadable(e: Exception) -> str:
    """A short reason for a failed decode, without PIL's object addresses."""
    if isinstance(e, UnidentifiedImageError):
        return "unreadable image: not an image, or a format PIL cannot read"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "unreadable image: too many pixels (decompression bomb guard)"
    if isinstance(e, PermissionError):
        return "unreadable image: permission denied"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"unreadable image: {detail[:100]}"


def sample_key(source: str, sha256: str) -> str:
    """Stable key from the source path and content hash; never from a loader position."""
    return hashlib.sha256(f"{source}\0{sha256}".encode()).hexdigest()[:24]
