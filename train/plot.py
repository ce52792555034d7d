"""The run's plots as PNGs: the loss curve with the learning rate, and the loss by noise level.

Drawn with PIL, not a plotting library: PIL is a dependency already (the sample images need it), so
nothing more is installed; its built-in bitmap font and integer-pixel lines give identical PNGs on
every machine (no system fonts, no anti-aliasing backend, no style files to differ); and these plots
need only a few primitives: lines, rectangles and text."""
import functools
import json
import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from shards.common.atomic import atomic_open

BACKGROUND = (255, 255, 255)
RAW = (176, 198, 230)
BOLD = (20, 70, 170)
LR = (214, 104, 16)
GRID = (232, 232, 232)
FRAME = (120, 120, 120)
TEXT = (0, 0, 0)
CHAR_W, LINE_H = 6, 11  # the bitmap font's cell


@functools.lru_cache(maxsize=1)
def bitmap_font():
    # Pillow >= 10.1 would otherwise pick a FreeType font, whose pixels vary with the FreeType version.
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def save_png(img: Image.Image, path: str) -> str:
    """Written atomically: a viewer open on the file while the run rewrites it never sees half a PNG."""
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def centred_mean(values: Sequence[float], half: int) -> List[float]:
    """Mean of the values from i - half to i + half (fewer at the ends): no lag, unlike an EMA, so a
    change in the loss shows at the step where it happened."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    n = len(values)
    return [(prefix[min(n, i + half + 1)] - prefix[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def nice_ticks(lo: float, hi: float, count: int = 6, integer: bool = False) -> List[float]:
    """Ticks at multiples of 1, 2 or 5 x 10^k that cover [lo, hi] with about `count` intervals."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_labels(ticks: Sequence[float]) -> Tuple[List[str], int]:
    """Labels with as many decimals as the tick step needs, and the power of ten they are in units of
    (0 unless the values are tiny or huge, like a learning rate: its axis then reads "in 1e-4")."""
    top = max(abs(t) for t in ticks) or 1.0
    exp = math.floor(math.log10(top)) if top < 1e-2 or top >= 1e6 else 0
    scaled = [t / 10 ** exp for t in ticks]
    step = abs(scaled[1] - scaled[0]) if len(scaled) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{0.0 if abs(v) < step * 1e-6 else v:.{decimals}f}" for v in scaled], exp


def _text_w(s: str) -> int:
    return CHAR_W * len(s)


