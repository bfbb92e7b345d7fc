"""bf16 vs fp32 on the CPU, per backbone: how close bf16 features stay to fp32's, beside the
input's own noise floor, and how much faster bf16 runs - side by side in one run.

For each backbone (the built-in ones and, where their libraries are installed, a timm and
an OpenCLIP model), on frames of the 1080p50 EPIC clip (../shared/clips):

- random weights, BatchNorm statistics measured on the clip's frames (random statistics
  make every feature nearly the same vector, and every cosine meaningless), BatchNorm folded
  and channels_last, as `ekx extract` runs it;
- fidelity: per-frame cosine of bf16 autocast features (stored as float16, as the cache
  stores them) to fp32 features - min and median;
- noise floor: the cosine of each input's fp32 features to the next sampled input's (0.6 s
  later for frames, 2.3 s for clips), the median: how far the input moves features on its own;
- speed: images (or clips) per second in fp32 and in bf16, timed alternately (2 rounds each,
  the best of each), this machine's threads.

Where the CPU has no bf16 matrix math (neither AMX-BF16 nor AVX512-BF16), the bf16 speed
is the emulated path's and the run says so. Run: `python bench/precision_bench.py
[--backbones resnet50,efficientnet_b3] [--frames 24]` (about 4 minutes here).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import decord
import numpy as np
import torch

from ekx.extract import backbones
from ekx.runtime import autocast, cpu_bf16_units

CLIP = Path(__file__).resolve().parents[2] / "shared" / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
DEFAULT = ["resnet50", "efficientnet_b3", "r2plus1d_18"]
OPTIONAL = {"timm": "timm:vit_small_patch16_224", "open_clip": "open_clip:ViT-B-32"}


def inputs(bb, vr, n: int) -> torch.Tensor:
    """n model inputs spread over the clip: frames, or clips of clip_len consecutive frames."""
    step = max(1, (len(vr) - bb.clip_len) // n)
    idx = [s + j for s in range(0, step * n, step) for j in range(bb.clip_len)]
    frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
    x = bb.preprocess(frames)
    if bb.clip_len > 1:  # [n * clip, 3, h, w] -> [n, 3, clip, h, w], as ekx.extract.inputs does
        x = x.reshape(n, bb.clip_len, *x.shape[1:]).transpose(1, 2)
    return x.contiguous(memory_format=torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d)


def features(model, x: torch.Tensor, precision: str, batch: int) -> tuple[np.ndarray, float]:
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        model(x[:batch])  # warm-up: oneDNN picks and caches its kernels
        t0 = time.perf_counter()
        out = torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])
    return out.numpy(), len(x) / (time.perf_counter() - t0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="", help="comma-separated (default: built-ins + timm/OpenCLIP if installed)")
    ap.add_argument("--frames", type=int, default=24, help="inputs per backbone (clip models: a quarter as many clips)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if not CLIP.is_file():
        raise SystemExit(f"{CLIP} not found: this bench reads the shared EPIC clip beside the repository")
    names = (
        args.backbones.split(",")
        if args.backbones
        else DEFAULT + [n for lib, n in OPTIONAL.items() if importlib.util.find_spec(lib)]
    )
    units = cpu_bf16_units()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 units: {units or 'none'}"
        + ("" if units else " (no AMX or AVX512-BF16 here: the bf16 column times the emulated path)")
    )
    vr = decord.VideoReader(str(CLIP))
    rows = []
    for name in names:
        torch.manual_seed(0)
        bb = backbones.get(name)
        n = args.frames if bb.clip_len == 1 else max(2, args.frames // 4)
        x = inputs(bb, vr, n)
        model = bb.build().eval()
        if backbones.has_batchnorm(model):
            backbones.calibrate_batchnorm(model, [x])
        model = backbones.fuse_for_inference(model).to(
            memory_format=torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d
        )
        speed: dict[str, list[float]] = {"fp32": [], "bf16": []}
        out = {}
        for _ in range(2):
            for p in ("fp32", "bf16"):
                out[p], s = features(model, x, p, args.batch_size)
                speed[p].append(s)
        fid = cosine(out["bf16"].astype(np.float16), out["fp32"])
        floor = cosine(out["fp32"][1:], out["fp32"][:-1])
        f32, b16 = max(speed["fp32"]), max(speed["bf16"])
        rows.append((name, n, bb.clip_len, fid.min(), statistics.median(fid), statistics.median(floor), f32, b16))
        print(f"{name}: done", flush=True)
    print()
    print("| backbone | inputs | bf16 vs fp32 cosine (min / median) | next input vs this one (median) "
          "| fp32 inputs/s | bf16 inputs/s | bf16 / fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, n, clip, lo, med, floor, f32, b16 in rows:
        what = f"{n} clips of {clip}" if clip > 1 else f"{n} frames"
        print(f"| {name} | {what} | {lo:.4f} / {med:.4f} | {floor:.4f} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f}x |")


if __name__ == "__main__":
    main()
