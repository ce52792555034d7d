"""Aspect-ratio buckets around a target area, and the resize + center crop into one."""
import math
import random
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image


def make_buckets(resolution: int, step: int, min_aspect: float = 0.5, max_aspect: float = 2.0) -> List[Tuple[int, int]]:
    """(height, width) pairs, sides multiples of `step`, area as close to resolution² as the grid allows
    without exceeding it, height/width within [min_aspect, max_aspect]."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= area // step:
        h = (area // w) // step * step
        if h >= step and min_aspect <= h / w <= max_aspect:
            buckets.add((h, w))
        w += step
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(height: int, width: int, buckets: List[Tuple[int, int]]) -> Tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (ties: the larger area)."""
    r = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - r), -hw[0] * hw[1]))


def resize_and_crop(img: Image.Image, bucket: Tuple[int, int], rng: Optional[random.Random] = None):
    """Scale to cover the bucket, then crop: centered, or at a position drawn from `rng`.
    Returns ([3,h,w] tensor in [-1, 1], (top, left))."""
    bh, bw = bucket
    w, h = img.size
    scale = max(bh / h, bw / w)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    img = img.crop((left, top, left + bw, top + bh))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (top, left)
