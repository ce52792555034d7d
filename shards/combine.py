"""`python -m shards combine OUT PART_DIR...`: one shard set from parts written to separate folders.

Each part folder holds the same run.json (same config, model and inputs) and the shards of its part;
the combined set is what a single run would have written.
"""
import json
import os
from typing import List

from . import format as F
from .common.errors import DataError, UsageError
from .common.atomic import link_or_copy, write_json
from .writer import assemble, clear_set, read_sidecar, shard_name, sidecar_path


def _state(folder: str) -> dict:
    path = os.path.join(folder, F.RUN_STATE)
    if not os.path.exists(path):
        raise UsageError(f"{folder} has no {F.RUN_STATE}: it is not the output of a precompute part")
    with open(path) as f:
        return json.load(f)


def combine(out_dir: str, parts: List[str], overwrite: bool = False) -> dict:
    if not parts:
        raise UsageError("name at least one part folder")
    if os.path.exists(os.path.join(out_dir, F.MANIFEST)) and not overwrite and \
            os.path.abspath(out_dir) not in {os.path.abspath(p) for p in parts}:
        raise UsageError(f"{out_dir} already holds a complete shard set; choose another folder or pass --overwrite")
    states = [_state(p) for p in parts]
    same = lambda s: {k: s.get(k) for k in ("format_version", "config", "components", "inputs", "shards")}  # noqa: E731
    for p, s in zip(parts[1:], states[1:]):
        if same(s) != same(states[0]):
            raise DataError(f"{p} was made with other settings, model or inputs than {parts[0]}; "
                            "parts of one set must share them")
    n = states[0]["shards"]
    os.makedirs(out_dir, exist_ok=True)
    if overwrite and os.path.abspath(out_dir) not in {os.path.abspath(p) for p in parts}:
        clear_set(out_dir)
    found = set()
    for p in parts:
        for i in range(n):
            if i not in found and read_sidecar(p, i) is not None:
                link_or_copy(os.path.join(p, shard_name(i)), os.path.join(out_dir, shard_name(i)))
                link_or_copy(sidecar_path(p, i), sidecar_path(out_dir, i))
                found.add(i)
    missing = sorted(set(range(n)) - found)
    if missing:
        raise DataError(f"shards {', '.join(map(str, missing[:10]))} are in none of the part folders "
                        f"({len(missing)} of {n} missing); run the parts that write them")
    extras = next((os.path.join(p, F.EXTRAS) for p in parts if os.path.exists(os.path.join(p, F.EXTRAS))), None)
    if extras is None:
        raise DataError(f"none of the part folders holds {F.EXTRAS}")
    link_or_copy(extras, os.path.join(out_dir, F.EXTRAS))
    state = dict(states[0])
    write_json(os.path.join(out_dir, F.RUN_STATE), state)
    facts = dict(state["facts"])
    manifest = assemble(out_dir, n, facts, state["config"]["out.dtype"])
    if manifest is None:
        raise DataError(f"{out_dir} could not be completed")
    return manifest
