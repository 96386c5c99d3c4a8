"""The one map between precision names (flags, configs, logs) and torch dtypes."""

from __future__ import annotations

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                            "fp16": torch.float16}


def precision_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the inverse of PRECISION_DTYPES)."""
    for name, d in PRECISION_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"no precision name for {dtype}")
