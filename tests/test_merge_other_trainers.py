"""LoRAs made by other trainers: sd-scripts files with text encoder LoRAs (lora_te1_/te2_/te3_), the conv LoRA
on x_embedder.proj, the split_qkv alpha, and a header without ranks. The files are built here by hand in
sd-scripts' naming (the transformers module path with '.' -> '_'), with random non-zero up and down, alphas
that differ from the ranks, and ranks that differ by module type."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import cli
from merge.card import lora_facts
from merge.convert import convert
from merge.sd3_keys import PREFIX, to_original
from merge.sources import TRANSFORMERS_WEIGHTS
from test_merge import WEIGHTS, base_model, merge, merged_weights  # noqa: F401 (base_model is a fixture)
from test_merge_release import base_single_file

ENCODERS = {"text_encoder": ("lora_te1_", "text_encoders.clip_l.transformer."),
            "text_encoder_2": ("lora_te2_", "text_encoders.clip_g.transformer."),
            "text_encoder_3": ("lora_te3_", "text_encoders.t5xxl.transformer.")}
# (rank, alpha) per module type: none has alpha = rank, so a merge that ignores alpha fails.
RANKS = {"lora_te1_": (4, 2.0), "lora_te2_": (2, 8.0), "lora_te3_": (3, 1.5), "attn": (4, 3.0), "mlp": (2, 1.0),
         "conv": (2, 3.0)}
# What sd-scripts targets: the linear layers of CLIPAttention / CLIPMLP and T5Attention / T5DenseGatedActDense.
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
              "SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
              "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
SCALE = 0.7


def _pair(g, shape, rank, dtype):
    if len(shape) == 4:  # sd-scripts' conv LoRA: a kh x kw down kernel, a 1x1 up kernel
        down, up = torch.randn(rank, *shape[1:], generator=g), torch.randn(shape[0], rank, 1, 1, generator=g)
    else:
        down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
    return (down * 0.2).to(dtype), (up * 0.2).to(dtype)


def sd_scripts_lora(base, path, dtype=torch.float32, seed=0, text=True, transformer=True, conv=True, header=None):
    """A LoRA file as sd-scripts' LoRANetwork.save_weights writes it for the tiny base (fused qkv)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, shape, kind):
        rank, alpha = RANKS[kind]
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = _pair(g, shape, rank, dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)  # save_weights casts the alphas too

    orig = to_original(load_file(os.path.join(base, "transformer", WEIGHTS)))
    for key, w in sorted(orig.items()):
        name = "lora_unet_" + key[len(PREFIX):-len(".weight")].replace(".", "_")
        if transformer and key.endswith(("attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight")):
            add(name, w.shape, "attn" if "attn" in key else "mlp")
        if conv and key.endswith("x_embedder.proj.weight"):
            add(name, w.shape, "conv")
    for component, (prefix, _) in ENCODERS.items():
        for key, w in sorted(load_file(os.path.join(base, component, TRANSFORMERS_WEIGHTS)).items()):
            if text and key.endswith(tuple(t + ".weight" for t in TE_TARGETS)):
                add(prefix + key[: -len(".weight")].replace(".", "_"), w.shape, prefix)
    save_file(sd, str(path), metadata=header)
    return str(path)


def te_modules(sd, prefix):
    """kohya module name -> (down, up, alpha) for one text encoder."""
    names = [k[: -len(".alpha")] for k in sd if k.startswith(prefix) and k.endswith(".alpha")]
    return {n: (sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], float(sd[f"{n}.alpha"])) for n in names}


def expected_text_encoder(base, component, sd, scale):
    """W + scale * alpha / r * up @ down for every targeted module, in float64; module names by hand."""
    prefix = ENCODERS[component][0]
    w = {k: v.double() for k, v in load_file(os.path.join(base, component, TRANSFORMERS_WEIGHTS)).items()}
    by_kohya = {prefix + k[: -len(".weight")].replace(".", "_"): k for k in w if k.endswith(".weight")}
    targets = set()
    for name, (down, up, alpha) in te_modules(sd, prefix).items():
        key = by_kohya[name]
        w[key] = w[key] + scale * alpha / down.shape[0] * (up.double() @ down.double())
        targets.add(key)
    return w, targets


