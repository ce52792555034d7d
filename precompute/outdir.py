"""out.dir of the precompute stage: is it this run's set, which shards are still to do, who may write it.

A part redoes only its own shards: those missing, those whose inputs changed (a changed size or time is
checked against the content hash) and, with out.overwrite, those computed with other numerics. Parts share
the folder, each holding a lock on its own part only.
"""
import contextlib
import json
import os
from typing import Dict, List, Optional

from shards import format as F
from shards.common.atomic import write_json
from shards.common.config import to_dict
from shards.common.errors import UsageError
from shards.common.fingerprint import file_sha256
from shards.common.lock import live_holders, out_dir_lock
from shards.writer import clear_set, read_sidecar, shard_name, sidecar_path

from .config import PrecomputeConfig
from .inputs import Item


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _same_inputs(record: dict, items: List[Item], signature: list) -> bool:
    """Did this shard's inputs stay the same? A changed size or time is checked against the content hash."""
    old = record.get("inputs", [])
    if not items:
        return old == signature
    if len(old) != len(items):
        return False
    hashes = dict(zip(record["sources"], record["content"]))
    for o, it in zip(old, items):
        if o == it.signature():
            continue
        if o[0] != it.source or o[3:] != it.signature()[3:] or it.source not in hashes:  # reason, caption
            return False
        try:
            if file_sha256(it.path) != hashes[it.source]:
                return False
        except OSError:
            return False
    return True


def _describe_changes(old: dict, new: dict) -> str:
    parts = []
    changed = [k for k in sorted(set(old["config"]) | set(new["config"])) if old["config"].get(k) != new["config"].get(k)]
    if changed:
        parts.append("config " + ", ".join(f"{k} ({old['config'].get(k)!r} -> {new['config'].get(k)!r})"
                                           for k in changed[:4]) + (" ..." if len(changed) > 4 else ""))
    comps = [k for k in sorted(set(old["components"]) | set(new["components"]))
             if old["components"].get(k) != new["components"].get(k)]
    if comps:
        parts.append("model components " + ", ".join(comps))
    if old["inputs"] != new["inputs"]:
        parts.append(f"number of inputs ({old['inputs']} -> {new['inputs']})")
    if old.get("format_version", 1) != new.get("format_version", 1):
        parts.append(f"shard format version ({old.get('format_version', 1)} -> {new.get('format_version', 1)}: "
                     "this shardtune writes the newer one)")
    return "; ".join(parts)


