"""The dtypes LoRA weights are read and written in (fp32, fp16, bf16) and their names."""

from __future__ import annotations

import logging

import torch

from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: The floating dtypes weights are stored and written in.
FLOATS = tuple(_DTYPES.values())
#: The weights a merge can add ``ΔW`` to (float8 is floating point to torch, but holds FP8 values without their scales).
MERGEABLE = (*FLOATS, torch.float64)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"fp16"`` / ``"bf16"`` / ``"fp32"`` (or ``None``) to a torch dtype."""
    if name is None:
        return None
    key = name.lower().replace("float", "fp").replace("bfloat", "bf").replace("half", "fp16")
    key = {"fp": "fp32", "bfp16": "bf16"}.get(key, key)
    if key not in _DTYPES:
        raise LoraCompressError(f"unknown dtype {name!r}: use one of fp32, fp16, bf16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def common_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype an adapter of tensors in ``dtypes`` is written in by default: one that holds each exactly.

    The widest one, except that fp16 and bf16 (both two bytes) hold different numbers (fp16 more
    mantissa, bf16 more range), so an adapter with both is fp32, which holds both exactly (writing it
    as bf16 moved the fp16 tensors by up to 1.4e-3 at budget 1.0); ``--dtype`` still picks another.
    """
    if not dtypes:
        return torch.float32
    if {torch.float16, torch.bfloat16} <= dtypes:
        log.info("the LoRA weights mix fp16 and bf16: the output is fp32, which holds both exactly (--dtype picks another)")
        return torch.float32
    return max(dtypes, key=lambda d: torch.empty(0, dtype=d).element_size())


def output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """What ``--dtype`` allows (fp32, fp16, bf16): an adapter written in another dtype cannot be read back."""
    if dtype is None or isinstance(dtype, str):
        return parse_dtype(dtype)
    if dtype not in DTYPE_NAMES:
        raise LoraCompressError(f"cannot save LoRA weights as {dtype}: use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