def digest(folder):
    return {str(p.relative_to(folder)): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def warnings_of(err):
    return [line for line in err.splitlines() if "warning" in line]


@pytest.fixture(scope="module")
def lora_file(base_model, tmp_path_factory):
    return sd_scripts_lora(base_model, tmp_path_factory.mktemp("sd-scripts") / "lora.safetensors",
                           header={"ss_network_dim": "None", "ss_network_alpha": "None", "ss_learning_rate": "0.0001"})


def _unmerged_hooks(model, sd, prefix, scale):
    """The LoRA applied unmerged: each targeted Linear gets scale * alpha / r * up(down(x)) added."""
    names = {prefix + n.replace(".", "_"): n for n, _ in model.named_modules()}
    hooks = []
    for name, (down, up, alpha) in te_modules(sd, prefix).items():
        def hook(_, inputs, output, down=down.float(), up=up.float(), s=scale * alpha / down.shape[0]):
            return output + s * (inputs[0] @ down.T) @ up.T
        hooks.append(model.get_submodule(names[name]).register_forward_hook(hook))
    return hooks


# (a) into a diffusers release: every targeted module is W + scale * alpha/r * up @ down, the encoders load with
# transformers and give what the base does with the LoRA applied unmerged; the base stays as it was, though
# every unchanged file is hard-linked from it.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_text_encoder_loras_fold_into_a_diffusers_release(base_model, lora_file, tmp_path, dtype):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    lora = lora_file if dtype == torch.float32 else sd_scripts_lora(base_model, tmp_path / "bf16.safetensors",
                                                                    torch.bfloat16, seed=1)
    before = digest(base_model)
    out = tmp_path / "out"
    r = cli("merge", f"model.path={base_model}", f"lora.path={lora}", f"out.dir={out}", f"lora.scale={SCALE}",
            "out.link=hardlink", "merge.verify=true")
    assert r.returncode == 0 and not warnings_of(r.stderr), r.stderr
    assert "merge: folded 18 LoRA modules into CLIP-L (text_encoder), 18 into CLIP-G (text_encoder_2), " \
           "14 into T5 (text_encoder_3)" in r.stdout, r.stdout
    assert "verify: 127 text encoder tensors read back; 50 LoRA targets match" in r.stdout, r.stdout
    assert digest(base_model) == before
    sd = load_file(lora)
    for component in ENCODERS:
        release = os.path.join(out, component, TRANSFORMERS_WEIGHTS)
        assert os.stat(release).st_ino != os.stat(os.path.join(base_model, component, TRANSFORMERS_WEIGHTS)).st_ino
        expected, targets = expected_text_encoder(base_model, component, sd, SCALE)
        got = load_file(release)
        assert got.keys() == expected.keys() and len(targets) == {"text_encoder_3": 14}.get(component, 18)
        for key, w in got.items():
            if key in targets:
                torch.testing.assert_close(w.double(), expected[key], atol=1e-6, rtol=1e-6, msg=key)
            else:
                assert torch.equal(w.double(), expected[key]), key
    assert os.stat(out / "vae" / WEIGHTS).st_ino == os.stat(os.path.join(base_model, "vae", WEIGHTS)).st_ino
    # The transformer part, in the original layout: fused qkv, fc1/fc2 and the conv on x_embedder.proj.
    orig_base = to_original(load_file(os.path.join(base_model, "transformer", WEIGHTS)))
    orig_out = to_original(merged_weights(str(out)))
    unet = {k[: -len(".alpha")] for k in sd if k.startswith("lora_unet_") and k.endswith(".alpha")}
    assert len(unet) == 11  # 4 fused qkv, 3 fc1, 3 fc2 (the last block has no context MLP), the conv
    for name in unet:
        key = PREFIX + next(k for k in (x[len(PREFIX):] for x in orig_base) if
                            "lora_unet_" + k[: -len(".weight")].replace(".", "_") == name)
        down, up, alpha = (sd[f"{name}.{p}"].double() for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        delta = torch.einsum("or,rihw->oihw", up[..., 0, 0], down) if down.dim() == 4 else up @ down
        want = orig_base[key].double() + SCALE * float(alpha) / down.shape[0] * delta
        torch.testing.assert_close(orig_out[key].double(), want, atol=1e-6, rtol=1e-6, msg=key)
    if dtype != torch.float32:
        return
    card = (out / "README.md").read_text()
    assert "folded into the transformer and text encoders" in card
    assert "| rank | 2 (25 modules), 3 (14 modules), 4 (22 modules) |" in card, card  # from the tensors
    assert "| alpha | 1 (6 modules), 1.5 (14 modules), 2 (18 modules), 3 (5 modules), 8 (18 modules) |" in card
    ids = torch.tensor([[1, 5, 9, 13, 2, 0, 0, 0]])
    for component, cls in (("text_encoder", CLIPTextModelWithProjection),
                           ("text_encoder_2", CLIPTextModelWithProjection), ("text_encoder_3", T5EncoderModel)):
        base_te = cls.from_pretrained(os.path.join(base_model, component)).eval()
        merged_te = cls.from_pretrained(str(out / component)).eval()
        with torch.no_grad():
            plain = base_te(ids).last_hidden_state
            got = merged_te(ids).last_hidden_state
            hooks = _unmerged_hooks(base_te, sd, ENCODERS[component][0], SCALE)
            want = base_te(ids).last_hidden_state
            for h in hooks:
                h.remove()
        assert (got - plain).abs().max() > 1e-2, component
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=component)


