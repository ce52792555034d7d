"""One LoRA module (a down and an up matrix with their scale) and the checks every LoRA file format's reader
applies to it: shared by the diffusers/peft reader (merge.lora) and the kohya reader (merge.kohya)."""
from dataclasses import dataclass
from typing import Tuple

import torch

from shards.common.errors import DataError

TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # diffusers' and kohya's


@dataclass(frozen=True)
class LoraModule:
    name: str  # module path inside the transformer (e.g. transformer_blocks.0.attn.to_q) or a text encoder
    # lora_A, [rank, in_features]; for a conv LoRA (pos_embed.proj) the down kernel [rank, in, kh, kw]
    down: torch.Tensor
    up: torch.Tensor  # lora_B, [out_features, rank]; for a conv LoRA the 1x1 up kernel [out, rank, 1, 1]
    scale: float  # everything that multiplies up @ down: lora.scale * alpha / rank (or / sqrt(rank))

    def delta(self) -> torch.Tensor:
        """The fp32 weight update; fp32 so bf16 LoRAs do not lose the small products.

        A conv LoRA is a kh x kw conv to `rank` channels followed by a 1x1 conv, which is one conv whose
        kernel is delta[o, i, h, w] = sum_r up[o, r] * down[r, i, h, w]."""
        if self.down.dim() == 4:
            return (self.up.float().flatten(1) @ self.down.float().flatten(1)).mul_(self.scale).reshape(self.shape)
        return (self.up.float() @ self.down.float()).mul_(self.scale)

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """`w += delta()` for an fp32 `w`, rounded exactly as `delta()` is (verify recomputes it)."""
        return w.add_(self.delta())

    @property
    def shape(self) -> Tuple[int, ...]:
        """The shape of the weight it updates: (out_features, in_features), or (out, in, kh, kw) for a conv."""
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    @property
    def conv(self) -> bool:
        return self.down.dim() == 4


def key_error(path: str, key: str, kohya: bool = False) -> DataError:
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return DataError(f"{path}: '{key}' is a diffusers-format text encoder LoRA weight, which is not supported "
                        "(kohya / sd-scripts text encoder LoRAs, lora_te1_* / lora_te2_* / lora_te3_*, are)")
    if kohya:
        return DataError(f"{path}: '{key}' is not a kohya SD3 transformer LoRA weight (expected "
                        "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha); a file cannot mix "
                        "kohya and diffusers keys")
    return DataError(f"{path}: '{key}' is not a transformer LoRA weight (expected "
                    "transformer.<module>.lora_A.weight / .lora_B.weight; DoRA and LoRA biases are not supported)")


def checked_pair(path: str, name: str, down: torch.Tensor, up: torch.Tensor,
                 a: str = "lora_A", b: str = "lora_B") -> Tuple[torch.Tensor, torch.Tensor]:
    """down, up after checking they are one linear LoRA's two finite matrices, or one conv LoRA's two kernels
    (a kh x kw down, a 1x1 up: what peft and sd-scripts put on a Conv2d)."""
    linear = down.dim() == 2 and up.dim() == 2
    conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    if not (linear or conv) or up.shape[1] != down.shape[0]:
        raise DataError(f"{path}: module '{name}' has {a} {tuple(down.shape)} and {b} {tuple(up.shape)}, "
                        "which are not the two matrices of one linear LoRA (nor the kh x kw and 1x1 kernels of "
                        "one conv LoRA)")
    for part, t in ((a, down), (b, up)):
        # Checked here, as folding would blame lora.scale or out.dtype for it.
        if not torch.isfinite(t).all():
            raise DataError(f"{path}: module '{name}' {part} holds non-finite values "
                            "(the LoRA itself is broken: retrain it)")
    return down, up
