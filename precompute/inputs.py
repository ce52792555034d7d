"""What an input is, before any reading: the image types, one input (`Item`), whether a data.path names
webdataset tars, and the caption prefix. Shared by the config, the folder reader and the tar reader."""
from dataclasses import dataclass
from typing import Optional

# Every extension PIL decodes as a picture (GIF: first frame; TIFF: first page; case is ignored).
IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
# Image files we see but do not read (PIL cannot, or gets no single right picture from them: layers,
# icons, raw sensor data); each is listed in rejected.jsonl, as is every file of an unknown type.
OTHER_IMAGE_EXTS = (".heic", ".heif", ".jxl", ".svg", ".ico", ".psd", ".raw", ".dng", ".cr2", ".nef", ".arw",
                    ".exr", ".hdr")


@dataclass
class Item:
    source: str  # path relative to data.path ("class/..." for class images); printable (see display_name)
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


def display_name(name: str) -> str:
    """`name` as valid text: bytes of a file name that are not UTF-8 (which Python carries as lone
    surrogates, unencodable in JSON, keys and terminals) are written as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_webdataset(path: str) -> bool:
    return path.startswith(("pipe:", "http://", "https://", "s3://", "gs://")) or \
        path.endswith((".tar", ".tar}")) or ("{" in path and ".tar" in path)


def with_prefix(caption: Optional[str], data_cfg) -> Optional[str]:
    """An instance caption with data.caption_prefix put before it (with one space); None stays None."""
    if caption is None or not data_cfg.caption_prefix:
        return caption
    return f"{data_cfg.caption_prefix.rstrip()} {caption}"