# (a) the single file bundling the text encoders carries them merged, from a diffusers base with
# out.include=[text_encoders] and from a single-file base that bundles them.
def test_single_file_releases_carry_the_merged_text_encoders(base_model, lora_file, tmp_path):
    sd = load_file(lora_file)
    single_base = base_single_file(base_model, tmp_path / "base.safetensors")
    for name, model, extra in (("from-folder", base_model, ["out.format=single_file", "out.include=[text_encoders]"]),
                               ("from-file", single_base, [])):
        out = merge(model, lora_file, tmp_path / name, f"lora.scale={SCALE}", *extra)
        got = load_file(os.path.join(out, "model.safetensors"))
        for component, (_, prefix) in ENCODERS.items():
            expected, targets = expected_text_encoder(base_model, component, sd, SCALE)
            for key, w in expected.items():
                if key in targets:
                    torch.testing.assert_close(got[prefix + key].double(), w, atol=1e-6, rtol=1e-6, msg=key)
                else:
                    assert torch.equal(got[prefix + key].double(), w), key
        base_qkv = to_original(load_file(os.path.join(base_model, "transformer", WEIGHTS)))
        key = PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"
        assert (got[key] - base_qkv[key]).abs().max() > 1e-3


# (a) a release without the text encoders: the transformer part is merged and one warning line says what was
# left out and how to include it; a file with nothing else to merge is refused.
@pytest.mark.parametrize("case, hint", ids=["single-file", "single-file+vae", "base-file-without-encoders"], argvalues=[
    ("single-file", "to include them, set out.include=[text_encoders]"),
    ("single-file+vae", "to include them, set out.include=[vae,text_encoders]"),
    ("base-file-without-encoders", "the base file does not bundle them; merge into a diffusers base (or a file "
                                   "bundling them) instead"),
])
def test_text_encoders_the_release_lacks_are_one_warning_line(base_model, lora_file, tmp_path, case, hint):
    if case == "base-file-without-encoders":
        args = [f"model.path={base_single_file(base_model, tmp_path / 'base.safetensors', include=('vae',))}"]
    else:
        args = [f"model.path={base_model}", "out.format=single_file"] + (["out.include=[vae]"] if "vae" in case else [])
    r = cli("merge", *args, f"lora.path={lora_file}", f"out.dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    lines = warnings_of(r.stderr)
    assert lines == [
        "merge: warning: the release does not carry every text encoder the LoRAs change: left out 18 LoRA modules "
        "of CLIP-L (text_encoder), 18 of CLIP-G (text_encoder_2), 14 of T5 (text_encoder_3) and merged the rest; "
        + hint]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("text_encoders.") for k in got)
    base_qkv = to_original(load_file(os.path.join(base_model, "transformer", WEIGHTS)))
    key = PREFIX + "joint_blocks.1.context_block.attn.qkv.weight"
    assert (got[key] - base_qkv[key]).abs().max() > 1e-3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "not in this release, so not folded in: 18 LoRA modules of CLIP-L" in card


