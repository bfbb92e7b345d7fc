"""What every family shares: the registry, its library's import, a torchvision eval
transform read as plain `Preprocess` values, and the finetune stages of common shapes."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone, Preprocess, resnet_stages


@dataclass(frozen=True)
class Family:
    prefix: str
    module: str  # the Python module to import
    extra: str  # the ekx extra that installs it
    resolve: Callable[[str], Backbone]
    example: str
    what: str


FAMILIES: dict[str, Family] = {}


def family(prefix: str, module: str, extra: str, example: str, what: str):
    def wrap(fn: Callable[[str], Backbone]) -> Callable[[str], Backbone]:
        if prefix in FAMILIES:
            raise ValueError(f"backbone family {prefix!r} is already registered")
        FAMILIES[prefix] = Family(prefix, module, extra, fn, example, what)
        return fn

    return wrap


def library(prefix: str) -> Any:
    fam = FAMILIES[prefix]
    try:
        return importlib.import_module(fam.module)
    except ImportError:
        raise EkxError(
            f"--backbone {fam.prefix}:...: needs the {fam.module} package: pip install 'ekx[{fam.extra}]'"
        ) from None


def version(module: str) -> str:
    return f"{module} {getattr(importlib.import_module(module), '__version__', 'unknown')}"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"


# steps that only turn a PIL image into a float tensor: ekx's frames are RGB uint8 tensors
# already, and `Preprocess` converts them to float itself
_CONVERSIONS = {"ToTensor", "MaybeToTensor", "MaybeConvertMode", "ConvertImageDtype", "Lambda"}


def preprocess_of_transform(transform: Any, where: str) -> Preprocess:
    """A torchvision eval transform (timm's and OpenCLIP's: Resize, CenterCrop, to-tensor,
    Normalize) as plain values; any step ekx does not reproduce is refused, named. A
    Resize to an exact (h, w) with no crop after it (OpenCLIP's "squash") is a crop of the
    whole resized image."""
    from torchvision import transforms as T

    resize: tuple[int, ...] | None = None
    crop, mean, std, interp, antialias = None, None, None, "bilinear", True
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, T.Resize):
            size = t.size
            resize = (int(size),) if isinstance(size, int) else tuple(int(x) for x in size)
            interp = t.interpolation.value
            antialias = bool(t.antialias) if t.antialias is not None else True
            if t.max_size is not None:
                raise EkxError(f"{where}: a Resize with max_size is not reproduced by ekx")
        elif isinstance(t, T.CenterCrop):
            crop = tuple(int(x) for x in t.size)
        elif isinstance(t, T.Normalize):
            mean, std = tuple(round(float(x), 7) for x in t.mean), tuple(round(float(x), 7) for x in t.std)
        elif type(t).__name__ not in _CONVERSIONS:
            raise EkxError(f"{where}: its preprocessing has a {type(t).__name__} step, which ekx does not reproduce")
    if crop is None and resize is not None and len(resize) == 2:
        crop = resize
    if resize is None or crop is None or mean is None or std is None:
        raise EkxError(f"{where}: its preprocessing lacks a resize, centre crop or normalisation")
    crop2 = (crop[0], crop[-1])
    return Preprocess(resize, crop2, mean, std, interp, antialias)  # type: ignore[arg-type]


class _Params(nn.Module):
    """A model's own top-level parameters (a ViT's class token and position embedding) as a
    module, so `finetune --freeze-blocks` freezes them with the stem."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for n, p in model.named_parameters(recurse=False):
            self.register_parameter(n, p)


def blocks_stages(stem: list[nn.Module], blocks: Any, model: nn.Module) -> list[list[nn.Module]]:
    return [[*stem, _Params(model)], *[[b] for b in blocks]]


def timm_stages(m: Any) -> list[list[nn.Module]]:
    if hasattr(m, "blocks") and hasattr(m, "patch_embed"):  # ViTs, DeiT, DINOv2, EVA
        return blocks_stages([m.patch_embed], m.blocks, m)
    if hasattr(m, "stages") and hasattr(m, "stem"):  # ConvNeXt, RegNet, EfficientFormer...
        return [[m.stem], *[[s] for s in m.stages]]
    if hasattr(m, "layer1"):  # ResNets
        return resnet_stages(m)
    return [[m]]
