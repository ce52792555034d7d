"""out.format=single_file: the merged transformer as one safetensors file in the original SD3 checkpoint layout,
checked against diffusers' own converter and loader (SD3 Medium layout and SD3.5 Medium's qk-norm + attn2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge.sd3_keys import PREFIX, VAE_PREFIX, groups_from_original, original_name, plan, split, to_original, vae_to_original
from merge.single_file import SINGLE_FILE_METADATA
from shards.common.errors import DataError
from conftest import tiny_model_copy
from test_merge import _run, make_lora, merge, merged_weights

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
# SD3 Medium; SD3.5 Medium (qk-norm, dual attention in the first blocks); SD3.5 Large (qk-norm only).
LAYOUTS = {"sd3": {}, "sd35": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
           "sd35-large": {"qk_norm": "rms_norm"}}


@pytest.fixture(scope="session", params=sorted(LAYOUTS))
def base(request, tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, f"sf-{request.param}", **LAYOUTS[request.param])


@pytest.fixture(scope="session")
def lora(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("sf-lora"))


def base_weights(model):
    return load_file(os.path.join(model, "transformer", WEIGHTS))


def single_file(out, name="model"):
    return os.path.join(out, f"{name}.safetensors")


def architecture_from_shapes(sd) -> dict:
    """The SD3 architecture as ComfyUI and sd-scripts infer it from an original-layout checkpoint, whose
    header they ignore: hidden width from x_embedder, depth = hidden / 64, as many heads as blocks (so head
    size 64), qk-norm and dual-attention blocks from which keys exist."""
    x = sd[PREFIX + "x_embedder.proj.weight"]
    blocks = {int(k[len(PREFIX + "joint_blocks."):].split(".")[0]) for k in sd if k.startswith(PREFIX + "joint_blocks.")}
    return {"in_channels": x.shape[1], "patch_size": x.shape[2], "depth": x.shape[0] // 64, "heads": x.shape[0] // 64,
            "head_size": 64, "blocks": len(blocks), "pooled": sd[PREFIX + "y_embedder.mlp.0.weight"].shape[1],
            "context": tuple(sd[PREFIX + "context_embedder.weight"].shape),
            "pos_embed_max_size": round(sd[PREFIX + "pos_embed"].shape[1] ** 0.5),
            "qk_norm": PREFIX + "joint_blocks.0.context_block.attn.ln_q.weight" in sd,
            "dual_attention": sorted(b for b in blocks if f"{PREFIX}joint_blocks.{b}.x_block.attn2.qkv.weight" in sd)}


def architecture_of(config) -> dict:
    """The same facts from a diffusers transformer config."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return {"in_channels": config["in_channels"], "patch_size": config["patch_size"], "depth": config["num_layers"],
            "heads": config["num_attention_heads"], "head_size": config["attention_head_dim"],
            "blocks": config["num_layers"], "pooled": config["pooled_projection_dim"],
            "context": (hidden, config["joint_attention_dim"]), "pos_embed_max_size": config["pos_embed_max_size"],
            "qk_norm": bool(config["qk_norm"]), "dual_attention": sorted(config["dual_attention_layers"])}


def test_the_tiny_model_has_sd3_proportions(base):
    """Head size 64 and heads = depth, caption projection = hidden: what other tools need to load it."""
    import json

    with open(os.path.join(base, "transformer", "config.json")) as f:
        config = json.load(f)
    assert config["attention_head_dim"] == 64 and config["num_attention_heads"] == config["num_layers"] >= 2
    assert config["caption_projection_dim"] == 64 * config["num_layers"]


