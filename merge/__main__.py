import sys

from shards.common.config import run_cli

from .config import MergeConfig
from .run import main


def command(argv):
    if argv[:1] == ["convert"]:  # python -m merge convert IN OUT --to kohya|diffusers
        from .convert import USAGE, ConvertCommand, main as convert_main

        run_cli("merge convert", convert_main, argv[1:], schema=ConvertCommand, usage=USAGE)
    else:
        run_cli("merge", main, argv, schema=MergeConfig)


if __name__ == "__main__":
    command(sys.argv[1:])
