"""Preprocessing paths vs torchvision's own `weights.transforms()` on full-size decoded
frames, on the real EPIC clips (issue 18, point 7), and what each stage-1 resize costs.

Paths: ``--resize torchvision`` (stage 1 / fine-tuning / predict: full-size decode, the
weights' resize), ``ekx live`` (full-size BGR capture, the same resize), ``--resize
decoder`` (the default: the decoder's scaler at decode; decord and torchcodec) and live's
old cv2.INTER_AREA. Features: random weights with BatchNorm calibrated on the reference
inputs (pretrained features are smoother, so these cosines are a lower bound). Cost:
useful frames/s of decode + resize to the backbone's input on one core, side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ekx.extract import backbones, sources
from ekx.extract.video import Request
from ekx.live import _to_tensor

CLIPS = Path(__file__).resolve().parents[1].parent / "shared" / "clips"
NAMES = ("epic100_visor_cut_0.mp4", "epic55_wall_04x04_h264_720p60.mp4", "epic55_wall_04x04_zoom2_h264_1080p50.mp4")


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50", help="a per-frame backbone")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip")
    ap.add_argument("--clips", type=Path, default=CLIPS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = backbones.get(args.backbone)
    pre, reference = bb.preprocess, bb.weights.DEFAULT.transforms()
    names = ["reference", "--resize torchvision", "live", "--resize decoder (decord)", "cv2.INTER_AREA (old live)"]
    tc = sources.get("torchcodec")
    if tc.missing() is None:
        names.insert(4, "--resize decoder (torchcodec)")
    x: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    cost: dict[str, list[float]] = {"torchvision": [0.0, 0], "decoder": [0.0, 0]}
    for name in NAMES:
        path = args.clips / name
        reader = sources.get("decord").open(path, None)
        req = [Request(0, 0.0, 0.95 * float(reader.timestamps()[-1]))]
        reader.close()
        t0 = time.perf_counter()
        full = next(sources.get("decord").decode(path, req, args.frames, 1, None))
        inputs = pre(nchw(full.frames))
        cost["torchvision"][0] += time.perf_counter() - t0
        t0 = time.perf_counter()
        scaled = next(sources.get("decord").decode(path, req, args.frames, 1, pre.decode_size))
        pre(nchw(scaled.frames))
        cost["decoder"][0] += time.perf_counter() - t0
        cost["torchvision"][1] += args.frames
        cost["decoder"][1] += args.frames
        assert (scaled.centres == full.centres).all()
        h, w = scaled.frames.shape[1:3]
        x["reference"].append(reference(nchw(full.frames)))
        x["--resize torchvision"].append(inputs)
        bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in full.frames]  # as OpenCV captures
        x["live"].append(pre(torch.cat([_to_tensor(cv2, f) for f in bgr])))
        x["--resize decoder (decord)"].append(pre(nchw(scaled.frames)))
        if "--resize decoder (torchcodec)" in x:
            t = next(tc.decode(path, req, args.frames, 1, pre.decode_size))
            x["--resize decoder (torchcodec)"].append(pre(nchw(t.frames)))
        area = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in full.frames])
        x["cv2.INTER_AREA (old live)"].append(pre(nchw(area)))
    inp = {k: torch.cat(v) for k, v in x.items()}
    model, _ = backbones.load_weights(bb, "none", 0)
    backbones.calibrate_batchnorm(model, [inp["reference"]])
    with torch.inference_mode():
        f = {k: model(v).double() for k, v in inp.items()}
    n = len(f["reference"])
    print(f"{bb.name}, random weights + calibrated BatchNorm, {n} frames of {len(NAMES)} real clips (1 core)")
    print("| path | cosine to weights.transforms() on full-size frames (min / mean) |")
    print("|---|---|")
    for k in names[1:]:
        c = torch.nn.functional.cosine_similarity(f[k], f["reference"])
        print(f"| {k} | {c.min():.5f} / {c.mean():.5f} |")
    other = torch.nn.functional.cosine_similarity(f["reference"], f["reference"].roll(1, 0))
    print(f"| (another frame of the same clips, for scale) | - / {other.mean():.5f} |")
    print("decode + resize to the backbone's input (sparse frames, one core):")
    for k, (secs, count) in cost.items():
        print(f"  --resize {k:11s}: {count / secs:6.1f} frames/s")
    print(f"  ratio decoder / torchvision: {cost['torchvision'][0] / cost['decoder'][0]:.2f}x")


if __name__ == "__main__":
    main()
