import json
import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from train import validation
from train.plot import BOLD, FRAME, LR, RAW, centred_mean, loss_by_sigma_png, loss_curve_png, nice_ticks, tick_labels
from train.sampling import save_grid


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _is(a, colour):
    return (a == np.array(colour, dtype=a.dtype)).all(-1)


def _frame(a):
    """The plot frame's box, found from its outline's colour."""
    m = _is(a, FRAME)
    cols = np.where(m.sum(0) > a.shape[0] // 2)[0]
    rows = np.where(m.sum(1) > a.shape[1] // 2)[0]
    return cols[0], rows[0], cols[-1], rows[-1]


def _bands(mask_1d, gap: int = 1) -> int:
    """Runs of True separated by more than `gap` False entries (text labels along an axis)."""
    idx = np.where(mask_1d)[0]
    return 0 if not len(idx) else 1 + int((np.diff(idx) > gap + 1).sum())


def _tick_labels_drawn(a, colour=(0, 0, 0)):
    """Label counts along the left axis, the bottom axis and the right-hand margin."""
    x0, y0, x1, y1 = _frame(a)
    ink = _is(a, colour)
    left = _bands(ink[y0 - 6:y1 + 7, 20:x0 - 5].any(1))
    bottom = _bands(ink[y1 + 5:y1 + 18, x0 - 30:x1 + 30].any(0), gap=8)
    right = _bands(ink[y0 - 6:y1 + 7, x1 + 5:a.shape[1] - 20].any(1))
    return left, bottom, right


def _history(n=300, seed=0):
    rng = random.Random(seed)
    steps = list(range(1, n + 1))
    losses = [0.6 - 0.2 * s / n + rng.uniform(-0.15, 0.15) for s in steps]
    lrs = [1e-4 * min(1.0, s / 30) * 0.5 * (1 + math.cos(math.pi * s / n)) for s in steps]
    return steps, losses, lrs


def test_nice_ticks_cover_the_range_in_round_steps():
    for lo, hi in ((0.213, 0.871), (1, 1000), (3e-6, 1.2e-4), (5.0, 5.0), (-2.5, 7.1)):
        t = nice_ticks(lo, hi)
        step = t[1] - t[0]
        assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 13
        mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6, (lo, hi, t)
    assert all(float(t).is_integer() for t in nice_ticks(1, 7, integer=True))
    labels, exp = tick_labels(nice_ticks(0.0, 1e-4, 5))
    assert exp == -4 and labels == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]  # "in 1e-4" on the axis
    assert tick_labels([0.2, 0.4, 0.6])[0] == ["0.2", "0.4", "0.6"]


def test_centred_mean_has_no_lag():
    values = [0.0] * 50 + [1.0] * 50
    m = centred_mean(values, 5)
    assert m[44] == 0 and m[55] == 1 and m[49] == pytest.approx(5 / 11) and m[50] == pytest.approx(6 / 11)
    assert centred_mean([1.0, 2.0, 3.0], 5) == [2.0, 2.0, 2.0]  # the window shrinks at the ends


def test_loss_curve_has_axes_a_smoothed_curve_and_an_lr_axis(tmp_path):
    steps, losses, lrs = _history()
    path = loss_curve_png(losses, str(tmp_path / "loss.png"), steps, lrs)
    a = _pixels(path)
    assert a.shape == (400, 800, 3)
    left, bottom, right = _tick_labels_drawn(a)
    assert left >= 4 and bottom >= 4  # tick values along both axes, not just the two ends
    x0, y0, x1, y1 = _frame(a)
    inside = a[y0 + 1:y1, x0 + 1:x1]
    # Both curves are visible: the bold one does not sit on top of the raw one everywhere.
    assert _is(inside, RAW).sum() > 500 and _is(inside, BOLD).sum() > 500
    smoothed = centred_mean(losses, len(losses) // 40)
    assert np.std(np.diff(smoothed)) < 0.2 * np.std(np.diff(losses))
    # The learning rate: a line inside and a labelled axis on the right, in its own colour.
    assert _is(inside, LR).sum() > 200
    assert _tick_labels_drawn(a, LR)[2] >= 3


def test_loss_curve_without_a_varying_lr_has_no_lr_axis(tmp_path):
    steps, losses, _ = _history()
    a = _pixels(loss_curve_png(losses, str(tmp_path / "loss.png"), steps, [1e-4] * len(steps)))
    x0, y0, x1, y1 = _frame(a)
    assert _tick_labels_drawn(a, LR)[2] == 0 and x1 > 760  # the frame takes the margin an lr axis needs
    assert not _is(a[y0 + 1:y1, x0 + 1:x1], LR).any()  # a flat lr line would only hide the loss
    assert _is(a[:y0], LR).any()  # its value is in the legend
    # Without metrics.jsonl's steps and rates (a history alone) the curve is still drawn, indexed from 1.
    assert _pixels(loss_curve_png(losses, str(tmp_path / "h.png"))).shape == (400, 800, 3)
    assert loss_curve_png([float("nan")], str(tmp_path / "n.png")) is None


def test_loss_curve_range_is_not_set_by_one_spike(tmp_path):
    steps, losses, lrs = _history()
    losses[150] = 50.0
    a = _pixels(loss_curve_png(losses, str(tmp_path / "loss.png"), steps, lrs))
    x0, y0, x1, y1 = _frame(a)
    rows = np.where(_is(a[y0 + 1:y1, x0 + 1:x1], BOLD).any(1))[0]
    assert rows[-1] - rows[0] > 0.3 * (y1 - y0)  # the smoothed curve still spans a good part of the height


def test_loss_by_sigma_has_axes_and_both_halves(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(1, 201):
            sigmas = [rng.random() for _ in range(4)]
            losses = [(1.0 if step <= 100 else 0.7) * (0.2 + s) for s in sigmas]
            f.write(json.dumps({"step": step, "loss": sum(losses) / 4, "lr": 1e-4, "sigmas": sigmas,
                                "losses": losses}) + "\n")
    a = _pixels(loss_by_sigma_png(str(path), str(tmp_path / "s.png")))
    assert a.shape == (400, 800, 3)
    left, bottom, _ = _tick_labels_drawn(a)
    assert left >= 4 and bottom >= 6  # loss values up the side, sigma 0.0 ... 1.0 along the bottom
    x0, y0, x1, y1 = _frame(a)
    inside = a[y0 + 1:y1, x0 + 1:x1]
    assert _is(inside, RAW).sum() > 2000 and _is(inside, BOLD).sum() > 2000
    # Loss grows with sigma: the last bin's bars reach higher than the first bin's.
    bars = _is(inside, RAW) | _is(inside, BOLD)
    first, last = bars[:, : bars.shape[1] // 10], bars[:, -bars.shape[1] // 10:]
    assert np.where(last.any(1))[0][0] < np.where(first.any(1))[0][0]


PROMPTS = ["a photo of a cat", "a red apple on a wooden table, studio lighting, a long prompt that wraps", "x"]


def _grids(d, steps, size=(96, 128)):
    """Step grids as the validator writes them; each image's colour encodes its step (red) and prompt (green)."""
    h, w = size
    for step in steps:
        images = [Image.fromarray(np.full((h, w, 3), (step % 256, 60 * r, 7), np.uint8)) for r in range(len(PROMPTS))]
        save_grid(images, PROMPTS, os.path.join(d, f"step-{step:06d}.png"), f"step {step}")


def _cells(path, size, n_cols):
    """(step, prompt) decoded from the centre of each cell of progress.png."""
    a = _pixels(path)
    scale = 1.0 if max(size) > validation.CELL_MIN else validation.CELL_MIN / max(size)
    cw, ch = round(size[1] * scale), round(size[0] * scale)
    col_w = max(cw, validation.CHAR_W * 12) + 4
    out = []
    for r in range(len(PROMPTS)):
        row = []
        for c in range(n_cols):
            x = validation.PROMPT_W + c * col_w + (col_w - cw) // 2 + cw // 2
            y = validation.HEADER_H + r * (ch + 4) + ch // 2
            px = a[y, x]
            row.append((int(px[0]), int(px[1]) // 60))
        out.append(row)
    return a, out


def test_progress_strip_rows_are_prompts_columns_spread_validations(tmp_path, monkeypatch):
    d = str(tmp_path)
    steps = list(range(10, 240, 10))  # 23 validations
    _grids(d, steps + [250])
    opened = []
    real_open = validation.Image.open
    monkeypatch.setattr(validation.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    path = validation.progress_png(d, PROMPTS, (96, 128), upto=230)  # 250 is past this run's step: stale
    assert path == os.path.join(d, "progress.png")
    grids = [p for p in opened if isinstance(p, str)]
    assert len(grids) == validation.PROGRESS_COLUMNS  # one read per column, not per validation
    a, cells = _cells(path, (96, 128), validation.PROGRESS_COLUMNS)
    shown = [step for step, _ in cells[0]]
    assert shown[0] == 10 and shown[-1] == 230 and shown == sorted(set(shown))
    assert len(shown) == validation.PROGRESS_COLUMNS
    assert all([p for _, p in row] == [r] * len(row) for r, row in enumerate(cells))
    col_w = max(128, validation.CHAR_W * 12) + 4
    assert a.shape[1] == validation.PROMPT_W + 10 * col_w
    assert a.shape[0] == validation.HEADER_H + 3 * (96 + 4) + validation.FOOTER_H
    ink = _is(a[:validation.HEADER_H, validation.PROMPT_W:], (0, 0, 0)).any(0)
    assert _bands(ink, gap=8) == 10  # a step label over every column
    assert _is(a[validation.HEADER_H:, :validation.PROMPT_W], (0, 0, 0)).sum() > 300  # prompt texts


def test_progress_strip_with_few_validations_shows_all_and_small_images_grow(tmp_path):
    d = str(tmp_path)
    _grids(d, [5, 10, 15], size=(32, 32))
    _, cells = _cells(validation.progress_png(d, PROMPTS, (32, 32), upto=15), (32, 32), 3)
    assert [s for s, _ in cells[0]] == [5, 10, 15]
    # A grid made at another size (validation settings changed on resume) is left out, not cut wrongly.
    _grids(d, [20], size=(64, 64))
    _, cells = _cells(validation.progress_png(d, PROMPTS, (32, 32), upto=20), (32, 32), 3)
    assert [s for s, _ in cells[0]] == [5, 10, 15]


def test_progress_strip_is_written_atomically(tmp_path, monkeypatch):
    d = str(tmp_path)
    _grids(d, [1, 2])
    path = validation.progress_png(d, PROMPTS, (96, 128), upto=2)
    before = open(path, "rb").read()
    _grids(d, [3])
    real_save = Image.Image.save

    def torn(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", torn)
    with pytest.raises(OSError):
        validation.progress_png(d, PROMPTS, (96, 128), upto=3)
    assert open(path, "rb").read() == before  # the old strip, whole
    assert sorted(os.listdir(d)) == ["progress.png", "step-000001.png", "step-000002.png", "step-000003.png"]


def test_a_training_run_writes_readable_plots_and_the_progress_strip(tiny_model, shard_set_fp32, tmp_path):
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train
    from test_train import train_args

    out = str(tmp_path / "run")
    r = train(load_config(TrainConfig, train_args(tiny_model, shard_set_fp32, out, "train.max_steps=5",
                                                  "validation.every=2", "train.warmup_steps=3",
                                                  "train.log_every=1", "checkpoint.every=0")))
    a = _pixels(r["loss_curve"])
    assert _tick_labels_drawn(a)[:2] >= (4, 4) and _tick_labels_drawn(a, LR)[2] >= 3  # warmup: the lr varies
    samples = os.path.join(out, "samples")
    progress = os.path.join(samples, "progress.png")
    strip = _pixels(progress)
    h = w = 128  # the shard set's bucket
    col_w = max(w, validation.CHAR_W * 12) + 4
    assert strip.shape[:2] == (validation.HEADER_H + 2 * (h + 4) + validation.FOOTER_H, validation.PROMPT_W + 4 * col_w)
    for c, step in enumerate((0, 2, 4, 5)):  # before training (the base model), two during the run, one at its end
        grid = np.asarray(Image.open(os.path.join(samples, f"step-{step:06d}.png")).convert("RGB"))
        for row in range(2):  # the two validation prompts
            x = validation.PROMPT_W + c * col_w + (col_w - w) // 2
            y = validation.HEADER_H + row * (h + 4)
            cell_w = max(w, validation.GRID_CELL_MIN_W)
            assert (strip[y:y + h, x:x + w] == grid[:h, row * cell_w:row * cell_w + w]).all(), (step, row)
