"""The merge stage: base (diffusers folder, hub id or original single file) + LoRAs -> a release.

A diffusers base gives a complete pipeline folder with the LoRAs folded into the transformer, or one file in
the original SD3 layout (out.format=single_file, optionally bundling the VAE and text encoders). A single-file
base gives a single file again, with everything it bundles carried over unchanged.
"""
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from shards.common.config import load_config
from shards.common.errors import DataError, UsageError
from shards.common.lock import sibling_lock
from shards.common.hub import resolve_model

from .base_check import other_base_warnings
from .card import CARD_NAME, lora_header, write_card
from .config import MergeConfig, is_single_file
from .fold import WEIGHTS_NAME, FoldResult, fold_transformer
from .lora import conv_modules, find_lora_file
from .release import check_out_dir, clean_leftovers, copy_tree, placed_summary, staged
from .rerun import merge_inputs, recorded_inputs, write_inputs
from .single_file import copy_jobs, file_name, transformer_jobs, vae_jobs, write_single_file
from .sources import TRANSFORMERS_WEIGHTS, OriginalSource, OtherKeys, Source, folder_source
from .text_encoders import TEXT_ENCODERS as ENCODERS
from .text_encoders import MergeLoras, TextMerge, bundled, fold_folders, is_weight_file, plan_folders, \
    read_merge_loras, release_file_source, verify_text_encoders
from .verify import VerifyReport, probe_or_skip, verify_tensors

# out.include=[text_encoders]: pipeline component -> prefix in the original single file.
TEXT_ENCODERS = {t.component: t.single_file for t in ENCODERS}


@dataclass
class MergeResult(FoldResult):
    verify: Optional[VerifyReport] = None
    placed: Dict[str, int] = field(default_factory=dict)  # unchanged component files, by how they got there
    up_to_date: bool = False  # out.dir already held the release of these very inputs; nothing was done


def resolve_model_path(path: str) -> str:
    """A local pipeline folder for model.path, downloading the whole pipeline for a hub id."""
    path = resolve_model(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"model.path '{path}' is not a diffusers pipeline folder (no model_index.json)")
    return path


def _not_carried(rel: str) -> bool:
    """The base's transformer weights (the fold writes new ones) and its model card (the release gets its own)."""
    return rel == CARD_NAME or rel.startswith(os.path.join("transformer", os.path.splitext(WEIGHTS_NAME)[0]))


def single_file_name(cfg: MergeConfig) -> str:
    """The file out.format=single_file writes in out.dir: out.name plus .safetensors (given or not)."""
    name = cfg.out.name[: -len(".safetensors")] if cfg.out.name.endswith(".safetensors") else cfg.out.name
    return file_name(name)


def _text_encoder_sources(model: str, stack: ExitStack) -> Dict[str, Source]:
    sources = {}
    for component, prefix in TEXT_ENCODERS.items():
        folder = os.path.join(model, component)
        if os.path.isdir(folder):  # SD3 may ship without T5 (text_encoder_3 null in model_index.json)
            sources[component] = stack.enter_context(folder_source(folder, f"base {component}", TRANSFORMERS_WEIGHTS,
                                                                   prefix))
    if not sources:
        raise UsageError(f"out.include has text_encoders but {model} has none of {', '.join(TEXT_ENCODERS)}")
    return sources


def trained_transformer(cfg: MergeConfig, base: Source, stack: ExitStack) -> Source:
    """The transformer of the release: the base's, or the fully fine-tuned one of transformer.path, which must
    hold the base's tensors in their shapes (the same architecture) and nothing else."""
    if not cfg.transformer.path:
        return base
    trained = stack.enter_context(folder_source(cfg.transformer.folder(), "trained transformer"))
    theirs, ours = set(trained.names), set(base.names)
    missing = [n for n in base.names if n not in theirs]
    extra = [n for n in trained.names if n not in ours]
    shapes = [n for n in base.names if n in theirs and base.shape(n) != trained.shape(n)]
    if missing or extra or shapes:
        what = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the base has not" if extra else
                f"holds {shapes[0]} as {trained.shape(shapes[0])}, the base as {base.shape(shapes[0])}")
        raise DataError(f"transformer.path {cfg.transformer.path} is not a transformer of model.path's architecture "
                        f"(it {what}); give the base the transformer was trained from")
    return trained


