"""Reading a dtype given by name (``"bfloat16"``, ``"torch.float16"``, ``"fp32"``...), with a clear error,
and the compute dtype of the recurrences (at least float32)."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` itself, or the floating dtype its name names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}. Use one of: {', '.join(DTYPES)} (or a torch.dtype).")
    return DTYPES[name]


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if its dtype is narrower (bf16, fp16: the recurrences run in fp32, as in
    transformers), else unchanged, so a float64 model computes in float64 throughout."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
