"""``hf:<repo id or local directory>`` (``hf:MCG-NJU/videomae-base``): Hugging Face video
transformers, VideoMAE first; a clip model reading ``num_frames`` frames (at the clip rate of
the sampling rule, as R(2+1)D's clips), mean-pooled token features (the model's pooler where
it has one). The preprocessing is what the library's own image processor class runs
(``AutoImageProcessor``): the values its config file holds over that class's own defaults
(VideoMAE's mean and std are 0.5 when the file names none)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone, Preprocess
from ekx.extract.families.base import family, first_line, library, version

# PIL's resampling numbers (what Hugging Face processors store) -> the tensor resize that
# transformers' own torchvision backend runs for them (PIL's nearest is torch's nearest-exact)
RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
# the ones torchvision resizes only as PIL images (box, hamming) or only on the CPU (lanczos):
# ekx resizes tensors on the model's device
NOT_ON_TENSORS = {1: "lanczos", 4: "box", 5: "hamming"}


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


def hf_preprocess(proc: dict, where: str) -> Preprocess:
    """An image processor's settings (``processor.to_dict()``: its file over its class's
    defaults) as ekx's tensor steps; a setting ekx does not reproduce is refused, named."""

    def refuse(what: str) -> EkxError:
        return EkxError(f"{where}: its image processor {what}, which ekx does not reproduce")

    if not proc.get("do_resize", True):
        raise refuse("does not resize (do_resize false)")
    size = proc.get("size") or {}
    size = {"shortest_edge": size} if isinstance(size, int) else {k: v for k, v in size.items() if v is not None}
    if set(size) == {"shortest_edge"}:
        resize: tuple[int, ...] = (int(size["shortest_edge"]),)
    elif set(size) == {"height", "width"}:
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise refuse(f"resizes to {size!r}")
    crop = {k: v for k, v in (proc.get("crop_size") or {}).items() if v is not None}
    if proc.get("do_center_crop", bool(crop)):
        crop2 = (int(crop["height"]), int(crop["width"]))
    elif len(resize) == 2:
        crop2 = (resize[0], resize[1])
    else:
        raise refuse("keeps the video's aspect ratio (shortest_edge without a centre crop)")
    if not proc.get("do_rescale", True) or abs(float(proc.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise refuse(f"rescales by {proc.get('rescale_factor') if proc.get('do_rescale', True) else 'nothing'}")
    for flag in ("offset", "do_pad"):  # ViViT's shift to [-1, 1]; padding to a size
        if proc.get(flag):
            raise refuse(f"sets {flag}")
    code = int(proc.get("resample", 2))
    if code not in RESAMPLE:
        name = NOT_ON_TENSORS.get(code, "unknown")
        raise EkxError(
            f"{where}: its image processor resamples with PIL code {code} ({name}): ekx resizes tensors on the "
            "model's device, where torchvision has only nearest, bilinear and bicubic; save the processor with "
            "resample 2 (bilinear) or 3 (bicubic) if that is what the model wants"
        )
    if proc.get("do_normalize", True):
        if proc.get("image_mean") is None or proc.get("image_std") is None:
            raise refuse("normalises with no image_mean/image_std")
        mean = tuple(float(x) for x in proc["image_mean"])
        std = tuple(float(x) for x in proc["image_std"])
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(resize, crop2, mean, std, RESAMPLE[code], True)  # type: ignore[arg-type]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@family("hf", "transformers", "hf", "hf:MCG-NJU/videomae-base", "Hugging Face video transformers (VideoMAE)")
def hf_backbone(repo: str) -> Backbone:
    transformers = library("hf")
    local = Path(repo).expanduser()
    source = str(local) if local.is_dir() else repo
    where = f"hf:{repo}"
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        frames = int(getattr(config, "num_frames", 0) or 0)
        # a model without frames may be one of sound (AST, CLAP, wav2vec2): its feature extractor then
        processor: Any = transformers.AutoImageProcessor.from_pretrained(source) if frames > 0 else None
    except Exception as e:
        raise EkxError(
            f"--backbone {where}: cannot read its config or image processor ({first_line(e)}); "
            "without internet, pass a local directory written by save_pretrained (config.json, "
            "preprocessor_config.json, weights)"
        ) from None

    def ident() -> str:  # the pretrained weights' identity (hashed only when they are loaded)
        files = (sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))) if local.is_dir() else []
        hashes = ",".join(f"{f.name}:{_sha256(f)}" for f in files)
        return f"pretrained:hf {repo}" + (f" {hashes}" if files else "")

    if frames < 1:
        from ekx.extract.audio.hf import hf_audio_backbone

        attrs = {"backbone_family": "hf", "backbone_library": version("transformers"),
                 "hf_model_type": str(getattr(config, "model_type", ""))}  # fmt: skip
        if local.is_dir():
            attrs["hf_config_sha256"] = _sha256(local / "config.json")
        return hf_audio_backbone(transformers, source, config, where, attrs, ident)
    pre = hf_preprocess(processor.to_dict(), where)
    model_cls = transformers.AutoModel

    def build() -> nn.Module:
        return HFClipModel(model_cls.from_config(config, attn_implementation="sdpa")).eval()

    def pretrained() -> tuple[nn.Module, str]:
        try:
            m = model_cls.from_pretrained(source, attn_implementation="sdpa")
        except Exception as e:
            raise EkxError(
                f"cannot get {where}'s weights ({first_line(e)}); pass a local model directory, --weights FILE "
                "or --weights none"
            ) from None
        return HFClipModel(m), ident()

    def stages(m: Any) -> list[list[nn.Module]]:
        inner = m.model
        if hasattr(inner, "embeddings") and hasattr(inner, "encoder"):
            last = getattr(inner, "layernorm", None) or nn.Identity()
            return [[inner.embeddings], *[[b] for b in inner.encoder.layer], [last]]
        return [[m]]

    attrs = {
        "backbone_family": "hf",
        "backbone_library": version("transformers"),
        "pooling": "pooler output, else mean of the last hidden states",
        "hf_model_type": str(getattr(config, "model_type", "")),
        "hf_processor": type(processor).__name__,  # whose defaults fill what its file leaves out
    }
    if local.is_dir():
        attrs["hf_config_sha256"] = _sha256(local / "config.json")
    return Backbone(
        where, build, None, int(getattr(config, "hidden_size", 0)), clip_len=frames, stages=stages, family="hf",
        own_preprocess=pre, pretrained=pretrained, attrs=attrs,
    )  # fmt: skip
