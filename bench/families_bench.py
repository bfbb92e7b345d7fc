"""Backbone families side by side on one real clip (random weights: speed is the same).

For each backbone - resnet50 (the reference), a timm ViT-S/16 and ConvNeXt-T, an OpenCLIP
ViT-B/32 image tower and VideoMAE-B (a Hugging Face clip model, 16 frames, from a local
config directory) - on the 1080p50 EPIC clip in ../shared/clips:

  (a) decode only: useful frames/s at that backbone's decode size (ekx's reader, 1 worker)
  (b) backbone only: preprocessing + batched inference on the decoded frames
  (c) ekx end to end: `ekx extract`, useful frames/s (first segment to last write)
  c / (1/(1/a+1/b)): the fraction of the decode + compute limit ekx reaches

plus each model's GFLOPs per input (counted by torch.utils.flop_counter on meta tensors,
no weights needed) and the arithmetic of a whole EPIC-100 extraction on one H200.
Run: `python bench/families_bench.py` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from ekx import epic
from ekx.extract import backbones
from ekx.extract.pipeline import ExtractConfig, VideoJobs, extract, identity_collate
from ekx.extract.video import Request
from ekx.runtime import autocast, resolve_precision

ROOT = Path(__file__).resolve().parent
CLIP = ROOT.parents[1] / "shared" / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
SEGMENTS = [(0.25 + 2.5 * i, 2.25 + 2.5 * i) for i in range(5)]  # 2 s segments over the 14 s clip
# EPIC-100 segments over train + validation + test (67,217 + 9,668 + 13,092)
EPIC_SEGMENTS = 89_977


def workspace(out: Path) -> tuple[Path, Path]:
    videos, ann = out / "videos", out / "annotations"
    videos.mkdir(parents=True, exist_ok=True)
    ann.mkdir(exist_ok=True)
    if not (videos / "P90_01.mp4").exists():
        (videos / "P90_01.mp4").symlink_to(CLIP)
    rows = [
        [f"P90_01_{i}", "P90", "P90_01", "00:00:00.000", epic.format_timestamp(a), epic.format_timestamp(b), 0, 0]
        for i, (a, b) in enumerate(SEGMENTS)
    ]
    with open(ann / "EPIC_100_test_timestamps.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([epic.TEST_COLUMNS, *rows])
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    return videos, ann


def videomae_base(out: Path) -> Path:
    """VideoMAE-B's architecture (transformers' VideoMAEConfig defaults: 16 frames, 224 px,
    ViT-B) with videomae-base's processor values, as a local directory (no download)."""
    from transformers import VideoMAEConfig, VideoMAEImageProcessor

    d = out / "videomae-base-config"
    if not (d / "config.json").exists():
        VideoMAEConfig().save_pretrained(d)
        VideoMAEImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


