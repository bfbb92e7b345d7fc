"""Model inputs of a decoded segment (the clean view and seeded augmented views), and the
BatchNorm calibration of random weights: shared by stage 1 and the slow path."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from ekx import EkxError, epic
from ekx.cache.store import sha256_file
from ekx.extract import backbones, bn_cache, sources
from ekx.extract.sources.watchdog import guarded
from ekx.extract.video import Request, Result

if TYPE_CHECKING:
    from ekx.extract.pipeline import ExtractConfig


def view_params(seed: int, narration_id: str, view: int, h: int, w: int) -> dict:
    """Seeded augmentation of one view, the same for every frame of the segment."""
    rng = np.random.default_rng([seed, zlib.crc32(narration_id.encode()), view])
    scale, ratio = rng.uniform(0.35, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(scale * h * w / ratio))))
    cw = int(min(w, round(np.sqrt(scale * h * w * ratio))))
    return {
        "top": int(rng.integers(0, h - ch + 1)),
        "left": int(rng.integers(0, w - cw + 1)),
        "height": ch,
        "width": cw,
        "flip": bool(rng.random() < 0.5),
        "brightness": float(rng.uniform(0.6, 1.4)),
        "contrast": float(rng.uniform(0.6, 1.4)),
        "saturation": float(rng.uniform(0.6, 1.4)),
    }


def make_view(frames: torch.Tensor, pre: backbones.Preprocess, p: dict | None) -> torch.Tensor:
    """uint8 [F, 3, H, W] on the device -> normalised float; view 0 (p None) is the clean one."""
    if p is None:
        return pre(frames)
    x = F.resized_crop(
        frames,
        p["top"],
        p["left"],
        p["height"],
        p["width"],
        list(pre.crop_size),
        interpolation=F.InterpolationMode(pre.interpolation),
        antialias=True,
    )
    if p["flip"]:
        x = F.horizontal_flip(x)
    x = F.to_dtype(x, torch.float32, scale=True)
    x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, p["brightness"]), p["contrast"]), p["saturation"])
    return F.normalize(x, mean=list(pre.mean), std=list(pre.std))


def segment_inputs(
    res: Result, narration_id: str, cfg: ExtractConfig, bb: backbones.Backbone, device: torch.device
) -> torch.Tensor:
    """Model inputs of one segment: [V*K, 3, h, w] images or [V*K, 3, clip, h, w] clips."""
    frames = res.frames if isinstance(res.frames, torch.Tensor) else torch.from_numpy(res.frames)  # GPU-decoded
    frames = frames.to(device, non_blocking=True).permute(0, 3, 1, 2)
    pre = bb.preprocess
    views = []
    for v in range(cfg.views):
        p = None if v == 0 else view_params(cfg.seed, narration_id, v, frames.shape[-2], frames.shape[-1])
        x = make_view(frames, pre, p)
        if bb.clip_len > 1:  # [K*clip, 3, h, w] -> [K, 3, clip, h, w]
            x = x.reshape(cfg.frames, bb.clip_len, *x.shape[1:]).transpose(1, 2)
        views.append(x)
    return torch.cat(views)


def union_size(bbs: list[backbones.Backbone]):
    """One decode size serving every backbone: the largest of their sizes (each backbone's
    preprocessing then resizes down to its own, as it would from the full frame)."""
    if len(bbs) == 1:
        return bbs[0].preprocess.decode_size

    def size(h: int, w: int) -> tuple[int, int]:
        return max((b.preprocess.decode_size(h, w) for b in bbs), key=lambda s: s[0] * s[1])

    return size


RESIZES = ("decoder", "torchvision")


def check_resize(resize: str) -> None:
    """Refuse an unknown ``--resize`` before anything is opened or written."""
    if resize not in RESIZES:
        raise EkxError(f"--resize {resize!r}: expected one of {', '.join(RESIZES)}")


def decode_size(cfg, bbs: list[backbones.Backbone]):
    """The size function the decoder gets: the backbones' union size (`union_size`) where
    the decoder's scaler resizes (``--resize decoder``), None (full size) for torchvision's."""
    return union_size(bbs) if cfg.resize == "decoder" else None


@dataclasses.dataclass(frozen=True)
class FrameResize:
    """``--resize torchvision`` done in the decoding process: the weights' own resize
    (`Preprocess.resize`, the same call on the same uint8 frames, so the features are
    bit-identical) before the frames cross two process boundaries (decoder child -> worker
    -> main) at 1/18 of their 1080p size; the main process's resize then returns them as they are.
    One frame at a time: the antialiased uint8 resize of 16 1080p frames at once held 390 MB
    of temporaries beside its 100 MB input (the same values: each frame is resized alone)."""

    pre: backbones.Preprocess

    def __call__(self, frames):
        if not isinstance(frames, np.ndarray):  # GPU-decoded tensors stay where they are
            return frames
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        out = None
        for i in range(len(x)):
            f = self.pre.resize(x[i : i + 1]).permute(0, 2, 3, 1)
            if out is None:
                out = np.empty((len(x), *f.shape[1:]), dtype=frames.dtype)
            out[i] = f[0].numpy()
        return frames if out is None else out


def resized(decode: Callable[[], Iterator[Result]], post: Callable) -> Iterator[Result]:
    """``decode()``'s Results with ``post`` (`FrameResize`) applied to their frames."""
    for res in decode():
        yield res if res.frames is None else dataclasses.replace(res, frames=post(res.frames))