def _vertical_text(img: Image.Image, s: str, x: int, y_mid: int, colour) -> None:
    strip = Image.new("RGB", (_text_w(s) + 2, LINE_H + 2), BACKGROUND)
    ImageDraw.Draw(strip).text((1, 0), s, fill=colour, font=bitmap_font())
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (x, y_mid - strip.height // 2))


class _Frame:
    """A plot area inside `img` with a data range on x and on y; curves are drawn on a separate image the
    size of the area and pasted in, so points outside the range are cut off at the frame."""

    def __init__(self, img: Image.Image, box: Tuple[int, int, int, int], xticks, yticks):
        self.img, self.box = img, box
        self.x0, self.y0, self.x1, self.y1 = box
        self.xt, self.yt = xticks, yticks
        self.area = Image.new("RGB", (self.x1 - self.x0, self.y1 - self.y0), BACKGROUND)
        self.draw = ImageDraw.Draw(self.area)
        for t in xticks:
            self.draw.line([(self.ax(t), 0), (self.ax(t), self.area.height)], fill=GRID)
        for t in yticks:
            self.draw.line([(0, self.ay(t)), (self.area.width, self.ay(t))], fill=GRID)

    def ax(self, x: float) -> float:
        return (self.area.width - 1) * (x - self.xt[0]) / (self.xt[-1] - self.xt[0])

    def ay(self, y: float, ticks=None) -> float:
        t = ticks or self.yt
        return (self.area.height - 1) * (t[-1] - y) / (t[-1] - t[0])

    def finish(self, xlabel: str, ylabel: str, integer_x: bool = False) -> ImageDraw.ImageDraw:
        self.img.paste(self.area, (self.x0, self.y0))
        d = ImageDraw.Draw(self.img)
        font = bitmap_font()
        d.rectangle(self.box, outline=FRAME)
        labels, exp = tick_labels(self.yt)
        for t, s in zip(self.yt, labels):
            y = self.y0 + self.ay(t)
            d.line([(self.x0 - 4, y), (self.x0, y)], fill=FRAME)
            d.text((self.x0 - 6 - _text_w(s), y - LINE_H // 2), s, fill=TEXT, font=font)
        xlabels = [str(int(t)) for t in self.xt] if integer_x else tick_labels(self.xt)[0]
        for t, s in zip(self.xt, xlabels):
            x = self.x0 + self.ax(t)
            d.line([(x, self.y1), (x, self.y1 + 4)], fill=FRAME)
            d.text((x - _text_w(s) / 2, self.y1 + 6), s, fill=TEXT, font=font)
        d.text(((self.x0 + self.x1 - _text_w(xlabel)) / 2, self.y1 + 20), xlabel, fill=TEXT, font=font)
        _vertical_text(self.img, ylabel + (f", in 1e{exp}" if exp else ""), 4, (self.y0 + self.y1) // 2, TEXT)
        return d

    def right_axis(self, d: ImageDraw.ImageDraw, ticks, label: str, colour) -> None:
        labels, exp = tick_labels(ticks)
        for t, s in zip(ticks, labels):
            y = self.y0 + self.ay(t, ticks)
            d.line([(self.x1, y), (self.x1 + 4, y)], fill=colour)
            d.text((self.x1 + 7, y - LINE_H // 2), s, fill=colour, font=bitmap_font())
        _vertical_text(self.img, label + (f", in 1e{exp}" if exp else ""), self.img.width - LINE_H - 6,
                       (self.y0 + self.y1) // 2, colour)


def _legend(d: ImageDraw.ImageDraw, x: int, y: int, entries) -> None:
    """Entries (text, colour, line width or None for a filled box) in one row."""
    font = bitmap_font()
    for text, colour, width in entries:
        if width is None:
            d.rectangle([x, y + 2, x + 14, y + 9], fill=colour)
        else:
            d.line([(x, y + 5), (x + 14, y + 5)], fill=colour, width=width)
        d.text((x + 19, y), text, fill=TEXT, font=font)
        x += 19 + _text_w(text) + 16


def _rows(metrics_path: str) -> List[dict]:
    """metrics.jsonl's lines, one per step (the last line of a step wins); a torn line is skipped."""
    by_step = {}
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                by_step[r.get("step")] = r
    except FileNotFoundError:
        return []
    return [by_step[s] for s in sorted(k for k in by_step if isinstance(k, int))]


def metric_series(metrics_path: str) -> Tuple[List[int], List[float], List[Optional[float]]]:
    """Steps, losses and learning rates from metrics.jsonl."""
    rows = [r for r in _rows(metrics_path) if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows], [r.get("lr") for r in rows]


def _percentile(sorted_values: List[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def loss_curve_png(losses: List[float], path: str, steps: Optional[List[int]] = None,
                   lrs: Optional[List[Optional[float]]] = None, size=(800, 400)) -> Optional[str]:
    """The per-step loss (faint), its centred moving mean (bold), and the learning rate on its own
    right-hand axis when it changed during the run."""
    steps = list(steps) if steps is not None else list(range(1, len(losses) + 1))
    points = [(s, v, lr) for s, v, lr in zip(steps, losses, lrs or [None] * len(losses)) if math.isfinite(v)]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    half = max(1, len(ys) // 40) if len(ys) >= 5 else 0  # a window of about 5% of the run
    smoothed = centred_mean(ys, half)
    lr_values = [p[2] for p in points if p[2] is not None and math.isfinite(p[2])]
    lr_varies = len(lr_values) == len(points) and max(lr_values) - min(lr_values) > 1e-6 * max(lr_values)

    w, h = size
    left, right, top, bottom = 72, (72 if lr_varies else 20), 40, 40
    # A few spikes would squash the curve into a line: the raw loss's outer percent may run off the frame.
    ordered = sorted(ys)
    cut = 0.01 if len(ys) >= 100 else 0.0
    lo = min(_percentile(ordered, cut), min(smoothed))
    hi = max(_percentile(ordered, 1 - cut) if cut else ordered[-1], max(smoothed))
    pad = 0.02 * (hi - lo)  # a curve along the frame's edge would hide under it
    img = Image.new("RGB", size, BACKGROUND)
    xt = nice_ticks(min(xs), max(xs), 8, integer=True)
    frame = _Frame(img, (left, top, w - right, h - bottom), xt, nice_ticks(lo - pad, hi + pad, 6))
    line = lambda series, ticks=None: [(frame.ax(x), frame.ay(v, ticks)) for x, v in zip(xs, series)]
    if len(xs) > 1:
        frame.draw.line(line(ys), fill=RAW if half else BOLD, width=1 if half else 2)
        if half:
            frame.draw.line(line(smoothed), fill=BOLD, width=2)
        if lr_varies:
            lr_ticks = nice_ticks(0.0, 1.02 * max(lr_values), 6)
            frame.draw.line(line(lr_values, lr_ticks), fill=LR, width=1)
    else:
        x, y = frame.ax(xs[0]), frame.ay(ys[0])
        frame.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=BOLD)
    d = frame.finish("step", "loss", integer_x=True)
    if lr_varies:
        frame.right_axis(d, lr_ticks, "learning rate", LR)
    d.text((left, 6), f"training loss, {len(xs)} steps ({xs[0]}-{xs[-1]})", fill=TEXT, font=bitmap_font())
    entries = [("loss per step", RAW, 1), (f"centred mean of {2 * half + 1} steps", BOLD, 2)] if half else \
        [("loss per step", BOLD, 2)]
    if lr_varies:
        entries.append(("learning rate (right axis)", LR, 1))
    elif lr_values:
        entries.append((f"learning rate {lr_values[0]:.3g} (constant)", LR, None))
    _legend(d, left, 22, entries)
    return save_png(img, path)


def _halves_by_sigma(metrics_path: str, bins: int):
    """Mean per-sample loss per σ bin, for the first and the second half of the logged steps, and the
    step ranges of the two halves."""
    rows = []
    for r in _rows(metrics_path):
        rows += [(r["step"], s, l) for s, l in zip(r.get("sigmas", []), r.get("losses", []))]
    if len(rows) < 2:
        return None
    mid = (rows[0][0] + rows[-1][0]) / 2
    halves, spans = ([], []), ([], [])
    for step, s, l in rows:
        spans[step > mid].append(step)
        if math.isfinite(l):
            halves[step > mid].append((s, l))

    def means(points):
        acc = [[0.0, 0] for _ in range(bins)]
        for s, l in points:
            b = min(bins - 1, int(s * bins))
            acc[b][0] += l
            acc[b][1] += 1
        return [(a / n, n) if n else None for a, n in acc]

    return [means(h) for h in halves], [(min(s), max(s)) if s else None for s in spans]


def change_at_equal_sigma(metrics_path: str, bins: int = 10) -> Optional[float]:
    """Relative change of the loss from the first to the second half of training, compared within σ bins
    (weighted by samples): unlike the raw per-step loss, not swayed by which timesteps were drawn."""
    found = _halves_by_sigma(metrics_path, bins)
    if not found:
        return None
    num = den = 0.0
    for a, b in zip(*found[0]):
        if a and b and a[0] > 0:
            n = min(a[1], b[1])
            num += n * (b[0] - a[0]) / a[0]
            den += n
    return num / den if den else None


def loss_by_sigma_png(metrics_path: str, path: str, bins: int = 10, size=(800, 400)) -> Optional[str]:
    """Mean per-sample loss in σ bins, first half of training vs second half: where the LoRA learned.

    The per-step loss mixes noise levels; binning by σ separates learning from timestep luck."""
    found = _halves_by_sigma(metrics_path, bins)
    if not found:
        return None
    halves, spans = found
    series = [[m[0] if m else None for m in h] for h in halves]
    values = [v for ser in series for v in ser if v is not None]
    if not values:
        return None
    w, h = size
    left, right, top, bottom = 72, 20, 40, 40
    img = Image.new("RGB", size, BACKGROUND)
    frame = _Frame(img, (left, top, w - right, h - bottom), nice_ticks(0.0, 1.0, bins), nice_ticks(0.0, max(values), 6))
    slot = frame.area.width / bins
    for i in range(bins):
        for k, (ser, colour) in enumerate(zip(series, (RAW, BOLD))):
            if ser[i] is None:
                continue
            x0 = i * slot + 3 + k * (slot - 6) / 2
            frame.draw.rectangle([x0, frame.ay(ser[i]), x0 + (slot - 6) / 2 - 2, frame.area.height], fill=colour)
    d = frame.finish("sigma (noise level; 0 = clean latent, 1 = pure noise)", "mean loss per sample")
    d.text((left, 6), "loss by noise level, first vs second half of training (bars: mean over the samples "
           "drawn in that sigma bin)", fill=TEXT, font=bitmap_font())
    _legend(d, left, 22, [(f"{name}: steps {span[0]}-{span[1]}" if span else f"{name}: no steps", colour, None)
                          for name, span, colour in zip(("first half", "second half"), spans, (RAW, BOLD))])
    return save_png(img, path)
