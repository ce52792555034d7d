"""Config loading shared by the three stages: dataclass schema + YAML + key=value overrides.

Every stage's `python -m STAGE --config FILE key=value ...` goes through `load_config`, so a
wrong key, a wrong type or a missing file is always reported the same way: one line, exit 2.
"""
import dataclasses
import errno
import json
import math
import os
import sys
import warnings
import typing
from typing import Callable, Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import DataError, Interrupted, UsageError

T = TypeVar("T")


class HelpRequested(Exception):
    """`-h` / `--help`: print the keys with their defaults instead of running."""


def parse_argv(argv: Sequence[str]):
    """Split `--config FILE` and `key=value` tokens."""
    config_path, overrides = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            raise HelpRequested()
        if a in ("--config", "-c"):
            if i + 1 >= len(args):
                raise UsageError("--config needs a file path")
            config_path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise UsageError(f"unexpected argument '{a}': use --config FILE and key=value overrides (--help lists the keys)")
        i += 1
    return config_path, overrides


def command_argv(argv: Sequence[str], positional: Sequence[str], flags: Sequence[str] = (),
                 rest: Optional[str] = None) -> List[str]:
    """The tool commands (shards, convert) take the stages' grammar, `key=value` and `--config FILE`, parsed
    by load_config against a schema like any stage; their positional arguments and `--key [value]` options
    are the same keys written the way such commands usually are. `positional` names the keys the bare
    arguments fill in order, `rest` the list key that takes any further ones, `flags` the boolean keys a
    bare `--key` sets."""
    out, bare, extra = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help", "-c", "--config") or a.startswith("--config="):
            out.append(a)
            if a in ("-c", "--config") and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
        elif a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if not eq and key in flags:
                value = "true"
            elif not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"option '--{key}' needs a value")
                value, i = args[i + 1], i + 1
            out.append(f"{key}={value}")
        elif "=" in a and not a.startswith("-"):
            out.append(a)
        else:
            (bare if len(bare) < len(positional) else extra).append(a)
        i += 1
    if extra and rest is None:
        raise UsageError(f"unexpected argument '{extra[0]}': this command takes {' and '.join(p.upper() for p in positional)}")
    out += [f"{k}={v}" for k, v in zip(positional, bare)]
    if extra:
        out.append(f"{rest}=[{','.join(extra)}]")
    return out


def _describe(e: OmegaConfBaseException, token: str = "") -> str:
    key = getattr(e, "full_key", None) or token.split("=", 1)[0] or "?"
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        return f"unknown config key '{key}' (--help lists the keys)"
    if "ListConfig" in msg:
        return f"config key '{key}' takes a list: write {key}=[a,b] (quote it in the shell)"
    if "is not a subclass of" in msg or "Merge error" in msg:
        return f"config key '{key}' is a section, not a value: set one of its keys, e.g. {key}.something=..."
    if msg.startswith("Incompatible value 'None'") or "Non optional field cannot be assigned None" in msg:
        return f"config key '{key}' needs a value"
    return f"config key '{key}': {msg}"


def load_config(schema: Type[T], argv: Sequence[str]) -> T:
    """Build a `schema` instance from argv; `__post_init__` validation errors become UsageError."""
    config_path, overrides = parse_argv(argv)
    merged = OmegaConf.structured(schema)
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise UsageError(f"config file not found: {config_path}")
        try:
            yaml = OmegaConf.load(config_path)
        except Exception as e:  # YAML syntax errors carry line numbers in the first line
            raise UsageError(f"cannot read config file {config_path}: {str(e).splitlines()[0]}") from None
        if not isinstance(yaml, DictConfig):
            raise UsageError(f"config file {config_path} must hold sections of keys (e.g. 'train:' with "
                             "'max_steps: 100' under it), not a list")
        try:
            merged = OmegaConf.merge(merged, yaml)
        except OmegaConfBaseException as e:
            raise UsageError(f"{_describe(e)} (in {config_path})") from None
    for o in overrides:  # one at a time, so an error names the command-line token at fault
        if not o.split("=", 1)[0]:
            raise UsageError(f"override '{o}' has no key")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o]))
        except OmegaConfBaseException as e:
            raise UsageError(f"{_describe(e, o)} (on the command line)") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UsageError(_describe(e)) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def describe_keys(schema) -> str:
    """What `--help` prints: every key of the schema by section, with its default, the values it may take and
    what it means. The meanings, allowed values and required keys are the HELP, CHOICES, RANGES and REQUIRED
    tables of the schema's own module, the tables the config is checked against."""
    tables = vars(sys.modules[schema.__module__])
    help_, choices, ranges = (tables.get(n, {}) for n in ("HELP", "CHOICES", "RANGES"))
    required = tables.get("REQUIRED", ())
    defaults = default_keys(schema)
    lines, section = [], None
    for key, default in defaults.items():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"\n{head}:" if head else "")
        shown = "(required)" if key in required else json.dumps(default)
        allowed = f"  [{' | '.join(map(str, choices[key]))}]" if key in choices else \
            (f"  [{_range_words(ranges[key])}]" if key in ranges else "")
        lines.append(f"  {key} = {shown}{allowed}")
        if help_.get(key):
            lines.append(f"      {help_[key]}")
    return "\n".join(lines).lstrip("\n") + "\n"


