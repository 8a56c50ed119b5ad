"""Reading a dtype given by name (``"bfloat16"``, ``"torch.float16"``, ``"fp32"``...), with a clear error."""

from __future__ import annotations

import torch

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
