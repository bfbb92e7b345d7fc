"""``timm:<model>`` (``timm:convnext_tiny``, ``timm:vit_small_patch14_dinov2.lvd142m``): pooled
features (``num_classes=0``); preprocessing from timm's own eval transform
(``resolve_data_config`` + ``create_transform``: resize ``size / crop_pct``, centre crop,
interpolation, mean/std)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone
from ekx.extract.families.base import family, first_line, library, preprocess_of_transform, timm_stages, version


def classifier_keys(pretrained_cfg: dict) -> tuple[str, ...]:
    """The classifier's key prefixes (``head``; ``head``, ``head_dist`` of a distilled
    model): a full checkpoint holds them, the pooled model (``num_classes=0``) does not."""
    names = pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


@family("timm", "timm", "timm", "timm:convnext_tiny", "any timm image model (pooled features)")
def timm_backbone(model: str) -> Backbone:
    timm = library("timm")
    from timm.data import create_transform, resolve_data_config

    def build(pretrained: bool = False) -> nn.Module:
        return timm.create_model(model, pretrained=pretrained, num_classes=0)

    try:
        probe: Any = build()
    except Exception as e:  # an unknown name: timm's own message says so
        raise EkxError(f"--backbone timm:{model}: timm cannot build it ({first_line(e)})") from None
    cfg = resolve_data_config({}, model=probe)
    pre = preprocess_of_transform(create_transform(**cfg), f"timm:{model}")
    tag = (probe.pretrained_cfg or {}).get("tag") or ""

    def pretrained() -> tuple[nn.Module, str]:
        try:
            m = build(pretrained=True)
        except Exception as e:
            raise EkxError(
                f"cannot get timm:{model}'s pretrained weights ({first_line(e)}); "
                "on a machine without internet, copy the Hugging Face cache (~/.cache/huggingface) from one that "
                "has them, or pass --weights FILE (a state dict) or --weights none"
            ) from None
        return m, f"pretrained:timm {model.split('.')[0]}.{tag}" if tag else f"pretrained:timm {model}"

    return Backbone(
        f"timm:{model}",
        build,
        None,
        int(probe.num_features),
        stages=timm_stages,
        family="timm",
        own_preprocess=pre,
        pretrained=pretrained,
        classifier=classifier_keys(probe.pretrained_cfg or {}),
        attrs={"backbone_family": "timm", "backbone_library": version("timm"), "pooling": "timm num_classes=0"},
    )
