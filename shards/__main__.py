"""`python -m shards inspect|verify|combine PATH ...`: look at, check or join shard sets."""
import sys
from dataclasses import dataclass, field
from typing import List

from .common.config import command_argv, load_config, run_cli
from .common.errors import DataError, UsageError

COMMANDS = ("inspect", "verify", "combine")
USAGE = ("python -m shards inspect|verify|combine PATH [PART ...] [--quick] [--overwrite] "
         "(or the same as key=value: command=verify path=PATH quick=true)")


CHOICES = {"command": COMMANDS}
REQUIRED = ("command", "path")
HELP = {
    "command": "inspect: what a set holds; verify: check its files; combine: join part folders into one set",
    "path": "the shard set folder or URL (combine: the output folder)",
    "parts": "combine: the part folders",
    "quick": "verify: check sizes and hashes only, do not decode the samples",
    "overwrite": "combine: replace a complete set in the output folder",
}


@dataclass
class ShardsCommand:
    command: str = ""
    path: str = ""
    parts: List[str] = field(default_factory=list)
    quick: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise UsageError(f"config key 'command': {self.command or 'nothing'} given; choose {', '.join(COMMANDS)}")
        if not self.path:
            raise UsageError("config key 'path': the shard set (combine: the output folder) is missing")


def main(argv):
    a = load_config(ShardsCommand, command_argv(argv, ("command", "path"), ("quick", "overwrite"), rest="parts"))
    if a.command == "combine":
        from .combine import combine

        m = combine(a.path, a.parts, a.overwrite)
        print(f"{a.path}: {m.counts.written} samples in {len(m.shards)} shard(s) from {len(a.parts)} part folder(s)")
        return
    if a.command == "inspect":
        from .inspect import inspect

        print(inspect(a.path))
        return
    from .verify import verify

    problems = verify(a.path, deep=not a.quick)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise DataError(f"{a.path}: {len(problems)} problem(s) found")
    from .manifest import absent_run_state, read_manifest, unchecked

    manifest = read_manifest(a.path)
    older, absent = unchecked(manifest), absent_run_state(a.path, manifest)
    notes = ([f"written before the manifest hashed them: {' and '.join(older)} not checked"] if older else []) + \
        ([f"{len(absent)} precompute run-state file(s) not in this copy (needed only to resume or combine)"]
         if absent else [])
    print(f"{a.path}: OK" + (f" ({'; '.join(notes)})" if notes else ""))


def command(argv):
    run_cli("shards", main, argv, schema=ShardsCommand, usage=USAGE)


if __name__ == "__main__":
    command(sys.argv[1:])
