"""The merge stage's release features: several LoRAs, a single-file base, bundled text encoders loaded by
StableDiffusion3Pipeline.from_single_file, merge.verify, the model card, and memory that does not grow with
the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cli, tiny_model_copy
from merge.kohya import to_kohya
from merge.lora import read_lora, read_loras
from merge.run import TEXT_ENCODERS
from merge.single_file import copy_jobs, transformer_jobs, vae_jobs, write_single_file
from merge.sources import TRANSFORMERS_WEIGHTS, OriginalSource, folder_source
from merge.verify import forward_probe, verify_tensors
from shards.common.errors import DataError
from test_merge import _run, make_lora, merge, merged_weights

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, "rel", qk_norm="rms_norm", dual_attention_layers=(0,))


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    """Two different LoRAs: the first on the attention, the second (rank 2, alpha 3) on attention outputs and
    feed-forward layers, also as a kohya file."""
    first = make_lora(base, tmp_path_factory.mktemp("lora1"), seed=1)
    second = make_lora(base, tmp_path_factory.mktemp("lora2"), seed=2, r=2, lora_alpha=3,
                       target_modules=["to_out.0", "ff.net.2", "ff_context.net.2", "attn2.to_q"])
    kohya = os.path.join(second, "kohya.safetensors")
    save_file(to_kohya(read_lora(os.path.join(second, "pytorch_lora_weights.safetensors"))), kohya)
    return first, second, kohya


def base_single_file(base, path, include=("vae", "text_encoders")):
    """The base model as an original single-file checkpoint (what Stability publishes), written by our writer."""
    with folder_source(os.path.join(base, "transformer"), "t") as t, folder_source(os.path.join(base, "vae"), "v") as v:
        jobs = transformer_jobs(t, {}, "auto") + (vae_jobs(v) if "vae" in include else [])
        sources = [folder_source(os.path.join(base, c), c, TRANSFORMERS_WEIGHTS, p) for c, p in TEXT_ENCODERS.items()]
        try:
            for s in sources if "text_encoders" in include else []:
                jobs += copy_jobs(s)
            write_single_file(jobs, str(path), progress=False)
        finally:
            for s in sources:
                s.close()
    return str(path)


# Several LoRAs with their own scales = merging them one after the other (in fp32, bit for bit), in either format.
def test_several_loras_equal_merging_in_sequence(base, loras, tmp_path):
    first, second, kohya = loras
    both = merge(base, f"[{first},{second}]", tmp_path / "both", "lora.scale=[0.5,2]", "out.dtype=fp32")
    step1 = merge(base, first, tmp_path / "step1", "lora.scale=0.5", "out.dtype=fp32")
    step2 = merge(step1, second, tmp_path / "step2", "lora.scale=2", "out.dtype=fp32")
    got, expected = merged_weights(both), merged_weights(step2)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    only_first = merged_weights(step1)
    assert sum(not torch.equal(got[k], only_first[k]) for k in got) >= 6  # the second LoRA did something
    mixed = merge(base, f"[{first},{kohya}]", tmp_path / "mixed", "lora.scale=[0.5,2]", "out.dtype=fp32")
    for k, v in merged_weights(mixed).items():
        torch.testing.assert_close(v, got[k], rtol=0, atol=1e-6)
    ups = read_loras([os.path.join(first, "pytorch_lora_weights.safetensors"), kohya], [1.0, 1.0])
    assert len(ups["transformer_blocks.0.attn.to_out.0"]) == 2  # both LoRAs change it, in order


@pytest.mark.parametrize("args, words", [
    (["lora.scale=[1,2,3]"], ["lora.scale", "3 values for 2 lora.path entries"]),
    (["lora.scale=[1,nan]"], ["lora.scale", "not a finite number"]),
])
def test_lora_lists_are_checked(base, loras, tmp_path, capsys, args, words):
    argv = [f"model.path={base}", f"lora.path=[{loras[0]},{loras[1]}]", f"out.dir={tmp_path / 'o'}", *args]
    code, line = _run(argv, capsys)
    assert code == 2 and all(w in line for w in words), line


# A single-file base gives a single file with the same bytes as merging the diffusers base into a single file
# that bundles the same components; everything else the base file holds is carried over.
def test_single_file_base(base, loras, tmp_path):
    base_file = base_single_file(base, tmp_path / "sd3_base.safetensors")
    from_file = merge(base_file, loras[0], tmp_path / "from_file")  # out.format=auto: single_file
    from_folder = merge(base, loras[0], tmp_path / "from_folder", "out.format=single_file",
                        "out.include=[vae,text_encoders]")
    a, b = Path(from_file, "model.safetensors"), Path(from_folder, "model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    keys = load_file(str(a)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "text_encoders"}
    # ... and its own diffusers-named view reads back the merged weights of the diffusers release.
    folder = merged_weights(merge(base, loras[0], tmp_path / "diffusers"))
    with OriginalSource(str(a)) as src:
        assert set(src.names) == set(folder)
        assert all(torch.equal(src.get(n), folder[n]) for n in src.names)


@pytest.mark.parametrize("args, words", [
    (["out.format=diffusers"], ["out.format", "single-file base gives a single-file release"]),
    (["out.include=[vae]"], ["out.include", "keeps everything it bundles"]),
])
def test_single_file_base_options_are_checked(base, loras, tmp_path, capsys, args, words):
    argv = [f"model.path={tmp_path / 'x.safetensors'}", f"lora.path={loras[0]}", f"out.dir={tmp_path / 'o'}", *args]
    code, line = _run(argv, capsys)
    assert code == 2 and all(w in line for w in words), line


def test_single_file_base_errors(base, loras, tmp_path, capsys):
    argv = [f"model.path={tmp_path / 'missing.safetensors'}", f"lora.path={loras[0]}", f"out.dir={tmp_path / 'o'}"]
    code, line = _run(argv, capsys)
    assert code == 2 and "does not exist" in line, line
    vae_only = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(vae_only))
    code, line = _run([f"model.path={vae_only}", *argv[1:]], capsys)
    assert code == 1 and "holds no SD3 transformer" in line, line
    assert not (tmp_path / "o").exists()


# The whole release, transformer + VAE + three text encoders in one file, loads with
# StableDiffusion3Pipeline.from_single_file to exactly the merged transformer and the base's other weights.
def test_pipeline_from_single_file_loads_the_whole_release(base, loras, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = merge(base, loras[0], tmp_path / "single", "out.format=single_file", "out.include=[vae,text_encoders]")
    pipe = StableDiffusion3Pipeline.from_single_file(os.path.join(out, "model.safetensors"), config=base,
                                                     local_files_only=True, torch_dtype=torch.float32)
    expected = merged_weights(merge(base, loras[0], tmp_path / "diffusers"))
    got = pipe.transformer.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    for component, folder, weights in [("vae", "vae", WEIGHTS), ("text_encoder", "text_encoder", TRANSFORMERS_WEIGHTS),
                                       ("text_encoder_2", "text_encoder_2", TRANSFORMERS_WEIGHTS),
                                       ("text_encoder_3", "text_encoder_3", TRANSFORMERS_WEIGHTS)]:
        stored = load_file(os.path.join(base, folder, weights))
        loaded = getattr(pipe, component).state_dict()
        for k, v in stored.items():
            if component == "text_encoder" and k == "text_projection.weight":
                # The original layout has no CLIP-L projection: SD3 uses CLIP-L's pooled output as it is, and
                # from_single_file sets an identity there.
                assert torch.equal(loaded[k], torch.eye(v.shape[0]))
                continue
            assert torch.equal(loaded[k], v), (component, k)


# merge.verify: reads the release back, checks each tensor and runs the forward probe; it catches a wrong release.
def test_verify_on_the_command_line(base, loras, tmp_path):
    p = cli("merge", f"model.path={base}", f"lora.path=[{loras[0]},{loras[2]}]", "lora.scale=[1,0.5]",
            f"out.dir={tmp_path / 'o'}", "merge.verify=true")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert f"({os.path.basename(loras[0])} x 1, kohya.safetensors x 0.5)" in lines[0]
    assert lines[1].startswith("verify: ") and "LoRA targets match base + scale * B @ A" in lines[1]
    assert lines[2].startswith("verify: forward probe") and "relative error" in lines[2]


def test_verify_numbers(base, loras, tmp_path):
    from merge.config import MergeConfig
    from merge.run import run_merge
    from shards.common.config import load_config

    argv = [f"model.path={base}", f"lora.path=[{loras[0]},{loras[2]}]", "lora.scale=[1,0.5]", "merge.verify=true"]
    r = run_merge(load_config(MergeConfig, argv + [f"out.dir={tmp_path / 'a'}"]), progress=False).verify
    assert r.tensors > 50 and r.targets >= 20
    assert r.worst_relative_error < 1e-5 and r.probe_relative_error < 1e-5
    r = run_merge(load_config(MergeConfig, argv + [f"out.dir={tmp_path / 'b'}", "out.format=single_file",
                                                   "out.dtype=bf16"]), progress=False).verify
    assert r.probe_relative_error < 5e-2 and r.worst_relative_error > 1e-4  # bf16 rounding, reported as such
    r = run_merge(load_config(MergeConfig, argv + [f"out.dir={tmp_path / 'c'}", "merge.probe_max_params=1000"]),
                  progress=False).verify
    assert r.probe_relative_error is None and "merge.probe_max_params" in r.probe_skipped


def test_verify_catches_a_wrong_release(base, loras, tmp_path):
    lora_file = os.path.join(loras[0], "pytorch_lora_weights.safetensors")
    updates = read_loras([lora_file], [1.0])
    out = merge(base, loras[0], tmp_path / "o", "out.dtype=fp32")
    with folder_source(os.path.join(base, "transformer"), "base") as b, \
            folder_source(os.path.join(out, "transformer"), "release") as o:
        verify_tensors(b, o, updates, "fp32", progress=False)  # the real release passes
        with pytest.raises(DataError, match="beyond torch.float32 rounding"):
            verify_tensors(b, o, read_loras([lora_file], [1.01]), "fp32", progress=False)
        with pytest.raises(DataError, match="no LoRA target but differs"):
            fewer = dict(updates)
            fewer.pop("transformer_blocks.1.attn.to_q")
            verify_tensors(b, o, fewer, "fp32", progress=False)
        err, _ = forward_probe(os.path.join(base, "transformer"), o, read_loras([lora_file], [0.5]))
        assert err > 1e-3  # the probe sees a LoRA applied at the wrong strength


# The model card: base, each LoRA's training settings and trigger words from its file, and the training run's
# samples; reruns give the same bytes.
def test_model_card_from_a_training_run(tiny_model, sample_data, model_without_text_encoders, tmp_path, capsys):
    from conftest import precompute_cfg
    from precompute.run import run as precompute
    from shards.common.config import load_config
    from train.config import TrainConfig
    from train.loop import train

    shards = str(tmp_path / "shards")
    precompute(precompute_cfg(tiny_model, sample_data, shards, **{"data.caption_prefix": "sks toy,"}))
    run_dir = str(tmp_path / "run")
    train(load_config(TrainConfig, [f"model.path={model_without_text_encoders}", f"data.shards={shards}",
                                    f"out.dir={run_dir}", "train.max_steps=2", "lora.rank=4", "lora.alpha=8",
                                    "validation.steps=1", "train.lr=1e-3"]))
    capsys.readouterr()
    out = merge(tiny_model, run_dir, tmp_path / "release", "lora.scale=0.8")
    # Trained on the same transformer (the copy without text encoders): a base fingerprint, and no warning.
    with safe_open(os.path.join(run_dir, "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["shardtune"])["base_fingerprint"]["dtype"] in ("fp32", "bf16", "fp16")
    assert "warning" not in capsys.readouterr().err
    card = Path(out, "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert 'instance_prompt: "sks toy,"' in card and "`sks toy,`" in card
    for words in ("scale 0.8", "| rank | 4 |", "| alpha | 8", "| steps | 2 |", "| learning rate | 0.001 |",
                  "a photo of a cat"):
        assert words in card, words
    assert "![samples](samples/lora1-step-000002.png)" in card
    assert Path(out, "samples", "lora1-step-000002.png").read_bytes() == Path(run_dir, "samples", "step-000002.png").read_bytes()
    again = merge(tiny_model, run_dir, tmp_path / "again", "lora.scale=0.8")
    assert Path(again, "README.md").read_text() == card
    # A single-file release keeps its card beside the file, and out.overwrite=true still recognises it.
    single = merge(tiny_model, run_dir, tmp_path / "single", "out.format=single_file")
    assert sorted(os.listdir(single)) == ["README.md", "model.safetensors", "samples", "shardtune-merge.json"]
    merge(tiny_model, run_dir, single, "out.format=single_file", "out.overwrite=true")


def _peak_rss_mb(model_file, lora, out):
    """Peak RSS of a merge run as its own process, in MB: VmHWM, which (unlike ru_maxrss) starts afresh at exec."""
    code = ("import sys; from merge.run import main; main(sys.argv[1:]); "
            "print('RSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    p = subprocess.run([sys.executable, "-c", code, f"model.path={model_file}", f"lora.path={lora}",
                        f"out.dir={out}", "merge.verify=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split("RSS")[-1]) / 1024


def _random_checkpoint(path, layers, lora_dir):
    """An original-layout checkpoint of a random SD3 transformer (hidden 512) and a LoRA for it."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from merge.sd3_keys import to_original

    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                              attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                              caption_projection_dim=512, pooled_projection_dim=256, pos_embed_max_size=32)
    sd = {k: v.half() for k, v in t.state_dict().items()}
    save_file(to_original(sd), str(path))
    t.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights="gaussian"))
    os.makedirs(lora_dir, exist_ok=True)
    lora = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(t).items()}
    save_file(lora, os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    return os.path.getsize(path) / 2**20


# Streaming: peak RSS does not grow with the model (one tensor at a time, no memory map kept).
def test_peak_rss_stays_flat_as_the_model_grows(tmp_path):
    small_mb = _random_checkpoint(tmp_path / "small.safetensors", 2, tmp_path / "lora_small")
    big_mb = _random_checkpoint(tmp_path / "big.safetensors", 16, tmp_path / "lora_big")
    assert big_mb - small_mb > 250
    small = _peak_rss_mb(tmp_path / "small.safetensors", tmp_path / "lora_small", tmp_path / "out_small")
    big = _peak_rss_mb(tmp_path / "big.safetensors", tmp_path / "lora_big", tmp_path / "out_big")
    print(f"checkpoints {small_mb:.0f} MB and {big_mb:.0f} MB: peak RSS {small:.0f} MB and {big:.0f} MB")
    assert big - small < 0.1 * (big_mb - small_mb), (small, big)
