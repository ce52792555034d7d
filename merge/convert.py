"""`python -m merge convert IN OUT --to kohya|diffusers [--overwrite]`: an SD3 LoRA file in the other format."""
import os
from typing import List

from safetensors.torch import save

from shards.atomic import write_bytes
from shards.errors import UsageError

from .kohya import to_diffusers, to_kohya
from .lora import LORA_FILE_NAME, read_lora

USAGE = "usage: python -m merge convert IN.safetensors OUT.safetensors --to kohya|diffusers [--overwrite]"
FORMATS = ("kohya", "diffusers")


def parse(argv: List[str]):
    args, to, overwrite = [], None, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--to":
            if i + 1 >= len(argv):
                raise UsageError(f"--to needs a value (kohya or diffusers); {USAGE}")
            to, i = argv[i + 1], i + 1
        elif a.startswith("--to="):
            to = a[len("--to="):]
        elif a == "--overwrite":
            overwrite = True
        elif a.startswith("-"):
            raise UsageError(f"unknown option '{a}'; {USAGE}")
        else:
            args.append(a)
        i += 1
    if len(args) != 2:
        raise UsageError(f"convert takes IN and OUT, got {len(args)} path(s); {USAGE}")
    if to not in FORMATS:
        raise UsageError(f"--to must be kohya or diffusers, got {to!r}; {USAGE}")
    return args[0], args[1], to, overwrite


def convert(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    """Write src (kohya or diffusers, read as merge reads it) to dst in format `to`; returns the file written.

    dst is a .safetensors file, or for --to diffusers also a folder (gets pytorch_lora_weights.safetensors)."""
    if os.path.isdir(src):
        src = os.path.join(src, LORA_FILE_NAME)
    if not os.path.isfile(src):
        raise UsageError(f"convert: input '{src}' does not exist")
    if not src.endswith(".safetensors"):
        raise UsageError(f"convert: input '{src}' is not a .safetensors file")
    if not dst.endswith(".safetensors"):
        if to == "kohya":
            raise UsageError(f"convert: output '{dst}' must be a .safetensors file")
        dst = os.path.join(dst, LORA_FILE_NAME)
    if os.path.abspath(dst) == os.path.abspath(src):
        raise UsageError(f"convert: output '{dst}' is the input file")
    if os.path.exists(dst) and not overwrite:
        raise UsageError(f"convert: output '{dst}' exists; pass --overwrite to replace it")
    modules = read_lora(src)
    if to == "kohya":
        data = save(to_kohya(modules), metadata={"format": "pt"})
    else:
        state, header = to_diffusers(modules)
        data = save(state, metadata=header)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    write_bytes(dst, data)
    return dst


def main(argv: List[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    src, dst, to, overwrite = parse(argv)
    out = convert(src, dst, to, overwrite)
    print(f"merge convert: wrote {out} ({to} format)")
