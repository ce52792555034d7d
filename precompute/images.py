"""Images as the encoders take them: decoded (from a path or a stream's bytes), EXIF-rotated, converted to RGB
with wide samples scaled rather than clipped, transparency on white; and why a file that cannot be used is not."""
import hashlib
import io
import warnings
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import NotRegularFile, read_file

# A decompression bomb is rejected rather than decoded.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def load_rgb(path: str) -> Tuple[Image.Image, str]:
    return decode_rgb(read_file(path))


# Modes with more than 8 bits per sample, which PIL's own convert() clips to 0..255 (a 16-bit
# greyscale photo becomes pure white) instead of scaling.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")


def _wide_to_l(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit L (plus its tRNS transparency as alpha).

    Integer samples are taken as 16-bit and keep their high byte (value >> 8), which is what PIL
    does with every 16-bit RGB(A) PNG, so a greyscale and a colour 16-bit file of the same picture
    give the same 8-bit values. Floats are taken as 0..1. Values outside those ranges have no one
    meaning (a 32-bit scientific image, HDR) and are refused rather than guessed."""
    arr = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(arr).all():
            raise ValueError("unsupported pixel values: a float image with NaN or infinite values")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"unsupported pixel values: a float image with values {arr.min():g}..{arr.max():g} "
                             "(0..1 expected); save it as 8- or 16-bit")
        out = np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    else:
        wide = arr.astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"unsupported pixel values: an integer image with values {wide.min()}..{wide.max()} "
                             "(0..65535 expected); save it as 8- or 16-bit")
        out = (wide >> 8).astype(np.uint8)
    grey = Image.fromarray(out, "L")
    t = im.info.get("transparency")
    if isinstance(t, int) and im.mode != "F":
        grey.putalpha(Image.fromarray(np.where(arr == t, 0, 255).astype(np.uint8), "L"))
    return grey


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB with the image's real value range; anything transparent is composited on white."""
    if im.mode in _WIDE_MODES:
        im = _wide_to_l(im)
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


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
            im = to_rgb(ImageOps.exif_transpose(im))
    return im, digest


def why_unreadable(e: Exception) -> str:
    """A short reason for a failed decode, without PIL's object addresses."""
    if isinstance(e, UnidentifiedImageError):
        return "unreadable image: not an image, or a format PIL cannot read"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "unreadable image: too many pixels (decompression bomb guard)"
    if isinstance(e, PermissionError):
        return "unreadable image: permission denied"
    if isinstance(e, NotRegularFile):
        return str(e)
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if detail.startswith("unsupported pixel values"):
        return detail
    return f"unreadable image: {detail[:100]}"