def gflops(bb: backbones.Backbone) -> float:
    """GFLOPs (multiply-adds x 2) of one input: an image, or a clip for a clip model."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = bb.preprocess.crop_size
    shape = (1, 3, h, w) if bb.clip_len == 1 else (1, 3, bb.clip_len, h, w)
    try:
        with torch.device("meta"):
            model, x = bb.build().eval(), torch.zeros(shape)
    except Exception:  # a library that moves its model to a device itself (OpenCLIP): real tensors
        model, x = bb.build().eval(), torch.zeros(shape)
    counter = FlopCounterMode(display=False)
    with counter:  # with autograd on: nn.MultiheadAttention's inference fast path is one op the counter misses
        model(x)
    return counter.get_total_flops() / 1e9


def measure(name: str, k: int, workers: int, batch: int, precision: str, out: Path, device: str) -> dict:
    bb = backbones.get(name)
    videos, ann = workspace(out)
    segs = epic.Annotations(ann).segments("test")
    reqs = [Request(i, s.start, s.stop) for i, s in enumerate(segs)]
    loader = torch.utils.data.DataLoader(
        VideoJobs([(CLIP, reqs)], k, bb.clip_len, bb.preprocess.decode_size),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
    )
    t0 = time.perf_counter()
    results = list(loader)
    a = sum(len(r.frames) for r in results) / (time.perf_counter() - t0)
    torch.manual_seed(0)
    model = backbones.fuse_for_inference(bb.build().eval())
    fmt = torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d
    dev = torch.device(device)
    model = model.to(dev).to(memory_format=fmt)
    frames = torch.cat([torch.from_numpy(r.frames).permute(0, 3, 1, 2) for r in results]).to(dev)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(dev, precision):
        x = bb.preprocess(frames)
        if bb.clip_len > 1:
            x = x.reshape(-1, bb.clip_len, *x.shape[1:]).transpose(1, 2)
        step = max(1, batch // bb.clip_len)
        for i in range(0, len(x), step):
            model(x[i : i + step].contiguous(memory_format=fmt))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    b = len(frames) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        clock: dict[str, float] = {}
        cfg = ExtractConfig(
            split="test", weights="none", frames=k, workers=workers, batch_size=batch, backbone=name,
            precision=precision, device=device, out=Path(tmp) / "f.h5",
        )  # fmt: skip
        s = extract(
            cfg, ann, videos, Path(tmp), warn=lambda m: None,
            on_start=lambda total, done: clock.setdefault("t", time.perf_counter()),
        )  # fmt: skip
        c = s.frames / (time.perf_counter() - clock["t"])
    return {"name": name, "a": a, "b": b, "c": c, "gflops": gflops(bb), "clip": bb.clip_len, "dim": bb.dim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8, help="K positions per segment")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="where the backbones run (cuda on a GPU machine)")
    args = ap.parse_args()
    if not CLIP.is_file():
        sys.exit(f"{CLIP} is absent: this bench reads the shared 1080p50 EPIC clip")
    out = ROOT / "out" / "families"
    names = ["resnet50", "timm:vit_small_patch16_224", "timm:convnext_tiny", "open_clip:ViT-B-32"]
    try:
        names.append(f"hf:{videomae_base(out)}")
    except ImportError:
        print("note: transformers absent (pip install 'ekx[hf]'): the VideoMAE row is skipped", file=sys.stderr)
    precision = resolve_precision("auto", torch.device(args.device))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU {torch.backends.cpu.get_cpu_capability()}, device {args.device}, precision {precision}; "
        f"{CLIP.name}, {len(SEGMENTS)} segments, K={args.frames}, random weights"
    )
    rows = []
    for name in names:
        r = measure(name, args.frames, args.workers, args.batch_size, precision, out, args.device)
        rows.append(r)
        print(f"{name}: a={r['a']:.1f} b={r['b']:.1f} c={r['c']:.1f} frames/s, {r['gflops']:.1f} GFLOPs", flush=True)
    print()
    print("| backbone | clip | GFLOPs / input | (a) decode | (b) backbone | (c) ekx | c / (1/(1/a+1/b)) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ideal = 1 / (1 / r["a"] + 1 / r["b"])
        short = "hf:VideoMAE-B (local config)" if r["name"].startswith("hf:") else r["name"]
        print(
            f"| {short} | {r['clip']} | {r['gflops']:.1f} | {r['a']:.1f} | {r['b']:.1f} | {r['c']:.1f} | "
            f"{r['c'] / ideal:.2f} |"
        )
    print(
        f"\nWhole EPIC-100 on one H200 (K=16 inputs per segment x {EPIC_SEGMENTS:,} segments; bf16 dense peak "
        "989 TFLOP/s, at an assumed 40% utilisation = 396 TFLOP/s):"
    )
    for r in rows:
        total = EPIC_SEGMENTS * 16 * r["gflops"] * 1e9
        print(f"  {r['name'][:40]}: {EPIC_SEGMENTS:,} x 16 x {r['gflops']:.1f} GFLOP = {total / 1e15:.1f} PFLOP "
              f"-> {total / 396e12 / 60:.1f} min of compute")  # fmt: skip


if __name__ == "__main__":
    main()
