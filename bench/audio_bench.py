"""Audio extraction speed (issue 33), side by side in one run, per second of video:

  (a) the audio path - decoding the video's sound track (PyAV: one pass over the file, the
      video packets only demuxed), the model's front end and the model, as stage 1 runs them
      (`decode_windows`, `audio.run.features`) - beside pure model compute on the same windows
      (their front-end inputs built beforehand): overhead = (a) / pure - 1, target <= 10%.
      Rounds alternate the two, medians reported, so a load change hits both alike;
  (b) the cost of audio next to RGB: `extract --dense RATE` of the same video with
      audio:auditory_slowfast and with resnet50 (random weights, BatchNorm calibration and
      start-up included: the whole command), seconds of work per second of video.

Videos: the shared clips that have a sound track (checked with PyAV) and a synthetic one
(456x256, 60 fps, with its PCM track), or the paths given. Precision: the CPU's default
(`--precision auto`: bf16 where the CPU runs it fast), as `ekx extract` runs.

Run: `python bench/audio_bench.py [--rate 2] [--rounds 3] [VIDEO ...]` (a few minutes here).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ekx import epic, runtime, synth
from ekx.cache import dense
from ekx.extract import backbones
from ekx.extract.audio.decode import decode_windows, missing_sound
from ekx.extract.audio.run import features
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.extract.video import Request

SHARED = Path(__file__).resolve().parents[2] / "shared"
ASF = "audio:auditory_slowfast"
K = 8  # positions per stored row (--frames)


def synthetic(root: Path) -> tuple[Path, Path]:
    """(annotations, video) of one 20 s synthetic video with sound, and its dataset."""
    cfg = synth.SynthConfig(videos=2, segments=6, width=456, height=256, fps=(60,), seed=4, workers=1)
    synth.synthesize(root, cfg)
    return root / "annotations", sorted((root / "videos").rglob("*.MP4"))[0]


def requests(path: Path, rate: float) -> tuple[list[Request], float, int]:
    duration, _fps = dense.video_length(path)
    times = (np.arange(int(duration * rate)) + 0.5) / rate
    runs = [times[i : i + K] for i in range(0, len(times), K)]
    runs = [np.concatenate([r, np.full(K - len(r), r[-1])]) for r in runs]  # the last run padded, as a store pads
    return [Request(i, float(r[0]), float(r[-1]), times=r) for i, r in enumerate(runs)], duration, len(times)


def audio_path_vs_pure(path: Path, rate: float, rounds: int, device, precision: str) -> dict:
    bb = backbones.get(ASF)
    spec = bb.audio
    assert spec is not None
    model, _ = backbones.load_weights(bb, "none", 0)
    model = backbones.fuse_for_inference(model).to(device, memory_format=torch.channels_last)
    reqs, duration, n = requests(path, rate)
    windows = [r.frames for r in decode_windows(path, reqs, K, spec.rate, spec.samples)]
    assert all(w is not None for w in windows), "the sound track does not cover the video"
    inputs = [spec.frontend(torch.from_numpy(w), device) for w in windows]

    def full() -> float:
        t0 = time.perf_counter()
        for res in decode_windows(path, reqs, K, spec.rate, spec.samples):
            features(model, bb, res.frames, 16, device, precision)
        return time.perf_counter() - t0

    def pure() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in inputs:
                with runtime.autocast(device, precision):
                    model(x).float()
        return time.perf_counter() - t0

    def decode_only() -> float:
        t0 = time.perf_counter()
        for _ in decode_windows(path, reqs, K, spec.rate, spec.samples):
            pass
        return time.perf_counter() - t0

    def frontend_only() -> float:
        t0 = time.perf_counter()
        for w in windows:
            spec.frontend(torch.from_numpy(w), device)
        return time.perf_counter() - t0

    pure()  # warm-up: the first pass builds the kernels
    times: dict[str, list[float]] = {"full": [], "pure": [], "decode": [], "frontend": []}
    for _ in range(rounds):
        times["full"].append(full())
        times["pure"].append(pure())
        times["decode"].append(decode_only())
        times["frontend"].append(frontend_only())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"duration": duration, "positions": n, **med, "overhead": med["full"] / med["pure"] - 1}


def rgb_vs_audio(ann: Path, video: Path, rate: float, tmp: Path) -> dict:
    """Whole `extract --dense` commands (one video) for sound and for frames."""
    vid = video.stem
    csv_path = tmp / f"{vid}.csv"
    a = epic.Annotations(ann)
    rows = [s for s in a.segments("train") + a.segments("validation") if s.video_id == vid]
    with open(a.split_path("train")) as fh:
        header = fh.readline()
        lines = [ln for ln in fh if ln.split(",")[2] == vid]
    csv_path.write_text(header + "".join(lines))
    assert rows, vid
    out = {}
    for name in (ASF, "resnet50"):
        c = ExtractConfig(backbone=name, split=str(csv_path), weights="none", frames=K, dense=str(rate), workers=1,
                          device="cpu", out=tmp / f"{name.replace(':', '_')}.h5", calibration_segments=2)  # fmt: skip
        s = extract(c, ann, video.parents[2], tmp, warn=lambda m: None, info=lambda m: None)
        assert s.failed == 0, s.failures
        out[name] = s.seconds
    return out


def clips_with_sound() -> list[Path]:
    clips = SHARED / "clips"
    return [p for p in sorted(clips.glob("*")) if p.suffix.lower() in (".mp4", ".mpg", ".mkv") and not missing_sound(p)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--rate", type=float, default=2.0, help="positions per second (dense)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cpu")
    precision = runtime.resolve_precision("auto", device)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, precision {precision}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ann, synthetic_video = synthetic(tmp / "synth")
        videos = args.videos or [*clips_with_sound(), synthetic_video]
        print(f"\n(a) {ASF}, dense {args.rate:g}/s, {args.rounds} rounds (medians), seconds per second of video")
        cols = ("video", "length", "positions", "decode", "front end", "decode + front end + model", "pure model")
        print("| " + " | ".join(cols) + " | overhead |")
        print("|---|---|---|---|---|---|---|---|")
        for v in videos:
            r = audio_path_vs_pure(v, args.rate, args.rounds, device, precision)
            per = r["duration"]
            print(f"| {v.name} | {r['duration']:.1f} s | {r['positions']} | {r['decode'] / per:.4f} | "
                  f"{r['frontend'] / per:.4f} | {r['full'] / per:.3f} | {r['pure'] / per:.3f} | "
                  f"{100 * r['overhead']:+.1f}% |")  # fmt: skip
        print(f"\n(b) whole `ekx extract --dense {args.rate:g}` of {synthetic_video.name} (456x256, 60 fps), "
              "random weights, seconds of work per second of video")  # fmt: skip
        length, _ = dense.video_length(synthetic_video)
        t = rgb_vs_audio(ann, synthetic_video, args.rate, tmp)
        print("| backbone | seconds | per second of video |")
        print("|---|---|---|")
        for name, sec in t.items():
            print(f"| {name} | {sec:.1f} | {sec / length:.3f} |")
        print(f"audio / RGB: {t[ASF] / t['resnet50']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
