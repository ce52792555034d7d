"""What each stage's benchmark module shares on its command line: `--json FILE`, rewritten after every row,
so `python -m bench` (which runs each stage's module as its own process, README "Layout") shows and saves
each row as it comes, and keeps the rows made before a failure."""
import argparse
from typing import Callable, Iterable, Iterator, List, Optional

from .results import rows_json
from .row import Row


def write_rows(path: str, rows: List[Row]) -> None:
    from shards.common.atomic import write_json

    write_json(path, rows_json({}, rows))


def reported(rows: Iterable[Row], json_path: Optional[str], show: Callable[[Row], str]) -> List[Row]:
    """Each row printed with `show` and, with a `json_path`, the file rewritten with every row so far."""
    done = []
    for r in rows:
        done.append(r)
        print(show(r), flush=True)
        if json_path:
            write_rows(json_path, done)
    return done


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", help="also write the rows to this file, after each row (python -m bench reads it)")


def rows_cli(argv: List[str], prog: str, description: str, rows: Callable[[bool], Iterator[Row]],
             show: Callable[[Row], str], quick_help: str) -> None:
    """The command line of a stage's benchmark that has only `--quick` and `--json`."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    reported(rows(a.quick), a.json, show)
