"""Dataset reading: find images and captions, load images as RGB, report what cannot be used.

Every reason is "category: detail", so summaries can count by category.
"""
import hashlib
import io
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import IMAGE_EXTS, OTHER_IMAGE_EXTS, DataConfig

# A decompression bomb is rejected rather than decoded.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


@dataclass
class Item:
    source: str  # path relative to data.path
    path: str
    caption: Optional[str] = None
    reject: Optional[str] = None  # known to be unusable before decoding, and why
    size: int = -1
    mtime_ns: int = -1

    def signature(self) -> list:
        """What identifies this input's state between runs (content is checked when this differs)."""
        return [self.source, self.size, self.mtime_ns, self.reject]


def list_inputs(cfg: DataConfig) -> List[Item]:
    """Every input under `cfg.path`, usable or not, in a fixed order (sorted by relative path)."""
    items, rejects = scan_folder(cfg)
    items += [Item(source=s, path=os.path.join(cfg.path, s), reject=why) for s, why in rejects]
    for it in items:
        try:
            st = os.stat(it.path)
            it.size, it.mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    return sorted(items, key=lambda it: it.source)


def scan_folder(cfg: DataConfig) -> Tuple[List[Item], List[Tuple[str, str]]]:
    """Images under `cfg.path` (recursive, sorted) with their captions; and (source, reason) rejects."""
    items, rejects, captioned = [], [], set()
    captions = []
    for root, dirs, files in os.walk(cfg.path):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            source = os.path.relpath(path, cfg.path)
            ext = os.path.splitext(name)[1].lower()
            if ext == cfg.caption_ext:
                captions.append(source)
            elif ext in OTHER_IMAGE_EXTS:
                rejects.append((source, f"unsupported image format: {ext} (use {', '.join(IMAGE_EXTS)})"))
            elif ext in IMAGE_EXTS:
                caption, why = _caption_for(path, cfg)
                captioned.add(os.path.splitext(source)[0])
                if why:
                    rejects.append((source, why))
                else:
                    items.append(Item(source=source, path=path, caption=caption))
    for source in captions:
        if os.path.splitext(source)[0] not in captioned:
            rejects.append((source, "caption without an image: no image file of the same name"))
    items.sort(key=lambda it: it.source)
    return items, rejects


def _caption_for(image_path: str, cfg: DataConfig):
    if cfg.caption_source == "instance":
        return cfg.instance_prompt, None
    txt = os.path.splitext(image_path)[0] + cfg.caption_ext
    if not os.path.exists(txt):
        if cfg.instance_prompt:
            return cfg.instance_prompt, None
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
    """Decode fully (so truncated files fail here), honour EXIF orientation, convert to RGB.

    Returns the image and the sha256 of the file's bytes.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file")
    digest = hashlib.sha256(data).hexdigest()
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
    if isinstance(e, Image.DecompressionBombError):
        return "unreadable image: too many pixels (decompression bomb guard)"
    if isinstance(e, PermissionError):
        return "unreadable image: permission denied"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"unreadable image: {detail[:100]}"


def sample_key(source: str, sha256: str) -> str:
    """Stable key from the source path and content hash; never from a loader position."""
    return hashlib.sha256(f"{source}\0{sha256}".encode()).hexdigest()[:24]
