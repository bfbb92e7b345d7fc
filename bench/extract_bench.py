"""Stage-1 throughput, measured side by side in one run (these machines are noisy).

For each source - the real EPIC clips in ../shared/clips and a synthetic 1080p 60 fps
H.264 video - and resnet50 at 224 px:

  (a) decode only: ekx's decoder (DataLoader workers), useful frames/s
  (b) backbone only: preprocessing + batched inference on pre-decoded frames
  (c) ekx end to end: `ekx extract`, useful frames/s (from first segment to last write)
  (d) naive baseline: a seek per segment at full resolution, per-frame PIL transforms,
      fp32, batch of one

Targets: (c) >= 0.8 x 1/(1/a + 1/b) and (c) >= 3 x (d); fp16 features vs an fp32
reference: cosine >= 0.999. Run: `python bench/extract_bench.py` (about 5 minutes here).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import torch
from PIL import Image

from ekx import epic
from ekx.cache.reader import open_cache
from ekx.extract import backbones
from ekx.extract.pipeline import ExtractConfig, VideoJobs, extract, identity_collate
from ekx.extract.video import Request
from ekx.runtime import autocast, resolve_precision
from ekx.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parents[1] / "shared"
K = 16


def make_sources(out: Path) -> dict[str, Path]:
    """Two data sets in the official layout: the real clips, and a synthetic 1080p60 video."""
    sources = {}
    synth = out / "synth1080"
    if not (synth / "annotations" / "EPIC_100_train.csv").exists():
        synthesize(synth, SynthConfig(videos=3, segments=8, width=1920, height=1080, fps=(60,), seed=7))
    sources["synthetic 1080p60 H.264"] = synth
    clips = SHARED / "clips"
    if clips.is_dir():
        data = out / "clips"
        (data / "videos").mkdir(parents=True, exist_ok=True)
        (data / "annotations").mkdir(exist_ok=True)
        rows = []
        # MP4 only: both video sources refuse the MPEG-2 program stream (wrong frames there)
        for i, clip in enumerate(sorted(clips.glob("*.mp4"))):
            vid = f"P90_{i:02d}"
            link = data / "videos" / f"{vid}{clip.suffix}"
            if not link.exists():
                link.symlink_to(clip)
            vr = decord.VideoReader(str(clip))
            dur = len(vr) / vr.get_avg_fps()
            for j, t in enumerate(np.arange(0.25, dur - 2.0, 2.5)):  # 2 s segments, 0.5 s gaps
                rows.append(
                    [
                        f"{vid}_{j}",
                        "P90",
                        vid,
                        epic.format_timestamp(t) + "0",
                        epic.format_timestamp(t),
                        epic.format_timestamp(t + 2.0),
                        0,
                        0,
                        "x",
                        "x",
                        0,
                        "x",
                        0,
                        "['x']",
                        "[0]",
                    ]
                )
        with open(data / "annotations" / epic.SPLIT_FILES["train"], "w", newline="") as fh:
            csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
        for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
            (data / "annotations" / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
        sources["EPIC clips (4 real MP4 files)"] = data
    else:
        print(f"note: {clips} absent, real-clip rows skipped", file=sys.stderr)
    return sources


def jobs_of(data: Path) -> tuple[list, list[epic.Segment]]:
    segs = epic.Annotations(data / "annotations").segments("train")
    found, _ = epic.locate_videos(segs, data / "videos")
    by_video: dict[str, list[Request]] = {}
    for i, s in enumerate(segs):
        by_video.setdefault(s.video_id, []).append(Request(i, s.start, s.stop))
    return [(found[v], r) for v, r in by_video.items()], segs


def decode_only(jobs, bb, workers: int) -> tuple[float, list]:
    loader = torch.utils.data.DataLoader(
        VideoJobs(jobs, K, 1, bb.preprocess.decode_size),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
    )
    t0, results = time.perf_counter(), []
    for res in loader:
        results.append(res)
    dt = time.perf_counter() - t0
    return sum(len(r.frames) for r in results) / dt, sorted(results, key=lambda r: r.row)


def backbone_only(model, bb, results, precision: str, batch: int) -> tuple[float, np.ndarray]:
    frames = [torch.from_numpy(r.frames).permute(0, 3, 1, 2) for r in results]
    t0, outs = time.perf_counter(), []
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        x = torch.cat([bb.preprocess(f) for f in frames]).contiguous(memory_format=torch.channels_last)
        for i in range(0, len(x), batch):
            outs.append(model(x[i : i + batch]).float())
    dt = time.perf_counter() - t0
    return len(x) / dt, torch.cat(outs).numpy()


def end_to_end(data: Path, workers: int, batch: int) -> tuple[float, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        clock = {}
        cfg = ExtractConfig(
            split="train", weights="none", frames=K, workers=workers, batch_size=batch, out=Path(tmp) / "f.h5"
        )
        s = extract(
            cfg,
            data / "annotations",
            data / "videos",
            Path(tmp),
            warn=lambda m: None,
            on_start=lambda total, done: clock.setdefault("t", time.perf_counter()),
        )
        dt = time.perf_counter() - clock["t"]
        return s.frames / dt, open_cache(cfg.out).features()[:, 0].reshape(-1, 2048)


def naive(jobs, segs, model, limit_segments: int) -> float:
    """The loop a first script writes: seek per segment, PIL per frame, fp32, batch of one."""
    transforms = backbones.get("resnet50").weights.DEFAULT.transforms()
    # segments taken round-robin over the videos, so every resolution is represented
    order = [(path, reqs[i]) for i in range(max(len(r) for _, r in jobs)) for path, reqs in jobs if i < len(reqs)]
    frames_done, t0 = 0, time.perf_counter()
    for path, r in order[:limit_segments]:
        vr = decord.VideoReader(str(path))
        t = r.start + (np.arange(K) + 0.5) * (r.stop - r.start) / K
        idx = np.minimum(np.round(t * vr.get_avg_fps()).astype(int), len(vr) - 1)
        for frame in vr.get_batch(list(idx)).asnumpy():
            with torch.no_grad():
                model(transforms(Image.fromarray(frame))[None])
            frames_done += 1
    return frames_done / (time.perf_counter() - t0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--naive-segments", type=int, default=6, help="segments timed for the slow baseline")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = backbones.get("resnet50")
    precision = resolve_precision("auto", torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"ekx precision on this CPU: {precision}; resnet50 @224, K={K}, weights: random (speed is the same)"
    )
    from ekx.runtime import cpu_bf16_units

    if not cpu_bf16_units():  # the auto precision's bf16 speed-up needs bf16 units: say so, time no bf16 row
        print("no AMX or AVX512-BF16 here: --precision auto is fp32 on this CPU (bf16 would time the emulated path)")
    else:
        print(f"{cpu_bf16_units()} here: --precision auto is bf16; (b) is also timed in fp32, side by side")
    rows = []
    for name, data in make_sources(ROOT / "out").items():
        jobs, segs = jobs_of(data)
        model = backbones.fuse_for_inference(bb.build().eval()).to(memory_format=torch.channels_last)
        a, results = decode_only(jobs, bb, args.workers)
        b, _ = backbone_only(model, bb, results, precision, args.batch_size)
        if precision != "fp32":
            b32, _ = backbone_only(model, bb, results, "fp32", args.batch_size)
            print(f"{name}: (b) backbone {precision} {b:.1f} vs fp32 {b32:.1f} frames/s ({b / b32:.2f}x)", flush=True)
        c, _ = end_to_end(data, args.workers, args.batch_size)
        d = naive(jobs, segs, bb.build().eval(), args.naive_segments)
        ideal = 1 / (1 / a + 1 / b)
        rows.append((name, len(segs), a, b, c, d, ideal))
        print(f"{name}: {len(segs)} segments; a={a:.1f} b={b:.1f} c={c:.1f} d={d:.1f} frames/s", flush=True)
    print()
    print("| source | segments | (a) decode | (b) backbone | (c) ekx | (d) naive | c / (1/(1/a+1/b)) | c / d |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, a, b, c, d, ideal in rows:
        print(f"| {name} | {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {c / ideal:.2f} | {c / d:.1f} |")
    fp16_report(bb)


def fp16_report(bb) -> None:
    """Cosine of what the cache stores (fp16, and bf16 autocast where used) to fp32 features."""
    torch.manual_seed(0)
    model = bb.build().eval()
    data = ROOT / "out" / "synth1080"
    jobs, _ = jobs_of(data)
    _, results = decode_only(jobs[:1], bb, 0)
    x = torch.cat([bb.preprocess(torch.from_numpy(r.frames).permute(0, 3, 1, 2)) for r in results[:2]])
    backbones.calibrate_batchnorm(model, [x])
    with torch.inference_mode():
        ref = model(x).numpy()
        low = {}
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            with torch.autocast("cpu", dtype=dtype):
                low[name] = model(x).float().numpy()
    print(
        f"\ncosine to fp32 features, min over {len(x)} frames: stored as float16 "
        f"{cosine(ref.astype(np.float16), ref).min():.6f}; fp16 autocast + float16 "
        f"{cosine(low['fp16'].astype(np.float16), ref).min():.6f}; bf16 autocast + float16 "
        f"{cosine(low['bf16'].astype(np.float16), ref).min():.6f}"
    )


if __name__ == "__main__":
    main()
