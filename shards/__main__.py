import argparse
import sys

from .config import run_cli
from .errors import DataError
from .verify import inspect, verify


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m shards",
                                 description="Inspect, verify or combine shardtune shard sets; benchmark shard streaming.")
    ap.add_argument("command", choices=["inspect", "verify", "combine", "bench"])
    ap.add_argument("path", nargs="?", help="shard set folder or URL (combine: the output folder; bench: none)")
    ap.add_argument("parts", nargs="*", help="combine: the part folders")
    ap.add_argument("--quick", action="store_true",
                    help="verify: check sizes and hashes only, do not decode samples; bench: a few samples, one pass")
    ap.add_argument("--overwrite", action="store_true", help="combine: replace a complete set in the output folder")
    a = ap.parse_args(argv)
    if a.command == "bench":
        from .bench import format_row, rows

        if a.path:
            ap.error("bench takes no path: it writes its own shard set in a temporary folder")
        for row in rows(a.quick):
            print(format_row(row))
        return
    if a.path is None:
        ap.error(f"{a.command} needs a path")
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
    print(f"{a.path}: OK")


run_cli("shards", main)
