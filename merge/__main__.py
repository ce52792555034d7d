from shards.config import run_cli

from .config import MergeConfig
from .run import main

if __name__ == "__main__":
    run_cli("merge", main, schema=MergeConfig)
