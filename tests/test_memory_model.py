"""The modelled GPU memory of `make bench --rows modelled` (bench.memory): its method reproduces a real run's
live bytes, its nf4 layers hold what bitsandbytes holds, and its rows are labelled as a model everywhere."""
import json

import torch

from bench.measure import TRANSFORMER_CONFIGS


def test_the_model_counts_what_a_real_run_holds():
    from bench.memory import host_check

    # The same fp32 LoRA step (checkpointing on), second step's peak: on fake tensors and for real on the CPU.
    r = host_check(TRANSFORMER_CONFIGS["tiny"], 128, 2, checkpointing=True)
    assert r["observed"] > 5 * 2 ** 20
    assert r["modelled"] == r["observed"], r


def test_a_modelled_nf4_layer_holds_what_bitsandbytes_holds():
    import bitsandbytes as bnb

    from bench.modelled_layers import ModelledLinear4bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 640)
    real = bnb.nn.Linear4bit(256, 640, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    real.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    real = real.to("cpu")  # bitsandbytes quantizes as the weight moves
    state = real.weight.quant_state
    model = ModelledLinear4bit(linear, torch.bfloat16)
    assert (model.weight.shape, model.weight.dtype) == (real.weight.shape, real.weight.dtype)
    assert (model.absmax.shape, model.absmax.dtype) == (state.absmax.shape, state.absmax.dtype)
    assert (model.absmax2.shape, model.absmax2.dtype) == (state.state2.absmax.shape, state.state2.absmax.dtype)
    # Output in the compute dtype, as the trainer's layer returns it; bitsandbytes' own returns the input's.
    x = torch.randn(3, 256)
    assert model(x).dtype == torch.bfloat16
    assert ModelledLinear4bit(linear, torch.bfloat16, out_in_compute_dtype=False)(x).dtype == real(x).dtype == x.dtype


def test_modelled_rows_are_labelled_as_a_model(tmp_path, stages_in_process):
    from bench import driver
    from bench.results import format_table, load_results

    path = driver.main(["--quick", "--rows", "modelled", "--out", str(tmp_path)])
    with open(path) as f:
        rows = json.load(f)["rows"]
    assert [r["row"] for r in rows] == ["modelled"] * 5
    assert all(r["status"] == "modelled" and "modelled" in r["what"] for r in rows)
    plain, checkpointed, nf4, full_fused, full = rows
    # Full fine-tuning: held = bf16 weights + 8-bit AdamW's moments (one byte each, two per weight, and an fp32
    # absmax per 256; weights under 4096 values keep fp32 moments), with or without the fused step. (What the
    # fused step saves shows at full size, where the gradient outweighs one weight's transients: BENCHMARKS.md.)
    from bench.measure import TRANSFORMER_CONFIGS
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        t = SD3Transformer2DModel(**TRANSFORMER_CONFIGS["tiny"])
    sizes = [p.numel() for p in t.parameters()]
    state = sum(2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 2 * 4 * n for n in sizes)
    buffers = sum(b.numel() * 4 for b in t.buffers())  # the fp32 position grid, cast to bf16 with the model
    assert full["settings"]["mode"] == "full" and full_fused["settings"]["fused_step"]
    assert abs(full["modelled_held_mb"] * 2 ** 20 - (2 * sum(sizes) + state)) <= buffers
    assert full_fused["modelled_held_mb"] == full["modelled_held_mb"]
    assert full["modelled_peak_mb"] > full["modelled_held_mb"] and full_fused["modelled_peak_mb"] > full["modelled_held_mb"]
    # Checkpointing keeps less for backward; an nf4 base holds a quarter of the bf16 weights' bytes or less.
    assert checkpointed["modelled_peak_mb"] < plain["modelled_peak_mb"]
    assert nf4["modelled_held_mb"] < checkpointed["modelled_held_mb"]
    table = format_table(load_results(path)[1])
    assert table.count("MODELLED") == 5


def test_validation_decodes_in_tiles_that_need_a_fraction_of_a_whole_decode():
    from bench.memory import modelled_validation

    narrow = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                  norm_num_groups=8, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)
    tiled = modelled_validation(None, 1024, vae_config=narrow)
    whole = modelled_validation(None, 1024, vae_config=narrow, tiled=False)  # diffusers' tile: the whole 1024²
    assert tiled.status == "modelled" and tiled.settings["validation_tile"] == 512
    assert tiled.extra["modelled_decode_mb"] < 0.5 * whole.extra["modelled_decode_mb"]


def test_modelled_nf4_t5_quantizes_what_transformers_quantizes(tiny_model):
    """transformers' 4-bit T5 keeps the feed-forward output layers `wo` out of quantization; so does the model."""
    import bitsandbytes as bnb  # noqa: F401  (transformers' 4-bit load needs it)
    from transformers import T5EncoderModel

    from bench.modelled_layers import ModelledLinear4bit
    from bench.precompute_memory import _t5_in_nf4

    t5 = T5EncoderModel.from_pretrained(f"{tiny_model}/text_encoder_3")
    _t5_in_nf4(t5, torch.bfloat16)
    kinds = {n.split(".")[-1]: type(m) for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("wo") is torch.nn.Linear
    assert set(kinds.values()) == {ModelledLinear4bit} and {"q", "k", "v", "o", "wi_0", "wi_1"} <= set(kinds)


def test_modelled_precompute_peak_with_idle_encoders_on_the_host(monkeypatch):
    """The stage's own encoders and `Residency` on fake CUDA, with narrow text encoders and SD3's real VAE:
    with `offload: idle` the peak is the largest encoder's phase, not everything at once; and the VAE
    encoder's modelled activations stay within the per-pixel figure `offload: auto` decides with (and near it,
    so the rule is not needlessly cautious)."""
    from bench import precompute as pb
    from bench.precompute_memory import modelled_encode
    from precompute.encoders import VAE_ACTIVATION_BYTES_PER_PIXEL_FP32, vae_activation_bytes
    from shards.gpu_margins import MIB

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    monkeypatch.setattr(pb, "CLIP_L", {**pb.CLIP_L, **small})
    monkeypatch.setattr(pb, "CLIP_G", {**pb.CLIP_G, **small})
    monkeypatch.setattr(pb, "T5_XXL", {**pb.T5_XXL, "d_model": 1024, "d_ff": 4096, "num_layers": 6, "num_heads": 16})
    rows = {o: modelled_encode(256, 1, t5_tokens=64, offload=o).to_json() for o in ("none", "idle")}
    weights = rows["none"]["modelled_weights_mb"]
    everything = sum(weights.values())
    assert rows["none"]["status"] == "modelled" and rows["none"]["encoder_switches"] == 0
    vae_activations = rows["none"]["modelled_vae_peak_mb"] - everything
    assert 0.9 * vae_activation_bytes(256 * 256, torch.float32) / MIB < vae_activations <= \
        VAE_ACTIVATION_BYTES_PER_PIXEL_FP32 * 256 * 256 / MIB
    idle = rows["idle"]
    assert idle["encoder_switches"] == 8  # two rounds of VAE, CLIP-L, CLIP-G, T5
    largest = max(weights["t5"], weights["vae_encoder"] + vae_activations)
    assert 0.98 * largest <= idle["modelled_peak_mb"] < largest + 0.25 * weights["t5"]
    assert idle["modelled_peak_mb"] < rows["none"]["modelled_peak_mb"] - weights["clip_l"] - weights["clip_g"]
