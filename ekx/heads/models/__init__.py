"""The head registry. A head maps features [B, T, D] to
{"verb": [B, n_verbs], "noun": [B, n_nouns]} logits. Adding one is one file in this
package plus one `@register`: the package imports every module in it, and holds
nothing but heads and their building blocks (the training machinery lives beside it,
in `ekx.heads`), so there is no list of modules to skip.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from torch import nn

from ekx import EkxError
from ekx.heads.config import HEADS

REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"head {name!r} is already registered")
        REGISTRY[name] = cls
        HEADS.add(name)  # TrainConfig's check accepts it from now on
        return cls

    return wrap


def create(name: str, dim: int, num_verbs: int, num_nouns: int, frames: int, **hp) -> nn.Module:
    """Build a head; ``hp`` holds the regularisation knobs (dropout, drop_path)."""
    if name not in REGISTRY:
        raise EkxError(f"unknown head {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](dim=dim, num_verbs=num_verbs, num_nouns=num_nouns, frames=frames, **hp)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
