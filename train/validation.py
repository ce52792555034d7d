"""Validation images during training: the shard set's validation prompts, sampled and saved as a PNG grid,
and samples/progress.png, the prompts' images across the validations so far."""
import os
import re
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw
from tqdm import tqdm

from shards.common.errors import UsageError
from shards.manifest import Manifest

from .config import TrainConfig
from .plot import BACKGROUND, CHAR_W, LINE_H, TEXT, bitmap_font, save_png
from .sampling import denoise, generate, load_vae_decoder, save_grid

PROGRESS_COLUMNS = 10  # validations shown in progress.png at most: its size and its reads stay bounded
CELL_MIN, CELL_MAX = 128, 256  # longest side of an image in progress.png
GRID_CAPTION_H, GRID_CELL_MIN_W = 44, 160  # sampling.save_grid's layout, which progress.png cuts images from
PROMPT_W, HEADER_H, FOOTER_H = 186, 18, 18


class Validator:
    """Sample images for the shard set's validation prompts and save them as a PNG grid."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, extras: dict, root: str, sched: dict, device, dtype,
                 transformer_config):
        self.cfg, self.sched, self.dtype = cfg.validation, sched, dtype
        self.prompts = manifest.extras.validation_prompts
        self.embeds = (extras["validation_prompt_embeds"].float(), extras["validation_pooled_prompt_embeds"].float())
        self.empty = (extras["empty_prompt_embeds"].float()[None], extras["empty_pooled_prompt_embeds"].float()[None])
        self.enabled = self.cfg.enabled and bool(self.prompts)
        if self.cfg.enabled and not self.prompts:
            tqdm.write("train: the shard set has no validation prompts (precompute validation.prompts), "
                       "so no sample images will be made")
        if self.enabled:
            h, w = self.cfg.height, self.cfg.width
            if not h:
                common = max(manifest.buckets.items(), key=lambda kv: kv[1])[0]
                h, w = (int(x) for x in common.split("x"))
            limit = transformer_config.pos_embed_max_size * transformer_config.patch_size * \
                manifest.vae.downsample_factor
            if max(h, w) > limit:
                raise UsageError(f"validation size {h}x{w} is larger than this transformer's position grid "
                                 f"allows ({limit} px a side); lower validation.height/width")
            self.size = (h, w)
            self.vae = load_vae_decoder(root, device)
            self.dir = os.path.join(cfg.out.dir, "samples")

    def __call__(self, transformer, step: int, write: bool = True):
        """The grid's path; `write=False` samples (a sharded model needs every process's forward) and writes
        nothing."""
        if not self.enabled:
            return None
        v = self.cfg
        if not write:  # the denoising alone: the sharded forward needs this process, the decoder does not
            f = 2 ** (len(self.vae.config.block_out_channels) - 1)
            denoise(transformer, self.sched, *self.embeds, *self.empty, self.size[0] // f, self.size[1] // f, v.steps,
                    v.guidance, v.seed, self.dtype)
            return None
        images = generate(transformer, self.vae, self.sched, *self.embeds, *self.empty, *self.size, v.steps,
                          v.guidance, v.seed, self.dtype)
        grid = save_grid(images, self.prompts, os.path.join(self.dir, f"step-{step:06d}.png"),
                         f"training step {step}; sampler: {v.steps} Euler steps, guidance {v.guidance}, seed {v.seed}")
        progress_png(self.dir, self.prompts, self.size, step)
        return grid


def grid_steps(samples_dir: str, upto: int) -> List[Tuple[int, str]]:
    """The step grids on disk up to `upto`, in step order; any later one was made by an earlier attempt
    that went past the checkpoint this run resumed from, so it shows weights this run never had."""
    found = []
    for name in os.listdir(samples_dir):
        m = re.fullmatch(r"step-(\d+)\.png", name)
        if m and int(m.group(1)) <= upto:
            found.append((int(m.group(1)), os.path.join(samples_dir, name)))
    return sorted(found)


def spread(n: int, cap: int) -> List[int]:
    """At most `cap` evenly spaced indices into n items, always the first and the last."""
    if n <= cap:
        return list(range(n))
    return [round(i * (n - 1) / (cap - 1)) for i in range(cap)]


def _wrap(text: str, width: int, lines: int) -> List[str]:
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)[:width]
        while words and len(line) + 1 + len(words[0]) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words and out:
        out[-1] = out[-1][: width - 3] + "..."
    return out


def progress_png(samples_dir: str, prompts: List[str], size: Tuple[int, int], upto: int,
                 cap: int = PROGRESS_COLUMNS) -> Optional[str]:
    """samples/progress.png: a row per validation prompt, a column per validation step (at most `cap`,
    evenly spaced, the first and the last always), cut from the step grids on disk: one grid read per
    column, whatever the number of validations."""
    h, w = size
    cell_w = max(w, GRID_CELL_MIN_W)
    expected = (cell_w * len(prompts), h + GRID_CAPTION_H)
    grids = grid_steps(samples_dir, upto)
    chosen = [grids[i] for i in spread(len(grids), cap)]
    scale = min(1.0, CELL_MAX / max(h, w)) if max(h, w) > CELL_MIN else CELL_MIN / max(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    col_w = max(cw, CHAR_W * 12) + 4
    columns = []
    for step, path in chosen:
        try:
            with Image.open(path) as grid:
                if grid.size != expected:  # made with other validation settings: not comparable
                    continue
                cells = [grid.crop((i * cell_w, 0, i * cell_w + w, h)) for i in range(len(prompts))]
                resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
                columns.append((step, [c.convert("RGB").resize((cw, ch), resample) for c in cells]))
        except OSError:  # an unreadable grid costs its column, not the training run
            continue
    if not columns:
        return None
    shown = f"{len(columns)} of {len(grids)} validations" if len(columns) < len(grids) else \
        f"{len(columns)} validation{'s' if len(columns) > 1 else ''}"
    footer = f"validation images per prompt (rows) over training (columns; {shown})"
    width = max(PROMPT_W + col_w * len(columns), CHAR_W * len(footer) + 8)
    img = Image.new("RGB", (width, HEADER_H + (ch + 4) * len(prompts) + FOOTER_H), BACKGROUND)
    d, font = ImageDraw.Draw(img), bitmap_font()
    for c, (step, cells) in enumerate(columns):
        x = PROMPT_W + c * col_w
        label = f"step {step}"
        d.text((x + (col_w - CHAR_W * len(label)) // 2, 4), label, fill=TEXT, font=font)
        for r, cell in enumerate(cells):
            img.paste(cell, (x + (col_w - cw) // 2, HEADER_H + r * (ch + 4)))
    for r, prompt in enumerate(prompts):
        for k, line in enumerate(_wrap(prompt, (PROMPT_W - 8) // CHAR_W, max(1, ch // (LINE_H + 2)))):
            d.text((4, HEADER_H + r * (ch + 4) + k * (LINE_H + 2)), line, fill=TEXT, font=font)
    d.text((4, img.height - FOOTER_H + 4), footer, fill=(90, 90, 90), font=font)
    return save_png(img, os.path.join(samples_dir, "progress.png"))
