"""Stage 1 against diffusers: embeddings = encode_prompt, latents = AutoencoderKL.encode."""
import json
import os

import pytest
import torch

from shards import read_extras, read_manifest, read_rejected, read_samples
from conftest import precompute_cfg


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_model)


def _encode(pipe, prompts, t5_len=77):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=t5_len)
    return pe, pooled


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_embeddings_equal_encode_prompt(pipe, shard_set_fp32):
    samples = list(read_samples(shard_set_fp32))
    assert len(samples) == 8
    pe, pooled = _encode(pipe, [s["meta"]["caption"] for s in samples])
    for i, s in enumerate(samples):
        assert s["prompt_embeds"].shape == pe[i].shape == (77 + 77, 128)
        assert _rel(s["prompt_embeds"], pe[i]) < 1e-5
        assert _rel(s["pooled_prompt_embeds"], pooled[i]) < 1e-5
    # The three parts are really there: CLIP-L and CLIP-G widths, zero padding, non-zero T5.
    clip = samples[0]["prompt_embeds"][:77]
    assert clip[:, :80].abs().sum() > 0 and clip[:, 80:].abs().sum() == 0
    assert samples[0]["prompt_embeds"][77:].abs().sum() > 0


def test_extras_hold_empty_and_validation_prompts(pipe, shard_set_fp32):
    extras = read_extras(shard_set_fp32)
    manifest = read_manifest(shard_set_fp32)
    assert manifest.extras.validation_prompts == ["a photo of a cat", "a red apple"]
    pe, pooled = _encode(pipe, ["a photo of a cat", "a red apple"])
    assert _rel(extras["validation_prompt_embeds"], pe) < 1e-5
    assert _rel(extras["validation_pooled_prompt_embeds"], pooled) < 1e-5
    e_pe, e_pooled = _encode(pipe, [""])
    assert _rel(extras["empty_prompt_embeds"], e_pe[0]) < 1e-5
    assert _rel(extras["empty_pooled_prompt_embeds"], e_pooled[0]) < 1e-5


