"""Dtype names: the ones configs and manifests use, and the ones safetensors headers use."""
import torch

# Storage and precision names every stage accepts (out.dtype, train.precision, merge's out.dtype, ...).
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors header dtype names -> torch dtypes (the shard reader and merge's tensor files).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def storage_name(dtype: torch.dtype) -> str:
    """"bf16" for torch.bfloat16 and so on."""
    return next(k for k, v in STORAGE_DTYPES.items() if v == dtype)
