"""Several backbones in one stage-1 pass: each backbone's `Target` (model, cache, writer,
the rows its cache lacks), and how one decode serves them all - the largest decode size
and clip length, from which each backbone takes its own frames."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from ekx import EkxError, epic
from ekx.cache import identity, lock, store
from ekx.extract import backbones
from ekx.extract.audio import run as audio
from ekx.extract.inputs import calibrate
from ekx.extract.video import Result
from ekx.extract.writer import WriterThread, cache_attrs

if TYPE_CHECKING:
    from ekx.extract.pipeline import ExtractConfig


@dataclass
class Summary:
    path: Path
    total: int
    done: int
    failed: int
    processed: int
    frames: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    missing_videos: str | None = None


def backbone_names(spec: str) -> list[str]:
    """`resnet50` or `resnet50,efficientnet_b3,r2plus1d_18` -> the names, checked."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise EkxError(f"--backbone {spec!r}: name one or more backbones, each once, separated by commas")
    for n in names:
        backbones.get(n)  # an unknown name is refused here, with the registry's list
    return names


@dataclass
class Target:
    """One backbone's share of a run: its model, its cache and writer, and the rows it lacks."""

    cfg: ExtractConfig  # with this backbone's name
    bb: backbones.Backbone
    model: torch.nn.Module
    writer: store.Writer
    thread: WriterThread
    todo: np.ndarray  # [rows] bool: not done in this cache
    summary: Summary
    lock: lock.CacheLock
    pending: list[tuple[Result, torch.Tensor]] = field(default_factory=list)
    n_inputs: int = 0


def select_frames(frames: np.ndarray, k: int, have: int, want: int) -> np.ndarray:
    """From K clips of ``have`` consecutive frames (centred as video.clip_frames centres
    them), the K clips of ``want`` frames a backbone reads: the middle ``want`` of each."""
    if have == want:
        return frames
    start = have // 2 - want // 2
    clips = frames.reshape(k, have, *frames.shape[1:])[:, start : start + want]
    return clips.reshape(k * want, *frames.shape[1:])


def open_target(
    cfg: ExtractConfig,
    out: Path,
    device: torch.device,
    precision: str,
    ann: epic.Annotations,
    ann_path: Path,
    calib_plan: list[epic.Segment],
    found: dict[str, Path],
    rows: store.Rows,
    video_input: str,
    warn: Callable[[str], None],
    held: lock.CacheLock,
    source_attrs: dict,
    decode_size: str = identity.OWN_SIZE,
    times: np.ndarray | None = None,
) -> Target:
    """Load one backbone (calibrating random weights), open or create its cache (whose lock
    ``held`` the caller took first), start its writer."""
    bb = backbones.with_weights(backbones.get(cfg.backbone), cfg.weights)  # preprocessing of these weights
    model, weights_id = backbones.load_weights(bb, cfg.weights, cfg.seed)
    model = model.to(device)
    calibration, bn_state = "", None
    if weights_id == "none":
        warn(
            f"--weights none: RANDOM {bb.name} weights (BatchNorm calibrated on the data) - features "
            "are for tests and demos, not for real results"
        )
        calibration = (audio.calibrate if bb.audio else calibrate)(model, bb, cfg, calib_plan, found, device)
        bn_state = {k: v.numpy() for k, v in backbones.batchnorm_state(model).items()}
    model = backbones.fuse_for_inference(model)
    model = model.to(memory_format=torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d)
    # a checkpoint is named by its path (the sha256 in "weights" is its identity)
    weights_path = str(Path(cfg.weights).resolve()) if weights_id.startswith("sha256:") else ""
    # a sound model's attributes are whole already (`audio.source_attrs`): no frames, no resize
    inputs = source_attrs if bb.audio else identity.input_attrs(bb, source_attrs, video_input, decode_size)
    attrs = cache_attrs(cfg, bb, weights_id, precision, device, ann, ann_path, calibration, weights_path, inputs)
    bad = (
        identity.mismatch(identity.extraction(store.open_attrs(out)), identity.extraction(attrs))
        if out.exists()
        else []
    )
    recalibrated = cfg.recalibrate and bad and all(b.startswith("bn_calibration:") for b in bad)
    if bad and not recalibrated:
        raise EkxError(mismatch_message(out, bad))
    if not out.exists() or recalibrated:
        # --recalibrate: a new cache (every row pending) replaces the old one in one rename
        store.create(out, attrs, rows, cfg.views, cfg.frames, bb.dim, bn_state, times)
    with h5py.File(out, "r") as f:
        store.check_rows(out, f, rows)
    writer = store.Writer(out)
    writer.restore_plan(rows, times)  # a row repaired by `cache verify --repair` gets its planned values back
    status = writer.status_array()
    thread = WriterThread(writer)
    thread.start()
    n = len(rows.narration_id)
    summary = Summary(out, n, int((status == store.DONE).sum()), 0, 0, 0, 0.0)
    return Target(cfg, bb, model, writer, thread, status != store.DONE, summary, held)


def input_source(src, cfg: ExtractConfig, bbs: dict, videos_read: list[str], video_input: str) -> tuple[dict, str]:
    """(source attributes, decode size) of ``cfg.backbone``'s cache in a pass over ``bbs``:
    the frame source, its videos and where the frames were resized; or a sound model's input."""
    bb = bbs[cfg.backbone]
    if bb.audio is not None:
        return audio.source_attrs(bb, videos_read, video_input), identity.OWN_SIZE
    others = [b for n, b in bbs.items() if n != cfg.backbone]
    attrs = {**src.identity(cfg.decode_device, cfg.resize), **identity.source_attrs(videos_read, bb)}
    return attrs, identity.decode_size_of(bb, others, cfg.resize)


def mismatch_message(out: Path, bad: list[str]) -> str:
    """Why an existing cache is refused, and the ways on that keep one network per cache."""
    if all(b.startswith("bn_calibration:") for b in bad):
        # the random backbone's BatchNorm statistics came from other calibration segments
        # (a calibration video missing or unreadable in one run, restored or broken in the other)
        return (
            f"{out}: its random backbone was calibrated on other segments than this run's "
            f"({bad[0]}); refusing to mix two networks in one cache. Pass --recalibrate to redo "
            "every row with this run's calibration, or --out NEW.h5 to start a new cache "
            "(or make the calibration videos as they were when the cache was made)"
        )
    return (
        f"{out} was made with other parameters ({identity.describe(bad)}); refusing to mix features that "
        "mean different things in one cache. Delete it or choose another --out"
    )