def test_latents_equal_vae_encode(pipe, shard_set_fp32, sample_data):
    from precompute.buckets import resize_and_crop
    from precompute.images import load_rgb

    for s in read_samples(shard_set_fp32):
        meta = s["meta"]
        img, _ = load_rgb(os.path.join(sample_data, meta["source"]))
        assert list(img.size[::-1]) == meta["original_size"]
        pixels, crop = resize_and_crop(img, tuple(meta["bucket"]))
        assert list(crop) == meta["crop_top_left"]
        with torch.no_grad():
            dist = pipe.vae.encode(pixels[None]).latent_dist
        # precompute encodes same-bucket images as one batch; batched convolutions round slightly differently
        assert torch.allclose(s["latent_mean"], dist.mean[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(s["latent_std"], dist.std[0], rtol=1e-4, atol=1e-5)
        h, w = meta["bucket"]
        assert s["latent_mean"].shape == (16, h // 8, w // 8)


def _dequantized_t5(root):
    """fp32 T5 whose linear weights are the nf4 weights our loader makes, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from transformers import T5EncoderModel

    from precompute.encoders import _load_t5

    quantized = dict(_load_t5(root, "nf4", torch.device("cpu")).named_modules())
    ref = T5EncoderModel.from_pretrained(os.path.join(root, "text_encoder_3")).eval()
    n = 0
    for name, m in ref.named_modules():
        q = quantized.get(name)
        if isinstance(m, torch.nn.Linear) and isinstance(q, bnb.nn.Linear4bit):
            m.weight.data = bf.dequantize_4bit(q.weight.data, q.weight.quant_state).reshape(m.weight.shape).float()
            n += 1
    assert n > 0
    return ref


def test_nf4_t5_runs_and_stays_close(pipe, tiny_model, sample_data, shard_set_fp32, tmp_path):
    from precompute.run import run

    out = str(tmp_path / "nf4")
    m = run(precompute_cfg(tiny_model, sample_data, out, **{"text.t5_precision": "nf4", "out.dtype": "fp32"}))
    assert m.manifest.precisions["t5"] == "nf4"
    ref = {s["key"]: s for s in read_samples(shard_set_fp32)}
    deq = _dequantized_t5(tiny_model)
    for s in read_samples(out):
        r = ref[s["key"]]
        assert torch.equal(s["prompt_embeds"][:77], r["prompt_embeds"][:77])  # CLIP part untouched
        t5, t5_fp32 = s["prompt_embeds"][77:], r["prompt_embeds"][77:]
        # 4-bit weights: close to full precision, but not equal (the test would catch a silent fp32 load)...
        cos = torch.nn.functional.cosine_similarity(t5.flatten(), t5_fp32.flatten(), dim=0).item()
        assert 0.9 < cos < 0.9999, cos
        # ...and equal, up to the kernel's arithmetic, to T5 run with the dequantized weights.
        ids = pipe.tokenizer_3([s["meta"]["caption"]], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        with torch.no_grad():
            expected = deq(ids)[0][0]
        assert _rel(t5, expected) < 0.03


def test_no_t5_gives_zero_t5_embeddings_like_the_pipeline(pipe, tiny_model, sample_data, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from precompute.run import run

    out = str(tmp_path / "not5")
    m = run(precompute_cfg(tiny_model, sample_data, out, **{"text.t5_precision": "none", "out.dtype": "fp32",
                                                           "text.max_sequence_length": 32}))
    assert "text_encoder_3" not in m.manifest.model.components
    no_t5 = StableDiffusion3Pipeline.from_pretrained(tiny_model, text_encoder_3=None, tokenizer_3=None)
    s = next(iter(read_samples(out)))
    pe, pooled = _encode(no_t5, [s["meta"]["caption"]], t5_len=32)
    assert s["prompt_embeds"].shape == (77 + 32, 128)
    assert s["prompt_embeds"][77:].abs().sum() == 0
    assert _rel(s["prompt_embeds"], pe[0]) < 1e-5


def test_bad_inputs_are_rejected_not_fatal(tiny_model, sample_data, tmp_path):
    import shutil

    from precompute.run import run

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    (data / "empty.png").write_bytes(b"")
    (data / "empty.txt").write_text("an empty file")
    (data / "corrupt.jpg").write_bytes(open(data / "rocket.jpg", "rb").read()[:2000])
    (data / "corrupt.txt").write_text("a truncated jpeg")
    (data / "text.png").write_text("not an image at all")
    (data / "text.txt").write_text("a text file named png")
    shutil.copy(data / "coffee.png", data / "nocaption.png")
    shutil.copy(data / "coffee.png", data / "sub_dup.png")
    (data / "sub_dup.txt").write_text("the same coffee again")
    (data / "blank.txt").write_text("   \n")
    shutil.copy(data / "chelsea.png", data / "blank.png")
    out = str(tmp_path / "out")
    m = run(precompute_cfg(tiny_model, str(data), out, **{"text.t5_precision": "none"}))
    rejected = {r["source"]: r["reason"] for r in read_rejected(out)}
    assert set(rejected) == {"empty.png", "corrupt.jpg", "text.png", "nocaption.png", "sub_dup.png", "blank.png"}
    assert "missing caption" in rejected["nocaption.png"]
    assert "empty caption" in rejected["blank.png"]
    assert rejected["sub_dup.png"] == "duplicate: same content as coffee.png"
    assert rejected["empty.png"].startswith("unreadable image")
    assert vars(m.manifest.counts) == {"seen": 14, "written": 8, "rejected": 6}


def test_instance_prompt_fills_missing_captions(tiny_model, sample_data, tmp_path):
    import shutil

    from precompute.run import run

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    os.remove(data / "rocket.txt")
    out = str(tmp_path / "out")
    run(precompute_cfg(tiny_model, str(data), out, **{"text.t5_precision": "none", "data.instance_prompt": "sks rocket"}))
    captions = {s["meta"]["source"]: s["meta"]["caption"] for s in read_samples(out)}
    assert captions["rocket.jpg"] == "sks rocket" and captions["chelsea.png"].startswith("a close-up photo")
    run(precompute_cfg(tiny_model, str(data), out, **{"text.t5_precision": "none", "data.instance_prompt": "sks",
                                                      "data.caption_source": "instance", "out.overwrite": "true"}))
    assert {s["meta"]["caption"] for s in read_samples(out)} == {"sks"}


def test_buckets_fit_the_grid():
    from precompute.buckets import make_buckets, nearest_bucket

    for res, step in ((1024, 64), (512, 64), (128, 32)):
        buckets = make_buckets(res, step)
        assert (res, res) in buckets
        for h, w in buckets:
            assert h % step == 0 and w % step == 0 and h * w <= res * res and 0.5 <= h / w <= 2
    b = make_buckets(1024, 64)
    assert nearest_bucket(1000, 1000, b) == (1024, 1024)
    assert nearest_bucket(600, 900, b)[0] < nearest_bucket(600, 900, b)[1]


@pytest.mark.parametrize("argv, needle", [
    (["data.nope=1"], "unknown config key 'data.nope'"),
    (["batch_size=many"], "config key 'batch_size'"),
    (["text.t5_precision=int3"], "config key 'text.t5_precision'"),
    (["data.path=/no/such/dir"], "data.path': no such folder: /no/such/dir"),
    (["--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
    (["buckets.step=40"], "buckets.step"),
])
def test_config_errors_are_one_line_exit_2(argv, needle, tiny_model, sample_data, tmp_path, capsys):
    from precompute.__main__ import main
    from shards.common.config import run_cli

    base = [f"model.path={tiny_model}", f"data.path={sample_data}", f"out.dir={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        run_cli("precompute", main, base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_refuses_to_overwrite_a_complete_set(tiny_model, sample_data, shard_set_fp32, capsys):
    from precompute.__main__ import main
    from shards.common.config import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli("precompute", main, [f"model.path={tiny_model}", f"data.path={sample_data}", f"out.dir={shard_set_fp32}"])
    assert e.value.code == 2 and "out.overwrite=true" in capsys.readouterr().err
    assert json.load(open(os.path.join(shard_set_fp32, "manifest.json")))["counts"]["written"] == 8


def test_tiny_model_keeps_the_real_shape_relations(tiny_model):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, T5Config

    l = CLIPTextConfig.from_pretrained(os.path.join(tiny_model, "text_encoder"))
    g = CLIPTextConfig.from_pretrained(os.path.join(tiny_model, "text_encoder_2"))
    t5 = T5Config.from_pretrained(os.path.join(tiny_model, "text_encoder_3"))
    tr = SD3Transformer2DModel.load_config(os.path.join(tiny_model, "transformer"))
    vae = AutoencoderKL.load_config(os.path.join(tiny_model, "vae"))
    sched = FlowMatchEulerDiscreteScheduler.load_config(os.path.join(tiny_model, "scheduler"))
    assert l.hidden_size != g.hidden_size and l.hidden_size + g.hidden_size < t5.d_model
    assert tr["joint_attention_dim"] == t5.d_model
    assert tr["pooled_projection_dim"] == l.projection_dim + g.projection_dim
    assert vae["latent_channels"] == 16 and 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)
    assert sched["shift"] == 3.0


def test_nothing_usable_is_an_error_with_the_reasons(tiny_model, tmp_path, capsys):
    from precompute.__main__ import main
    from shards.common.config import run_cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.psd").write_bytes(b"8BPS")
    (data / "orphan.txt").write_text("a caption with no image")
    (data / "b.png").write_bytes(b"")
    (data / "b.txt").write_text("zero bytes")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_cli("precompute", main, [f"model.path={tiny_model}", f"data.path={data}", f"out.dir={out}",
                                     "text.t5_precision=none"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("precompute: error: no usable images")
    rejected = {r["source"]: r["reason"] for r in read_rejected(str(out))}
    assert rejected["a.psd"].startswith("unsupported image format: .psd")
    assert rejected["orphan.txt"].startswith("caption without an image")
    assert rejected["b.png"].startswith("unreadable image")
    assert not os.path.exists(out / "manifest.json")


def test_out_dir_must_differ_from_data_path(tiny_model, sample_data, capsys):
    from precompute.__main__ import main
    from shards.common.config import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli("precompute", main, [f"model.path={tiny_model}", f"data.path={sample_data}", f"out.dir={sample_data}"])
    assert e.value.code == 2 and "name the same folder" in capsys.readouterr().err
