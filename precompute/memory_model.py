"""Modelled GPU memory of precompute's encoding at real component sizes, on a fake GPU: a model, not a
measurement (`python -m precompute.memory_model`).

The full-size CLIP-L, CLIP-G, T5-XXL and SD3 VAE encoder (precompute.bench's configs) are built on fake CUDA
(shards.fake_cuda) in the dtypes precompute loads them in and run the stage's own encoders' calls
(`TextEncoders.encode`, `VaeEncoder.encode`) on one batch; the peak of live bytes (512-byte blocks) is taken
per phase. T5 in nf4 as transformers loads it: every linear layer quantized (bitsandbytes' layout,
`ModelledLinear4bit`, output in the input's dtype) except the feed-forward output layers `wo`, which
transformers keeps out of quantization, in the compute dtype. Margins as in train.memory_model: the CUDA
context and the allocator's fragmentation are not in these figures.
"""
import argparse
import json
import sys
from typing import Optional

import torch

from shards.fake_cuda import FakeCuda, LiveBytes, ModelledLinear4bit
from shards.measure import MIB

CUDA = torch.device("cuda", 0)


def _t5_in_nf4(t5, compute_dtype: torch.dtype) -> None:
    for name, parent in list(t5.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child_name != "wo":
                setattr(parent, child_name, ModelledLinear4bit(child, compute_dtype, out_in_compute_dtype=False))


def modelled_encode(resolution: int = 1024, batch: int = 1, t5_precision: str = "nf4",
                    vae_dtype: torch.dtype = torch.float32, clip_dtype: torch.dtype = torch.float16,
                    t5_tokens: int = 256, encoders_during_vae: bool = True) -> dict:
    """Peak live bytes of the text phase and of the VAE phase of one batch, with every component resident
    (as precompute runs today), or with the text encoders gone during the VAE phase (`encoders_during_vae`
    False: what running the phases apart would hold)."""
    from .bench import component

    compute = torch.bfloat16
    with FakeCuda():
        clips = [component(n, "cpu").to(CUDA, clip_dtype) for n in ("text_encoder", "text_encoder_2")]
        t5 = component("text_encoder_3", "cpu")
        if t5_precision == "nf4":
            _t5_in_nf4(t5, compute)
        t5 = t5.to(CUDA, compute)
        vae = component("vae", "cpu")
        vae.decoder = None
        vae = vae.to(CUDA, vae_dtype)

        def weights(m) -> int:
            return sum(x.untyped_storage().nbytes() for x in list(m.parameters()) + list(m.buffers()))

        sizes = {"clip_l": weights(clips[0]), "clip_g": weights(clips[1]), "t5": weights(t5),
                 "vae_encoder": weights(vae)}
        ids = torch.ones(batch, 77, dtype=torch.long).to(CUDA)
        live = LiveBytes()
        live.hold(x for m in (*clips, t5, vae) for x in list(m.parameters()) + list(m.buffers()))
        held = live.now
        with live, torch.no_grad():
            for clip in clips:
                clip(ids, output_hidden_states=True)
            t5(torch.ones(batch, t5_tokens, dtype=torch.long).to(CUDA))
        text_peak = live.peak
        if not encoders_during_vae:
            del clips, t5
        live2 = LiveBytes()
        live2.hold(x for x in list(vae.parameters()) + list(vae.buffers()))
        if encoders_during_vae:
            live2.now += held - live2.now  # the text encoders stay resident
            live2.peak = live2.now
        with live2, torch.no_grad():
            dist = vae.encode(torch.zeros(batch, 3, resolution, resolution).to(CUDA, vae_dtype)).latent_dist
            dist.mean.float(), dist.std.float()
        vae_peak = live2.peak
    return {"row": "modelled", "status": "modelled", "what": "modelled precompute encoders on fake CUDA, SD3 sizes",
            "settings": {"model": "sd3 encoders", "resolution": resolution, "batch": batch,
                         "base_dtype": f"t5 {t5_precision}, clip {str(clip_dtype)[6:]}, vae {str(vae_dtype)[6:]}",
                         "t5_tokens": t5_tokens, "encoders_during_vae": encoders_during_vae,
                         "device": "fake cuda (modelled)"},
            "modelled_weights_mb": {k: v / MIB for k, v in sizes.items()},
            "modelled_text_peak_mb": text_peak / MIB, "modelled_vae_peak_mb": vae_peak / MIB,
            "modelled_peak_mb": max(text_peak, vae_peak) / MIB}


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m precompute.memory_model", description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    for vae_dtype in (torch.float32, torch.bfloat16):
        for together in (True, False):
            r = modelled_encode(a.resolution, a.batch, vae_dtype=vae_dtype, encoders_during_vae=together)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
