"""Backbone families: any model of timm, OpenCLIP or Hugging Face transformers by name.

- ``timm:<model>`` (``timm:convnext_tiny``, ``timm:vit_small_patch14_dinov2.lvd142m``):
  pooled features (``num_classes=0``); preprocessing from timm's own eval transform
  (``resolve_data_config`` + ``create_transform``: resize ``size / crop_pct``, centre crop,
  interpolation, mean/std).
- ``open_clip:<arch>/<pretrained>`` (``open_clip:ViT-B-16/openai``): the image tower
  (``model.visual``: the projected image embedding); preprocessing from OpenCLIP's own.
- ``hf:<repo id or local directory>`` (``hf:MCG-NJU/videomae-base``): Hugging Face video
  transformers, VideoMAE first; a clip model reading ``num_frames`` frames (at the clip
  rate of the sampling rule, as R(2+1)D's clips), mean-pooled token features (the model's
  pooler where it has one); preprocessing from its image processor config.

Each resolves to an ordinary `backbones.Backbone`, so extraction (one model or several in
one decode pass), fine-tuning, predict and live take it unchanged. Its library is an
optional extra, imported on first use of a name (``import ekx.cli`` loads none of them);
a missing one is named with its pip line. Random weights (``--weights none``) need no
download: timm and OpenCLIP build their architectures offline, and ``hf:`` takes a local
directory written by ``save_pretrained``. The cache records family, model, library version,
the weights (pretrained tag or file sha256), the preprocessing and the pooling.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone, Preprocess, resnet_stages

# PIL's resampling numbers (Hugging Face image processors store these) -> torchvision's names
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


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
        FAMILIES[prefix] = Family(prefix, module, extra, fn, example, what)
        return fn

    return wrap


def library(fam: Family) -> Any:
    try:
        return importlib.import_module(fam.module)
    except ImportError:
        raise EkxError(
            f"--backbone {fam.prefix}:...: needs the {fam.module} package: pip install 'ekx[{fam.extra}]'"
        ) from None


@functools.cache
def resolve(name: str) -> Backbone:
    """The Backbone of ``family:model`` (cached: one build of the preprocessing per name)."""
    prefix, _, model = name.partition(":")
    if prefix not in FAMILIES:
        raise EkxError(f"unknown backbone family {prefix!r} in {name!r}; families: {', '.join(FAMILIES)}")
    if not model:
        raise EkxError(f"--backbone {name!r}: name a model after the colon, e.g. {FAMILIES[prefix].example}")
    return FAMILIES[prefix].resolve(model)


def preprocess_of_transform(transform: Any, where: str) -> Preprocess:
    """A torchvision eval transform (timm's and OpenCLIP's: Resize, CenterCrop, to-tensor,
    Normalize) as plain values; any step ekx does not reproduce is refused, named."""
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
        elif type(t).__name__ in ("ToTensor", "MaybeToTensor", "MaybeConvertMode", "ConvertImageDtype") or (
            type(t).__name__ == "Lambda"
        ):
            continue  # ekx's frames are RGB uint8 tensors; Preprocess converts to float itself
        else:
            raise EkxError(f"{where}: its preprocessing has a {type(t).__name__} step, which ekx does not reproduce")
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


def _blocks_stages(stem: list[nn.Module], blocks: Any, model: nn.Module) -> list[list[nn.Module]]:
    return [[*stem, _Params(model)], *[[b] for b in blocks]]


def _timm_stages(m: Any) -> list[list[nn.Module]]:
    if hasattr(m, "blocks") and hasattr(m, "patch_embed"):  # ViTs, DeiT, DINOv2, EVA
        return _blocks_stages([m.patch_embed], m.blocks, m)
    if hasattr(m, "stages") and hasattr(m, "stem"):  # ConvNeXt, RegNet, EfficientFormer...
        return [[m.stem], *[[s] for s in m.stages]]
    if hasattr(m, "layer1"):  # ResNets
        return resnet_stages(m)
    return [[m]]


def _version(module: str) -> str:
    return f"{module} {getattr(importlib.import_module(module), '__version__', 'unknown')}"


# ---------------------------------------------------------------- timm


@family("timm", "timm", "timm", "timm:convnext_tiny", "any timm image model (pooled features)")
def timm_backbone(model: str) -> Backbone:
    timm = library(FAMILIES["timm"])
    from timm.data import create_transform, resolve_data_config

    def build(pretrained: bool = False) -> nn.Module:
        return timm.create_model(model, pretrained=pretrained, num_classes=0)

    try:
        probe: Any = build()
    except Exception as e:  # an unknown name: timm's own message says so
        raise EkxError(f"--backbone timm:{model}: timm cannot build it ({str(e).splitlines()[0][:160]})") from None
    cfg = resolve_data_config({}, model=probe)
    pre = preprocess_of_transform(create_transform(**cfg), f"timm:{model}")
    tag = (probe.pretrained_cfg or {}).get("tag") or ""

    def pretrained() -> tuple[nn.Module, str]:
        try:
            m = build(pretrained=True)
        except Exception as e:
            raise EkxError(
                f"cannot get timm:{model}'s pretrained weights ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "on a machine without internet, copy the Hugging Face cache (~/.cache/huggingface) from one that "
                "has them, or pass --weights FILE (a state dict) or --weights none"
            ) from None
        return m, f"pretrained:timm {model.split('.')[0]}.{tag}" if tag else f"pretrained:timm {model}"

    return Backbone(
        f"timm:{model}",
        build,
        None,
        int(probe.num_features),
        stages=_timm_stages,
        family="timm",
        own_preprocess=pre,
        pretrained=pretrained,
        attrs={"backbone_family": "timm", "backbone_library": _version("timm"), "pooling": "timm num_classes=0"},
    )


# ---------------------------------------------------------------- OpenCLIP


@family("open_clip", "open_clip", "clip", "open_clip:ViT-B-16/openai", "OpenCLIP image towers")
def open_clip_backbone(spec: str) -> Backbone:
    open_clip = library(FAMILIES["open_clip"])
    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise EkxError(f"--backbone open_clip:{spec}: OpenCLIP has no model {arch!r} (open_clip.list_models())")

    def build(pretrained: str | None = None) -> nn.Module:
        import logging

        logging.getLogger().disabled = True  # its "no pretrained weights loaded" warning on every build
        try:
            model = open_clip.create_model(arch, pretrained=pretrained)
        finally:
            logging.getLogger().disabled = False
        return model.visual

    probe: Any = build()
    cfg = getattr(probe, "preprocess_cfg", None) or {}
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    pre = preprocess_of_transform(transform, f"open_clip:{spec}")

    def pretrained() -> tuple[nn.Module, str]:
        if not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:6])
            raise EkxError(f"--weights DEFAULT needs a pretrained tag: open_clip:{arch}/<tag> (tags: {tags})")
        try:
            return build(tag), f"pretrained:open_clip {arch}/{tag}"
        except Exception as e:
            raise EkxError(
                f"cannot get open_clip:{spec}'s weights ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "pass --weights FILE (its checkpoint) or --weights none"
            ) from None

    def stages(m: Any) -> list[list[nn.Module]]:
        if hasattr(m, "transformer") and hasattr(m, "conv1"):
            return _blocks_stages([m.conv1, m.ln_pre], m.transformer.resblocks, m)
        return [[m]]

    return Backbone(
        f"open_clip:{spec}",
        build,
        None,
        int(probe.output_dim),
        stages=stages,
        family="open_clip",
        own_preprocess=pre,
        pretrained=pretrained,
        attrs={
            "backbone_family": "open_clip",
            "backbone_library": _version("open_clip"),
            "pooling": "OpenCLIP image embedding (model.visual, projected)",
        },
    )


# ---------------------------------------------------------------- Hugging Face video transformers


class HFClipModel(nn.Module):
    """A Hugging Face video model as a clip backbone: [B, 3, T, H, W] (ekx's clip layout) ->
    [B, D], the pooler output where the model has one, else the mean of the last tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x.transpose(1, 2))
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(1)


