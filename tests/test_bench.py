"""Benchmark harness on the CPU with tiny models: FLOP formulas against torch's FLOP counter, the
train-step and precompute rows, the rows' JSON, and the `python -m bench` orchestrator. Real sizes only on the
meta device."""
import json
import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import driver, flops, train_step
from bench.matrix import MODELS
from bench.results import format_table, load_results, save_results
from bench.row import Row
from conftest import REPO, run_module
from shards.common.errors import DataError, UsageError

CPU = torch.device("cpu")


def _tiny_config(tiny_model) -> dict:
    with open(os.path.join(tiny_model, "transformer", "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _counted_flops(model, config, height, width, text_tokens, batch=1, backward=False) -> int:
    """torch's own count; the math SDPA backend, whose matmuls it sees (the CPU flash kernel it does not)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config["in_channels"], height // 8, width // 8, generator=g, requires_grad=backward)
    e = torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g, requires_grad=backward)
    p = torch.randn(batch, config["pooled_projection_dim"], generator=g)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        out = model(hidden_states=x, encoder_hidden_states=e, pooled_projections=p,
                    timestep=torch.full((batch,), 500.0), return_dict=False)[0]
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


def test_bench_tiny_config_is_the_tiny_model(tiny_model):
    cfg = _tiny_config(tiny_model)
    assert {k: cfg[k] for k in MODELS["tiny"]} == {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in MODELS["tiny"].items()}


@pytest.mark.parametrize("variant", [{}, {"dual_attention_layers": [0]}, {"qk_norm": "rms_norm"}])
def test_forward_flops_match_flop_counter(tiny_model, variant):
    from diffusers import SD3Transformer2DModel

    config = {**_tiny_config(tiny_model), **variant}
    if variant:
        model = SD3Transformer2DModel.from_config(config)
    else:
        model = SD3Transformer2DModel.from_pretrained(os.path.join(tiny_model, "transformer"))
    for height, width, text in ((256, 256, 333), (128, 256, 20)):  # square with SD3's 77+256, and not
        counted = _counted_flops(model.eval(), config, height, width, text)
        assert abs(flops.forward_flops(config, height, width, text) / counted - 1) < 0.01


def test_real_configs_match_published_sizes_and_flops():
    """On the meta device nothing is allocated, so the full-size models can be counted here."""
    from diffusers import SD3Transformer2DModel

    sizes = {"sd3-medium": 2.08e9, "sd3.5-medium": 2.47e9, "sd3.5-large": 8.14e9}  # the published parameter counts, buffers included
    for name, size in sizes.items():
        with torch.device("meta"):
            m = SD3Transformer2DModel(**MODELS[name])
        n = sum(t.numel() for t in list(m.parameters()) + list(m.buffers()))
        assert abs(n / size - 1) < 0.005, name
    assert abs(flops.forward_flops(MODELS["sd3-medium"], 1024, 1024, 154) / 8.4e12 - 1) < 0.01  # the reference count for SD3 Medium at 1024², 154 tokens
    config = MODELS["sd3.5-medium"]  # dual attention and qk_norm at full size, 1024²
    with torch.device("meta"):
        m = SD3Transformer2DModel(**config)
        counted = _counted_flops(m, config, 1024, 1024, flops.TEXT_TOKENS)
    assert abs(flops.forward_flops(config, 1024, 1024) / counted - 1) < 0.01


def test_real_encoder_configs_match_published_sizes():
    from bench.precompute import component

    sizes = {"text_encoder": 123.65e6, "text_encoder_2": 694.66e6, "text_encoder_3": 4.762e9, "vae": 83.82e6}
    for sub, size in sizes.items():
        n = sum(p.numel() for p in component(sub, "meta").parameters())
        assert abs(n / size - 1) < 0.001, sub


def test_step_flops_match_counted_forward_and_backward(tiny_model):
    """A frozen base with inputs that need gradients does what a LoRA step's base does: activation gradients only."""
    from diffusers import SD3Transformer2DModel

    config = {**_tiny_config(tiny_model), "num_layers": 4}
    model = SD3Transformer2DModel.from_config(config).requires_grad_(False)
    counted = _counted_flops(model, config, 256, 256, 20, batch=2, backward=True)
    assert abs(flops.train_step_flops(config, 256, 256, 20, batch=2) / counted - 1) < 0.01
    # Every weight trained (full fine-tuning): the weights' gradients too.
    counted = _counted_flops(model.requires_grad_(True), config, 256, 256, 20, batch=2, backward=True)
    assert abs(flops.train_step_flops(config, 256, 256, 20, batch=2, full=True) / counted - 1) < 0.01


def test_bad_size_is_one_line_error():
    with pytest.raises(UsageError, match="multiples of 16"):
        flops.forward_flops(MODELS["tiny"], 200, 256)
    with pytest.raises(UsageError, match="unknown model"):
        train_step.train_row("sd4", 256, 1, device=CPU)


def test_matmul_peak_is_a_rate():
    peak = flops.matmul_peak_flops(CPU, size=256, repeats=2)
    assert math.isfinite(peak) and peak > 1e8


def test_bench_run_is_the_trainers_step_on_lora():
    """LoRA on the trainer's default targets (B starts at 0), and the trainer's optimizer step moves it."""
    from train.config import LoraConfig
    from train.model import lora_module_names
    from train.synthetic import bench_config

    cfg = bench_config(batch=2)
    t = train_step.build_transformer("tiny", torch.float32, CPU)
    expected = len(lora_module_names(t, LoraConfig()))
    run = train_step.BenchRun(t, cfg, 128, 20, CPU)
    params = run.stepper.params
    assert len(params) == 2 * expected and all(p.dtype == torch.float32 for p in params)
    times, nonfinite = run.time_steps(warmup=0, steps=1)
    assert len(times) == 1 and nonfinite == 0
    # Every B moved except the last block's context query: that block's context outputs are dropped, so no gradient.
    unmoved = [n for n, p in t.named_parameters() if "lora_B" in n and p.abs().sum() == 0]
    assert unmoved == ["transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"]


def test_a_full_fine_tuning_row_is_the_trainers_full_step(monkeypatch):
    """--full rows: train.mode=full through the trainer's own step (every weight moves, the fused step included),
    counted with the weights' gradients; the table says which."""
    from train import step as train_step_module

    moved = []
    real = train_step_module.TrainStep.step

    def step(self, next_batch):
        before = [p.detach().clone() for p in self.params]
        out = real(self, next_batch)
        moved.append(sum(not torch.equal(a, p) for a, p in zip(before, self.params)) / len(before))
        return out

    monkeypatch.setattr(train_step_module.TrainStep, "step", step)
    r = train_step.full_row("tiny", 128, 1, fused=True, optimizer="adamw", device=CPU, steps=1, warmup=0,
                            peak_flops=1e9)
    assert r.status == "ok" and r.settings["mode"] == "full" and r.settings["fused_step"] is True
    assert moved and min(moved) > 0.9  # (the last block's context-only weights get no gradient)
    config = train_step.model_config("tiny")
    assert r.extra["step_flops"] == flops.train_step_flops(config, 128, 128, flops.TEXT_TOKENS, 1, full=True)
    assert "full fused adamw" in format_table([r])


def test_a_quantized_bench_model_is_built_without_its_full_precision_weights():
    t = train_step.build_transformer("tiny", torch.float32, CPU, quantize="nf4")
    assert not [n for n, x in list(t.named_parameters()) + list(t.named_buffers()) if x.is_meta]
    blocks = [type(m).__name__ for n, m in t.named_modules() if n.startswith("transformer_blocks.") and
              isinstance(m, torch.nn.Linear)]
    assert blocks and set(blocks) == {"Linear4bitInComputeDtype"}
    assert all(p.dtype == torch.uint8 for n, p in t.named_parameters() if n.startswith("transformer_blocks.")
               and n.endswith(".weight") and "norm" not in n)


def test_out_of_memory_becomes_an_oom_row(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_step, "_measure_train", oom)
    r = train_step.train_row("tiny", 256, 4, device=CPU, peak_flops=1e9)
    assert r.status == "OOM" and r.seconds is None and r.mfu is None
    assert "seconds" not in r.to_json() and "mfu" not in r.to_json()
    assert format_table([r]).splitlines()[2].count("OOM") == 4


def test_orchestrator_quick_writes_json_and_prints_one_table(tiny_model, tmp_path, capsys, stages_in_process):
    path = driver.main(["--quick", "--rows", "train,precompute", "--out", str(tmp_path), "--steps", "1",
                       "--warmup", "1", "--tiny-model", tiny_model])
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("results-cpu-")
    with open(path) as f:
        saved = json.load(f)
    assert [r["row"] for r in saved["rows"]] == ["train"] * 4 + ["precompute"]
    assert saved["device"] == "cpu" and saved["matmul_peak_flops"] > 0 and saved["versions"]["torch"]
    assert {(r["settings"]["base_dtype"], r["settings"]["checkpointing"]) for r in saved["rows"][:4]} == \
        {("fp32", False), ("fp32", True), ("nf4", False), ("nf4", True)}
    assert all(r["settings"]["quick"] for r in saved["rows"])
    for r in saved["rows"][:4]:
        assert r["status"] == "ok" and 0 < r["mfu"] <= 1 and r["peak_rss_mb"] > 0
        assert r["forward_flops"] == flops.forward_flops(MODELS["tiny"], 128, 128, 154) and r["step_flops"] > 0
        assert r["samples_per_s"] == pytest.approx(2 / r["seconds"]) and r["peak_flops"] > 0
    p = saved["rows"][4]  # the precompute row: T5 in nf4 as the stage loads it, per stage and per component
    assert p["status"] == "ok" and p["settings"]["base_dtype"].startswith("t5 nf4") and p["settings"]["batch"] == 2
    for key in ("seconds", "images_per_s", "peak_rss_mb", "load_seconds"):
        assert math.isfinite(p[key]) and p[key] > 0, key
    assert set(p["stages"]) == {"text", "vae"} and all(s["seconds"] > 0 for s in p["stages"].values())
    assert set(p["stages"]["text"]["component_peaks"]) == {"clip_l", "clip_g", "t5"}
    assert set(p["stages"]["vae"]["component_peaks"]) == {"vae_encoder"}
    assert set(p["weights_mb"]) == {"clip_l", "clip_g", "t5", "vae_encoder"} and min(p["weights_mb"].values()) > 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["row", "model"] and "MFU" in lines[0]
    assert sum(line.startswith("train ") for line in lines) == 4
    assert sum(line.startswith("precompute ") for line in lines) == 1
    assert "MFU = B·(2·F_dense + 3·F_attn)" in out and path in out


def test_results_file_keeps_rows_with_other_settings(tmp_path):
    path = str(tmp_path / "r.json")
    row = lambda batch, s: Row("train", "x", {"batch": batch}, seconds=s)
    save_results(path, [row(1, 1.0), row(4, 2.0)], {"command": "a"})
    save_results(path, [row(4, 3.0)], {"command": "b"})
    with open(path) as f:
        saved = json.load(f)
    assert [(r["settings"]["batch"], r["seconds"]) for r in saved["rows"]] == [(1, 1.0), (4, 3.0)]
    assert saved["commands"] == ["a", "b"]


def test_command_line(tmp_path):
    p = run_module("bench", "--help")
    assert p.returncode == 0 and "--rows" in p.stdout and "--quick" in p.stdout
    with pytest.raises(UsageError, match="--rows: gpu not known; choose from train, precompute, stream, merge, modelled"):
        driver.main(["--rows", "train,gpu", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="--batches"):
        driver.main(["--rows", "train", "--batches", "0", "--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []  # nothing ran, nothing written


def test_full_size_precompute_path_with_shrunk_configs(monkeypatch, tmp_path):
    """The GPU row's own code (random components written as a pipeline folder, loaded back by the stage's
    loaders with T5 in nf4), run here with narrow, shallow versions of the configs."""
    from bench import precompute as pb

    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=64)
    monkeypatch.setattr(pb, "CLIP_L", {**pb.CLIP_L, **small})
    monkeypatch.setattr(pb, "CLIP_G", {**pb.CLIP_G, **small})
    monkeypatch.setattr(pb, "T5_XXL", {**pb.T5_XXL, "vocab_size": 500, "d_model": 128, "d_ff": 128, "num_layers": 2,
                                       "num_heads": 2})
    monkeypatch.setattr(pb, "SD3_VAE", {**pb.SD3_VAE, "block_out_channels": (32,) * 4, "layers_per_block": 1})
    root = pb.write_pipeline("sd3", str(tmp_path / "sd3"), CPU)
    (r,) = (r.to_json() for r in pb.encode_rows("sd3", root, [1], 64, CPU, max_sequence_length=16, steps=1, warmup=0))
    assert r["status"] == "ok" and r["images_per_s"] > 0 and r["settings"]["model"] == "sd3 encoders"
    assert r["settings"]["base_dtype"].startswith("t5 nf4") and set(r["stages"]["text"]["component_peaks"]) == \
        {"clip_l", "clip_g", "t5"}


def test_merge_rows_through_the_orchestrator(tmp_path, capsys, stages_in_process):
    """`--rows merge` runs bench.merge's `--quick` rows: both layouts, each merge a process of its own, timed
    against a copy."""
    path = driver.main(["--quick", "--rows", "merge", "--out", str(tmp_path)])
    with open(path) as f:
        rows = json.load(f)["rows"]
    assert [r["what"].split(",")[1].strip() for r in rows] == ["diffusers folder -> diffusers release",
                                                               "single file -> single file"]
    for r in rows:
        assert r["status"] == "ok" and r["settings"]["lora_modules"] == 2 * 8 - 1  # the last block has no to_add_out
        assert 0 < r["peak_rss_mb"] < 4096 and r["seconds"] > 0 and r["baseline"]["seconds"] > 0
        assert r["ratio"] == pytest.approx(r["seconds"] / r["baseline"]["seconds"])
    assert sum(line.startswith("merge ") for line in capsys.readouterr().out.splitlines()) == 2


def test_a_stage_runs_as_its_own_process_and_a_failing_one_is_one_line(tmp_path, capsys):
    """The driver as `make bench` runs it: the stage's module in a process of its own (the stream rows, the
    quickest), its rows read from the file it writes, one table printed."""
    path = driver.main(["--quick", "--rows", "stream", "--out", str(tmp_path)])
    with open(path) as f:
        (row,) = json.load(f)["rows"]
    assert row["row"] == "stream" and row["status"] == "ok" and row["settings"]["quick"]
    assert row["samples_per_s"] > 0 and row["baseline"]["samples_per_s"] > 0
    out = capsys.readouterr().out
    assert sum(line.startswith("stream ") for line in out.splitlines()) == 1 and path in out
    with pytest.raises(DataError, match=r"`python -m bench.merge --nonsense` failed \(exit 2"):
        list(driver.stage_rows("bench.merge", "--nonsense"))


def test_quick_runs_are_marked_and_kept_apart(tmp_path):
    assert driver.parse_args(["--quick"]).out == os.path.join("build", "bench")
    assert driver.parse_args([]).out == "bench"
    with pytest.raises(UsageError, match="--models, --batches choose GPU train rows; --quick runs a fixed tiny matrix"):
        driver.parse_args(["--quick", "--models", "sd9", "--batches", "0"])
    with pytest.raises(UsageError, match="--rows: no row named"):
        driver.main(["--rows", ",", "--out", str(tmp_path)])
    if not torch.cuda.is_available():  # nothing this machine can run is an error, not an empty success
        with pytest.raises(UsageError, match="no rows ran on this machine"):
            driver.main(["--rows", "train", "--out", str(tmp_path)])
    r = Row("train", "x", {"model": "tiny", "quick": True})
    assert "quick: tiny" in format_table([r])


def test_precompute_row_with_idle_encoders_on_the_host(tiny_model):
    """`--offload idle`: a group of batches VAE-encoded then text-encoded (one round of switches) and a round of
    switches alone; the row's time per batch carries a batch's share of a round at precompute's offload_group."""
    from bench import precompute as pb
    from precompute.config import PrecomputeConfig

    (r,) = (r.to_json() for r in pb.encode_rows("tiny", tiny_model, [2], 64, CPU, max_sequence_length=16, steps=1,
                                                warmup=0, offload="idle"))
    assert r["status"] == "ok" and r["settings"]["offload"] == "idle" and set(r["stages"]) == {"group", "switches"}
    g, round_s = r["stages"]["group"]["seconds"], r["switch_round_seconds"]
    assert 0 < round_s < g and r["offload_group"] == PrecomputeConfig.offload_group
    assert r["seconds"] == pytest.approx((g - round_s) / pb.GROUP_BATCHES + round_s * 2 / r["offload_group"])
    assert set(r["stages"]["group"]["component_peaks"]) == {"clip_l", "clip_g", "t5", "vae_encoder"}


def test_a_row_round_trips_through_json_and_keeps_what_it_does_not_know():
    r = Row("merge", "merge, x", {"model": "m", "layout": "single file"}, seconds=2.0, peak_rss_mb=300.0,
            baseline={"what": "copy", "seconds": 1.0}, ratio=2.0, label="m: single file",
            extra={"seconds_all": [2.0, 2.5], "nested": {"a": [1, 2]}})
    text = json.dumps(r.to_json())
    back = Row.from_json(json.loads(text))
    assert back == r and json.dumps(back.to_json()) == text
    assert Row.of("train", "x", {}, seconds=1.0, step_seconds=[1.0]) == Row("train", "x", {}, seconds=1.0,
                                                                            extra={"step_seconds": [1.0]})
    assert "seconds" not in Row("train", "x", {}, status="OOM").to_json()  # a value left out is not written as null


def test_a_row_that_breaks_the_contract_is_refused():
    for bad in ({"row": "train", "what": "x"}, {"row": "gpu", "what": "x", "settings": {}},
                {"row": "train", "what": "x", "settings": {}, "seconds": "fast"},
                {"row": "train", "what": "x", "settings": {}, "status": "modelled"},  # a measurement marked modelled
                {"row": "modelled", "what": "x", "settings": {}}):  # a model without its MODELLED status
        with pytest.raises(DataError):
            Row.from_json(bad, "test")


def test_every_results_file_in_the_repository_loads_and_writes_back_unchanged():
    """The results files in bench/ were written as plain dicts before the Row type; each row loads as a Row and
    writes back as the same JSON, so old and new rows share a results file."""
    import glob

    paths = sorted(glob.glob(os.path.join(REPO, "bench", "results-*.json")))
    assert len(paths) >= 2
    for path in paths:
        header, rows = load_results(path)
        with open(path) as f:
            raw = json.load(f)["rows"]
        assert rows and [r.to_json() for r in rows] == raw, path
        assert header["device"] and "rows" not in header
    _, rows = load_results(os.path.join(REPO, "bench", "results-cpu-2026-12-01.json"))
    assert {r.row for r in rows} == {"modelled"} and "MODELLED" in format_table(rows)
    _, rows = load_results(os.path.join(REPO, "bench", "results-cpu-2026-11-30.json"))
    assert [r.row for r in rows] == ["stream", "merge", "merge"] and all(r.ratio > 1 for r in rows)


def test_rows_of_an_earlier_file_are_kept_beside_new_ones(tmp_path):
    """A results file written before the Row type, with a row the new run does not replace: both are in it after."""
    import shutil

    path = str(tmp_path / "results.json")
    shutil.copy(os.path.join(REPO, "bench", "results-cpu-2026-11-30.json"), path)
    new = Row("stream", "another stream row", {"resolution": 512}, seconds=1.0)
    save_results(path, [new], {"command": "python -m bench --rows stream"})
    header, rows = load_results(path)
    assert len(rows) == 4 and rows[-1] == new and header["commands"][-1] == "python -m bench --rows stream"