# (b) the conv LoRA on x_embedder.proj: the kernel is up (x) down times alpha / r, and the merged transformer
# computes what the base does with the LoRA applied unmerged as two convolutions.
def test_conv_lora_on_x_embedder_merges_as_a_conv(base_model, tmp_path):
    from diffusers import SD3Transformer2DModel

    lora = sd_scripts_lora(base_model, tmp_path / "conv.safetensors", seed=2, text=False, transformer=False)
    sd = load_file(lora)
    down, up = sd["lora_unet_x_embedder_proj.lora_down.weight"], sd["lora_unet_x_embedder_proj.lora_up.weight"]
    s = SCALE * float(sd["lora_unet_x_embedder_proj.alpha"]) / down.shape[0]
    assert down.shape == (2, 16, 2, 2) and up.shape == (128, 2, 1, 1)
    out = merge(base_model, lora, tmp_path / "out", f"lora.scale={SCALE}", "merge.verify=true")
    base = load_file(os.path.join(base_model, "transformer", WEIGHTS))
    merged = merged_weights(out)
    direct = torch.zeros(128, 16, 2, 2, dtype=torch.float64)
    for o in range(128):
        for r in range(2):
            direct[o] += up[o, r, 0, 0].double() * down[r].double()
    torch.testing.assert_close(merged["pos_embed.proj.weight"].double(), base["pos_embed.proj.weight"].double() +
                               s * direct, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(merged[k], base[k]) for k in base if k != "pos_embed.proj.weight")

    model = SD3Transformer2DModel.from_pretrained(os.path.join(base_model, "transformer")).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 32, 32, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 128, generator=g),
                  pooled_projections=torch.randn(1, 80, generator=g))
    proj = model.pos_embed.proj
    with torch.no_grad():
        plain = model(**inputs).sample
        hook = proj.register_forward_hook(lambda m, x, y: y + s * F.conv2d(
            F.conv2d(x[0], down, stride=m.stride, padding=m.padding), up))
        want = model(**inputs).sample
        hook.remove()
        got = SD3Transformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()(**inputs).sample
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The converter keeps the kernels' shapes, so diffusers itself applies the same conv LoRA.
    from diffusers import StableDiffusion3Pipeline

    back = convert(lora, str(tmp_path / "diffusers"), "diffusers")
    assert load_file(back)["transformer.pos_embed.proj.lora_A.weight"].shape == (2, 16, 2, 2)
    pipe = StableDiffusion3Pipeline.from_pretrained(base_model)
    pipe.load_lora_weights(back, adapter_name="conv")
    pipe.set_adapters("conv", SCALE)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs).sample, want, atol=1e-5, rtol=1e-5)


def _split_layout(sd):
    """The same LoRA as sd-scripts holds it while training with split_qkv: q, k, v apart, each of rank r with
    scale alpha / r (what merge/kohya.py's _split_qkv reads)."""
    out = {}
    for key, t in sd.items():
        name, part = key.split(".", 1)
        if not name.endswith("_attn_qkv") or part == "alpha":
            out[key] = t
        elif part == "lora_down.weight":
            for i, chunk in enumerate(t.chunk(3)):
                out[f"{name}.lora_down.{i}.weight"] = chunk.contiguous()
        else:
            h, r = t.shape[0] // 3, t.shape[1] // 3
            for i in range(3):
                out[f"{name}.lora_up.{i}.weight"] = t[i * h:(i + 1) * h, i * r:(i + 1) * r].contiguous()
    return out


