"""Stage 2: temporal heads on cached features.

A head is a registry entry with one contract: features [B, T, D] in,
{"verb": [B, n_verbs], "noun": [B, n_nouns]} logits out. Adding one is one file in
this package plus one `@register` - the package imports every module in it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from torch import nn

from ekx import EkxError

REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# modules of this package that are not heads
_NOT_HEADS = {"layers", "train", "metrics", "sweep", "evaluate", "data", "compare"}


def register(name: str):
    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"head {name!r} is already registered")
        REGISTRY[name] = cls
        return cls
    return wrap


def create(name: str, dim: int, num_verbs: int, num_nouns: int, frames: int, **hp) -> nn.Module:
    """Build a head; ``hp`` holds the regularisation knobs (dropout, drop_path)."""
    if name not in REGISTRY:
        raise EkxError(f"unknown head {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](dim=dim, num_verbs=num_verbs, num_nouns=num_nouns, frames=frames, **hp)


for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _NOT_HEADS:
        importlib.import_module(f"{__name__}.{_m.name}")
