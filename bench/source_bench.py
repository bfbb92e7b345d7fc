"""Frame sources side by side in one run (these machines are noisy): decode-only useful
frames/s per core (one process) at EPIC segment density, K = 16, at resnet50's decode size.

Rows: decord and torchcodec (CPU) on the real clips and on synthetic 1080p60 H.264 (the
data sets of extract_bench.py); the `frames` source reading a tar of 456x256 JPEGs (EPIC's
RGB-frame size) made from the same 1080p videos, for the same segments.

Targets: frames-from-tar >= 5x decord on the 1080p originals; torchcodec vs decord: report,
recommend the faster where they differ by > 20%. Run: `python bench/source_bench.py`
(`--decode-device cuda` adds GPU rows: see bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ekx import epic
from ekx.extract import backbones, sources
from ekx.extract.sources.frames import write_frames
from ekx.extract.video import Request

K = 16


def requests_by_video(data: Path) -> dict[str, list[Request]]:
    out: dict[str, list[Request]] = {}
    for i, s in enumerate(epic.Annotations(data / "annotations").segments("train")):
        out.setdefault(s.video_id, []).append(Request(i, s.start, s.stop, s.start_frame, s.stop_frame))
    return out


def rate(src: sources.Source, paths: dict[str, Path], reqs: dict[str, list[Request]], device: str) -> float:
    """Useful frames/s decoding every segment once, one video after another, one process."""
    size = backbones.get("resnet50").preprocess.decode_size
    t0, frames = time.perf_counter(), 0
    for vid, rs in reqs.items():
        for res in src.decode(paths[vid], rs, K, 1, size, device):
            if res.error is not None:
                raise RuntimeError(f"{src.name} {vid}: {res.error}")
            frames += len(res.frames)
    if device != "cpu":
        torch.cuda.synchronize()
    return frames / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ekx-extract-bench")
    ap.add_argument("--decode-device", default="cpu", help="cpu, or cuda to add GPU rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from extract_bench import make_sources  # same data sets as the stage-1 bench

    data_sets = make_sources(args.work)
    devices = ["cpu"] + ([args.decode_device] if args.decode_device != "cpu" else [])
    print(f"decode only, useful frames/s per core, K={K}, resnet50 decode size")
    print(f"{'data':32} {'source':12} {'device':7} {'frames/s':>9}")
    results: dict[tuple[str, str, str], float] = {}
    for label, data in data_sets.items():
        reqs = requests_by_video(data)
        for name in ("decord", "torchcodec"):
            src = sources.get(name)
            if src.missing():
                print(f"{label:32} {name:12} skipped: {src.missing()}")
                continue
            paths = src.index(data / "videos")
            for device in devices:
                dev, note = src.resolve_device(device, next(iter(paths.values())))
                if note:
                    print(f"  note: {note}")
                if dev != device:
                    continue
                results[(label, name, dev)] = r = rate(src, paths, reqs, dev)
                print(f"{label:32} {name:12} {dev:7} {r:9.1f}", flush=True)
        if "1080" in label:
            tars = args.work / "rgb_frames_456x256"
            paths = epic.index_videos(data / "videos")
            for vid, path in paths.items():
                tar = tars / vid.split("_")[0] / "rgb_frames" / f"{vid}.tar"
                if not tar.exists():
                    t0 = time.perf_counter()
                    n = write_frames(path, tar, size=(256, 456))
                    print(f"  (made {tar.name}: {n} JPEGs in {time.perf_counter() - t0:.0f} s, not timed below)")
            src = sources.get("frames")
            for device in devices:
                dev, note = src.resolve_device(device)
                if note:
                    print(f"  note: {note}")
                if dev != device:
                    continue
                results[(label, "frames", dev)] = r = rate(src, src.index(tars), reqs, dev)
                print(f"{label:32} {'frames (tar)':12} {dev:7} {r:9.1f}", flush=True)
    for label in data_sets:
        d, t = results.get((label, "decord", "cpu")), results.get((label, "torchcodec", "cpu"))
        if d and t:
            faster = "torchcodec" if t > 1.2 * d else "decord" if d > 1.2 * t else "either (within 20%)"
            print(f"{label}: torchcodec/decord = {t / d:.2f} -> recommended: {faster}")
        f = results.get((label, "frames", "cpu"))
        if d and f:
            verdict = "met" if f >= 5 * d else "NOT met"
            print(f"{label}: frames-from-tar / decord = {f / d:.1f}x (target >= 5x: {verdict})")


if __name__ == "__main__":
    main()
