"""What a backbone is, as plain values: its preprocessing (`Preprocess`) and its registry
entry (`Backbone`). Shared by the built-in registry (`ekx.extract.backbones`) and the
families (`ekx.extract.families`), which both build these; neither imports the other's
module for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.functional as F
from torch import nn

from ekx import EkxError


@dataclass(frozen=True)
class Preprocess:
    """The weights' own preprocessing, as plain values (written into the cache attributes)."""

    resize_size: tuple[int, ...]  # one value: shorter side; two: exact (h, w)
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    antialias: bool

    def decode_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the decoder should output so the resize step is already done."""
        if len(self.resize_size) == 2:
            return self.resize_size[0], self.resize_size[1]
        s = self.resize_size[0]
        # torchvision's rule for a single size: the shorter side becomes s
        if height <= width:
            return s, int(s * width / height)
        return int(s * height / width), s

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> the resize size (torchvision's resize returns a tensor already
        at that size unchanged)."""
        return F.resize(
            frames,
            list(self.resize_size),
            interpolation=F.InterpolationMode(self.interpolation),
            antialias=self.antialias,
        )

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised float [N, 3, crop, crop]: the same ops, in the
        same order, as torchvision's ImageClassification / VideoClassification presets
        (`torchvision.transforms.functional`, theirs: v2's uint8 resize differs by 1 LSB,
        which moves random-weight features to 0.994 cosine)."""
        frames = self.resize(frames)  # returns frames a decoding process already resized as they are
        frames = F.center_crop(frames, list(self.crop_size))
        frames = F.convert_image_dtype(frames, torch.float32)
        return F.normalize(frames, mean=list(self.mean), std=list(self.std))

    def to_attrs(self) -> dict:
        return {f"preprocess_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    sides = list(t.crop_size)
    crop = (sides[0], sides[-1])
    return Preprocess(
        tuple(t.resize_size),
        crop,
        tuple(t.mean),
        tuple(t.std),
        t.interpolation.value,
        bool(getattr(t, "antialias", False)),
    )


@dataclass(frozen=True)
class AudioSpec:
    """What an audio backbone reads (`ekx.extract.audio`): mono sound at ``rate`` Hz, windows
    of ``samples`` samples, each centred on its feature's time, through ``frontend``
    (waveforms float32 [B, samples] -> the model's input on a device: its own front end)."""

    rate: int
    samples: int
    frontend: Callable[[torch.Tensor, torch.device], Any]
    describe: str  # the front end in words (`ekx backbones`)
    attrs: dict[str, Any]  # its parameters, written into the cache (identity)

    @property
    def window(self) -> float:
        return self.samples / self.rate


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module]  # random init, classifier removed
    weights: Any  # torchvision WeightsEnum class (mypy cannot see its members)
    dim: int
    clip_len: int = 1  # 1: per-frame 2D model; >1: consecutive frames per clip (3D model)
    # the network from the input on: [stem, stage 1, stage 2, ...]; `finetune --freeze-blocks N`
    # freezes the stem and the first N stages
    stages: Callable[[Any], list[list[nn.Module]]] = lambda m: [[m]]
    weights_name: str = "DEFAULT"  # the weights whose own transforms `preprocess` follows
    # a family's model (`ekx.extract.families`): its library's preprocessing, its pretrained
    # weights (-> model, weights identity), and the identity fields it adds to a cache
    family: str = "torchvision"
    own_preprocess: Preprocess | None = None
    pretrained: Callable[[], tuple[nn.Module, str]] | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # key prefixes of the classifier this headless model removed (``fc``, timm's ``head``): a
    # full checkpoint's only keys that a weights file may hold beyond the model's own
    classifier: tuple[str, ...] = ()
    audio: AudioSpec | None = None  # a model of sound (`ekx.extract.audio`): no frames, no Preprocess

    @property
    def preprocess(self) -> Preprocess:
        if self.audio is not None:
            raise EkxError(f"{self.name} reads the videos' sound, not their frames")
        if self.own_preprocess is not None:
            return self.own_preprocess
        enum = self.weights.DEFAULT if self.weights_name == "DEFAULT" else self.weights[self.weights_name]
        return _preprocess_of(enum)


def resnet_stages(m: Any) -> list[list[nn.Module]]:
    stem = [m.stem] if hasattr(m, "stem") else [m.conv1, m.bn1]  # video ResNets have a stem block
    return [stem, [m.layer1], [m.layer2], [m.layer3], [m.layer4]]
