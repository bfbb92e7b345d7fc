"""Stage 1: annotation segments -> decoded frames -> frozen backbone -> HDF5 cache.

Decoding runs in DataLoader worker processes (one video at a time, each opened once);
frames reach the main process as uint8 at the preprocessing size and are normalised on
the device; inference is batched under inference_mode with channels_last and autocast
where the device runs it fast; a writer thread owns the HDF5 file so writes stay off
the compute path. Re-running the same command resumes: done rows are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ekx import EkxError, epic
from ekx.cache import store
from ekx.cache.reader import failures, open_cache
from ekx.extract import backbones
from ekx.extract.inputs import calibrate, calibration_plan, segment_inputs
from ekx.extract.video import Request, Result, decode_video
from ekx.extract.writer import WriterThread, cache_attrs
from ekx.prepare import read_manifest
from ekx.runtime import autocast, resolve_device, resolve_precision


@dataclass
class ExtractConfig:
    backbone: str = "resnet50"
    split: str = "train"
    weights: str = "DEFAULT"
    frames: int = 16
    views: int = 1
    batch_size: int | None = None  # None: 16 on CPU (cache-friendly there), 64 on a GPU
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (index, count), index in 0..count-1
    seed: int = 0  # random weights (--weights none) and augmented views
    calibration_segments: int = 8
    out: Path | None = None


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


# ---------------------------------------------------------------- planning


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise EkxError(f"--shard {text!r}: expected I/N, e.g. 0/4 (I counts from 0)") from None
    if not 0 <= i < n:
        raise EkxError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def shard_videos(segments: list[epic.Segment], count: int) -> list[set[str]]:
    """Deterministic, video-balanced split: largest videos first, each to the lightest shard."""
    sizes: dict[str, int] = {}
    for s in segments:
        sizes[s.video_id] = sizes.get(s.video_id, 0) + 1
    loads = [0] * count
    shards: list[set[str]] = [set() for _ in range(count)]
    for vid in sorted(sizes, key=lambda v: (-sizes[v], v)):
        j = min(range(count), key=lambda j: (loads[j], j))
        shards[j].add(vid)
        loads[j] += sizes[vid]
    return shards


def plan_rows(segments: list[epic.Segment], cfg: ExtractConfig) -> tuple[list[epic.Segment], np.ndarray]:
    plan = segments[: cfg.limit] if cfg.limit else segments
    index = np.arange(len(plan))
    if cfg.shard:
        mine = shard_videos(plan, cfg.shard[1])[cfg.shard[0]]
        keep = [i for i, s in enumerate(plan) if s.video_id in mine]
        plan, index = [plan[i] for i in keep], index[keep]
    return plan, index


def default_out(cfg: ExtractConfig, features_root: Path) -> Path:
    name = Path(cfg.split).stem if cfg.split.endswith(".csv") else cfg.split
    if cfg.shard:
        name += f".shard{cfg.shard[0]}of{cfg.shard[1]}"
    return features_root / cfg.backbone / f"{name}.h5"


# ---------------------------------------------------------------- decoding workers


class VideoJobs(IterableDataset):
    """Yields decoded segments; each worker takes whole videos (each opened once)."""

    def __init__(self, jobs: list[tuple[Path, list[Request]]], k: int, clip_len: int, size_fn):
        self.jobs, self.k, self.clip_len, self.size_fn = jobs, k, clip_len, size_fn

    def __iter__(self) -> Iterator[Result]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for path, reqs in self.jobs[wid::nw]:
            yield from decode_video(path, reqs, self.k, self.clip_len, self.size_fn)


def worker_init(_):
    # Ctrl-C goes to the whole process group: the main process handles it, workers just stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # Decoding yields to the backbone: when workers and the backbone's threads compete
    # for the same cores, a descheduled compute thread stalls the others at every
    # parallel barrier; at lower priority the decoder fills the idle gaps instead.
    os.nice(10)
    try:  # Linux: die with the main process, even when it is SIGKILLed
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def identity_collate(batch):
    return batch


# ---------------------------------------------------------------- the run


def extract(
    cfg: ExtractConfig,
    annotations: Path,
    videos: Path,
    features_root: Path,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = print,
) -> Summary:
    """Run stage 1; resumes an existing cache made with the same parameters."""
    t0 = time.perf_counter()
    bb = backbones.get(cfg.backbone)
    if cfg.frames < 1 or cfg.views < 1 or (cfg.batch_size is not None and cfg.batch_size < 1):
        raise EkxError("--frames, --views and --batch-size must be >= 1")
    ann = epic.Annotations(annotations)
    ann_path = ann.split_path(cfg.split)
    plan_all = ann.segments(cfg.split)
    plan, plan_index = plan_rows(plan_all, cfg)
    if not plan:
        raise EkxError(f"{ann_path}: no segments to extract (check --limit / --shard)")
    calib_plan = calibration_plan(ann, plan_all, cfg) if cfg.weights.lower() == "none" else []
    own = plan_all[: 4 * cfg.calibration_segments] if calib_plan else []
    found, missing = epic.locate_videos(plan + calib_plan + own, videos)
    missing = [v for v in missing if v in {s.video_id for s in plan}]
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.batch_size is None:
        cfg = dataclasses.replace(cfg, batch_size=64 if device.type == "cuda" else 16)
    model, weights_id = backbones.load_weights(bb, cfg.weights, cfg.seed)
    model = model.to(device)
    calibration, bn_state = "", None
    if weights_id == "none":
        warn(
            "--weights none: RANDOM backbone weights (BatchNorm calibrated on the data) - features "
            "are for tests and demos, not for real results"
        )
        if not any(s.video_id in found for s in calib_plan):
            warn(
                "the train split's first videos are not here: BatchNorm calibrated on this split's own "
                "segments, so these features will not match a train cache made with them"
            )
            calib_plan = own
        calibration = calibrate(model, bb, cfg, calib_plan, found, device)
        bn_state = {k: v.numpy() for k, v in backbones.batchnorm_state(model).items()}
    model = backbones.fuse_for_inference(model)
    model = model.to(memory_format=torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d)

    out = cfg.out or default_out(cfg, features_root)
    # a checkpoint is named by its path (the sha256 in "weights" is its identity)
    weights_path = str(Path(cfg.weights).resolve()) if weights_id.startswith("sha256:") else ""
    attrs = cache_attrs(cfg, bb, weights_id, precision, device, ann, ann_path, calibration, weights_path)
    prepared = read_manifest(videos)  # a prepared copy's features never mix with the originals'
    attrs["video_input"] = prepared.describe() if prepared else store.ORIGINAL_VIDEOS
    rows = store.Rows(
        [s.narration_id for s in plan],
        [s.video_id for s in plan],
        np.array([s.verb_class for s in plan]),
        np.array([s.noun_class for s in plan]),
        plan_index,
    )
    if out.exists():
        have = store.open_attrs(out)
        bad = store.identity_mismatch(have, attrs)
        if bad:
            raise EkxError(
                f"{out} was made with other parameters ({'; '.join(bad)}); refusing to mix. "
                "Delete it or choose another --out"
            )
    else:
        store.create(out, attrs, rows, cfg.views, cfg.frames, bb.dim, bn_state)
    with h5py.File(out, "r") as f:
        store.check_rows(out, f, rows)
    writer = store.Writer(out)
    status = writer.status_array()
    todo = np.flatnonzero(status != store.DONE)
    thread = WriterThread(writer)
    thread.start()
    summary = Summary(out, len(plan), int((status == store.DONE).sum()), 0, 0, 0, 0.0)
    if missing:
        summary.missing_videos = epic.missing_videos_message(missing, len({s.video_id for s in plan}), videos)
    if on_start:
        on_start(len(plan), summary.done)
    try:
        _run(cfg, bb, model, device, precision, plan, todo, found, thread, summary, on_progress)
    finally:
        try:
            thread.finish()
        finally:
            writer.close()
    counts = open_cache(out).counts()
    summary.done, summary.failed = counts["done"], counts["failed"]
    summary.failures = failures(out) if summary.failed else []
    summary.seconds = time.perf_counter() - t0
    return summary


def _run(cfg, bb, model, device, precision, plan, todo, found, thread, summary, on_progress):
    by_video: dict[str, list[Request]] = {}
    for row in todo:
        s = plan[row]
        if s.video_id not in found:
            thread.put(("failed", int(row), f"video {s.video_id} not found"))
            continue
        by_video.setdefault(s.video_id, []).append(Request(int(row), s.start, s.stop))
    # biggest videos first, so the last worker does not finish long after the others
    jobs = sorted(((found[v], r) for v, r in by_video.items()), key=lambda j: -len(j[1]))
    if not jobs:
        return
    workers = max(0, min(cfg.workers, len(jobs)))
    loader = DataLoader(
        VideoJobs(jobs, cfg.frames, bb.clip_len, bb.preprocess.decode_size),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    pending: list[tuple[Result, torch.Tensor]] = []
    n_inputs = 0
    fmt = torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d

    def flush():
        nonlocal pending, n_inputs
        x = torch.cat([p[1] for p in pending]).contiguous(memory_format=fmt)
        outs = []
        with torch.inference_mode(), autocast(device, precision):
            for i in range(0, len(x), cfg.batch_size):
                outs.append(model(x[i : i + cfg.batch_size]).float())
        feats = torch.cat(outs).cpu().numpy()
        o = 0
        for res, inp in pending:
            f = feats[o : o + len(inp)].reshape(cfg.views, cfg.frames, bb.dim)
            o += len(inp)
            thread.put(("done", res.row, f.astype(np.float16), res.centres))
        nframes = sum(len(r.frames) for r, _ in pending if r.frames is not None)
        summary.processed += len(pending)
        summary.frames += nframes
        if on_progress:
            on_progress(len(pending), nframes)
        pending, n_inputs = [], 0

    for res in loader:
        if res.error is not None:
            thread.put(("failed", res.row, res.error))
            if on_progress:
                on_progress(1, 0)
            continue
        inp = segment_inputs(res, plan[res.row].narration_id, cfg, bb, device)
        pending.append((res, inp))
        n_inputs += len(inp)
        if n_inputs >= cfg.batch_size:
            flush()
    if pending:
        flush()
