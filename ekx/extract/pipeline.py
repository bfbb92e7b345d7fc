"""Stage 1: annotation segments -> decoded frames -> frozen backbone -> HDF5 cache.

Decoding runs in DataLoader worker processes (one video at a time, each opened once);
frames reach the main process as uint8 at the preprocessing size and are normalised on
the device; inference is batched under inference_mode with channels_last and autocast
where the device runs it fast; a writer thread owns the HDF5 file so writes stay off
the compute path. Re-running the same command resumes: done rows are skipped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ekx import EkxError, epic, options
from ekx.cache import dense, identity, lock, store
from ekx.cache.reader import failures, open_cache
from ekx.config import backbone_folder
from ekx.extract import backbones, sources
from ekx.extract.audio import run as audio
from ekx.extract.config import ExtractConfig, check_dense_rate
from ekx.extract.inputs import calibration_plan, check_resize, decode_size, frame_resize, segment_inputs
from ekx.extract.jobs import NOT_FINITE, VideoJobs, identity_collate, plan_jobs, worker_init
from ekx.extract.sources.ffmpeg_log import DecoderLog
from ekx.extract.targets import Summary, Target, backbone_names, input_source, open_target, select_frames
from ekx.extract.video import Result
from ekx.prepare import read_manifest
from ekx.runtime import autocast, precision_note, resolve_device, resolve_precision

# ---------------------------------------------------------------- planning


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
    if cfg.dense:  # train.dense-4fps.h5, train.dense-every2-annotated.h5
        name += f".dense-{dense.Rate.parse(cfg.dense).tag()}" + ("-annotated" if cfg.dense_span == "annotated" else "")
    if cfg.shard:
        name += f".shard{cfg.shard[0]}of{cfg.shard[1]}"
    return features_root / backbone_folder(cfg.backbone) / f"{name}.h5"


# ---------------------------------------------------------------- the run


def extract(
    cfg: ExtractConfig,
    annotations: Path,
    videos: Path,
    features_root: Path,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = print,
    frames_root: Path | None = None,
    info: Callable[[str], None] = print,
) -> Summary:
    """Run stage 1 for one backbone; resumes an existing cache made with the same parameters."""
    if len(backbone_names(cfg.backbone)) != 1:
        raise EkxError("extract() takes one backbone; extract_many() takes several")
    return extract_many(cfg, annotations, videos, features_root, on_start, on_progress, warn, frames_root, info)[0]


def extract_many(
    cfg: ExtractConfig,
    annotations: Path,
    videos: Path,
    features_root: Path,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = print,
    frames_root: Path | None = None,
    info: Callable[[str], None] = print,
) -> list[Summary]:
    """Stage 1 for every backbone of ``cfg.backbone`` (comma-separated) in one pass: each
    segment is decoded once, at a size and clip length serving every backbone, and each
    backbone writes its own cache (`features/<backbone>/<split>.h5`) with its own identity.
    Each cache resumes on its own: a segment is decoded if any cache lacks it, and run
    only through the backbones whose cache lacks it."""
    check_resize(cfg.resize)
    cfg = options.checked(cfg)  # every setting against what ExtractConfig declares it admits
    t0 = time.perf_counter()
    names = backbone_names(cfg.backbone)
    sound = audio.is_audio(names)  # models of the videos' sound (ekx.extract.audio): their own loop
    if cfg.out is not None and len(names) > 1:
        raise EkxError("--out names one cache file; with several backbones the caches go to --features")
    ann = epic.Annotations(annotations)
    ann_path = ann.split_path(cfg.split)
    segments = ann.segments(cfg.split)
    plan_all, times_all = segments, None
    if cfg.dense:  # runs of K positions over each video (ekx.cache.dense), extracted as segments
        plan_all, times_all = dense_runs(cfg, segments, videos, frames_root)
    plan, plan_index = plan_rows(plan_all, cfg)
    if not plan:
        raise EkxError(f"{ann_path}: no segments to extract (check --limit / --shard)")
    times = times_all[plan_index] if times_all is not None else None
    calib_plan = calibration_plan(ann, segments, cfg) if cfg.weights.lower() == "none" else []
    own = segments[: 4 * cfg.calibration_segments] if calib_plan else []
    src, root = resolve_source(cfg, plan, videos, frames_root)
    if not Path(root).is_dir():  # else every segment fails with "not found", the root unnamed
        what = "videos" if src.reads == "videos" else "frames"
        flag = "--videos" if src.reads == "videos" else "--frames-root"
        raise EkxError(f"{what} root {root} does not exist; set {flag} or the {what} path (ekx config)")
    found, missing = sources.locate(src, plan + calib_plan + own, root)
    missing = [v for v in missing if v in {s.video_id for s in plan}]
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if note := precision_note(cfg.precision, device, precision):
        info(note)  # a choice, said once; not a warning
    if cfg.batch_size is None:
        cfg = dataclasses.replace(cfg, batch_size=64 if device.type == "cuda" else 16)
    decode_device, note = src.resolve_device(cfg.decode_device, next(iter(found.values()), None))
    if note:
        warn(note)
    cfg = dataclasses.replace(cfg, source=src.name, decode_device=decode_device)
    if calib_plan and not any(s.video_id in found for s in calib_plan):
        warn(
            "the train split's first videos are not here: BatchNorm calibrated on this split's own "
            "segments, so these features will not match a train cache made with them"
        )
        calib_plan = own
    rows = store.Rows(
        [s.narration_id for s in plan],
        [s.video_id for s in plan],
        np.array([s.verb_class for s in plan]),
        np.array([s.noun_class for s in plan]),
        plan_index,
    )
    prepared = read_manifest(videos) if src.reads == "videos" else None  # never mixed with the originals'
    video_input = prepared.describe() if prepared else identity.ORIGINAL_VIDEOS
    if src.reads == "frames":
        video_input = sources.RGB_FRAMES
    missing_msg = src.missing_message(missing, len({s.video_id for s in plan}), root) if missing else None
    # each backbone with its weights' preprocessing: one decode serves all (`decode_size_of`)
    bbs = {n: backbones.with_weights(backbones.get(n), cfg.weights) for n in names}
    if sound:  # before anything is written: a video without sound is one line, not N failed rows
        audio.check(cfg, list(bbs.values()), src, found, [s.video_id for s in plan])
    videos_read = identity.records(src, {v: found[v] for v in dict.fromkeys(s.video_id for s in plan) if v in found})
    targets: list[Target] = []
    decoder_log = DecoderLog()  # FFmpeg's own log lines, per video: one line, and in the cache
    try:
        for name in names:
            tcfg = dataclasses.replace(cfg, backbone=name)
            out = tcfg.out or default_out(tcfg, features_root)
            held = lock.acquire(out)  # first: a second run stops before loading anything
            try:
                t = open_target(
                    tcfg,
                    out,
                    device,
                    precision,
                    ann,
                    ann_path,
                    calib_plan,
                    found,
                    rows,
                    video_input,
                    warn,
                    held,
                    *input_source(src, tcfg, bbs, videos_read, video_input),
                    times,
                )
            except BaseException:
                held.release()
                raise
            t.summary.missing_videos = missing_msg
            targets.append(t)
        if on_start:
            on_start(len(plan), min(t.summary.done for t in targets))
        (audio.run if sound else _run)(cfg, targets, device, precision, plan, found, on_progress, times, decoder_log)
    finally:
        for t in targets:
            try:
                t.thread.finish()
            finally:
                t.writer.close()
                t.lock.release()
    for t in targets:
        counts = open_cache(t.summary.path).counts()
        t.summary.done, t.summary.failed = counts["done"], counts["failed"]
        t.summary.failures = failures(t.summary.path) if t.summary.failed else []
        t.summary.seconds = time.perf_counter() - t0
    decoder_log.finish([t.summary.path for t in targets], warn)
    return [t.summary for t in targets]


def dense_runs(
    cfg: ExtractConfig, segments: list[epic.Segment], videos: Path, frames_root: Path | None
) -> tuple[list[epic.Segment], np.ndarray]:
    """A dense extraction's plan: every video of the split, its length from its header.
    A video that is not here cannot be planned (its length is unknown), so it is refused
    before anything is written rather than left out of the store silently."""
    src, root = resolve_source(cfg, segments, videos, frames_root)
    if src.reads != "videos":
        raise EkxError(f"--dense reads videos; --source {src.name} reads the RGB frames (use decord or torchcodec)")
    found, missing = sources.locate(src, segments, root)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EkxError(
            f"--dense: {len(missing)} of {len(found) + len(missing)} videos of the split are not under {root} "
            f"({shown}); a dense store plans each video from its length. Put them there, or extract an "
            "annotation CSV that lists only the videos you have"
        )
    lengths = {v: dense.video_length(p) for v, p in found.items()}
    rate = dense.Rate.parse(cfg.dense)
    check_dense_rate(rate, lengths)  # from the headers alone, before a position is planned
    return dense.plan(segments, lengths, rate, cfg.frames, cfg.dense_span, cfg.dense_margin)


def resolve_source(
    cfg: ExtractConfig, plan: list[epic.Segment], videos: Path, frames_root: Path | None
) -> tuple[sources.Source, Path]:
    """The frame source (``cfg.source``, or auto) and the root it reads."""
    src = sources.choose(cfg.source, {s.video_id for s in plan}, videos, frames_root)
    if src.reads == "frames" and frames_root is None:
        raise EkxError(
            f"--source {src.name} reads the official RGB frames: say where they are with --frames-root, "
            "EKX_FRAMES or frames = ... in ekx.toml"
        )
    return src, (frames_root if src.reads == "frames" and frames_root is not None else videos)


def _run(
    cfg: ExtractConfig,
    targets: list[Target],
    device: torch.device,
    precision: str,
    plan: list[epic.Segment],
    found: dict[str, Path],
    on_progress: Callable[[int, int], None] | None,
    times: np.ndarray | None,
    decoder_log: DecoderLog,
) -> None:
    jobs = plan_jobs(targets, plan, found, times)
    if not jobs:
        return
    clip_len = max(t.bb.clip_len for t in targets)  # one decode serves every backbone
    gpu_decode = cfg.decode_device != "cpu"  # a CUDA context does not survive a fork: decode here
    workers = 0 if gpu_decode else max(0, min(cfg.workers, len(jobs)))
    timeout = 0.0 if gpu_decode else cfg.decode_timeout
    bbs = [t.bb for t in targets]
    size_fn = decode_size(cfg, bbs)
    loader = DataLoader(
        VideoJobs(jobs, cfg.frames, clip_len, size_fn, cfg.source, cfg.decode_device, timeout, frame_resize(cfg, bbs)),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )

    # a segment counts as progress once every backbone that needed it has its features
    remaining: dict[int, int] = {}
    frames_of: dict[int, int] = {}

    def flush(t: Target) -> None:
        fmt = torch.channels_last if t.bb.clip_len == 1 else torch.channels_last_3d
        bs = t.cfg.batch_size or 16
        outs = []
        # each segment's inputs in forward passes of their own (at most bs each), never with
        # another segment's: some kernels (efficientnet_b3's 1x1 convolutions on the CPU) give
        # a row other low bits in another batch size or position, so features that depended
        # on which segments shared a batch would change when a resumed run regroups them
        with torch.inference_mode(), autocast(device, precision):
            for _, inp in t.pending:
                x = inp.contiguous(memory_format=fmt)
                outs += [t.model(x[i : i + bs]).float() for i in range(0, len(x), bs)]
        with np.errstate(over="ignore"):  # a value beyond float16's range becomes Inf: refused below
            feats = torch.cat(outs).cpu().numpy().astype(np.float16)
        # one pass over the batch: a NaN or Inf anywhere in a segment's rows fails that segment
        finite = np.asarray(np.isfinite(feats.reshape(len(feats), -1)).all(axis=1))
        o = 0
        for res, inp in t.pending:
            f = feats[o : o + len(inp)].reshape(cfg.views, cfg.frames, t.bb.dim)
            ok = finite[o : o + len(inp)].all()
            o += len(inp)
            if ok:
                t.thread.put(("done", res.row, f, res.centres))
            else:
                t.thread.put(("failed", res.row, NOT_FINITE))
        t.summary.processed += len(t.pending)
        t.summary.frames += sum(len(r.frames) for r, _ in t.pending if r.frames is not None)
        for res, _ in t.pending:
            remaining[res.row] -= 1
            if remaining[res.row] == 0:
                del remaining[res.row]
                if on_progress:
                    on_progress(1, frames_of.pop(res.row))
        t.pending, t.n_inputs = [], 0

    for res in loader:
        decoder_log.add(plan[res.row].video_id, res)
        if res.error is not None:
            for t in targets:
                if t.todo[res.row]:
                    t.thread.put(("failed", res.row, res.error))
            if on_progress:
                on_progress(1, 0)
            continue
        assert res.frames is not None
        remaining[res.row] = sum(bool(t.todo[res.row]) for t in targets)
        frames_of[res.row] = len(res.frames)
        for t in targets:
            if not t.todo[res.row]:
                continue
            mine = Result(res.row, select_frames(res.frames, cfg.frames, clip_len, t.bb.clip_len), res.centres)
            inp = segment_inputs(mine, plan[res.row].narration_id, t.cfg, t.bb, device)
            t.pending.append((mine, inp))
            t.n_inputs += len(inp)
            if t.n_inputs >= (t.cfg.batch_size or 16):
                flush(t)
    for t in targets:
        if t.pending:
            flush(t)
