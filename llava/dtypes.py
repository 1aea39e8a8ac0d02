"""Torch dtypes by the names users give them on command lines and in configs."""

from __future__ import annotations

import torch

NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
         "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    """None and torch dtypes as given; a name ("float16", "bf16", ...) -> its torch dtype (KeyError otherwise)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return NAMES[str(dtype)]
