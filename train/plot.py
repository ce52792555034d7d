"""Loss curve as a PNG, drawn with PIL (no plotting library needed)."""
import math
from typing import List, Optional

from PIL import Image, ImageDraw


def smooth(values: List[float], beta: float = 0.9) -> List[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing slider shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def loss_curve_png(losses: List[float], path: str, size=(800, 400)) -> Optional[str]:
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(losses) - 1, 1)

    def xy(i, v):
        return (left + (w - left - right) * i / n, top + (h - top - bottom) * (hi - v) / (hi - lo))

    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for series, colour, width in ((losses, (170, 200, 235), 1), (smooth(losses), (20, 80, 180), 2)):
        pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=width)
    d.text((left, 8), f"training loss (light: per step, dark: smoothed), {len(losses)} steps", fill="black")
    d.text((5, top - 5), f"{hi:.4g}", fill="black")
    d.text((5, h - bottom - 8), f"{lo:.4g}", fill="black")
    d.text((left, h - bottom + 8), "1", fill="black")
    d.text((w - right - 40, h - bottom + 8), f"{len(losses)}", fill="black")
    img.save(path)
    return path
