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
from .single_file import file_name, write_single_file

def resolve_model_path(path: str) -> str:
    """A local pipeline folder for model.path, downloading the whole pipeline for a hub id."""
    path = resolve_model(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"model.path '{path}' is not a diffusers pipeline folder (no model_index.json)")
    return path


def _is_base_weights(rel: str) -> bool:
    return rel.startswith(os.path.join("transformer", os.path.splitext(WEIGHTS_NAME)[0]))


def single_file_name(cfg: MergeConfig) -> str:
    """The file out.format=single_file writes in out.dir: out.name plus .safetensors (given or not)."""
    name = cfg.out.name[: -len(".safetensors")] if cfg.out.name.endswith(".safetensors") else cfg.out.name
    return file_name(name)


def run_merge(cfg: MergeConfig, progress: bool = True) -> FoldResult:
    lora_file = find_lora_file(cfg.lora.path)
    local_model = [cfg.model.path] if os.path.isdir(cfg.model.path) else []
    check_out_dir(cfg.out.dir, cfg.out.overwrite, inputs=local_model + [lora_file])
    model = resolve_model_path(cfg.model.path)
    lora = read_lora(lora_file, cfg.lora.scale)
    if cfg.out.format == "single_file":
        with staged(cfg.out.dir) as tmp:
            return write_single_file(os.path.join(model, "transformer"), lora,
                                     os.path.join(tmp, single_file_name(cfg)), cfg.out.dtype, progress,
                                     vae_dir=os.path.join(model, "vae") if "vae" in cfg.out.include else None)
    with staged(cfg.out.dir) as tmp:
        copy_tree(model, tmp, cfg.out.link, skip=_is_base_weights)
        return fold_transformer(os.path.join(model, "transformer"), lora, os.path.join(tmp, "transformer"),
                                cfg.out.dtype, cfg.out.max_shard_bytes, progress)


def main(argv: List[str]) -> None:
    cfg = load_config(MergeConfig, argv)
    start = time.monotonic()
    result = run_merge(cfg)
    if cfg.out.format == "single_file":
        extra = " + " + ", ".join(cfg.out.include) if cfg.out.include else ""
        where = (f"{os.path.join(cfg.out.dir, result.files[0])} ({result.tensors} tensors of the transformer{extra} "
                 f"in the original SD3 layout, out.dtype {cfg.out.dtype})")
    else:
        where = f"{cfg.out.dir} ({result.tensors} tensors in {len(result.files)} file(s), out.dtype {cfg.out.dtype})"
    print(f"merge: folded {result.modules} LoRA modules (lora.scale {cfg.lora.scale}) into the transformer; "
          f"wrote {where} in {time.monotonic() - start:.1f} s")
