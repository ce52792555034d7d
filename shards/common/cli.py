"""The `shardtune` command: `shardtune precompute|train|merge|shards|convert ...`, each the same command as
`python -m STAGE ...` with the same grammar (`--config FILE`, `key=value`, `--help`).

Commands are found by module name at run time, as `python -m` finds them: the shards package stays free of
imports of the stages that build on it, and a command's heavy imports happen only when it runs."""
import importlib
import sys
from typing import List, Optional

# command -> (module whose __main__.command runs it, arguments put before the user's)
COMMANDS = {
    "precompute": ("precompute", []),
    "train": ("train", []),
    "merge": ("merge", []),
    "shards": ("shards", []),
    "convert": ("merge", ["convert"]),
}
USAGE = """usage: shardtune COMMAND [--config FILE.yaml] [key=value ...]   (shardtune COMMAND --help: its keys)

  precompute   encode images and captions into a shard set
  train        train a LoRA on a shard set
  merge        fold LoRAs into the base: a diffusers folder or one single file
  shards       inspect | verify | combine shard sets
  convert      a LoRA file in kohya or diffusers format"""


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(2)
        return
    if argv[0] not in COMMANDS:
        print(f"shardtune: error: unknown command '{argv[0]}'; choose {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module, before = COMMANDS[argv[0]]
    importlib.import_module(f"{module}.__main__").command(before + argv[1:])


if __name__ == "__main__":
    main()
