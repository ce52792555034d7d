"""Every shipped YAML loads into its stage's schema (unknown keys and wrong types would fail here)."""
import glob
import math
import os

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))


def _schema(stage):
    if stage == "precompute":
        from precompute.config import PrecomputeConfig
        return PrecomputeConfig
    if stage == "train":
        from train.config import TrainConfig
        return TrainConfig
    from merge.config import MergeConfig
    return MergeConfig


def test_every_stage_has_a_tiny_and_a_real_preset():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS}
    for preset in ("tiny", "sd3-medium"):
        for stage in ("precompute", "train", "merge"):
            assert f"{preset}/{stage}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_shipped_config_loads(path, tiny_model, tmp_path):
    from omegaconf import OmegaConf

    from shards.common.config import load_config
    from shards.common.hub import looks_like_hub_id

    stage = os.path.splitext(os.path.basename(path))[0].split("-")[0]  # train-full.yaml: a train preset
    # Paths in the presets point at outputs that need not exist yet; every other value must load as is.
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    overrides = {"precompute": [f"data.path={tmp_path}"], "train": [f"data.shards={tmp_path}"],
                 "merge": [f"lora.path={lora}"]}[stage]
    if not looks_like_hub_id(OmegaConf.load(path).model.path):
        overrides.append(f"model.path={tiny_model}")
    cfg = load_config(_schema(stage), ["--config", path, *overrides])
    assert cfg.out.dir


def _err(capsys, *argv):
    from precompute.__main__ import main
    from precompute.config import PrecomputeConfig
    from shards.common.config import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli("precompute", main, list(argv), schema=PrecomputeConfig)
    return e.value.code, capsys.readouterr().err


def test_messages_say_where_the_mistake_is(capsys, tmp_path):
    cfg = os.path.join(REPO, "configs", "tiny", "precompute.yaml")
    code, err = _err(capsys, "--config", cfg, "data.pth=x")
    assert code == 2 and "unknown config key 'data.pth'" in err and "(on the command line)" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  pth: x\n")
    code, err = _err(capsys, "--config", str(bad))
    assert code == 2 and f"(in {bad})" in err
    code, err = _err(capsys, "--config", cfg, "validation.prompts=hello")
    assert "takes a list: write validation.prompts=[a,b]" in err
    code, err = _err(capsys, "--config", cfg, "text=5")
    assert "config key 'text' is a section" in err


def test_help_lists_every_key(capsys):
    from precompute.__main__ import main
    from precompute.config import PrecomputeConfig
    from shards.common.config import run_cli

    run_cli("precompute", main, ["--help"], schema=PrecomputeConfig)
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m precompute")
    for key in ('text.t5_precision = "nf4"', "text.max_sequence_length = 77", "data.instance_prompt = null",
                "buckets.resolution = 1024"):
        assert key in out


def test_unknown_or_absent_device_is_a_usage_error():
    import torch

    from shards.common.config import resolve_device
    from shards.common.errors import UsageError

    assert resolve_device("device", "cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="is not a device"):
        resolve_device("device", "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("train.device", "cuda")


@pytest.mark.parametrize("stage", ["precompute", "train", "merge"])
def test_every_numeric_key_has_a_range_and_values_outside_it_are_refused(stage, tiny_model, tmp_path):
    import importlib

    from shards.common.config import load_config, numeric_keys
    from shards.common.errors import UsageError

    schema = _schema(stage)
    ranges = importlib.import_module(f"{stage}.config").RANGES
    assert sorted(ranges) == sorted(numeric_keys(schema))  # a new numeric key needs its range here
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    base = {"precompute": [f"data.path={tmp_path}", "out.dir=o"], "train": [f"data.shards={tmp_path}", "out.dir=o"],
            "merge": [f"lora.path={lora}", "out.dir=o"]}[stage] + [f"model.path={tiny_model}"]
    load_config(schema, base)  # the defaults are inside their ranges
    for key, text in ranges.items():
        lo, hi = (float(x) for x in text[1:-1].split(","))
        outside = ([lo - 1] if lo > -math.inf else []) + ([hi + 1] if hi < math.inf else [])
        outside += [lo] if text[0] == "(" and lo > -math.inf else []  # an open bound is itself outside
        outside += [math.nan, math.inf]
        for v in outside:
            value = int(v) if math.isfinite(v) and v.is_integer() else str(v)
            override = f"{key}=[{value}]" if key == "lora.blocks" else f"{key}={value}"
            if key == "lora.blocks" and not math.isfinite(v):
                continue  # a list of ints cannot hold one
            try:
                load_config(schema, base + [override])
            except UsageError as e:
                assert f"config key '{key}'" in str(e), (override, str(e))
            else:
                raise AssertionError(f"{override} was accepted")


def test_data_shuffle_buffer_of_zero_is_refused(tiny_model, tmp_path):
    from shards.common.config import load_config
    from shards.common.errors import UsageError
    from train.config import TrainConfig

    with pytest.raises(UsageError, match=r"config key 'data.shuffle_buffer' must be at least 1, not 0"):
        load_config(TrainConfig, [f"model.path={tiny_model}", f"data.shards={tmp_path}", "out.dir=o",
                                  "data.shuffle_buffer=0"])


@pytest.mark.parametrize("text", ["- train.max_steps: 3\n", "- - a\n  - b\n"])
def test_a_yaml_file_that_is_not_sections_of_keys_is_one_line(text, tmp_path):
    from shards.common.config import load_config
    from shards.common.errors import UsageError
    from train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=rf"config file {path} must hold sections of keys"):
        load_config(TrainConfig, ["--config", str(path)])


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch, capsys):
    import errno

    from shards.common import atomic
    from shards.common.config import run_cli

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    target = tmp_path / "state.json"
    with pytest.raises(SystemExit) as e:
        run_cli("train", lambda argv: atomic.write_json(str(target), {"a": 1}), [])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err == (f"train: error: cannot write {target}: No space left on device; "
                                         "free some space and run the same command again")
    assert os.listdir(tmp_path) == []  # no temp file left behind