# (c) sd-scripts saves split_qkv LoRAs fused with the alpha of one part: one warning line, and the lora.scale it
# suggests gives the qkv deltas back their trained strength (while the other modules get that scale too).
@pytest.mark.parametrize("flag", ["True", True], ids=["string", "json-bool"])
def test_split_qkv_file_warns_with_the_scale_that_restores_it(base_model, tmp_path, flag):
    g = torch.Generator().manual_seed(3)
    orig = to_original(load_file(os.path.join(base_model, "transformer", WEIGHTS)))
    qkv, fc2 = (orig[PREFIX + f"joint_blocks.0.x_block.{m}.weight"] for m in ("attn.qkv", "mlp.fc2"))
    r, alpha = 2, 5.0
    parts = [_pair(g, (qkv.shape[0] // 3, qkv.shape[1]), r, torch.float32) for _ in range(3)]
    up = torch.block_diag(*(u for _, u in parts))  # how sd-scripts' state_dict fuses the parts on saving
    saved = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.cat([d for d, _ in parts]),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
             "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(alpha)}
    for p, t in zip(("lora_down.weight", "lora_up.weight"), _pair(g, fc2.shape, 4, torch.float32)):
        saved[f"lora_unet_joint_blocks_0_x_block_mlp_fc2.{p}"] = t
    saved["lora_unet_joint_blocks_0_x_block_mlp_fc2.alpha"] = torch.tensor(3.0)
    header = {"ss_network_args": json.dumps({"split_qkv": flag, "emb_dims": "[0,0,2,0,0,0]"})}
    save_file(saved, str(tmp_path / "saved.safetensors"), metadata=header)
    save_file(_split_layout(saved), str(tmp_path / "trained.safetensors"))
    r1 = cli("merge", f"model.path={base_model}", f"lora.path={tmp_path / 'saved.safetensors'}",
             f"out.dir={tmp_path / 'a'}", "lora.scale=0.5")
    assert r1.returncode == 0, r1.stderr
    assert warnings_of(r1.stderr) == [
        f"merge: warning: {tmp_path / 'saved.safetensors'} was saved by sd-scripts with split_qkv, whose saved alpha "
        "makes every alpha / rank reader (this merge, ComfyUI, sd-scripts itself) apply its 1 fused qkv LoRA at 1/3 "
        "of the trained strength; lora.scale=1.5 for this file (3 x 0.5) restores it, but also triples its 1 "
        "other LoRA module"]
    restored = merged_weights(merge(base_model, tmp_path / "saved.safetensors", tmp_path / "b", "lora.scale=1.5"))
    trained = merged_weights(merge(base_model, tmp_path / "trained.safetensors", tmp_path / "c", "lora.scale=0.5"))
    base = load_file(os.path.join(base_model, "transformer", WEIGHTS))
    for m in ("to_q", "to_k", "to_v"):
        key = f"transformer_blocks.0.attn.{m}.weight"
        assert (trained[key] - base[key]).abs().max() > 1e-3
        torch.testing.assert_close(restored[key], trained[key], atol=1e-6, rtol=1e-6, msg=key)
    fc2_key = "transformer_blocks.0.ff.net.2.weight"
    torch.testing.assert_close(restored[fc2_key] - base[fc2_key], 3 * (trained[fc2_key] - base[fc2_key]),
                               atol=1e-6, rtol=1e-5)
    save_file(saved, str(tmp_path / "plain.safetensors"), metadata={"ss_network_args": '{"conv_dim": "4"}'})
    r2 = cli("merge", f"model.path={base_model}", f"lora.path={tmp_path / 'plain.safetensors'}",
             f"out.dir={tmp_path / 'd'}")
    assert r2.returncode == 0 and not warnings_of(r2.stderr), r2.stderr


# (d) the model card's rank and alpha come from the tensors when the kohya header has none.
@pytest.mark.parametrize("header", [{"ss_network_dim": "None", "ss_network_alpha": "None"}, {},
                                    {"ss_network_dim": "None", "ss_network_alpha": "16"}],
                         ids=["none", "missing", "alpha-only"])
def test_card_reads_rank_and_alpha_from_the_tensors_when_the_header_has_none(base_model, tmp_path, header):
    lora = sd_scripts_lora(base_model, tmp_path / "l.safetensors", text=False, header=header or None)
    facts = lora_facts(lora, header)
    assert facts["rank"] == "2 (7 modules), 4 (4 modules)"  # 4 fused qkv; 6 fc1 / fc2 and the conv
    assert facts["alpha"] == ("16" if header.get("ss_network_alpha") == "16" else "1 (6 modules), 3 (5 modules)")
    assert lora_facts(lora, {"ss_network_dim": "8"})["rank"] == "8"  # a header that has it is believed


def _edit(lora_file, tmp_path, edit):
    sd = load_file(lora_file)
    edit(sd)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return str(path)


def _rename(old, new):
    def edit(sd):
        for k in [k for k in sd if k.startswith(old + ".")]:
            sd[new + k[len(old):]] = sd.pop(k)
    return edit


def _reshape(key, shape):
    def edit(sd):
        sd[key] = torch.randn(shape)
    return edit


def _text_only(sd):
    for k in [k for k in sd if not k.startswith("lora_te")]:
        del sd[k]


Q_PROJ = "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"


# Bad input: one line naming the key (or module), exit 1, nothing written.
@pytest.mark.parametrize("edit, args, words", [
    (_rename(Q_PROJ, "lora_te2_text_model_encoder_layers_7_self_attn_q_proj"), [],
     ["'lora_te2_text_model_encoder_layers_7_self_attn_q_proj.lora_down.weight'", "no module", "CLIP-G"]),
    (_reshape(Q_PROJ + ".lora_down.weight", (2, 31)), [],
     [f"'{Q_PROJ}.lora_down.weight'", "48x31 update", "(48, 48)"]),
    (_reshape(Q_PROJ + ".lora_down.weight", (2, 31)), ["out.format=single_file", "out.include=[text_encoders]"],
     [f"'{Q_PROJ}.lora_down.weight'", "shape (48, 48)"]),
    (_reshape("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight", (64, 5)), [],
     ["lora_te3_encoder_block_0_layer_0_SelfAttention_q", "not the two matrices"]),
    (_reshape("lora_unet_x_embedder_proj.lora_up.weight", (128, 2, 3, 3)), [],
     ["lora_unet_x_embedder_proj", "conv LoRA"]),
    (_reshape("lora_unet_x_embedder_proj.lora_down.weight", (2, 8, 2, 2)), [],
     ["pos_embed.proj", "128x8x2x2", "(128, 16, 2, 2)"]),
    (_text_only, ["out.format=single_file"], ["only text encoders", "out.include=[text_encoders]"]),
], ids=["te-module-missing", "te-shape", "te-shape-single-file", "te-not-a-pair", "conv-up-not-1x1", "conv-shape",
        "te-only-not-carried"])
def test_bad_input_is_one_line(base_model, lora_file, tmp_path, edit, args, words):
    bad = _edit(lora_file, tmp_path, edit)
    r = cli("merge", f"model.path={base_model}", f"lora.path={bad}", f"out.dir={tmp_path / 'out'}", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("merge: error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert os.listdir(tmp_path) == ["bad.safetensors"]


def test_converter_refuses_text_encoder_loras_in_one_line(lora_file, tmp_path):
    r = cli("merge", "convert", lora_file, str(tmp_path / "d"), "--to", "diffusers")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "text encoder LoRA weight" in lines[0], r.stderr
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in lines[0] and not os.listdir(tmp_path)


# SD3 without T5 (text_encoder_3 null in model_index.json): CLIP-L and CLIP-G get theirs, T5's are left out.
def test_a_base_without_t5_merges_the_clip_loras_and_warns_about_t5(base_model, lora_file, tmp_path):
    import shutil

    base = tmp_path / "no-t5"
    shutil.copytree(base_model, base)
    for folder in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(base / folder)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                       "tokenizer_3": [None, None]}))
    r = cli("merge", f"model.path={base}", f"lora.path={lora_file}", f"out.dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    assert warnings_of(r.stderr) == [
        "merge: warning: the release does not carry every text encoder the LoRAs change: left out 14 LoRA modules "
        "of T5 (text_encoder_3) and merged the rest; model.path has no text_encoder_3 folder to fold them into"]
    assert "merge: folded 18 LoRA modules into CLIP-L (text_encoder), 18 into CLIP-G (text_encoder_2)\n" in r.stdout
    assert not (tmp_path / "out" / "text_encoder_3").exists()
    sd = load_file(lora_file)
    expected, targets = expected_text_encoder(base_model, "text_encoder_2", sd, 1.0)
    got = load_file(str(tmp_path / "out" / "text_encoder_2" / TRANSFORMERS_WEIGHTS))
    for key in targets:
        torch.testing.assert_close(got[key].double(), expected[key], atol=1e-6, rtol=1e-6, msg=key)
