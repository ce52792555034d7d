"""Full fine-tuning: which of the transformer's own weights train, and the trained transformer written as a
diffusers model folder (`out.dir/transformer/`, its EMA in `out.dir/transformer_ema/`) that
`SD3Transformer2DModel.from_pretrained` loads and merge turns into a release."""
import fnmatch
import json
import os
import shutil
from typing import Dict, List

import torch

from shards.common.atomic import write_json
from shards.common.errors import DataError, UsageError

from .config import FullConfig

TRANSFORMER_DIR = "transformer"
EMA_TRANSFORMER_DIR = "transformer_ema"
INFO_NAME = "shardtune.json"  # beside the weights: what trained them (base, blocks, steps, config)


def _matches(name: str, pattern: str) -> bool:
    """A pattern names a weight, or a module and so every weight under it (`norm_out` is `norm_out.*`)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def trained_names(transformer, cfg: FullConfig) -> List[str]:
    """The parameter names full mode trains, in the model's order: all of them, or the weights of
    `cfg.blocks` and those `cfg.include` matches."""
    names = [n for n, _ in transformer.named_parameters()]
    if cfg.everything():
        return names
    chosen = set()
    if cfg.blocks is not None:
        n = len(transformer.transformer_blocks)
        bad = [b for b in cfg.blocks if not 0 <= b < n]
        if bad:
            raise UsageError(f"full.blocks: {bad} outside 0..{n - 1} (the transformer has {n} blocks)")
        prefixes = tuple(f"transformer_blocks.{b}." for b in cfg.blocks)
        chosen.update(x for x in names if x.startswith(prefixes))
    for pattern in cfg.include:
        hit = [x for x in names if _matches(x, pattern)]
        if not hit:
            tops = sorted({x.split(".")[0] for x in names})
            raise UsageError(f"full.include: {pattern!r} matches no weight of the transformer; its top-level "
                             f"modules are {', '.join(tops)} (a pattern matches dotted names, e.g. "
                             "transformer_blocks.0.attn.*)")
        chosen.update(hit)
    if not chosen:
        raise UsageError("full.blocks is empty and full.include names nothing: no weight would train")
    return [x for x in names if x in chosen]


def unfreeze(transformer, cfg: FullConfig) -> List[torch.nn.Parameter]:
    """Make the chosen weights trainable (everything else stays frozen); returns them."""
    wanted = set(trained_names(transformer, cfg))
    params = []
    for name, p in transformer.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            params.append(p)
    return params


def save_transformer(out_dir: str, transformer, info: dict, name: str = TRANSFORMER_DIR) -> str:
    """Write the whole transformer (trained and frozen weights, in the run's dtype) as `out_dir/name/`: written
    beside it first and swapped in, so a crash leaves the earlier folder or the new one, never a mix."""
    broken = [n for n, p in transformer.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise DataError(f"the trained transformer holds non-finite values ({broken[0]} and {len(broken) - 1} "
                        "more); nothing was saved: lower train.lr")
    final = os.path.join(out_dir, name)
    tmp, old = final + ".tmp", final + ".old"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    transformer.save_pretrained(tmp, safe_serialization=True)
    write_json(os.path.join(tmp, INFO_NAME), info)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_info(folder: str) -> Dict:
    with open(os.path.join(folder, INFO_NAME)) as f:
        return json.load(f)