def frame_resize(cfg, bbs: list[backbones.Backbone]) -> FrameResize | None:
    """The decoder-side resize where it changes nothing but speed: ``--resize torchvision``,
    the clean view only (augmented views crop the full frame), every backbone resizing alike."""
    if cfg.resize != "torchvision" or cfg.views != 1:
        return None
    kinds = {(b.preprocess.resize_size, b.preprocess.interpolation, b.preprocess.antialias) for b in bbs}
    return FrameResize(bbs[0].preprocess) if len(kinds) == 1 else None


# ---------------------------------------------------------------- BatchNorm calibration (--weights none)


def calibration_plan(ann: epic.Annotations, plan_all: list[epic.Segment], cfg: ExtractConfig) -> list[epic.Segment]:
    """Segments whose frames calibrate BatchNorm for random weights: the train split's
    first ones whatever split is extracted (so train, validation and test caches come from
    one and the same backbone), the split's own where the workspace has no train CSV.
    Taken before --shard/--limit, so shards and resumed runs build the same model."""
    try:
        train = ann.segments("train") if ann.split_path("train").is_file() else []
    except EkxError:
        train = []
    return (train or plan_all)[: 4 * cfg.calibration_segments]


def calibrate(model, bb, cfg, plan_all, found, device) -> str:
    """BatchNorm statistics for random weights, from the first decodable segments of
    ``plan_all`` (see `calibration_plan`), each video decoded once."""
    if not backbones.has_batchnorm(model):  # nothing to measure (ViTs: LayerNorm only)
        return "none needed: no BatchNorm"
    calib = [s for s in plan_all if s.video_id in found][: cfg.calibration_segments]
    if not calib:
        raise EkxError("--weights none needs at least one decodable segment to calibrate BatchNorm")
    stored = bn_cache.plan_path(model, lambda: calibration_key(cfg, bb, calib, found, device))
    with bn_cache.locked(stored):  # ranks of one DDP run, or two test workers: one measures, the other reads
        if (hit := bn_cache.load(stored)) is not None:
            backbones.calibrate_batchnorm(model, [], measured=hit["state"])
            return hit["used"]
        rows = _measure(model, bb, cfg, calib, found, device)
        # exactly the segments that decoded: this string is part of the cache identity, so a
        # re-run whose calibration differs (a video restored or broken since) is refused, not mixed
        used = "first segments: " + ",".join(calib[row].narration_id for row in rows)
        if len(rows) == len(calib):  # a failure may be passing (a hung decoder): never stored
            bn_cache.save(stored, {"state": backbones.batchnorm_state(model), "used": used})
    return used


def _measure(model, bb, cfg, calib: list[epic.Segment], found, device) -> list[int]:
    """Calibrate on ``calib``'s segments, each video decoded once; the rows that decoded."""
    src = sources.get(sources.DEFAULT if cfg.source == "auto" else cfg.source)
    post = frame_resize(cfg, [bb])
    wanted: dict[str, list[Request]] = {}
    for row, s in enumerate(calib):
        wanted.setdefault(s.video_id, []).append(Request(row, s.start, s.stop, s.start_frame, s.stop_frame))
    decoded: dict[int, Result] = {}
    for vid, reqs in wanted.items():  # a video's segments in one pass (an open scans the whole file)
        decode = functools.partial(
            src.decode, found[vid], reqs, cfg.frames, bb.clip_len, decode_size(cfg, [bb]), cfg.decode_device
        )
        if post is not None:  # as in the run: full-size frames resized where they are decoded
            decode = functools.partial(resized, decode, post)
        timeout = cfg.decode_timeout if cfg.decode_device == "cpu" else 0
        decoded.update((res.row, res) for res in guarded(decode, found[vid], reqs, timeout) if res.error is None)
    rows = [row for row in range(len(calib)) if row in decoded]  # in plan order, whatever the decode order
    if not rows:
        raise EkxError("--weights none: none of the calibration segments could be decoded")
    # 64 inputs spread over the segments are enough for stable statistics
    x = torch.cat([segment_inputs(decoded[row], calib[row].narration_id, cfg, bb, device) for row in rows])
    x = x[torch.linspace(0, len(x) - 1, min(len(x), 64)).long()]
    torch.manual_seed(cfg.seed)
    backbones.calibrate_batchnorm(model, [x[i : i + 32] for i in range(0, len(x), 32)])
    return rows


# the settings that cannot change a calibration's inputs: left out of its key, so runs that
# differ only in them (another split, shard or output) share it; any other setting, including
# one added later, is in the key
NOT_CALIBRATION = frozenset(
    {"backbone", "split", "weights", "batch_size", "workers", "device", "precision", "limit", "shard",
     "calibration_segments", "recalibrate", "out", "decode_timeout", "dense", "dense_span", "dense_margin",
     "source"}  # the source: in the key as resolved ("auto" is decord where the videos are)
)  # fmt: skip


def calibration_key(cfg, bb, calib: list[epic.Segment], found, device) -> str | None:
    """What a calibration's inputs are made of, for `bn_cache.plan_path`: the bytes of each
    video, the segments in order, the settings that decode and preprocess them. None where a
    video is not one file (a frames folder): its inputs are then decoded to be keyed."""
    paths = {s.video_id: Path(found[s.video_id]) for s in calib}
    if not all(p.is_file() for p in paths.values()):
        return None
    settings = {k: v for k, v in sorted(dataclasses.asdict(cfg).items()) if k not in NOT_CALIBRATION}
    videos = {vid: sha256_file(p) for vid, p in sorted(paths.items())}
    segments = [(s.narration_id, s.video_id, s.start, s.stop, s.start_frame, s.stop_frame) for s in calib]
    source = sources.DEFAULT if cfg.source == "auto" else cfg.source
    return repr(
        ("calibration v1", source, settings, bb.clip_len, bb.preprocess, torch.device(device).type, videos, segments)
    )
