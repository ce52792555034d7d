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


def _halves_by_sigma(metrics_path: str, bins: int):
    """Mean per-sample loss per σ bin, for the first and the second half of the logged steps."""
    import json

    rows = []
    with open(metrics_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            rows += [(r["step"], s, l) for s, l in zip(r.get("sigmas", []), r.get("losses", []))]
    if len(rows) < 2:
        return None
    mid = (rows[0][0] + rows[-1][0]) / 2
    halves = ([], [])
    for step, s, l in rows:
        if math.isfinite(l):
            halves[step > mid].append((s, l))

    def means(points):
        acc = [[0.0, 0] for _ in range(bins)]
        for s, l in points:
            b = min(bins - 1, int(s * bins))
            acc[b][0] += l
            acc[b][1] += 1
        return [(a / n, n) if n else None for a, n in acc]

    return [means(h) for h in halves]


def change_at_equal_sigma(metrics_path: str, bins: int = 10) -> Optional[float]:
    """Relative change of the loss from the first to the second half of training, compared within σ bins
    (weighted by samples): unlike the raw per-step loss, not swayed by which timesteps were drawn."""
    halves = _halves_by_sigma(metrics_path, bins)
    if not halves:
        return None
    num = den = 0.0
    for a, b in zip(*halves):
        if a and b and a[0] > 0:
            n = min(a[1], b[1])
            num += n * (b[0] - a[0]) / a[0]
            den += n
    return num / den if den else None


def loss_by_sigma_png(metrics_path: str, path: str, bins: int = 10, size=(800, 400)) -> Optional[str]:
    """Mean per-sample loss in σ bins, first half of training vs second half: where the LoRA learned.

    The per-step loss mixes noise levels; binning by σ separates learning from timestep luck."""
    halves = _halves_by_sigma(metrics_path, bins)
    if not halves:
        return None
    series = [[m[0] if m else None for m in h] for h in halves]
    values = [v for ser in series for v in ser if v is not None]
    if not values:
        return None
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    lo, hi = 0.0, max(values) * 1.05
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    slot = (w - left - right) / bins
    for i in range(bins):
        for k, (ser, colour) in enumerate(zip(series, ((170, 200, 235), (20, 80, 180)))):
            v = ser[i]
            if v is None:
                continue
            x0 = left + i * slot + 4 + k * (slot - 8) / 2
            y = top + (h - top - bottom) * (hi - v) / (hi - lo)
            d.rectangle([x0, y, x0 + (slot - 8) / 2 - 2, h - bottom], fill=colour)
        d.text((left + i * slot + slot / 2 - 12, h - bottom + 8), f"{i / bins:.1f}", fill="black")
    d.text((left, 8), "mean loss per sigma bin (light: first half of training, dark: second half)", fill="black")
    d.text((5, top - 5), f"{hi:.4g}", fill="black")
    d.text((5, h - bottom - 8), "0", fill="black")
    d.text((w - right - 60, h - bottom + 24), "sigma", fill="black")
    img.save(path)
    return path