def check_choices(cfg, choices: Dict[str, Sequence], problems: List[str]) -> None:
    """Every key with a fixed set of values against it (a list is checked element by element)."""
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            one_of(problems, key, v, allowed)


def to_dict(cfg) -> dict:
    """Plain dict of a config dataclass, for manifests and metadata."""
    return dataclasses.asdict(cfg)


def flat_keys(config: dict, prefix: str = "") -> dict:
    """{'section.key': value} of a nested config dict (what a dotted override names)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def positive(problems: List[str], key: str, value, allow_zero: bool = False) -> None:
    """A finite number above zero (or at least zero)."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        problems.append(f"config key '{key}' must be a finite number {'>= 0' if allow_zero else '> 0'}, not {value}")


def _interval(text: str):
    """'[1, inf)' -> (1.0, inf, True, False): bounds and whether each is included."""
    lo, hi = (x.strip() for x in text[1:-1].split(","))
    return float(lo), float(hi), text[0] == "[", text[-1] == "]"


def _range_words(text: str) -> str:
    lo, hi, lo_in, _ = _interval(text)
    if math.isinf(hi) and math.isinf(lo):
        return "a finite number"
    if math.isinf(hi):
        return f"{'at least' if lo_in else 'above'} {lo:g}"
    return f"in {text}"


def check_ranges(cfg, ranges: Dict[str, str], problems: List[str]) -> None:
    """Every numeric key against its interval ('[1, inf)', '(0, inf)', '[0, 1)', '(-inf, inf)': finite).

    None (an optional key left unset) passes; a list is checked element by element."""
    for key, text in ranges.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        lo, hi, lo_in, hi_in = _interval(text)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
            if not ok:
                problems.append(f"config key '{key}' must be {_range_words(text)}, not {v}")


def default_keys(schema) -> dict:
    """{'section.key': default} of every key of a config dataclass (its checks in __post_init__ not run)."""
    return flat_keys(OmegaConf.to_container(OmegaConf.structured(schema)))


def numeric_keys(schema) -> List[str]:
    """Dotted names of every int / float key of a config dataclass (also optional ones and lists of numbers)."""
    out = []
    for f in dataclasses.fields(schema):
        t = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(t):
            out += [f"{f.name}.{k}" for k in numeric_keys(t)]
            continue
        args = [a for a in typing.get_args(t) if a is not type(None)]
        inner = args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t
        if typing.get_origin(inner) in (list, typing.List):
            inner = typing.get_args(inner)[0]
        if inner in (int, float):
            out.append(f.name)
    return out


def resolve_device(key: str, name: str):
    """`auto` -> cuda when present, else cpu; an explicit device must exist on this machine."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"config key '{key}': '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"config key '{key}': '{name}' asked for, but this machine has no CUDA GPU "
                         f"(or torch was installed without CUDA); use {key}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"config key '{key}': '{name}' asked for, but there are {torch.cuda.device_count()} GPU(s)")
    return device


def check(problems: List[str]) -> None:
    """Raise all collected config problems as one ValueError (style rule 1)."""
    if problems:
        raise ValueError("; ".join(problems))


def one_of(problems: List[str], key: str, value, allowed) -> None:
    if value not in allowed:
        problems.append(f"config key '{key}': '{value}' is not one of {', '.join(map(str, allowed))}")


def _not_a_cast_notice(record) -> bool:
    return "MatMul8bitLt" not in record.getMessage()


def quiet_libraries() -> None:
    """Keep the terminal for shardtune's own progress bars and messages."""
    import logging

    # bitsandbytes notes at import, on CPUs with AVX512-BF16, that an optional kernel package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # int8 layers say on every matmul that inputs are cast, through warnings in some bitsandbytes versions
    # and through logging in others.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    cast_notices = logging.getLogger("bitsandbytes.autograd._functions")
    if _not_a_cast_notice not in cast_notices.filters:
        cast_notices.addFilter(_not_a_cast_notice)
    # transformers' own notices (we report truncation ourselves); read when transformers is first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_cli(prog: str, main: Callable[[List[str]], None], argv=None, schema=None, usage: Optional[str] = None) -> None:
    """Run a stage's main, turning user errors into one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        main(argv)
    except HelpRequested:
        print(f"usage: {usage or f'python -m {prog} [--config FILE.yaml] [key=value ...]'}\n")
        if schema is not None:
            print("keys by section: default, [allowed values], and what each means:\n")
            print(describe_keys(schema))
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        # Disk full, permission denied, read-only or vanished paths: the file and the reason are enough.
        where = f" {e.filename}" if e.filename else ""
        advice = "free some space and run the same command again" if e.errno == errno.ENOSPC else \
            "check the path and its permissions"
        verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) else "cannot access"
        print(f"{prog}: error: {verb}{where}: {e.strerror or e}; {advice}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
