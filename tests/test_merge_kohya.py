"""kohya-format SD3 LoRAs: conversion both ways, merging them, loading the converted file in diffusers."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cli, tiny_model_copy
from merge.convert import convert
from merge.sd3_keys import PREFIX, to_original
from test_merge import ALPHA, R, TARGETS, WEIGHTS, latents, load_pipeline, make_lora, merge, merged_weights

# Every block's context modulation (the last one is stored swapped) and the final one (swapped).
ADALN = ["norm_out.linear", "norm1_context.linear"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, "kohya")


@pytest.fixture(scope="module", params=["attn", "attn+adaln"])
def lora(base, tmp_path_factory, request):
    extra = {} if request.param == "attn" else {"target_modules": TARGETS + ADALN}
    out = make_lora(base, tmp_path_factory.mktemp("lora"), **extra)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def kohya(lora, tmp_path_factory):
    return convert(lora, str(tmp_path_factory.mktemp("k") / "lora_kohya.safetensors"), "kohya")


@pytest.fixture(scope="module")
def back(kohya, tmp_path_factory):
    return convert(kohya, str(tmp_path_factory.mktemp("d")), "diffusers")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


# (a) diffusers -> kohya -> diffusers merges to the same weights; (b) so does the kohya file itself.
def test_round_trip_and_kohya_merge_equal_the_original_merge(base, lora, kohya, back, tmp_path):
    want = merged_weights(merge(base, lora, tmp_path / "orig"))
    base_w = load_file(os.path.join(base, "transformer", WEIGHTS))
    assert any(not torch.equal(want[k], base_w[k]) for k in want)
    assert_same_weights(merged_weights(merge(base, back, tmp_path / "back")), want)
    assert_same_weights(merged_weights(merge(base, kohya, tmp_path / "kohya")), want)


def test_command_line_merges_a_kohya_file(base, lora, kohya, tmp_path):
    for lp, out in ((lora, tmp_path / "d"), (kohya, tmp_path / "k")):
        r = cli("merge", f"model.path={base}", f"lora.path={lp}", f"out.dir={out}")
        assert r.returncode == 0, r.stderr
    assert_same_weights(merged_weights(str(tmp_path / "k")), merged_weights(str(tmp_path / "d")))


# (c) kohya names and fused shapes, and each kohya delta added to the ORIGINAL-layout base gives what the
# single-file merge of the diffusers LoRA gives (checks names, qkv fusing and the adaLN swap independently).
def test_kohya_keys_shapes_and_effect_in_original_layout(base, lora, kohya, tmp_path):
    sd = load_file(kohya)
    assert all(k.startswith("lora_unet_") for k in sd)
    base_w = load_file(os.path.join(base, "transformer", WEIGHTS))
    inner = base_w["transformer_blocks.0.attn.to_q.weight"].shape[0]
    d_in = base_w["transformer_blocks.0.attn.to_q.weight"].shape[1]
    for stream in ("x_block", "context_block"):
        name = f"lora_unet_joint_blocks_0_{stream}_attn_qkv"
        assert sd[f"{name}.lora_down.weight"].shape == (3 * R, d_in)
        assert sd[f"{name}.lora_up.weight"].shape == (3 * inner, 3 * R)
        assert float(sd[f"{name}.alpha"]) == 3 * 8
        up = sd[f"{name}.lora_up.weight"]
        assert torch.count_nonzero(up[:inner, R:]) == 0 and torch.count_nonzero(up[inner:2 * inner, :R]) == 0
    assert float(sd["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 8
    assert not any("to_q" in k or "transformer_blocks" in k for k in sd)

    orig = to_original(base_w)
    out = merge(base, lora, tmp_path / "sf", "out.format=single_file")
    want = load_file(os.path.join(out, "model.safetensors"))
    names = {k[: -len(".alpha")] for k in sd if k.endswith(".alpha")}
    for name in names:
        key = PREFIX + name[len("lora_unet_"):] + ".weight"
        key = next(k for k in orig if k.replace(".", "_") == key.replace(".", "_"))
        down, up, alpha = (sd[f"{name}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        got = orig[key] + float(alpha) / down.shape[0] * (up @ down)
        torch.testing.assert_close(got, want[key], atol=1e-6, rtol=1e-5, msg=key)


# (d) the converted-back file loads in diffusers and generates what the original LoRA does.
def test_converted_back_file_loads_in_diffusers(base, lora, back):
    with safe_open(back, framework="pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    # alpha / rank is folded into lora_B: a loader that reads no header (ComfyUI) gets the trained delta too.
    assert adapter["transformer.lora_alpha"] == adapter["transformer.r"] and not adapter["transformer.use_rslora"]
    orig, mine = load_file(lora), load_file(back)
    assert orig.keys() == mine.keys()
    for key in (k for k in orig if k.endswith(".lora_A.weight")):
        b = key.replace(".lora_A.", ".lora_B.")
        torch.testing.assert_close(mine[b] @ mine[key], ALPHA / R * (orig[b] @ orig[key]), atol=1e-7, rtol=1e-6)
    pipe = load_pipeline(base)
    pipe.load_lora_weights(os.path.dirname(lora), adapter_name="orig")
    want = latents(pipe)
    pipe.delete_adapters("orig")
    plain = latents(pipe)
    pipe.load_lora_weights(back, adapter_name="back")
    got = latents(pipe)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _cli(args):
    return cli("merge", "convert", *map(str, args))


def test_command_line_convert(lora, tmp_path):
    r = _cli([lora, tmp_path / "k.safetensors", "--to", "kohya"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.safetensors").is_file()
    r = _cli([tmp_path / "k.safetensors", tmp_path / "back", "--to=diffusers"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "pytorch_lora_weights.safetensors").is_file()


# (e) bad input: one line on stderr, exit 2 for usage, 1 for data; nothing written.
@pytest.mark.parametrize("case, code, words", [
    ("no_to", 2, ["--to"]),
    ("bad_to", 2, ["--to", "comfy"]),
    ("missing", 2, ["does not exist"]),
    ("one_path", 2, ["IN and OUT"]),
    ("exists", 2, ["exists", "--overwrite"]),
    ("not_lora", 1, ["hada_w1_a", "not a kohya LoRA weight"]),
    ("unknown_module", 1, ["_attn_nowhere", "not an SD3 transformer module"]),
    ("garbage", 1, ["cannot read LoRA file"]),
])
def test_bad_convert_input_is_one_line(lora, kohya, tmp_path, capsys, case, code, words):
    out = tmp_path / "out.safetensors"
    src = tmp_path / "in.safetensors"
    if case in ("not_lora", "unknown_module"):
        sd = load_file(kohya)
        if case == "not_lora":
            sd["lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a"] = torch.zeros(2, 2)
        else:
            sd = {k.replace("attn_qkv", "attn_nowhere"): v for k, v in sd.items()}
        save_file(sd, str(src))
    elif case == "garbage":
        src.write_bytes(b"not a safetensors file at all")
    args = {"no_to": [lora, out], "bad_to": [lora, out, "--to", "comfy"],
            "missing": [tmp_path / "nope.safetensors", out, "--to", "kohya"], "one_path": [lora, "--to", "kohya"],
            "exists": [lora, out, "--to", "kohya"]}.get(case, [src, out, "--to", "diffusers"])
    if case == "exists":
        out.write_bytes(b"keep me")
    from merge.convert import main as convert_main
    from shards.common.config import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # in this process: test_command_line_convert proves the entry point
        run_cli("merge convert", convert_main, [str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == code and len(lines) == 1 and lines[0].startswith("merge convert: error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


# sd-scripts' split_qkv layout: q, k, v LoRAs apart under the fused qkv name, scale alpha / rank of one part.
def test_split_qkv_layout_merges_like_the_diffusers_file(base, lora, kohya, tmp_path):
    fused = load_file(kohya)
    split = {}
    for key, t in fused.items():
        name = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        if not name.endswith("_attn_qkv"):
            split[key] = t
        elif key.endswith(".lora_down.weight"):
            for i, part in enumerate(t.chunk(3)):
                split[f"{name}.lora_down.{i}.weight"] = part.contiguous()
        elif key.endswith(".lora_up.weight"):
            h, r = t.shape[0] // 3, t.shape[1] // 3
            for i in range(3):
                split[f"{name}.lora_up.{i}.weight"] = t[i * h:(i + 1) * h, i * r:(i + 1) * r].contiguous()
        else:  # the fused alpha is 3r * scale; a part's scale is alpha / r, so alpha = r * scale
            split[key] = t / 3
    path = str(tmp_path / "split.safetensors")
    save_file(split, path)
    assert any(".lora_up.2.weight" in k for k in split)
    assert_same_weights(merged_weights(merge(base, path, tmp_path / "split")),
                        merged_weights(merge(base, lora, tmp_path / "orig")))
    del split[next(k for k in split if k.endswith(".lora_up.1.weight"))]
    save_file(split, path)
    r = cli("merge", f"model.path={base}", f"lora.path={path}", f"out.dir={tmp_path / 'bad'}")
    assert r.returncode == 1 and "lacks split-qkv parts (no lora_up.1.weight)" in r.stderr.strip().splitlines()[-1]
