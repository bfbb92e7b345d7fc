"""Device, precision, autocast and seeding: what both stages (and the slow path) share.

Stage 2 imports this instead of stage 1's pipeline, so training a head never loads the
video decoder.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ekx import EkxError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EkxError(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name not in ("fp32", "bf16", "fp16"):
            raise EkxError(f"--precision {name}: use auto, fp32, bf16 or fp16")
        return name
    # fp16 autocast keeps features within cosine 0.999 of fp32; bf16's 8-bit mantissa does
    # not (0.995 measured in bench/extract_bench.py), so bf16 is opt-in only.
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """torch (CPU and every GPU), numpy's global generator and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
