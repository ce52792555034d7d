"""The merge stage: base pipeline + LoRA -> a complete diffusers pipeline folder with the LoRA folded in."""
import os
import time
from typing import List

from shards.config import load_config
from shards.errors import UsageError
from shards.modelpath import resolve_model

from .config import MergeConfig
from .fold import WEIGHTS_NAME, FoldResult, fold_transformer
from .lora import find_lora_file, read_lora
from .release import check_out_dir, copy_tree, staged

def resolve_model_path(path: str) -> str:
    """A local pipeline folder for model.path, downloading the whole pipeline for a hub id."""
    path = resolve_model(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"model.path '{path}' is not a diffusers pipeline folder (no model_index.json)")
    return path


def _is_base_weights(rel: str) -> bool:
    return rel.startswith(os.path.join("transformer", os.path.splitext(WEIGHTS_NAME)[0]))


def run_merge(cfg: MergeConfig, progress: bool = True) -> FoldResult:
    lora_file = find_lora_file(cfg.lora.path)
    local_model = [cfg.model.path] if os.path.isdir(cfg.model.path) else []
    check_out_dir(cfg.out.dir, cfg.out.overwrite, inputs=local_model + [lora_file])
    model = resolve_model_path(cfg.model.path)
    lora = read_lora(lora_file, cfg.lora.scale)
    with staged(cfg.out.dir) as tmp:
        copy_tree(model, tmp, cfg.out.link, skip=_is_base_weights)
        return fold_transformer(os.path.join(model, "transformer"), lora, os.path.join(tmp, "transformer"),
                                cfg.out.dtype, cfg.out.max_shard_bytes, progress)


def main(argv: List[str]) -> None:
    cfg = load_config(MergeConfig, argv)
    start = time.monotonic()
    result = run_merge(cfg)
    print(f"merge: folded {result.modules} LoRA modules (lora.scale {cfg.lora.scale}) into the transformer; "
          f"wrote {cfg.out.dir} ({result.tensors} tensors in {len(result.files)} file(s), out.dtype {cfg.out.dtype}) "
          f"in {time.monotonic() - start:.1f} s")
