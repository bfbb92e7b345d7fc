"""Device, precision, autocast and seeding: what both stages (and the slow path) share.

Stage 2 imports this instead of stage 1's pipeline, so training a head never loads the
video decoder.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch

from ekx import EkxError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EkxError(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel reports them (Linux); empty elsewhere."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix math, or None, from the kernel's flags (no probe run,
    nothing to time, the same answer on every node of a partition): AMX-BF16 (Intel
    Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake), where
    oneDNN runs bf16 convolutions and matmuls natively. ResNet-50, batch 16, channels_last,
    bf16 autocast vs fp32: 53.6 vs 21.3 img/s (2.5x) on a 2-core AMX Xeon; 44-49 vs 19-20
    (2.3x) on a 2-core AVX512-BF16 AMD EPYC (Zen 5, no AMX). On CPUs with neither (AVX2
    only) bf16 is emulated and was 6x slower than fp32."""
    flags = cpu_flags()
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name not in ("fp32", "bf16", "fp16"):
            raise EkxError(f"--precision {name}: use auto, fp32, bf16 or fp16")
        return name
    # GPUs: fp16 autocast keeps features within cosine 0.999 of fp32. CPUs: bf16 where the
    # CPU has bf16 matrix units (2.3-2.5x there; features within cosine 0.995 of fp32, inside the
    # input's own noise floor: a near-lossless re-encode moves them to 0.983-0.986), else fp32
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_bf16_units() else "fp32"


def precision_note(name: str, device: torch.device, chosen: str) -> str | None:
    """The one line saying why ``--precision auto`` chose bf16 on a CPU (None otherwise)."""
    if name == "auto" and device.type == "cpu" and chosen == "bf16":
        return (
            f"--precision auto: bf16 on this CPU ({cpu_bf16_units()}: ~2.3-2.5x fp32's speed, features within "
            "cosine 0.995 of fp32); --precision fp32 for fp32"
        )
    return None


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """torch (CPU and every GPU), numpy's global generator and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
