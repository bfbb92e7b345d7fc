"""ExtractConfig: the settings of a stage-1 run, each with what it admits, and the names of
the backbone and frame-source registries. Torch-free, so the CLI checks an extraction's
arguments before the pipeline (torch, the decoders) loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekx import EkxError
from ekx.options import Names, opt

# the registries' names (ekx.extract.backbones, ekx.extract.sources), torch-free for the CLI;
# a test keeps them equal. Backbone names include families (`timm:<model>`, see
# ekx.extract.families): the part before the colon is what is checked here.
BACKBONES = Names(
    "backbone", ("resnet50", "efficientnet_b3", "r2plus1d_18"), families=("timm", "open_clip", "hf", "audio")
)
SOURCES = Names("frame source", ("auto", "decord", "torchcodec", "frames", "pyav"))
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIZES = ("decoder", "torchvision")
DEVICE: dict[str, Any] = {"pattern": r"auto|cpu|cuda(:\d+)?", "shown": "auto, cpu or cuda[:N]"}
DECODE_DEVICE: dict[str, Any] = {"pattern": r"cpu|cuda(:\d+)?", "shown": "cpu or cuda[:N]"}


@dataclass
class ExtractConfig:
    backbone: str = opt("resnet50", "backbones, separated by commas", choices=BACKBONES, several=True)
    split: str = opt("train", "train, validation, test, or an annotation CSV")
    weights: str = opt("DEFAULT", "DEFAULT, a torchvision weights name, a state-dict path, or none")
    frames: int = opt(16, "frames K sampled per segment (with --dense: positions per stored row)", ge=1)
    views: int = opt(1, "views per segment: view 0 clean, the others augmented", ge=1)
    # None: 16 on CPU (cache-friendly there), 64 on a GPU
    batch_size: int | None = opt(None, "backbone batch size in images (clips for 3D)", ge=1)
    workers: int = opt(2, "decoding worker processes (0: decode in this process)", ge=0)
    device: str = opt("auto", "device the backbone runs on", **DEVICE)
    precision: str = opt("auto", "autocast precision", choices=PRECISIONS)
    limit: int | None = opt(None, "only the first N segments", ge=1)
    shard: tuple[int, int] | None = None  # (index, count), index in 0..count-1 (parse_shard checks it)
    seed: int = opt(0, "seed of random weights (--weights none) and augmented views", ge=0)
    calibration_segments: int = opt(8, "segments calibrating BatchNorm of random weights", ge=1)
    recalibrate: bool = False  # an existing cache whose BatchNorm calibration differs is redone, not refused
    out: Path | None = None
    # frame source (ekx.extract.sources): auto = the videos where present, else the RGB frames
    source: str = opt("auto", "frame source", choices=SOURCES)
    decode_device: str = opt("cpu", "device decoding runs on", **DECODE_DEVICE)
    # decoder: the source's scaler resizes at decode (fast; features ~0.98 cosine to torchvision's
    # on random weights); torchvision: full-size frames, the weights' own resize (exact, slower)
    resize: str = opt("decoder", "where frames are resized", choices=RESIZES)
    # seconds without a decoded segment before a video's decoder is killed (0: no watchdog)
    decode_timeout: float = opt(600.0, "decoder watchdog, seconds", ge=0)
    # a dense store (ekx.cache.dense): features at fixed times over each video, for any annotation
    dense: str = opt("", "dense store: RATE positions per second (e.g. 4) or every:N frames; '' = per segment")
    dense_span: str = opt(
        "video",
        "dense store over whole videos, or the split's segments +- --dense-margin",
        choices=("video", "annotated"),
    )
    dense_margin: float = opt(2.0, "seconds kept around each segment with --dense-span annotated", ge=0)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise EkxError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I counts from 0)") from None
    if not 0 <= i < n:
        raise EkxError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def check_dense_rate(rate, lengths: dict[str, tuple[float, float]]) -> None:
    """``--dense`` (a `cache.dense.Rate`) against each video's (duration, fps) from its header,
    before anything is planned: a rate above a video's frame rate would store repeated frames
    (and at 1e6/s plan millions of positions before any other check), one too low for any
    position leaves the video out of the store."""
    from ekx.cache.dense import grid_count

    for vid, (_, fps) in sorted(lengths.items(), key=lambda kv: kv[1][1]):
        if rate.per_second is not None and rate.per_second > fps * (1 + 1e-9):
            raise EkxError(
                f"--dense {rate.text}: above the frame rate of {vid} ({fps:g} fps), so positions would "
                f"repeat its frames; give at most {fps:g} per second, or every:N (one per N frames)"
            )
    for vid, (duration, fps) in sorted(lengths.items(), key=lambda kv: kv[1][0]):
        if grid_count(duration, rate.of(fps)) == 0:
            raise EkxError(
                f"--dense {rate.text}: no position falls within {vid} ({duration:g} s; the first is at "
                f"{0.5 / rate.of(fps):g} s); give at least {0.5 / duration:.3g} per second"
            )
