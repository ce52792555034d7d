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


def test_a_part_that_runs_out_of_time_takes_its_child_processes_with_it(tmp_path):
    """`python -m bench` runs each stage's benchmark as a child process: at a part's timeout that child must stop
    too, not go on using the GPU beside the next part."""
    import os
    import time

    pid_file = tmp_path / "child.pid"
    status, tail = gpu_check.run_part(f"echo started; sleep 60 & echo $! > {pid_file}; wait", 2)
    assert status == "timed out" and "started" in tail
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # killed, waiting to be reaped
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the part's child process outlived its timeout")