def warn_if_other_base(lora_files: Sequence[str], base: Source, model_path: str) -> None:
    for line in other_base_warnings(lora_files, [lora_header(f) for f in lora_files], base, model_path):
        print(line, file=sys.stderr)


def _merge_into(cfg: MergeConfig, tmp: str, loras: MergeLoras, lora_files: Sequence[str], stack: ExitStack,
                progress: bool):
    """Write the release into tmp; returns (result, base transformer Source, release Source, base config dir,
    how the unchanged component files got there, what became of the text encoder LoRAs)."""
    fmt = cfg.release_format()
    updates, te = loras.updates, TextMerge()
    if is_single_file(cfg.model.path):
        base = trained_transformer(cfg, stack.enter_context(OriginalSource(cfg.model.path)), stack)
        warn_if_other_base(lora_files, base, cfg.model.path)
        carried = stack.enter_context(OtherKeys(cfg.model.path))
        out_file = os.path.join(tmp, single_file_name(cfg))
        has = {t.component: carried for t in ENCODERS if any(n.startswith(t.single_file) for n in carried.names)}
        te.hint = "the base file does not bundle them; merge into a diffusers base (or a file bundling them) instead"
        per_encoder = bundled(loras.text, has, te, lambda: release_file_source(out_file))
        te.check_something_left(updates, lora_files)
        te_updates = {k: v for u in per_encoder.values() for k, v in u.items()}
        result = write_single_file(transformer_jobs(base, updates, cfg.out.dtype) + copy_jobs(carried, te_updates),
                                   out_file, progress)
        return result, base, lambda: OriginalSource(out_file, "release"), None, {}, te
    model = resolve_model_path(cfg.model.path)
    transformer_dir = os.path.join(model, "transformer")
    base = trained_transformer(cfg, stack.enter_context(folder_source(transformer_dir, "base transformer")), stack)
    transformer_dir = cfg.transformer.folder() or transformer_dir
    warn_if_other_base(lora_files, base, cfg.model.path)
    if fmt == "single_file":
        jobs = transformer_jobs(base, updates, cfg.out.dtype)
        if "vae" in cfg.out.include:
            jobs += vae_jobs(stack.enter_context(folder_source(os.path.join(model, "vae"), "base VAE")))
        out_file = os.path.join(tmp, single_file_name(cfg))
        sources = _text_encoder_sources(model, stack) if "text_encoders" in cfg.out.include else {}
        te.hint = ("model.path has no folder for them" if sources else
                   f"to include them, set out.include=[{','.join(list(cfg.out.include) + ['text_encoders'])}]")
        per_encoder = bundled(loras.text, sources, te, lambda: release_file_source(out_file))
        te.check_something_left(updates, lora_files)
        for component, source in sources.items():
            jobs += copy_jobs(source, per_encoder.get(component))
        return write_single_file(jobs, out_file, progress), base, lambda: OriginalSource(out_file, "release"), \
            transformer_dir, {}, te
    plans = plan_folders(model, loras.text, te,
                         lambda folder, what: stack.enter_context(folder_source(folder, what, TRANSFORMERS_WEIGHTS)))
    te.check_something_left(updates, lora_files)
    # An encoder that gets a LoRA is written anew: none of its base weight files may be linked or copied.
    changed = [p.component for p in plans]
    placed = copy_tree(model, tmp, cfg.out.link, skip=lambda rel: _not_carried(rel) or is_weight_file(rel, changed))
    out_dir = os.path.join(tmp, "transformer")
    result = fold_transformer(base, updates, out_dir, cfg.out.dtype, cfg.out.max_shard_bytes, progress)
    fold_folders(plans, tmp, te, cfg.out.max_shard_bytes, progress)
    return result, base, lambda: folder_source(out_dir, "release transformer"), transformer_dir, placed, te


