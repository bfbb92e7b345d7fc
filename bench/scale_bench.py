"""A full-scale rehearsal of stage 1 on this machine, and the projection to EPIC-100.

Data (made once under --workdir, default bench/out/scale):
  - EPIC-like video: the shared EPIC 1080p50 H.264 clip (keyframes 250 frames apart, as
    the EPIC originals) remuxed end to end - no re-encoding - into --videos files of
    --minutes each (default 2 x 6 min = 12 min of 1080p50, 36,000 frames);
  - a short-GOP 1080p variant (the clip re-encoded once with a keyframe every 25 frames,
    then remuxed the same way) and the `ekx prepare` copy (320 px, keyframe every 0.5 s);
  - segments laid out like the official validation CSV: durations drawn from its
    9,668 segments (mean 3.7 s, median 2.0 s), placed at its coverage (75% of each
    video's time, segments may overlap as in the CSV).

Measured, side by side:
  (1) decode only, one process (= per core), K = 16 at the ResNet-50 decode size: useful
      frames/s from the originals, the short-GOP variant and the prepared copy;
  (2) decoder memory over a whole long video: RSS after each segment, peak, final and the
      slope in MiB per minute of video (no growth expected);
  (3) whole stage 1 on the 1080p originals (a --limit subset: the CPU runs the backbones
      at ~5-15 images/s): resnet50 alone, the three backbones in one pass, and the three
      as separate runs;
and the arithmetic of a whole-EPIC-100 extraction (three backbones) and of one
fine-tuning epoch on a node of 16 cores + 1 H200, and on 8 such nodes.

Run: `python bench/scale_bench.py` (about 25 minutes here; `--skip-extract` for 1-2 only).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ekx import epic
from ekx import prepare as pp
from ekx.extract import backbones
from ekx.extract.inputs import union_size
from ekx.extract.sources import decode_video
from ekx.extract.video import Request

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parents[1] / "shared"
CLIP = SHARED / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
EPIC = SHARED / "epic100"
K = 16


# ---------------------------------------------------------------- data


def loop_remux(src: Path, dst: Path, minutes: float) -> int:
    """Concatenate ``src``'s packets (no re-encoding) until ``minutes`` of video; returns frames."""
    import av

    if dst.is_file():
        with av.open(str(dst)) as c:
            return c.streams.video[0].frames
    with av.open(str(src)) as inp:
        s = inp.streams.video[0]
        packets = [p for p in inp.demux(s) if p.size]
        tb = s.time_base
        step = round(1 / (float(s.average_rate) * tb))
        span = (max(p.pts for p in packets) - min(p.pts for p in packets)) + step
        first = min(p.pts for p in packets)
        tmp = dst.with_name(dst.name + ".part")
        loops = int(np.ceil(minutes * 60 / float(span * tb)))
        with av.open(str(tmp), "w", format="mp4") as out:
            o = out.add_stream_from_template(s)
            n = 0
            for i in range(loops):
                for p in packets:
                    q = av.Packet(bytes(p))
                    q.pts = p.pts - first + i * span
                    q.dts = (p.dts if p.dts is not None else p.pts) - first + i * span
                    q.is_keyframe = p.is_keyframe
                    q.time_base = tb
                    q.stream = o
                    out.mux(q)
                    n += 1
    os.replace(tmp, dst)
    return n


def short_gop(src: Path, dst: Path, gop: int = 25) -> Path:
    """The clip re-encoded once at full size with a keyframe every ``gop`` frames."""
    if not dst.is_file():
        pp.transcode(src, dst, pp.Settings(short_side=100_000, keyframe_seconds=gop / 50, preset="ultrafast"))
    return dst


