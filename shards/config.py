"""Config loading shared by the three stages: dataclass schema + YAML + key=value overrides.

Every stage's `python -m STAGE --config FILE key=value ...` goes through `load_config`, so a
wrong key, a wrong type or a missing file is always reported the same way: one line, exit 2.
"""
import dataclasses
import errno
import os
import sys
from typing import Callable, List, Sequence, Type, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import DataError, UsageError

T = TypeVar("T")


def parse_argv(argv: Sequence[str]):
    """Split `--config FILE` and `key=value` tokens."""
    config_path, overrides = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
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
            raise UsageError(f"unexpected argument '{a}': use --config FILE and key=value overrides")
        i += 1
    return config_path, overrides


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        return f"unknown config key '{key}'"
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return f"config key '{key}': {msg}"
    return f"config key '{key}': {str(e).splitlines()[0]}"


def load_config(schema: Type[T], argv: Sequence[str]) -> T:
    """Build a `schema` instance from argv; `__post_init__` validation errors become UsageError."""
    config_path, overrides = parse_argv(argv)
    layers = [OmegaConf.structured(schema)]
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise UsageError(f"config file not found: {config_path}")
        try:
            layers.append(OmegaConf.load(config_path))
        except Exception as e:  # YAML syntax errors carry line numbers in the first line
            raise UsageError(f"cannot read config file {config_path}: {str(e).splitlines()[0]}") from None
    for o in overrides:
        if not o.split("=", 1)[0]:
            raise UsageError(f"override '{o}' has no key")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = f" (in {config_path})" if config_path else ""
        raise UsageError(_describe(e) + where) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def to_dict(cfg) -> dict:
    """Plain dict of a config dataclass, for manifests and metadata."""
    return dataclasses.asdict(cfg)


def check(problems: List[str]) -> None:
    """Raise all collected config problems as one ValueError (style rule 1)."""
    if problems:
        raise ValueError("; ".join(problems))


def one_of(problems: List[str], key: str, value, allowed) -> None:
    if value not in allowed:
        problems.append(f"config key '{key}': '{value}' is not one of {', '.join(map(str, allowed))}")


def quiet_libraries() -> None:
    """Keep the terminal for shardtune's own progress bars and messages."""
    import logging

    # bitsandbytes notes at import, on CPUs with AVX512-BF16, that an optional kernel package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()  # "Loading weights" bars for components of a few MB to GB
        tlog.set_verbosity_error()
    except ImportError:
        pass


def run_cli(prog: str, main: Callable[[List[str]], None], argv=None) -> None:
    """Run a stage's main, turning user errors into one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: no space left on the device writing {e.filename or 'output'}: "
              "free some space and run the same command again", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
