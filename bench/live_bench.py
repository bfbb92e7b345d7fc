"""`ekx live` / `ekx predict` inference costs for resnet50 + lstm on this machine.

  - per-frame backbone latency (one frame, as the live loop runs it) and per-window head
    latency ([1, K, 2048] -> verb/noun probabilities);
  - the feature ring vs recomputing the whole window every stride, side by side
    (target: the ring is >= K / stride-frames times cheaper);
  - sustained live fps: `run_live` on a real 1080p clip fed as fast as it can take frames,
    and played in real time (frames dropped, latency).

Random weights (no downloads here): latency does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ekx.extract import backbones
from ekx.heads import models
from ekx.heads.data import positions
from ekx.live import run_live
from ekx.predict import RunModel

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT.parent / "shared" / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"


def make_model(k: int) -> RunModel:
    bb = backbones.get("resnet50")
    net, _ = backbones.load_weights(bb, "none", 0)
    net = backbones.fuse_for_inference(net).to(memory_format=torch.channels_last)
    head = models.create("lstm", dim=bb.dim, num_verbs=97, num_nouns=300, frames=k, dropout=0.5, drop_path=0.1).eval()
    return RunModel(
        net,
        bb.preprocess,
        1,
        bb.dim,
        head,
        torch.zeros(bb.dim),
        torch.ones(bb.dim),
        k,
        positions(k, k, 1, False, None)[0],
        [f"v{i}" for i in range(97)],
        [f"n{i}" for i in range(300)],
        torch.device("cpu"),
        "fp32",
    )


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16, help="K frames per window")
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--stride", type=float, default=0.5)
    ap.add_argument("--strides", type=int, default=6, help="strides timed per mode")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of the clip for the live runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = make_model(args.frames)
    k = args.frames
    step = max(1, round(args.stride / (args.window / k)))
    frame = torch.randint(0, 255, (1, 3, 232, 412), dtype=torch.uint8)  # a 16:9 frame at the decode size
    window = torch.randn(1, k, model.dim)
    model.features(frame), model.classify(window)  # warm-up
    bb_ms = median_ms(lambda: model.features(frame), 20)
    head_ms = median_ms(lambda: model.classify(window), 50)
    print(f"resnet50 backbone, one frame:        {bb_ms:7.1f} ms  ({1000 / bb_ms:.1f} frames/s)")
    print(f"lstm head, one window [1, {k}, 2048]: {head_ms:7.2f} ms")

    ring = torch.randn(k, model.dim)
    frames = frame.expand(k, -1, -1, -1).contiguous()

    def ring_stride():  # the live loop: `step` new frames, one at a time, then the head on the ring
        for _ in range(step):
            ring[:-1] = ring[1:].clone()
            ring[-1] = model.features(frame)[0]
        model.classify(ring[None])

    def recompute_stride():  # no ring: the whole window through the backbone (batched), then the head
        model.classify(model.features(frames)[None])

    def ring_backbone():
        for _ in range(step):
            model.features(frame)

    def window_backbone():
        model.features(frames)

    r_ms, w_ms, rb_ms, wb_ms = [], [], [], []
    for _ in range(args.strides):  # interleaved, so drift on a noisy machine hits both alike
        r_ms.append(median_ms(ring_stride, 1))
        w_ms.append(median_ms(recompute_stride, 1))
        rb_ms.append(median_ms(ring_backbone, 1))
        wb_ms.append(median_ms(window_backbone, 1))
    r, w = statistics.median(r_ms), statistics.median(w_ms)
    rb, wb = statistics.median(rb_ms), statistics.median(wb_ms)
    print(f"per stride ({args.stride:g} s = {step} new frames of K={k}), target >= K/stride-frames = {k / step:.1f}x:")
    print(
        f"  backbone work: ring {rb:.0f} ms ({step} frames one by one), recompute {wb:.0f} ms ({k} frames batched) "
        f"-> ring {wb / rb:.2f}x cheaper"
    )
    print(
        f"  whole stride (+ the head, the same in both): ring {r:.0f} ms, recompute {w:.0f} ms -> {w / r:.2f}x "
        f"(bounded by (K f + h) / (s f + h) < K/s)"
    )

    if not CLIP.is_file():
        print(f"{CLIP} absent: live runs skipped")
        return
    for realtime in (False, True):
        out = run_live(
            model,
            video=CLIP,
            realtime=realtime,
            window=args.window,
            stride=args.stride,
            headless=True,
            seconds=args.seconds,
        )
        lat = sorted(out.latency_ms) or [0.0]
        mode = "real time (50 fps file)" if realtime else "as fast as possible    "
        print(
            f"live, {mode}: {out.fps:5.1f} frames/s through the backbone, {out.samples} sampled, "
            f"{out.dropped} dropped, latency median {lat[len(lat) // 2]:.0f} ms max {lat[-1]:.0f} ms, "
            f"RSS {min(out.rss_mb or [0]):.0f}-{max(out.rss_mb or [0]):.0f} MiB"
        )


if __name__ == "__main__":
    main()
