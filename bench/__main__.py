"""`python -m bench` (`make bench`): see bench.driver."""
from shards.common.config import run_cli

from .driver import main

if __name__ == "__main__":
    run_cli("bench", main)