def _numerics_clash(d: str, shards: List[int], old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    what = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    if keys == ["threads"]:
        advice = f"rerun with OMP_NUM_THREADS={old['threads']}"
    else:
        advice = "finish it with the device and library versions they were computed with"
    return (f"out.dir {d}: shards {', '.join(map(str, shards[:5]))}{' ...' if len(shards) > 5 else ''} were computed "
            f"with other numerics than this run ({what}), and float results differ between them, so the set would "
            f"be neither run's; {advice}, or set out.overwrite=true to redo those {len(shards)} shard(s) this way")


def other_numerics(records: Dict[int, dict], computed: dict) -> List[int]:
    """Shards this same part (same part and parts) computed with other numerics than `computed` says.

    Shards of other parts are the user's own split of the work, maybe over other machines: they are kept,
    and the manifest lists which settings computed which shards. A record without numerics predates them."""
    return [i for i, rec in sorted(records.items())
            if "numerics" in rec and rec.get("part") == computed["part"] and rec["numerics"] != computed["numerics"]]


def prepare_out_dir(cfg: PrecomputeConfig, state: dict, plan, mine: List[int], facts: dict,
                    computed: Optional[dict] = None) -> Optional[List[int]]:
    """Check out.dir against this run (`plan`: the Plan or TarPlan of its inputs) and return the shards of this
    part still to do, or None when out.dir already holds the complete set this run would make (same content
    config, model components and inputs): a rerun of a finished command. `computed` holds this run's
    numerics and part (see other_numerics)."""
    d = cfg.out.dir
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UsageError(f"config key 'out.dir': cannot create {d} ({e.strerror})") from None
    state_path = os.path.join(d, F.RUN_STATE)
    old = read_json(state_path) if os.path.exists(state_path) else None
    if old is not None and {k: old.get(k, 1 if k == "format_version" else None) for k in state} != state:
        if not cfg.out.overwrite:
            raise UsageError(f"out.dir {d} holds a shard set made differently: {_describe_changes(old, state)}; "
                             "set out.overwrite=true to rebuild it, or choose another out.dir")
        clear_set(d)
    elif old is None and any(n.startswith("shard-") or n == F.MANIFEST for n in os.listdir(d)):
        if not cfg.out.overwrite:
            raise UsageError(f"out.dir {d} holds shard files of unknown origin; set out.overwrite=true or choose another")
        clear_set(d)
    ours = tuple(os.path.basename(sidecar_path(d, i)) + "." for i in mine) + tuple(shard_name(i) + "." for i in mine)
    for name in os.listdir(d):  # a temp file of ours is from a killed run; another part's are not ours to touch
        if name.endswith(".tmp") and name.startswith(ours):
            os.remove(os.path.join(d, name))
    todo, changed, kept = [], [], {}
    for i in mine:
        rec = read_sidecar(d, i)
        if rec is None:
            todo.append(i)
        elif not _same_inputs(rec, plan.shard(i), plan.signature(i)):
            changed.append(i)
        else:
            kept[i] = rec
    complete = os.path.exists(os.path.join(d, F.MANIFEST))
    if changed and not cfg.out.overwrite:
        example = plan.signature(changed[0])[0][0]
        raise UsageError(f"source files changed since out.dir {d} was made (in shards {', '.join(map(str, changed[:5]))}, "
                         f"e.g. {example}); set out.overwrite=true to redo the affected shards")
    if complete and not changed and not cfg.out.overwrite:
        return None  # nothing is written, run.json included: the set and its hashes stay as they are
    clash = other_numerics(kept, computed) if computed else []
    if clash and not cfg.out.overwrite and not (todo or changed):
        clash = []  # this run computes nothing, so it mixes nothing into the set
    if clash and not cfg.out.overwrite:
        raise UsageError(_numerics_clash(d, clash, kept[clash[0]]["numerics"], computed["numerics"]))
    changed += clash
    # Written only once this run is going ahead: run.json is one of the files the manifest hashes.
    # The manifest facts ride along so that any part, or `shards combine`, can complete the set.
    write_json(state_path, {**state, "facts": {**facts, "config": to_dict(cfg)}})
    if (todo or changed) and complete:
        os.remove(os.path.join(d, F.MANIFEST))
    return sorted(todo + changed)


PART_LOCK = ".shardtune-precompute-part-"


@contextlib.contextmanager
def part_lock(out_dir: str, part: int, parts: int, overwrite: bool):
    """Parts share out.dir (each owns its shards), so each part locks only itself. Checked once this part
    holds its lock: parts of another split would write the same shards, and an overwrite may clear the
    shards another part is writing."""
    mine = f"{PART_LOCK}{part}-of-{parts}.lock"
    with out_dir_lock(out_dir, f"precompute part {part} of {parts}", mine):
        others = [h for h in live_holders(out_dir, PART_LOCK) if os.path.basename(h["path"]) != mine]
        clash = [h for h in others if not h["path"].endswith(f"-of-{parts}.lock")] or (others if overwrite else [])
        if clash:
            h = clash[0]
            raise UsageError(f"out.dir {out_dir} is being written by {h.get('stage', 'another precompute')} (pid "
                             f"{h.get('pid')} on {h.get('host')}); "
                             + ("out.overwrite=true would clear its shards: wait for it to finish"
                                if overwrite else f"parts of one set must all use parts={parts}"))
        yield
