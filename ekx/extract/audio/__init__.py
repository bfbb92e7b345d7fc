"""Audio in stage 1: features of each video's own sound track, stored as frames' features
are (per-segment caches and ``--dense`` stores, the same identity, checksums, resume, shards
and merge), so every stage-2 command reads them unchanged.

- `decode`: the sound of a video file (PyAV, one pass, resampled to the model's rate, mono)
  cut into the windows of a model's input, one centred on each feature's time.
- `frontend`: Auditory SlowFast's log-mel spectrogram (their librosa recipe, in torch).
- `slowfast`: the Auditory SlowFast network, their module names (their checkpoints load).
- `hf`: Hugging Face sound models (AST, CLAP, wav2vec2/HuBERT) with their own extractor.
- `run`: the extraction loop, the BatchNorm calibration of random weights, the identity.

A feature's time is the centre of its window: per segment, the centres of K equal parts of
the segment (as for frames); in a dense store, the store's times.
"""

from __future__ import annotations

from collections.abc import Callable

from ekx.extract.backbone_spec import AudioSpec, Backbone


def auditory_slowfast() -> Backbone:
    """TIM's Auditory SlowFast: 24 kHz, windows of 0.999 s (their CLIP_SECS 0.999: the
    23,976 samples of their clip less the one their end index drops, 23,975: 200 STFT frames,
    their NUM_FRAMES), log-mel front end (`frontend.LogMel`), 2304-d features."""
    from ekx.extract.audio.frontend import LogMel
    from ekx.extract.audio.slowfast import DIM, AuditorySlowFast

    fe = LogMel()
    samples = round(fe.rate * 0.999) - 1
    spec = AudioSpec(
        fe.rate,
        samples,
        fe,
        f"log-mel, {fe.mels} HTK bins, {fe.window_ms:g} ms Hann / {fe.hop_ms:g} ms hop, n_fft {fe.n_fft}, "
        f"{fe.frames(samples)} frames",
        fe.attrs(),
    )
    return Backbone(
        "audio:auditory_slowfast",
        AuditorySlowFast,
        None,
        DIM,
        stages=lambda m: m.stages(),
        family="audio",
        pretrained=_no_download,
        attrs={
            "backbone_family": "audio",
            "pooling": "each pathway's last stage averaged over time and frequency, slow + fast (TIM's 2304)",
            "architecture": "Auditory SlowFast R50 (alpha 4, beta_inv 8, fusion 2 / kernel 7), EPIC-Sounds/TIM",
        },
        classifier=("head",),  # their classifier, head.projection
        audio=spec,
    )


def _no_download():
    from ekx import EkxError

    raise EkxError(
        "audio:auditory_slowfast has no weights ekx can download: pass --weights FILE, the authors' checkpoint "
        "(TIM's asf_epicsounds.pyth, or one trained with the EPIC-Sounds code at CLIP_SECS 0.999 / NUM_FRAMES "
        "200), or --weights none for random features"
    )


MODELS: dict[str, Callable[[], Backbone]] = {"auditory_slowfast": auditory_slowfast}
