import argparse
import sys

from .config import run_cli
from .errors import DataError
from .verify import inspect, verify


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m shards", description="Inspect or verify a shardtune shard set.")
    ap.add_argument("command", choices=["inspect", "verify", "combine"])
    ap.add_argument("path", help="shard set folder or URL (combine: the output folder)")
    ap.add_argument("parts", nargs="*", help="combine: the part folders")
    ap.add_argument("--quick", action="store_true", help="verify: check sizes and hashes only, do not decode samples")
    ap.add_argument("--overwrite", action="store_true", help="combine: replace a complete set in the output folder")
    a = ap.parse_args(argv)
    if a.command == "combine":
        from .combine import combine

        m = combine(a.path, a.parts, a.overwrite)
        print(f"{a.path}: {m['counts']['written']} samples in {len(m['shards'])} shard(s) from {len(a.parts)} part folder(s)")
        return
    if a.command == "inspect":
        print(inspect(a.path))
        return
    problems = verify(a.path, deep=not a.quick)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise DataError(f"{a.path}: {len(problems)} problem(s) found")
    from .reader import read_manifest
    from .verify import absent_run_state, unchecked

    manifest = read_manifest(a.path)
    older, absent = unchecked(manifest), absent_run_state(a.path, manifest)
    notes = ([f"written before the manifest hashed them: {' and '.join(older)} not checked"] if older else []) + \
        ([f"{len(absent)} precompute run-state file(s) not in this copy (needed only to resume or combine)"]
         if absent else [])
    print(f"{a.path}: OK" + (f" ({'; '.join(notes)})" if notes else ""))


def command(argv):
    run_cli("shards", main, argv)


if __name__ == "__main__":
    command(sys.argv[1:])
