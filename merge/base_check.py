"""Whether each LoRA is folded into the base it was trained on.

shardtune's trainer records a fingerprint of its base transformer in the LoRA file (shards/common/fingerprint.py says
what it is made of); here the same fingerprint is taken of model.path's transformer, read under diffusers names
whatever its layout. A LoRA applied across finetunes of one architecture is a normal thing to do, so a
difference is a warning, not an error. Files without the record (other tools' LoRAs) are not checked.
"""
import json
from typing import Dict, List, Optional, Sequence, Tuple

from shards.common.fingerprint import transformer_fingerprint

from .sources import Source

RUN_KEY = "shardtune"  # the header entry with train's record of the run


def recorded_base(header: Dict[str, str]) -> Optional[Tuple[dict, str]]:
    """(fingerprint, the training's model.path) from a LoRA file header; None when it records no fingerprint."""
    try:
        run = json.loads(header.get(RUN_KEY, "{}"))
    except ValueError:
        return None
    fingerprint = run.get("base_fingerprint") if isinstance(run, dict) else None
    if not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("sha256"), str)
            and isinstance(fingerprint.get("dtype"), str)):
        return None
    return fingerprint, str(run.get("base_model") or "an unrecorded model")


def other_base_warnings(lora_files: Sequence[str], headers: Sequence[Dict[str, str]], base: Source,
                        model_path: str) -> List[str]:
    """One line per LoRA whose recorded base fingerprint differs from `base`'s (model.path's transformer)."""
    names = set(base.names)
    ours: Dict[str, str] = {}  # the base's fingerprint as seen in each training dtype the LoRAs record
    lines = []
    for path, header in zip(lora_files, headers):
        recorded = recorded_base(header)
        if recorded is None:
            continue
        fingerprint, trained_on = recorded
        dtype = fingerprint["dtype"]
        if dtype not in ours:
            try:
                ours[dtype] = transformer_fingerprint(lambda n: base.get(n) if n in names else None, dtype)["sha256"]
            except ValueError:  # a dtype name this version does not know: nothing to compare with
                continue
        if ours[dtype] != fingerprint["sha256"]:
            lines.append(f"merge: warning: {path} was trained on another base transformer ({trained_on}) than "
                         f"model.path {model_path}: their fingerprints differ; folding it anyway, check that this "
                         "base is the one you mean")
    return lines
