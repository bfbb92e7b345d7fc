"""``open_clip:<arch>/<tag>`` (``open_clip:ViT-B-16/openai``): the image tower (``model.visual``:
the projected image embedding), built and preprocessed as OpenCLIP builds it for that tag.

The tag is more than the weights: its pretrained config sets the preprocessing (mean/std,
interpolation, resize mode: LAION's ViT-L-14 tags normalise with 0.5/0.5, not OpenAI's
statistics) and whether the network runs QuickGELU (OpenAI's weights were trained with it).
ekx builds ``create_model(arch, force_quick_gelu=<the tag's quick_gelu>)`` with the tag's
preprocessing, whatever the weights' source (the tag, ``--weights FILE`` or ``none``):
OpenCLIP's ``create_model(arch, pretrained=tag)`` merges the tag's preprocessing itself but
only warns about its quick_gelu ("QuickGELU mismatch"), so ekx passes it, as that warning
asks and as the arch's ``-quickgelu`` twin does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone
from ekx.extract.families.base import (
    blocks_stages,
    family,
    first_line,
    library,
    preprocess_of_transform,
    timm_stages,
    version,
)


def tag_settings(open_clip: Any, arch: str, tag: str, where: str) -> tuple[bool, dict]:
    """(quick_gelu, preprocessing overrides) of ``arch/tag``: the untagged arch's own
    settings when there is no tag; an unknown tag is refused, naming the known ones."""
    if not tag:
        return False, {}
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise EkxError(f"--backbone {where}: OpenCLIP has no pretrained tag {tag!r} for {arch} (its tags: {tags})")
    # the size stays the tower's own: create_model sets it from the built model after the merge
    pre = {k: v for k, v in cfg.items() if k in ("mean", "std", "interpolation", "resize_mode", "fill_color")}
    return bool(cfg.get("quick_gelu", False)), pre


def _stages(m: Any) -> list[list[nn.Module]]:
    if hasattr(m, "transformer") and hasattr(m, "conv1"):  # OpenCLIP's own ViT
        return blocks_stages([m.conv1, m.ln_pre], m.transformer.resblocks, m)
    if hasattr(m, "trunk"):  # a timm tower (SigLIP, ConvNeXt): the timm model, then the projection
        return [*timm_stages(m.trunk), [m.head]]
    return [[m]]


def _output_dim(probe: nn.Module, crop: tuple[int, int]) -> int:
    """The tower's embedding width, from a forward pass on the meta device (no compute): a
    timm tower has no ``output_dim`` (its projection may be none: then the trunk's width)."""
    try:
        return int(probe(torch.empty(1, 3, *crop, device="meta")).shape[-1])
    except Exception:
        return int(probe.output_dim)  # type: ignore[arg-type]


@family("open_clip", "open_clip", "clip", "open_clip:ViT-B-16/openai", "OpenCLIP image towers")
def open_clip_backbone(spec: str) -> Backbone:
    open_clip = library("open_clip")
    where = f"open_clip:{spec}"
    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise EkxError(f"--backbone {where}: OpenCLIP has no model {arch!r} (open_clip.list_models())")
    quick_gelu, tag_pre = tag_settings(open_clip, arch, tag, where)
    # only the image tower is used: a Hugging Face text tower's own weights are not fetched
    # (`pretrained_hf`: OpenCLIP 2's name, which 3 still takes for its `pretrained_text`)
    kwargs = dict(force_quick_gelu=quick_gelu, force_preprocess_cfg=tag_pre, pretrained_hf=False)

    def build(pretrained: str | None = None) -> nn.Module:
        # on the ambient device: under `torch.device("meta")` a shell with no memory (create_model
        # would move it to the CPU otherwise, which a meta tensor cannot be copied to)
        device = torch.get_default_device()
        logging.getLogger().disabled = True  # its "no pretrained weights loaded" warning on every build
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, device=device, **kwargs)
        finally:
            logging.getLogger().disabled = False
        return model.visual

    try:
        with torch.device("meta"):  # shapes and configs only: nothing allocated, nothing initialised
            probe: Any = build()
    except EkxError:
        raise
    except Exception as e:
        raise EkxError(f"--backbone {where}: OpenCLIP cannot build it ({first_line(e)})") from None
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**probe.preprocess_cfg)
    pre = preprocess_of_transform(image_transform_v2(cfg, is_train=False), where)

    def pretrained() -> tuple[nn.Module, str]:
        if not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:6])
            raise EkxError(f"--weights DEFAULT needs a pretrained tag: open_clip:{arch}/<tag> (tags: {tags})")
        try:
            return build(tag), f"pretrained:open_clip {arch}/{tag}"
        except Exception as e:
            raise EkxError(
                f"cannot get {where}'s weights ({first_line(e)}); "
                "pass --weights FILE (its checkpoint) or --weights none"
            ) from None

    return Backbone(
        where,
        build,
        None,
        _output_dim(probe, pre.crop_size),
        stages=_stages,
        family="open_clip",
        own_preprocess=pre,
        pretrained=pretrained,
        attrs={
            "backbone_family": "open_clip",
            "backbone_library": version("open_clip"),
            "pooling": "OpenCLIP image embedding (model.visual, projected)",
            # what the tag decides besides the preprocessing_* values (the identity's words)
            "open_clip_quick_gelu": str(quick_gelu or bool(open_clip.get_model_config(arch).get("quick_gelu"))).lower(),
            "open_clip_resize_mode": str(cfg.resize_mode),
        },
    )
