"""The one dtype table: canonical names, their aliases and torch dtypes (model compute and storage)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[DtypeName, ...] = get_args(DtypeName)
TORCH_DTYPES: dict[DtypeName, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALIASES: dict[str, DtypeName] = {
    **{n: n for n in DTYPE_NAMES},
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def dtype_name(dtype: str | torch.dtype) -> DtypeName:
    """Canonical name of ``dtype`` (a name, an alias such as ``bf16``, or a torch dtype); else ``ValueError``."""
    if isinstance(dtype, torch.dtype):
        for name, t in TORCH_DTYPES.items():
            if t == dtype:
                return name
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPE_NAMES)}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(ALIASES))}")
    return ALIASES[key]


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name, an alias or a torch dtype."""
    return TORCH_DTYPES[dtype_name(dtype)]
