"""`python -m merge convert IN OUT --to kohya|diffusers [--overwrite]`: an SD3 LoRA file in the other format."""
import os
from dataclasses import dataclass
from typing import List

from safetensors.torch import save

from shards.common.atomic import write_bytes
from shards.common.config import command_argv, load_config
from shards.common.errors import UsageError

from .kohya import to_diffusers, to_kohya
from .lora import LORA_FILE_NAME, read_lora

USAGE = "python -m merge convert IN.safetensors OUT.safetensors --to kohya|diffusers [--overwrite]"
FORMATS = ("kohya", "diffusers")


CHOICES = {"to": FORMATS}
REQUIRED = ("src", "dst", "to")
HELP = {
    "src": "IN: a LoRA .safetensors file (kohya or diffusers format), or a folder holding one",
    "dst": "OUT: a .safetensors file (--to diffusers: also a folder, which gets pytorch_lora_weights.safetensors)",
    "to": "the format to write",
    "overwrite": "replace OUT if it exists",
}


@dataclass
class ConvertCommand:
    src: str = ""
    dst: str = ""
    to: str = ""
    overwrite: bool = False

    def __post_init__(self):
        if not (self.src and self.dst):
            raise UsageError(f"convert takes IN and OUT, got {int(bool(self.src)) + int(bool(self.dst))} path(s); "
                             f"usage: {USAGE}")
        if self.to not in FORMATS:
            raise UsageError(f"--to must be kohya or diffusers, got {self.to or 'nothing'}; usage: {USAGE}")


def parse(argv: List[str]) -> ConvertCommand:
    return load_config(ConvertCommand, command_argv(argv, ("src", "dst"), ("overwrite",)))


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
    a = parse(argv)
    out = convert(a.src, a.dst, a.to, a.overwrite)
    print(f"merge convert: wrote {out} ({a.to} format)")
