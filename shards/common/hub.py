"""Resolve `model.path` (a local diffusers folder or a Hugging Face hub id) to a local folder."""
import os
from typing import Optional, Sequence

from .errors import UsageError


def looks_like_hub_id(path: str) -> bool:
    """`org/name`, unless its first part is a local folder (then it is a mistyped local path)."""
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not os.path.isabs(path)
            and not os.path.isdir(parts[0]))


def check_model_path(key: str, path: str, problems: list) -> None:
    """Config-time check: a local folder that exists, or something shaped like a hub id."""
    if not path:
        problems.append(f"config key '{key}' is required (a diffusers SD3 folder or a hub id)")
    elif not os.path.isdir(path) and not looks_like_hub_id(path):
        problems.append(f"config key '{key}': no such folder: {path}")


def resolve_model(path: str, allow_patterns: Optional[Sequence[str]] = None, revision: Optional[str] = None) -> str:
    """Local folder as is; a hub id is downloaded (only `allow_patterns`) into the HF cache."""
    if os.path.isdir(path):
        return path
    if not looks_like_hub_id(path):
        raise UsageError(f"model.path: no such folder: {path}")
    from huggingface_hub import snapshot_download

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(path, allow_patterns=list(allow_patterns) if allow_patterns else None,
                                 revision=revision)
    except GatedRepoError:
        why = "the repository is gated: accept its licence on the hub page and run `hf auth login`"
    except RepositoryNotFoundError:
        why = "no such repository (or it is private: run `hf auth login`)"
    except RevisionNotFoundError:
        why = f"it has no revision '{revision}'"
    except Exception as e:  # no network, disk full, proxy trouble: all need the user
        why = f"{type(e).__name__}; check the network, or download it and pass the local folder"
    raise UsageError(f"model.path: '{path}' is not a local folder and cannot be had from the Hugging Face hub: {why}")


def component_dir(root: str, name: str) -> str:
    sub = os.path.join(root, name)
    if not os.path.isdir(sub):
        raise UsageError(f"model.path: {root} has no '{name}' folder; is it a diffusers SD3 pipeline folder?")
    return sub