# (1) diffusers -> original (ours) -> diffusers (diffusers' converter) gives back every tensor exactly.
def test_round_trip_through_diffusers_converter(base):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = base_weights(base)
    orig = to_original(sd)
    assert all(k.startswith(PREFIX) for k in orig)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # The converter ignores unknown keys: make sure we wrote nothing it does not read, and the rules by hand.
    assert len(orig) == len(plan(sd)) == len(sd) - 2 * 2 * sum(k.endswith("to_q.weight") or k.endswith(
        "add_q_proj.weight") for k in sd)
    qkv = orig[PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([sd[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]))
    norm_out = sd["norm_out.linear.weight"]
    half = norm_out.shape[0] // 2
    assert torch.equal(orig[PREFIX + "final_layer.adaLN_modulation.1.weight"],
                       torch.cat([norm_out[half:], norm_out[:half]]))
    last = sd["transformer_blocks.1.norm1_context.linear.bias"]
    assert torch.equal(orig[PREFIX + "joint_blocks.1.context_block.adaLN_modulation.1.bias"],
                       torch.cat([last[half:], last[:half]]))
    assert torch.equal(orig[PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias"],
                       sd["transformer_blocks.0.norm1_context.linear.bias"])


# (1b) ... and the original keys give back the same groups, whose split undoes combine, tensor for tensor.
def test_original_layout_reads_back_under_diffusers_names(base):
    sd = base_weights(base)
    orig = to_original(sd)
    groups = groups_from_original(list(orig) + ["first_stage_model.conv_in.weight"])  # other prefixes are ignored
    assert groups == plan(sd)
    for g in groups:
        for name, t in zip(g.sources, split(g, orig[g.key])):
            assert torch.equal(t, sd[name]), name
    with pytest.raises(DataError, match="model.diffusion_model.joint_blocks.0.x_block.attn.nonsense"):
        groups_from_original([PREFIX + "joint_blocks.0.x_block.attn.nonsense.weight"])


# (2) diffusers' from_single_file loads our merged file to exactly the weights of our merged diffusers release.
def test_from_single_file_equals_merged_diffusers_release(base, lora, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = merge(base, lora, tmp_path / "diffusers")
    out = merge(base, lora, tmp_path / "single", "out.format=single_file")
    assert sorted(os.listdir(out)) == ["README.md", "model.safetensors", "shardtune-merge.json"]
    expected = merged_weights(folder)
    base_sd = base_weights(base)
    assert sum(not torch.equal(expected[k], base_sd[k]) for k in base_sd) >= 15  # the LoRA changed the weights
    model = SD3Transformer2DModel.from_single_file(single_file(out), config=base, subfolder="transformer",
                                                   local_files_only=True, torch_dtype=torch.float32)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    with safe_open(single_file(out), framework="pt") as f:
        assert f.metadata() == SINGLE_FILE_METADATA
    # What a loader that reads shapes alone builds is the architecture the release was made from.
    assert architecture_from_shapes(load_file(single_file(out))) == architecture_of(dict(model.config))


def test_vae_round_trip_through_diffusers_converter(base):
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = load_file(os.path.join(base, "vae", WEIGHTS))
    orig = vae_to_original(sd)
    assert all(k.startswith(VAE_PREFIX) for k in orig) and len(orig) == len(sd)
    assert orig[VAE_PREFIX + "decoder.mid.attn_1.q.weight"].dim() == 4  # the LDM's 1x1 convolutions
    assert VAE_PREFIX + "decoder.up.0.block.0.conv1.weight" in orig
    config = json.loads(Path(base, "vae", "config.json").read_text())
    back = convert_ldm_vae_checkpoint(dict(orig), config)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


# out.include=[vae]: one file that diffusers loads both the merged transformer and the base VAE from.
def test_single_file_with_vae_loads_in_diffusers(base, lora, tmp_path):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder = merge(base, lora, tmp_path / "diffusers")
    out = merge(base, lora, tmp_path / "single", "out.format=single_file", "out.include=[vae]")
    with safe_open(single_file(out), framework="pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model"}
    got = SD3Transformer2DModel.from_single_file(single_file(out), config=base, subfolder="transformer",
                                                 local_files_only=True, torch_dtype=torch.float32).state_dict()
    expected = merged_weights(folder)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    vae = AutoencoderKL.from_single_file(single_file(out), config=base, subfolder="vae", local_files_only=True,
                                         torch_dtype=torch.float32).state_dict()
    base_vae = load_file(os.path.join(base, "vae", WEIGHTS))
    assert vae.keys() == base_vae.keys() and all(torch.equal(vae[k], base_vae[k]) for k in base_vae)


def test_out_dtype_and_rerun_bytes(base, lora, tmp_path):
    a = merge(base, lora, tmp_path / "a", "out.format=single_file", "out.dtype=bf16", "out.name=mine")
    b = merge(base, lora, tmp_path / "b", "out.format=single_file", "out.dtype=bf16", "out.name=mine.safetensors")
    assert Path(single_file(a, "mine")).read_bytes() == Path(single_file(b, "mine")).read_bytes()
    assert {t.dtype for t in load_file(single_file(a, "mine")).values()} == {torch.bfloat16}


def test_unknown_tensor_is_refused():
    with pytest.raises(DataError, match="transformer_blocks.0.attn.to_nowhere.weight"):
        original_name("transformer_blocks.0.attn.to_nowhere.weight", 2)
    with pytest.raises(DataError, match="q, k and v"):
        plan(["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight"])


# (3) end to end through the real entry point, and its errors.
def test_command_line_single_file(base, lora, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "merge", f"model.path={base}", f"lora.path={lora}", f"out.dir={out}",
           "out.format=single_file", "out.name=release"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    listing = ["README.md", "release.safetensors", "shardtune-merge.json"]
    assert sorted(os.listdir(out)) == listing and os.path.join(str(out), "release.safetensors") in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # The same command again (a retried job) is up to date: exit 0, the release untouched. Other inputs are
    # refused without out.overwrite=true, which replaces the earlier single-file release (in this process:
    # the entry point's wiring is proven above).
    from merge.run import main
    from shards.common.config import run_cli

    made = os.stat(out / "release.safetensors").st_ino
    capsys.readouterr()
    run_cli("merge", main, cmd[3:])
    assert capsys.readouterr().out.startswith(f"merge: up to date: {out} holds the release of these inputs")
    assert os.stat(out / "release.safetensors").st_ino == made
    with pytest.raises(SystemExit) as e:
        run_cli("merge", main, cmd[3:] + ["lora.scale=0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "out.overwrite=true" in err and len(err.strip().splitlines()) == 1
    run_cli("merge", main, cmd[3:] + ["lora.scale=0.5", "out.overwrite=true"])
    assert sorted(os.listdir(out)) == listing and os.stat(out / "release.safetensors").st_ino != made
    # The diffusers format may replace a single-file release too (both are this stage's releases).
    assert merge(base, lora, out, "out.overwrite=true") and (out / "model_index.json").is_file()


def test_overwrite_never_deletes_a_users_safetensors_file(base, lora, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"), metadata={"format": "pt"})
    argv = [f"model.path={base}", f"lora.path={lora}", f"out.dir={out}", "out.format=single_file",
            "out.overwrite=true"]
    code, line = _run(argv, capsys)
    assert code == 2 and "holds other files" in line, line
    assert os.listdir(out) == ["model.safetensors"] and list(load_file(str(out / "model.safetensors"))) == ["x"]


@pytest.mark.parametrize("args, words", [
    (["out.format=ckpt"], ["out.format", "ckpt", "auto, diffusers, single_file"]),
    (["out.format=single_file", "out.name=a/b"], ["out.name", "a/b"]),
    (["out.format=single_file", "out.name=.hidden"], ["out.name"]),
    (["out.format=single_file", "out.name="], ["out.name"]),
    (["out.include=[vae]"], ["out.include", "out.format=single_file"]),
    (["out.format=single_file", "out.include=[clip_l]"], ["out.include", "clip_l"]),
])
def test_bad_values_are_one_line_usage_errors(base, lora, tmp_path, capsys, args, words):
    code, line = _run([f"model.path={base}", f"lora.path={lora}", f"out.dir={tmp_path / 'out'}", *args], capsys)
    assert code == 2 and line.startswith("merge: error: ") and all(w in line for w in words), line
    assert os.listdir(tmp_path) == []


def test_non_finite_result_leaves_nothing(base, lora, tmp_path, capsys):
    argv = [f"model.path={base}", f"lora.path={lora}", f"out.dir={tmp_path / 'out'}", "out.format=single_file",
            "lora.scale=1e39"]
    code, line = _run(argv, capsys)
    assert code == 1 and "non-finite" in line, line
    assert os.listdir(tmp_path) == []


# Unchanged tensors are copied as input-file byte spans (in the kernel); the result must be the same bytes as
# reading, converting and writing every tensor, both ways between the layouts, with or without copy_file_range.
@pytest.mark.parametrize("kernel", [True, False])
def test_byte_copies_equal_the_tensor_path(base, lora, tmp_path, monkeypatch, kernel):
    from shards import tensorfile
    from merge.fold import fold_transformer
    from merge.lora import read_loras
    from merge.single_file import transformer_jobs, write_single_file
    from merge.sources import FileSource, OriginalSource, Source, folder_source

    copied = []
    real_copy = tensorfile._SpanCopier.copy
    monkeypatch.setattr(tensorfile._SpanCopier, "copy", lambda self, span, at: copied.append(span) or real_copy(self, span, at))
    if not kernel:  # the fallback of platforms or filesystem pairs without copy_file_range
        monkeypatch.delattr(tensorfile.os, "copy_file_range", raising=False)
    updates = read_loras([os.path.join(lora, "pytorch_lora_weights.safetensors")], [0.7])  # attention layers only
    outputs = {}
    for mode in ("spans", "tensors"):
        if mode == "tensors":
            for cls in (Source, FileSource, OriginalSource):
                monkeypatch.setattr(cls, "spans", lambda self, name: None)
            copied.clear()
        d = tmp_path / mode
        d.mkdir()
        for name, ups in (("merged", updates), ("plain", {})):  # diffusers -> original: fused qkv, swapped halves
            with folder_source(os.path.join(base, "transformer"), "base") as src:
                write_single_file(transformer_jobs(src, ups, "auto"), str(d / f"{name}.safetensors"), progress=False)
        for name, ups in (("plain", {}), ("merged", updates)):  # original -> diffusers: split qkv, swapped halves
            with OriginalSource(str(d / "plain.safetensors")) as src:
                fold_transformer(src, ups, str(d / name), progress=False)
        outputs[mode] = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}
        if mode == "spans":
            assert copied, "nothing was copied as bytes"
    assert outputs["spans"].keys() == outputs["tensors"].keys() and len(outputs["spans"]) == 4
    for name in outputs["spans"]:
        assert outputs["spans"][name] == outputs["tensors"][name], name
    # Through the original layout and back, unmerged: the base file's tensors exactly.
    back, sd = load_file(str(tmp_path / "spans" / "plain" / WEIGHTS)), base_weights(base)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