def _tool_schemas():
    from merge.convert import ConvertCommand
    from shards.__main__ import ShardsCommand

    return [ShardsCommand, ConvertCommand]


@pytest.mark.parametrize("name", ["precompute", "train", "merge", "shards", "convert"])
def test_help_says_what_every_key_means_and_may_be(name):
    import importlib
    import re

    from omegaconf import OmegaConf

    from shards.common.config import describe_keys, flat_keys

    schema = _schema(name) if name in ("precompute", "train", "merge") else \
        {"shards": _tool_schemas()[0], "convert": _tool_schemas()[1]}[name]
    tables = vars(importlib.import_module(schema.__module__))
    keys = flat_keys(OmegaConf.to_container(OmegaConf.structured(schema)))
    assert sorted(tables["HELP"]) == sorted(keys)  # a new key needs its meaning here
    assert set(tables.get("CHOICES", {})) <= set(keys) and set(tables["REQUIRED"]) <= set(keys)
    text = describe_keys(schema)
    for key in keys:
        block = re.split(r"\n  (?=\S)|\n\n", text.split(f"  {key} = ", 1)[1], maxsplit=1)[0]  # its line and help
        assert tables["HELP"][key] in block, key
        if key in tables.get("CHOICES", {}):
            assert " | ".join(map(str, tables["CHOICES"][key])) in block, key
        assert block.startswith("(required)") == (key in tables["REQUIRED"]), key


@pytest.mark.parametrize("stage", ["precompute", "train", "merge"])
def test_every_value_outside_a_keys_choices_is_refused(stage, tiny_model, tmp_path):
    import importlib

    from shards.common.config import load_config
    from shards.common.errors import UsageError

    choices = importlib.import_module(f"{stage}.config").CHOICES
    for key in choices:
        value = "[nosuch]" if key == "out.include" else "nosuch"
        with pytest.raises(UsageError, match=f"config key '{key}': 'nosuch' is not one of"):
            load_config(_schema(stage), [f"{key}={value}", f"model.path={tiny_model}", "out.dir=o"])


def _readme_tables(stage: str) -> dict:
    """{key: default as written} from the key tables of a stage's README section."""
    import re

    text = open(os.path.join(REPO, "README.md")).read()
    heading = {"precompute": "### 1. precompute", "train": "### 2. train", "merge": "### 3. merge"}[stage]
    section = text.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) if "`" in cells[1] else [cells[1]]
        for i, key in enumerate(keys):
            rows[key] = defaults[i] if len(defaults) == len(keys) else defaults[0]
    return rows


@pytest.mark.parametrize("stage", ["precompute", "train", "merge"])
def test_readme_tables_name_the_schemas_keys_with_its_defaults(stage):
    import importlib

    from omegaconf import OmegaConf

    from shards.common.config import flat_keys

    schema = flat_keys(OmegaConf.to_container(OmegaConf.structured(_schema(stage))))
    required = importlib.import_module(f"{stage}.config").REQUIRED
    readme = _readme_tables(stage)
    assert sorted(readme) == sorted(schema)
    for key, written in readme.items():
        if written == "(required)":
            assert key in required, key
            continue
        literal = written or '""'
        value = OmegaConf.to_container(OmegaConf.create(f"v: {literal}"))["v"]  # as YAML reads it
        assert key not in required and value == schema[key], (key, written, schema[key])


def test_bitsandbytes_int8_cast_notice_is_silenced_once(caplog):
    import logging

    from shards.common.config import quiet_libraries

    quiet_libraries()
    quiet_libraries()
    log = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING):
        log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
