"""`make gpu-check`: its plan (the dry run, which CI runs), its refusal without a GPU, and how it puts each
measured row beside its modelled one."""
import shlex

import pytest

from bench import driver, gpu_check
from shards.common.config import run_cli


def test_the_dry_run_prints_the_whole_plan_and_does_nothing(tmp_path, capsys):
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "check")])
    out = capsys.readouterr().out
    for part in ("tiny precompute on the GPU", "tiny train resumed to 20 steps, nf4 base", "tiny merge",
                 "sampled by diffusers on the GPU", "SD3 Medium 1024²", "SD3.5 Large nf4", "precompute at real",
                 "deterministic run, resumed at step 10"):
        assert part in out, part
    assert "budget 480 s" in out
    assert not (tmp_path / "check").exists()


def test_every_benchmark_command_of_the_plan_parses():
    from bench import precompute as precompute_bench

    parsed = 0
    for step in gpu_check.plan("/tmp/x"):
        if "-m bench " in step["cmd"]:
            a = driver.parse_args(shlex.split(step["cmd"].split("-m bench ", 1)[1]))
            driver._matrix(a)  # the rows it asks for exist
            parsed += 1
        elif "-m bench.precompute " in step["cmd"]:
            a = precompute_bench.parse_args(shlex.split(step["cmd"].split("-m bench.precompute ", 1)[1]))
            assert a.offload == "idle" and a.json.endswith(".json") and "results-" in a.json  # read back as rows
            parsed += 1
    assert parsed == 4


def test_without_a_gpu_it_refuses_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("bench.gpu_check", gpu_check.main, [])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err and "--dry-run" in err


def test_each_measured_row_gets_the_modelled_row_of_its_settings():
    from bench.row import Row

    def row(kind, base, ckpt, **extra):
        s = dict(model="sd3-medium", resolution=1024, batch=1, base_dtype=base, checkpointing=ckpt)
        return Row(kind, "x", {**s, **extra}, status="modelled" if kind == "modelled" else "ok")

    measured = [row("train", "bf16", True, device="h100"), row("train", "nf4", True, device="h100")]
    known = [row("modelled", "bf16", True), row("modelled", "bf16", False), row("modelled", "nf4", True, nf4_output="x")]
    assert gpu_check.modelled_beside(measured, known) == [known[0], known[2]]


def test_the_deterministic_part_compares_bit_for_bit(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(3)}, str(tmp_path / "y.safetensors"))
    save_file({"a": torch.ones(3) + 1e-7}, str(tmp_path / "z.safetensors"))
    gpu_check.same_tensors(str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))
    with pytest.raises(SystemExit, match="differ in 1 tensors"):
        gpu_check.same_tensors(str(tmp_path / "x.safetensors"), str(tmp_path / "z.safetensors"))
