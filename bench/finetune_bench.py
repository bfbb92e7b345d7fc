"""What the cache buys: samples/s of `finetune` (decode + augment + backbone + head,
forward and backward) vs `train-head` (cached tensors + head) on the same synthetic data
and device, measured in one run; and how well decoding/augmentation overlap with compute
in finetune (the time the training loop waits for the next batch, from torch.profiler).

Target: train-head >= 300x faster per sample on this CPU.

`--long-video`: instead, the decode side of a fine-tuning epoch over two long videos:
opening the video for each sample (the old reader: `decode_video` per segment, in a
shuffled order) vs one reader per video per worker (`Clips` fed by `VideoChunks`, as
`finetune` does), in one process standing for one worker, the two paths taking turns
sample by sample: decord.VideoReader constructions (decord scans the whole file on each)
and seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr

import argparse
import hashlib
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ekx import epic
from ekx.extract import backbones
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.finetune import clips as ftc
from ekx.finetune import model as ftm
from ekx.finetune import run as ft
from ekx.finetune.config import FinetuneConfig
from ekx.heads import checkpoint as ck
from ekx.heads import config as hc
from ekx.heads import epoch as ep
from ekx.heads import train as tr
from ekx.runtime import resolve_device, resolve_precision
from ekx.synth import SynthConfig, synthesize


def timed(batches, label: str = "ekx::wait_for_batch"):
    """Yields the batches; the time spent getting each one is a profiler range."""
    it = iter(batches)
    while True:
        with record_function(label):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16, help="T frames per segment (both paths' default)")
    ap.add_argument("--segments", type=int, default=16, help="segments in the fine-tuning epoch")
    ap.add_argument("--batch-size", type=int, default=4, help="finetune batch (memory-bound on a GPU)")
    ap.add_argument("--head-batch-size", type=int, default=24, help="train-head batch (its default)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--long-video", action="store_true", help="reader opens per epoch on long videos (see above)")
    ap.add_argument(
        "--long-segments", type=int, default=200, help="--long-video: segments per video (~3.9 s of video each)"
    )
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ekx-ftbench-"))
    if args.long_video:
        long_video(work, args.frames, args.batch_size, args.long_segments)
        return
    data = work / "data"
    if not (data / "annotations").is_dir():
        synthesize(data, SynthConfig(videos=4, segments=8, seed=1))
    ann, videos, feats = data / "annotations", data / "videos", work / "features"
    cache = feats / "resnet50" / "train.h5"
    if not cache.exists():
        print("extracting the train split once (resnet50, random weights) ...", flush=True)
        extract(
            ExtractConfig(split="train", weights="none", frames=args.frames, workers=args.workers, device=args.device),
            ann,
            videos,
            feats,
            warn=lambda m: None,
        )
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)

    # train-head: the cached path, several epochs over the same split
    loaded = tr.load_data(cache, cache, args.device)
    cfg = hc.TrainConfig(head="lstm", batch_size=args.head_batch_size, frames=args.frames)
    model, _ = ck.build_model(cfg, loaded.train)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ep.train_one_epoch(model, opt, *_epoch(loaded, cfg, gen, device), cfg, 0, device, precision)  # warm-up
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        ep.train_one_epoch(model, opt, *_epoch(loaded, cfg, gen, device), cfg, 0, device, precision)
    head_rate = reps * len(loaded.train.rows) / (time.perf_counter() - t0)

    # finetune: the same head on decoded video, backbone trained from layer3 on (seed phase 2)
    fcfg = FinetuneConfig(
        head="lstm",
        weights="none",
        frames=args.frames,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.segments,
        device=args.device,
    )
    a = epic.Annotations(ann)
    segs = a.segments("train")[: args.segments]
    paths, _ = epic.locate_videos(a.segments("train"), videos)
    start = ftm.cold_start(fcfg, a, segs, paths, device)
    bb = backbones.get("resnet50")
    clips = ftc.Clips(segs, paths, args.frames, bb)
    task = ft.finetune_task(fcfg, ftc.Dist(), device, precision, start, clips, clips, None, None, print)
    fopt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=5e-5)
    steps, batches = task.epoch_batches(0, gen)  # warm-up epoch: workers start, allocator settles
    ep.train_one_epoch(task.model, fopt, batches, steps, fcfg, 0, device, precision)
    steps, batches = task.epoch_batches(1, gen)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        ep.train_one_epoch(task.model, fopt, timed(batches), steps, fcfg, 1, device, precision)
        wall = time.perf_counter() - t0
    ft_rate = len(segs) / wall
    wait = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "ekx::wait_for_batch") / 1e6
    print(
        f"device {device}, precision {precision}, T={args.frames} frames, batch {args.head_batch_size} "
        f"(train-head) / {args.batch_size} (finetune, {args.workers} decode workers)"
    )
    print(f"train-head lstm (cached features): {head_rate:9.1f} samples/s")
    print(f"finetune   lstm (decoded video):   {ft_rate:9.3f} samples/s")
    print(f"-> the cache makes training {head_rate / ft_rate:.0f}x faster per sample (target >= 300x)")
    print(
        f"finetune: the loop waited {wait:.2f} s of {wall:.1f} s for batches ({100 * wait / wall:.1f}% idle: "
        "decode + augment overlap the backbone's forward/backward)"
    )


def long_video(work: Path, frames: int, chunk: int, per_video: int) -> None:
    import decord

    from ekx.extract.sources import decode_video
    from ekx.extract.video import Request

    # decord's open scans the whole file (~1.3 us per frame on the 2-core dev machine): the
    # default 200 segments make ~13-minute videos, whose open (~60 ms) outweighs decoding a
    # segment at the decode size; short synthetic videos open in ~13 ms and show little
    data = work / f"long{per_video}"
    if not (data / "annotations").is_dir():
        print(f"synthesizing two long videos ({per_video} segments each, 640x360, 60 fps) ...", flush=True)
        synthesize(data, SynthConfig(videos=2, segments=per_video, seed=3, width=640, height=360, fps=(60,)))
    a = epic.Annotations(data / "annotations")
    segs = a.segments("train") + a.segments("validation")
    paths, missing = epic.locate_videos(segs, data / "videos")
    assert not missing, missing
    bb = backbones.get("resnet50")
    size_fn = bb.preprocess.decode_size
    real = decord.VideoReader
    opens, open_s, secs = {"old": 0, "new": 0}, {"old": 0.0, "new": 0.0}, {"old": 0.0, "new": 0.0}
    path_now = ["old"]

    def counting(*x, **kw):
        opens[path_now[0]] += 1
        t = time.perf_counter()
        vr = real(*x, **kw)
        open_s[path_now[0]] += time.perf_counter() - t
        return vr

    def old_sample(i: int) -> tuple[int, np.ndarray]:
        # the old reader: open the video, decode this one segment
        s = segs[i]
        r = next(
            decode_video(
                paths[s.video_id], [Request(i, s.start, s.stop, s.start_frame, s.stop_frame)], frames, 1, size_fn
            )
        )
        assert r.error is None and r.frames is not None, r.error
        return i, r.frames

    # now: one reader per video per worker - Clips keeps it open, VideoChunks groups the
    # epoch's samples by video (in chunks of a batch); this one process stands for a worker
    clips = ftc.Clips(segs, paths, frames, bb)
    sampler = ftc.VideoChunks([s.video_id for s in segs], chunk, 1, 0, seed=0)

    def new_sample(i: int) -> tuple[int, np.ndarray]:
        j, f, err = clips[i]
        assert err is None and f is not None, err
        return j, f

    order = torch.randperm(len(segs), generator=torch.Generator().manual_seed(0)).tolist()  # the old shuffle
    digests: dict[str, dict[int, str]] = {"old": {}, "new": {}}
    # both paths construct readers through `decord.VideoReader` (video.open_reader imports
    # decord inside the function), so the counting wrapper sees every open; the two paths
    # take turns sample by sample, so both see the same load on a shared machine
    decord.VideoReader = counting
    try:
        for pair in itertools.zip_longest(order, list(sampler)):
            for name, i, fn in (("old", pair[0], old_sample), ("new", pair[1], new_sample)):
                if i is None:
                    continue
                path_now[0] = name
                t0 = time.perf_counter()
                j, f = fn(i)
                secs[name] += time.perf_counter() - t0
                digests[name][j] = hashlib.sha1(f.tobytes()).hexdigest()
    finally:
        decord.VideoReader = real
    same = sum(digests["old"][i] == digests["new"].get(i) for i in digests["old"])
    dur = 0.0
    for p in set(paths.values()):
        vr = real(str(p))
        dur += len(vr) / vr.get_avg_fps()
    print(
        f"{len(segs)} segments (T={frames}, resnet50 decode size) of {len(paths)} videos, "
        f"{dur / 60:.1f} min of 640x360 60 fps video; one process (= one worker), chunks of {chunk}; "
        f"same frames in both paths for {same}/{len(segs)} segments"
    )
    counts = {"old": len(order), "new": len(sampler)}
    for name, label in (("old", "per sample (old)"), ("new", "per video  (new)")):
        print(
            f"reader {label}: {opens[name]:4d} opens ({open_s[name]:5.1f} s inside decord.VideoReader), "
            f"{counts[name]:4d} samples in {secs[name]:6.1f} s, {counts[name] / secs[name]:6.2f} samples/s"
        )
    rate = (counts["new"] / secs["new"]) / (counts["old"] / secs["old"])
    print(f"-> {opens['old'] / max(opens['new'], 1):.0f}x fewer opens, {rate:.2f}x the samples/s")


def _epoch(loaded, cfg, gen, device):
    steps, batches = tr.cached_batches(loaded.train, loaded.norm, cfg, gen, device)
    return batches, steps


if __name__ == "__main__":
    main()