@contextmanager
def one_thread():
    """torch on one thread while folding: the work is rank-r products and casts between long kernel copies, and
    idle OpenMP workers spin on the cores those copies need (measured: 2.7 s of CPU and ~1.5 s of wall time
    for a full-size SD3 Medium merge on 2 cores). The verify probe's forward passes get the threads back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_merge(cfg: MergeConfig, progress: bool = True) -> MergeResult:
    # One merge per out.dir at a time; the lock sits beside out.dir, which is replaced whole on publishing.
    with sibling_lock(cfg.out.dir, "merge"):
        return _run_merge(cfg, progress)


def _run_merge(cfg: MergeConfig, progress: bool) -> MergeResult:
    lora_files = [find_lora_file(p) for p in cfg.lora.paths()] if cfg.lora.given() else []
    if is_single_file(cfg.model.path) and not os.path.isfile(cfg.model.path):
        raise UsageError(f"model.path '{cfg.model.path}' does not exist (a single-file base must be a local file)")
    local_model = [cfg.model.path] if os.path.exists(cfg.model.path) else []
    clean_leftovers(cfg.out.dir)  # first: a merge killed while publishing may have an earlier release to put back
    base_path = cfg.model.path if is_single_file(cfg.model.path) else resolve_model_path(cfg.model.path)
    inputs = merge_inputs(cfg, base_path, lora_files)
    earlier = recorded_inputs(cfg.out.dir)
    if not cfg.out.overwrite and earlier is not None and {k: earlier.get(k) for k in inputs} == inputs:
        made = earlier.get("made", {})
        return MergeResult(made.get("modules", 0), made.get("tensors", 0), made.get("files", []), up_to_date=True)
    check_out_dir(cfg.out.dir, cfg.out.overwrite, inputs=local_model + lora_files +
                  [cfg.transformer.path] * bool(cfg.transformer.path))
    loras = read_merge_loras(lora_files, cfg.lora.scales())
    for line in loras.warnings:
        print(line, file=sys.stderr)
    updates = loras.updates
    lines = []
    with staged(cfg.out.dir) as tmp, ExitStack() as stack:
        with one_thread():
            result, base, release, transformer_dir, placed, te = _merge_into(cfg, tmp, loras, lora_files, stack,
                                                                             progress)
        if te.warning():
            print(te.warning(), file=sys.stderr)
        report = None
        if cfg.merge.verify:  # before publishing: a release that fails is never put in place
            with release() as out:
                report = verify_tensors(base, out, updates, cfg.out.dtype, progress)
                conv = conv_modules(updates)
                if not updates or conv:  # the probe hooks linear layers, and needs a module to hook
                    report.probe_skipped = (f"'{conv[0]}' has a conv LoRA, which the probe does not apply unmerged"
                                            if conv else "nothing to apply unmerged: no transformer LoRA")
                else:
                    report = probe_or_skip(report, transformer_dir, base, out, updates, cfg.merge.probe_max_params)
            lines.append(verify_text_encoders(te))
        write_card(tmp, cfg, lora_files, result.files, te.merged, te.left_out)
        write_inputs(tmp, {**inputs, "made": {"modules": result.modules, "tensors": result.tensors,
                                              "files": result.files}})
    for line in [te.summary()] + lines:
        if line:
            print(line)
    return MergeResult(result.modules, result.tensors, result.files, report, placed)


def main(argv: List[str]) -> None:
    cfg = load_config(MergeConfig, argv)
    start = time.monotonic()
    result = run_merge(cfg)
    if result.up_to_date:
        print(f"merge: up to date: {cfg.out.dir} holds the release of these inputs (the same base, LoRA files, "
              "scales and settings); set out.overwrite=true to make it again")
        return
    fmt = cfg.release_format()
    if fmt == "single_file":
        extra = " + " + ", ".join(cfg.out.include) if cfg.out.include else ""
        if is_single_file(cfg.model.path):
            extra = " + everything else the base file bundles"
        where = (f"{os.path.join(cfg.out.dir, result.files[0])} ({result.tensors} tensors: the transformer{extra}, "
                 f"in the original SD3 layout, out.dtype {cfg.out.dtype})")
    else:
        placed = placed_summary(result.placed)
        where = (f"{cfg.out.dir} ({result.tensors} tensors in {len(result.files)} file(s), out.dtype {cfg.out.dtype}; "
                 f"other components: {placed or 'none'} (out.link {cfg.out.link}))")
    loras = ", ".join(f"{os.path.basename(os.path.normpath(p))} x {s:g}" for p, s in zip(cfg.lora.paths(), cfg.lora.scales()))
    what = f"folded {result.modules} LoRA modules ({loras}) into the transformer" if cfg.lora.given() else ""
    if cfg.transformer.path:
        what = f"took the transformer trained in {cfg.transformer.path}" + (f" and {what}" if what else "")
    print(f"merge: {what}; wrote {where} and README.md in {time.monotonic() - start:.1f} s")
    if result.verify:
        for line in result.verify.lines():
            print(line)