def _hf_preprocess(proc: dict, where: str) -> Preprocess:
    size = proc.get("size", {})
    if isinstance(size, int):
        resize: tuple[int, ...] = (size,)
    elif "shortest_edge" in size:
        resize = (int(size["shortest_edge"]),)
    elif "height" in size:
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise EkxError(f"{where}: image processor size {size!r} is not one ekx reproduces")
    crop = proc.get("crop_size", {}) if proc.get("do_center_crop", True) else {}
    crop2 = (int(crop["height"]), int(crop["width"])) if crop else (resize[0], resize[-1])
    mean = tuple(float(x) for x in proc.get("image_mean", (0.485, 0.456, 0.406)))
    std = tuple(float(x) for x in proc.get("image_std", (0.229, 0.224, 0.225)))
    if not proc.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    interp = PIL_RESAMPLE.get(int(proc.get("resample", 2)), "bilinear")
    return Preprocess(resize, crop2, mean, std, interp, True)  # type: ignore[arg-type]


def _sha256_json(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@family("hf", "transformers", "hf", "hf:MCG-NJU/videomae-base", "Hugging Face video transformers (VideoMAE)")
def hf_backbone(repo: str) -> Backbone:
    transformers = library(FAMILIES["hf"])
    local = Path(repo).expanduser()
    where = f"hf:{repo}"
    try:
        config = transformers.AutoConfig.from_pretrained(str(local) if local.is_dir() else repo)
        if local.is_dir() and (local / "preprocessor_config.json").is_file():
            proc = json.loads((local / "preprocessor_config.json").read_text())
        else:
            proc = transformers.AutoImageProcessor.from_pretrained(repo).to_dict()
    except EkxError:
        raise
    except Exception as e:
        raise EkxError(
            f"--backbone {where}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "without internet, pass a local directory written by save_pretrained (config.json, "
            "preprocessor_config.json, weights)"
        ) from None
    frames = int(getattr(config, "num_frames", 0) or 0)
    if frames < 1:
        raise EkxError(f"--backbone {where}: {type(config).__name__} is not a video model (no num_frames)")
    pre = _hf_preprocess(proc, where)
    model_cls = transformers.AutoModel

    def build() -> nn.Module:
        return HFClipModel(model_cls.from_config(config, attn_implementation="sdpa")).eval()

    def pretrained() -> tuple[nn.Module, str]:
        try:
            m = model_cls.from_pretrained(str(local) if local.is_dir() else repo, attn_implementation="sdpa")
        except Exception as e:
            raise EkxError(
                f"cannot get {where}'s weights ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "pass a local model directory, --weights FILE or --weights none"
            ) from None
        ident = f"pretrained:hf {repo}"
        if local.is_dir():
            files = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
            ident += " " + ",".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}" for f in files)
        return HFClipModel(m), ident

    def stages(m: Any) -> list[list[nn.Module]]:
        inner = m.model
        if hasattr(inner, "embeddings") and hasattr(inner, "encoder"):
            last = getattr(inner, "layernorm", None) or nn.Identity()
            return [[inner.embeddings], *[[b] for b in inner.encoder.layer], [last]]
        return [[m]]

    dim = int(getattr(config, "hidden_size", 0))
    attrs = {
        "backbone_family": "hf",
        "backbone_library": _version("transformers"),
        "pooling": "pooler output, else mean of the last hidden states",
        "hf_model_type": str(getattr(config, "model_type", "")),
    }
    if local.is_dir():
        attrs["hf_config_sha256"] = _sha256_json(local / "config.json")
    return Backbone(
        where, build, None, dim, clip_len=frames, stages=stages, family="hf", own_preprocess=pre,
        pretrained=pretrained, attrs=attrs,
    )  # fmt: skip
