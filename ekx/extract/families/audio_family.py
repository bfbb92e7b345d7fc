"""``audio:<model>`` (``audio:auditory_slowfast``): models of the videos' own sound track,
built here (`ekx.extract.audio`), each with the front end of its weights' recipe. Sound
models from Hugging Face (AST, CLAP's audio tower, wav2vec2, HuBERT) are ``hf:`` names: the
``hf`` family tells a sound model from a video model by its feature extractor."""

from __future__ import annotations

from ekx import EkxError
from ekx.extract.backbone_spec import Backbone
from ekx.extract.families.base import family


@family("audio", "torch", "", "audio:auditory_slowfast", "models of the videos' sound (built in)")
def audio_backbone(model: str) -> Backbone:
    from ekx.extract.audio import MODELS

    if model not in MODELS:
        raise EkxError(f"--backbone audio:{model}: no such audio model; audio models: {', '.join(sorted(MODELS))}")
    return MODELS[model]()