def write_annotations(root: Path, videos: dict[str, float], seed: int = 0) -> Path:
    """An official-format validation CSV over ``videos`` (id -> duration s), with the
    official validation split's segment durations and coverage; class lists copied."""
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for name in ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"):
        shutil.copy(EPIC / name, ann / name)
    rows = list(csv.DictReader(open(EPIC / "EPIC_100_validation.csv")))

    def t(s: str) -> float:
        h, m, x = s.split(":")
        return int(h) * 3600 + int(m) * 60 + float(x)

    durations = np.array([t(r["stop_timestamp"]) - t(r["start_timestamp"]) for r in rows])
    coverage = 0.749  # sum of segment durations / video time in the official validation split
    rng = np.random.default_rng(seed)
    out = []
    for vid, length in videos.items():
        pos, i = 0.2, 0
        while True:
            d = float(rng.choice(durations))
            gap = d * (1 / coverage - 1) * rng.uniform(0, 2)  # on average the official coverage
            if pos + d >= length - 0.2:
                break
            out.append((f"{vid}_{i}", vid, pos, pos + d, int(rng.integers(97)), int(rng.integers(300))))
            pos, i = pos + d + gap, i + 1

    def stamp(x: float) -> str:
        return f"{int(x // 3600):02d}:{int(x % 3600 // 60):02d}:{x % 60:05.2f}"

    header = rows[0].keys()
    with open(ann / epic.SPLIT_FILES["validation"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(header))
        w.writeheader()
        for nid, vid, a, b, v, n in out:
            w.writerow(
                {
                    "narration_id": nid,
                    "participant_id": vid.split("_")[0],
                    "video_id": vid,
                    "narration_timestamp": stamp(a),
                    "start_timestamp": stamp(a),
                    "stop_timestamp": stamp(b),
                    "start_frame": int(a * 50) + 1,
                    "stop_frame": int(b * 50),
                    "narration": "x",
                    "verb": "x",
                    "verb_class": v,
                    "noun": "x",
                    "noun_class": n,
                    "all_nouns": "['x']",
                    "all_noun_classes": f"[{n}]",
                }
            )
    return ann


def make_data(work: Path, n_videos: int, minutes: float) -> dict[str, Path]:
    """{input name: video root}, plus work/annotations."""
    roots = {"1080p originals (GOP 250)": work / "orig", "1080p short GOP (25)": work / "gop25"}
    gop25_clip = short_gop(CLIP, work / "clip-gop25.mp4")
    prepared_clip = work / "clip-prepared.mp4"
    if not prepared_clip.is_file():
        pp.transcode(CLIP, prepared_clip, pp.Settings())
    durations = {}
    for i in range(n_videos):
        vid = f"P90_{i + 1:02d}"
        for root, clip in ((roots["1080p originals (GOP 250)"], CLIP), (roots["1080p short GOP (25)"], gop25_clip)):
            root.mkdir(parents=True, exist_ok=True)
            n = loop_remux(clip, root / f"{vid}.MP4", minutes)
        durations[vid] = n / 50
    prepared = work / "prepared"
    prepared.mkdir(exist_ok=True)
    for vid in durations:
        loop_remux(prepared_clip, prepared / f"{vid}.MP4", minutes)
    pp.check_manifest(prepared, pp.Settings())  # as `ekx prepare` leaves it
    roots["prepared copy (320 px, GOP 0.5 s)"] = prepared
    write_annotations(work, durations)
    return roots


# ---------------------------------------------------------------- measurements


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def decode_only(root: Path, segments: list[epic.Segment], size_fn, clip_len: int = 1) -> dict:
    """One process over every video: useful frames/s, and RSS along the way."""
    found, _ = epic.locate_videos(segments, root)
    by_video: dict[str, list[Request]] = {}
    for i, s in enumerate(segments):
        by_video.setdefault(s.video_id, []).append(Request(i, s.start, s.stop))
    useful, t0, samples = 0, time.perf_counter(), []
    for vid, reqs in by_video.items():
        for res in decode_video(found[vid], reqs, K, clip_len, size_fn):
            assert res.error is None, res.error
            useful += len(res.frames) // clip_len  # sampled positions (each a clip when clip_len > 1)
            samples.append((segments[res.row].stop, rss_mib()))
    seconds = time.perf_counter() - t0
    t = np.array([s[0] for s in samples])
    r = np.array([s[1] for s in samples])
    half = len(r) // 2
    slope = float(np.polyfit(t[half:] / 60, r[half:], 1)[0]) if half > 2 else 0.0
    return {
        "fps": useful / seconds,
        "useful": useful,
        "seconds": seconds,
        "peak": r.max(),
        "final": r[-1],
        "slope": slope,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "scale")
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--limit", type=int, default=24, help="segments of the stage-1 runs")
    ap.add_argument("--frames", type=int, default=8, help="K of the stage-1 runs")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-decode", action="store_true", help="only the stage-1 runs (3)")
    args = ap.parse_args()
    if not CLIP.is_file():
        raise SystemExit(f"{CLIP}: the shared clips are needed (../shared beside the repository)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    roots = make_data(args.workdir, args.videos, args.minutes)
    ann = epic.Annotations(args.workdir / "annotations")
    segments = ann.segments("validation")
    total = sum(s.stop - s.start for s in segments)
    minutes = args.videos * args.minutes
    print(
        f"data: {args.videos} x {args.minutes:g} min of 1080p50 ({len(segments)} segments, mean "
        f"{total / len(segments):.1f} s, {total / (minutes * 60):.0%} of the video time) "
        f"ready in {time.perf_counter() - t0:.0f} s"
    )
    if args.skip_decode:
        extract_rows(args, roots["1080p originals (GOP 250)"])
        return
    size_fn = backbones.get("resnet50").preprocess.decode_size
    decode = {}
    print(f"\n(1)+(2) decode only, one process, K={K}, resnet50 decode size")
    for name, root in roots.items():
        d = decode[name] = decode_only(root, segments, size_fn)
        print(
            f"  {name:<36} {d['fps']:7.1f} useful frames/s/core   RSS peak {d['peak']:6.0f} MiB, "
            f"final {d['final']:6.0f} MiB, slope {d['slope']:+.2f} MiB per minute of video",
            flush=True,
        )
    union = union_size([backbones.get(n) for n in ("resnet50", "efficientnet_b3", "r2plus1d_18")])
    print("  the three backbones' union: 8-frame clips at each position, at the largest decode size (EfficientNet-B3)")
    for name in ("1080p originals (GOP 250)", "prepared copy (320 px, GOP 0.5 s)"):
        d = decode[f"{name}, 3-backbone union"] = decode_only(roots[name], segments, union, clip_len=8)
        print(
            f"  {name + ', union':<36} {d['fps']:7.1f} positions/s/core      RSS peak {d['peak']:6.0f} MiB, "
            f"final {d['final']:6.0f} MiB, slope {d['slope']:+.2f} MiB per minute of video",
            flush=True,
        )
    base = decode["1080p originals (GOP 250)"]["fps"]
    prep = decode["prepared copy (320 px, GOP 0.5 s)"]["fps"]
    print(f"  prepared copy / originals: {prep / base:.1f}x (target >= 8x)")
    if not args.skip_extract:
        extract_rows(args, roots["1080p originals (GOP 250)"])
    projection(decode)


def extract_rows(args, videos: Path) -> None:
    from ekx.extract.pipeline import ExtractConfig, extract_many

    print(f"\n(3) whole stage 1 on the 1080p originals, {args.limit} segments, K={args.frames}, 2 decode workers")
    names = ["resnet50", "efficientnet_b3", "r2plus1d_18"]

    def run(backbone: str, tag: str) -> float:
        out = args.workdir / "features" / tag
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig(backbone=backbone, split="validation", weights="none", frames=args.frames, workers=2)
        cfg.limit = args.limit
        t0 = time.perf_counter()
        extract_many(cfg, args.workdir / "annotations", videos, out, warn=lambda m: None)
        return time.perf_counter() - t0

    one = run("resnet50", "one")
    print(f"  resnet50 alone:                  {one:7.1f} s", flush=True)
    separate = {}
    for b in names:
        separate[b] = run(b, f"sep-{b}")
        print(f"  {b} alone:{'':<{22 - len(b)}} {separate[b]:7.1f} s", flush=True)
    together = run(",".join(names), "together")
    sep = sum(separate.values())
    print("  three separate runs:             " + " + ".join(f"{v:.1f}" for v in separate.values()) + f" = {sep:.1f} s")
    print(
        f"  three backbones in one pass:     {together:7.1f} s  "
        f"({together / sep:.2f}x the separate runs; target <= 0.6x)"
    )


# Projection constants (stated, not measured here: no GPU was lent to this task).
H200_FP16_DENSE = 989e12  # FLOP/s, dense fp16 tensor cores (H100/H200 SXM datasheet)
UTILISATION = {"resnet50": 0.30, "efficientnet_b3": 0.10, "r2plus1d_18": 0.30}  # depthwise convs run far below peak
SEGMENTS = {"train": 67217, "validation": 9668, "test": 13092}


def gflop_per_segment(name: str, k: int = K) -> float:
    """Forward GFLOP of one segment: torchvision's per-input count (multiply-adds) x 2."""
    bb = backbones.get(name)
    ops = float(bb.weights.DEFAULT.meta["_ops"])
    if bb.clip_len > 1:  # torchvision counts a 16-frame clip; ekx feeds clip_len frames per position
        ops *= bb.clip_len / 16
    return 2 * ops * k


TRANSCODE_PER_CORE = 62.5  # 1080p50 frames/s per core of `ekx prepare` (bench/prepare_bench.py: 125/s on 2 cores)


def projection(decode: dict) -> None:
    """Whole-EPIC-100 arithmetic from the measured per-core decode rates."""
    info = list(csv.DictReader(open(EPIC / "EPIC_100_video_info.csv")))
    frames = sum(float(r["duration"]) * float(r["fps"]) for r in info)
    hours = sum(float(r["duration"]) for r in info) / 3600
    n_seg = sum(SEGMENTS.values())
    cores, nodes = 16, 8
    useful = n_seg * K
    print(f"\nprojection: EPIC-100 = {len(info)} videos, {hours:.0f} h, {frames / 1e6:.1f} M frames, {n_seg} segments,")
    print(
        f"  {useful / 1e6:.2f} M sampled positions at K={K}; a node = {cores} cores + 1 H200; {nodes} nodes under SLURM"
    )
    gpu = {}
    for name in ("resnet50", "efficientnet_b3", "r2plus1d_18"):
        flop = gflop_per_segment(name) * 1e9 * n_seg
        gpu[name] = flop / (H200_FP16_DENSE * UTILISATION[name])
        print(
            f"  GPU {name:<16} {gflop_per_segment(name):5.0f} GFLOP/segment x {n_seg} = {flop / 1e15:5.1f} PFLOP "
            f"/ (989 TFLOP/s x {UTILISATION[name]:.0%}) = {gpu[name] / 60:4.1f} min"
        )
    g3 = sum(gpu.values())
    print(f"  GPU, all three backbones: {g3 / 60:.1f} min")
    for name in ("1080p originals (GOP 250)", "prepared copy (320 px, GOP 0.5 s)"):
        one, union = decode.get(name), decode.get(f"{name}, 3-backbone union")
        if not one or not union:
            continue
        d1 = useful / (one["fps"] * cores)  # one backbone's pass (at ResNet-50's size)
        du = useful / (union["fps"] * cores)  # the pass serving all three
        # decode workers overlap the GPU, so a pass takes the longer of the two
        together = max(du, g3)
        separate = sum(max(d1, g) for g in gpu.values())
        print(
            f"  {name}: one backbone's decode {useful / 1e6:.2f} M / ({one['fps']:.0f}/s x {cores}) = "
            f"{d1 / 60:.0f} min; the three-backbone decode / ({union['fps']:.0f}/s x {cores}) = {du / 60:.0f} min"
        )
        print(
            f"    -> three backbones in one pass max({du / 60:.0f}, {g3 / 60:.1f}) = {together / 60:.0f} min "
            f"on one node ({together / nodes / 60:.1f} min on {nodes}); three separate passes {separate / 60:.0f} min"
        )
    print(
        f"  one-time `ekx prepare`: {frames / 1e6:.1f} M frames / ({TRANSCODE_PER_CORE:.0f}/s x {cores}) = "
        f"{frames / (TRANSCODE_PER_CORE * cores) / 3600:.1f} h on one node, "
        f"{frames / (TRANSCODE_PER_CORE * cores * nodes) / 3600:.1f} h on {nodes} (an array job)"
    )
    prep = decode.get("prepared copy (320 px, GOP 0.5 s)")
    if prep:
        train = SEGMENTS["train"] * K
        dec = train / (prep["fps"] * cores)
        fwd_bwd = 3 * gflop_per_segment("resnet50") * 1e9 * SEGMENTS["train"] / (H200_FP16_DENSE * 0.30)
        val = SEGMENTS["validation"] * K / (prep["fps"] * cores)
        epoch = max(dec, fwd_bwd) + val
        print(
            f"  fine-tuning epoch (ResNet-50 + head, {SEGMENTS['train']} train segments, K={K}, prepared copy): "
            f"decode {dec / 60:.1f} min vs GPU forward+backward (3x forward) {fwd_bwd / 60:.1f} min, "
            f"+ validation decode {val / 60:.1f} min = ~{epoch / 60:.0f} min on one node, "
            f"~{epoch / nodes / 60:.1f} min on {nodes} (DDP: each node decodes its share)"
        )


if __name__ == "__main__":
    main()
