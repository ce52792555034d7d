"""The `shardtune` command and the one grammar all commands share (`--config`, `key=value`, `--help`; the tool
commands' positional arguments and `--options` are the same keys)."""
import os
import subprocess
import sys

import pytest

from shards.common.config import command_argv
from shards.common.errors import UsageError


def test_tool_arguments_are_keys_written_the_usual_way():
    to_keys = lambda argv: command_argv(argv, ("command", "path"), ("quick", "overwrite"), rest="parts")
    assert to_keys(["verify", "/s", "--quick"]) == ["quick=true", "command=verify", "path=/s"]
    assert to_keys(["combine", "/out", "/p0", "/p1", "--overwrite"]) == \
        ["overwrite=true", "command=combine", "path=/out", "parts=[/p0,/p1]"]
    assert to_keys(["command=inspect", "path=/s"]) == ["command=inspect", "path=/s"]
    assert to_keys(["--config", "c.yaml", "verify", "/s"]) == ["--config", "c.yaml", "command=verify", "path=/s"]
    convert = lambda argv: command_argv(argv, ("src", "dst"), ("overwrite",))
    assert convert(["a", "b", "--to", "kohya"]) == convert(["a", "b", "--to=kohya"]) == ["to=kohya", "src=a", "dst=b"]
    with pytest.raises(UsageError, match="unexpected argument 'c': this command takes SRC and DST"):
        convert(["a", "b", "c"])
    with pytest.raises(UsageError, match="option '--to' needs a value"):
        convert(["a", "b", "--to"])


def test_every_command_runs_through_shardtune(shard_set_fp32, tmp_path, capsys):
    from shards.common.cli import COMMANDS, main

    assert set(COMMANDS) == {"precompute", "train", "merge", "shards", "convert"}
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "shardtune COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["shardtune: error: unknown command 'trian'; choose precompute, train, "
                                         "merge, shards, convert"]
    for command, key in (("precompute", "out.samples_per_shard"), ("train", "train.max_steps"),
                         ("merge", "out.max_shard_bytes"), ("shards", "quick"), ("convert", "overwrite")):
        main([command, "--help"])
        assert f"  {key} = " in capsys.readouterr().out, command  # the command's own keys, from its schema
    main(["shards", "command=verify", f"path={shard_set_fp32}", "quick=true"])  # the same grammar as the stages
    assert capsys.readouterr().out.strip() == f"{shard_set_fp32}: OK"
    with pytest.raises(SystemExit) as e:
        main(["shards", "verify"])
    assert e.value.code == 2 and "config key 'path'" in capsys.readouterr().err


def test_the_installed_console_script(shard_set_fp32):
    script = os.path.join(os.path.dirname(sys.executable), "shardtune")
    assert os.path.isfile(script), "the package is installed without its console script (pip install -e .)"
    r = subprocess.run([script, "shards", "inspect", shard_set_fp32], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "8 written" in r.stdout, r.stderr[-2000:]
