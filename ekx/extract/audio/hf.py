"""``hf:<repo or local dir>`` sound models: AST, CLAP's audio tower, wav2vec2 / HuBERT-style
encoders, each fed by the library's own feature extractor (``AutoFeatureExtractor``): the
front end IS that extractor, called on the batch of a segment's windows (so ekx computes
exactly what the model's own processor computes for those waveforms).

The window each feature reads is the model's own input length where it has one (AST:
``max_length`` frames of its 25 ms / 10 ms filter bank, 10.255 s at 16 kHz; CLAP: its
``max_length_s``, 10 s); the encoders of raw waveforms (wav2vec2, HuBERT, WavLM) take any
length, and read 1 s, as Auditory SlowFast does in TIM.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ekx import EkxError
from ekx.extract.backbone_spec import AudioSpec, Backbone


@dataclass(frozen=True)
class Kind:
    model_class: str  # transformers' class building the part of the model that reads sound
    samples: Callable[[Any], int]  # the window in samples, from the feature extractor
    pooling: str  # "embeds": the projected audio embedding; else pooler output / token mean
    sub_config: str = ""  # the config part its class takes (CLAP: audio_config)


def _ast_samples(fe: Any) -> int:
    shift, frame = round(fe.sampling_rate * 0.010), round(fe.sampling_rate * 0.025)
    return (int(fe.max_length) - 1) * shift + frame


_ENCODER = Kind("AutoModel", lambda fe: int(fe.sampling_rate), "mean of the last hidden states")
KINDS: dict[str, Kind] = {
    "audio-spectrogram-transformer": Kind("AutoModel", _ast_samples, "pooler output"),
    "clap": Kind("ClapAudioModelWithProjection", lambda fe: int(fe.nb_max_samples), "embeds", "audio_config"),
    **{t: _ENCODER for t in ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")},
}


class HFAudioModel(nn.Module):
    """A Hugging Face sound model as an ekx backbone: its extractor's tensors -> [B, D]."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**inputs)
        if self.pooling == "embeds":
            return out.audio_embeds
        pooled = getattr(out, "pooler_output", None) if self.pooling == "pooler output" else None
        return pooled if pooled is not None else out.last_hidden_state.mean(1)


def _settings(fe: Any) -> str:
    """The extractor's settings as one line (arrays it derives - mel filters - left out)."""
    plain = {k: v for k, v in fe.to_dict().items() if not isinstance(v, np.ndarray)}
    return json.dumps(plain, sort_keys=True, default=str)


def hf_audio_backbone(
    transformers: Any, source: str, config: Any, where: str, attrs: dict, ident: Callable[[], str]
) -> Backbone:
    """The Backbone of a Hugging Face sound model (``config`` read from ``source``; ``ident``:
    its pretrained weights' identity)."""
    kind = KINDS.get(str(getattr(config, "model_type", "")))
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise EkxError(
            f"--backbone {where}: {type(config).__name__} is neither a video model (no num_frames) nor a "
            f"sound model ekx knows (model types: {known})"
        )
    try:
        fe = transformers.AutoFeatureExtractor.from_pretrained(source)
    except Exception as e:
        raise EkxError(
            f"--backbone {where}: cannot read its feature extractor ({type(e).__name__}); a local directory "
            "needs preprocessor_config.json (save_pretrained of the model's feature extractor)"
        ) from None
    cls = getattr(transformers, kind.model_class)
    cfg = getattr(config, kind.sub_config) if kind.sub_config else config
    rate = int(fe.sampling_rate)

    def frontend(wave: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        batch = fe(list(wave.numpy()), sampling_rate=rate, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    def build() -> nn.Module:
        make = getattr(cls, "from_config", None) or cls._from_config  # an Auto class's, or a model class's
        return HFAudioModel(make(cfg), kind.pooling).eval()

    def pretrained() -> tuple[nn.Module, str]:
        quiet = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # CLAP's text tower, left unread, is not news
        try:
            m = cls.from_pretrained(source)
        except Exception as e:
            raise EkxError(
                f"cannot get {where}'s weights ({type(e).__name__}); pass a local model directory, --weights FILE "
                "or --weights none"
            ) from None
        finally:
            transformers.logging.set_verbosity(quiet)
        return HFAudioModel(m, kind.pooling), ident()

    probe = build()
    with torch.no_grad():  # the width from one forward pass on a short input (CLAP projects, AST pools)
        dim = int(probe(frontend(torch.zeros(1, kind.samples(fe)), torch.device("cpu"))).shape[-1])
    samples = kind.samples(fe)
    spec = AudioSpec(
        rate,
        samples,
        frontend,
        f"{type(fe).__name__} (the library's own), {samples / rate:g} s windows at {rate} Hz",
        {
            "audio_frontend": f"transformers {type(fe).__name__}",
            "audio_frontend_settings": _settings(fe),
        },
    )
    out_attrs = {**attrs, "pooling": kind.pooling, "hf_feature_extractor": type(fe).__name__}
    out_attrs.pop("hf_processor", None)
    return Backbone(
        where, build, None, dim, family="hf", pretrained=pretrained, attrs=out_attrs, audio=spec,
        stages=lambda m: [[m]],
    )  # fmt: skip
