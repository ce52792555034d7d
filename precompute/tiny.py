"""The built-in tiny SD3 model and the sample dataset, built in code with fixed seeds.

The tiny pipeline keeps the relations of the real SD3 shapes that the code depends on:
two CLIP encoders of different widths whose sum is below T5's width, `joint_attention_dim`
equal to T5's `d_model`, pooled width = the sum of the CLIP projections, a 16-channel VAE with
the real 8x downsampling and SD3's scaling/shift factors, and a shift-3 flow-matching scheduler.

`python -m precompute.tiny model DIR` / `python -m precompute.tiny data DIR`.
"""
import argparse
import io
import os
import shutil
import tempfile

import torch

CAPTIONS = {
    "astronaut": "a portrait photo of an astronaut in a white space suit in front of an american flag",
    "chelsea": "a close-up photo of a tabby cat with green eyes looking to the side",
    "coffee": "a cup of coffee with latte art on a saucer with a spoon on a wooden table",
    "rocket": "a rocket on the launch pad under a clear blue sky",
    "hubble_deep_field": "a deep space photo full of distant galaxies in many colours",
    "motorcycle_left": "a red motorcycle parked in a garage next to a wall",
    "camera": "a black and white photo of a man with a camera on a tripod in a field",
    "coins": "a black and white photo of old coins laid out in rows",
}

# Words the tokenizers learn from: the captions plus the prompts the demo and tests use.
_CORPUS_EXTRA = [
    "a photo of sks dog", "a photo of a dog", "a painting of a cat", "an astronaut riding a horse on the moon",
    "a close-up photo of a red apple", "a city street at night in the rain", "a drawing of a house by a lake",
    "a mountain landscape at sunset", "the quick brown fox jumps over the lazy dog",
]

# The transformer has SD3's own proportions at small size: head size 64 and as many heads as blocks (hidden
# width = 64 x depth, caption projection = hidden), the rules by which ComfyUI and sd-scripts infer the
# architecture from a checkpoint's shapes, so the demo's single-file release loads there. Widths inside the
# blocks are multiples of 64, which bitsandbytes' 4-bit CPU kernels need (QLoRA tests).
TINY_DIMS = dict(clip_l=32, clip_g=48, t5=128, caption_projection=128, heads=2, head_dim=64, layers=2)


def _corpus():
    return list(CAPTIONS.values()) + _CORPUS_EXTRA


def build_clip_tokenizer(out_dir: str, vocab_size: int = 700):
    """A byte-level BPE with CLIP's normalisation, pre-tokenisation and `</w>` suffix.

    Trained here with a deterministic tie-break (the `tokenizers` trainer breaks ties by hash
    order, which would make the tiny model differ between builds).
    """
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokeniser
    words = Counter()
    for text in _corpus():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet + [a + "</w>" for a in alphabet])}
    merges = []
    while len(vocab) < vocab_size - 2:
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(out_dir)
    return tok


def build_t5_tokenizer(out_dir: str, vocab_size: int = 300):
    """A small SentencePiece unigram model, saved the way real T5 repos ship it (spiece.model)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() * 8), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    tok = T5TokenizerFast.from_pretrained(out_dir, extra_ids=0, model_max_length=512)
    tok.save_pretrained(out_dir)
    return tok


def _jitter_(module: torch.nn.Module, seed: int, std: float = 0.02):
    """Make every parameter non-trivial (norm weights off 1, biases off 0) so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _umask_modes(folder: str) -> None:
    """safetensors writes 0600 files; give them the mode any other file of this process gets."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def build_tiny_model(out_dir: str, seed: int = 0, qk_norm=None, dual_attention_layers=()):
    """Write a diffusers-format SD3 pipeline folder that `StableDiffusion3Pipeline.from_pretrained` loads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    d = TINY_DIMS
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        tok = build_clip_tokenizer(os.path.join(tmp, "tokenizer"))
        build_clip_tokenizer(os.path.join(tmp, "tokenizer_2"))
        tok3 = build_t5_tokenizer(os.path.join(tmp, "tokenizer_3"))

        def clip(hidden, act, s):
            torch.manual_seed(s)
            cfg = CLIPTextConfig(
                vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            m = CLIPTextModelWithProjection(cfg).eval()
            _jitter_(m, s)
            return m

        te1 = clip(d["clip_l"], "quick_gelu", seed + 1)
        te2 = clip(d["clip_g"], "gelu", seed + 2)
        torch.manual_seed(seed + 3)
        te3 = T5EncoderModel(T5Config(
            # bitsandbytes on CPU needs in_features % 64 == 0: d_model, d_ff and heads * d_kv are multiples of 64.
            vocab_size=len(tok3), d_model=d["t5"], d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )).eval()
        _jitter_(te3, seed + 3)

        torch.manual_seed(seed + 4)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=d["layers"],
            attention_head_dim=d["head_dim"], num_attention_heads=d["heads"], joint_attention_dim=d["t5"],
            caption_projection_dim=d["caption_projection"], pooled_projection_dim=d["clip_l"] + d["clip_g"],
            pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers),
        ).eval()
        _jitter_(transformer, seed + 4)

        torch.manual_seed(seed + 5)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=128,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
        _jitter_(vae, seed + 5)

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        from transformers import CLIPTokenizer, T5TokenizerFast
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=te1, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer")),
            text_encoder_2=te2, tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2")),
            text_encoder_3=te3, tokenizer_3=T5TokenizerFast.from_pretrained(os.path.join(tmp, "tokenizer_3")),
        )
        staged = os.path.join(tmp, "pipe")
        pipe.save_pretrained(staged, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # keep the files as built (spiece.model too)
            shutil.rmtree(os.path.join(staged, name))
            shutil.copytree(os.path.join(tmp, name), os.path.join(staged, name))
        _umask_modes(staged)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_sample_dataset(out_dir: str):
    """Real photos bundled with scikit-image, copied as files, each with a hand-written caption."""
    import skimage

    src = os.path.join(os.path.dirname(skimage.__file__), "data")
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(src))
    for stem, caption in CAPTIONS.items():
        fname = next(n for n in names if os.path.splitext(n)[0] == stem)
        shutil.copyfile(os.path.join(src, fname), os.path.join(out_dir, fname))
        with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
            f.write(caption + "\n")
    return out_dir


def main(argv=None):
    from shards.common.config import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(prog="python -m precompute.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["model", "data"])
    ap.add_argument("out")
    a = ap.parse_args(argv)
    if a.what == "model":
        build_tiny_model(a.out)
    else:
        build_sample_dataset(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
