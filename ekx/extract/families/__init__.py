"""Backbone families: any model of timm, OpenCLIP or Hugging Face transformers by name.

- ``timm:<model>``: pooled features, timm's own eval transform (`timm_family`).
- ``open_clip:<arch>/<tag>``: the image tower, built and preprocessed as OpenCLIP does for
  that tag (its mean/std, interpolation, resize mode and QuickGELU; `open_clip_family`).
- ``hf:<repo id or local directory>``: Hugging Face video transformers, preprocessed as the
  library's own image processor class does (`hf_family`); Hugging Face sound models (AST,
  CLAP's audio tower, wav2vec2, HuBERT) with the library's own feature extractor.
- ``audio:<model>``: models of the videos' sound built here (`audio_family`, `ekx.extract.audio`).

Each resolves to an ordinary `backbones.Backbone`, so extraction (one model or several in
one decode pass), fine-tuning, predict and live take it unchanged. Its library is an
optional extra, imported on first use of a name (``import ekx.cli`` loads none of them);
a missing one is named with its pip line. Random weights (``--weights none``) need no
download: timm and OpenCLIP build their architectures offline, and ``hf:`` takes a local
directory written by ``save_pretrained``. The cache records family, model, library version,
the weights (pretrained tag or file sha256), the preprocessing, the pooling and what else
the build depends on (OpenCLIP's QuickGELU and resize mode, the processor class).
"""

from __future__ import annotations

import functools

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone
from ekx.extract.families import audio_family, hf_family, open_clip_family, timm_family  # noqa: F401  (they register)
from ekx.extract.families.base import FAMILIES, Family, preprocess_of_transform

__all__ = ["FAMILIES", "Family", "preprocess_of_transform", "resolve"]


@functools.cache
def resolve(name: str) -> Backbone:
    """The Backbone of ``family:model`` (cached: one build of the preprocessing per name)."""
    prefix, _, model = name.partition(":")
    if prefix not in FAMILIES:
        raise EkxError(f"unknown backbone family {prefix!r} in {name!r}; families: {', '.join(FAMILIES)}")
    if not model:
        raise EkxError(f"--backbone {name!r}: name a model after the colon, e.g. {FAMILIES[prefix].example}")
    return FAMILIES[prefix].resolve(model)
