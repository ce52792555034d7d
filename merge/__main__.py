import sys

from shards.config import run_cli

from .config import MergeConfig
from .run import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["convert"]:  # python -m merge convert IN OUT --to kohya|diffusers
        from .convert import main as convert_main

        run_cli("merge convert", convert_main, sys.argv[2:])
    else:
        run_cli("merge", main, schema=MergeConfig)
