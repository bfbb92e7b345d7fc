"""What `ekx prepare` costs and changes, on the real clips in ../shared/clips:

  - transcode speed (frames/s, this machine) and the copy's size per hour of video;
  - how close the backbone input is: 16 frames per clip decoded from the original and
    from the copy, each through the backbone's own torchvision transforms (ResNet-50:
    resize 232, crop 224; EfficientNet-B3: resize 320, crop 300): PSNR of the
    preprocessed images, and cosine of the features (random weights with BatchNorm
    calibrated on the frames - nothing can be downloaded here). Random networks are far
    more sensitive to pixel noise than trained ones, so each clip also gets a noise-floor
    row: a near-lossless re-encode at full size (crf 12, no resize), which no
    preprocessing choice can beat.

Run: `python bench/prepare_bench.py` (about a minute here).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import torch

from ekx import prepare as pp
from ekx.extract import backbones

SHARED = Path(__file__).resolve().parents[2] / "shared" / "clips"
K = 16


def frames(path: Path, k: int = K) -> torch.Tensor:
    vr = decord.VideoReader(str(path), num_threads=1)
    idx = np.linspace(0, len(vr) - 1, k).round().astype(int)
    return torch.from_numpy(vr.get_batch(list(idx)).asnumpy()).permute(0, 3, 1, 2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def main() -> None:
    clips = sorted(p for p in SHARED.glob("*") if p.suffix in (".mp4", ".mpg"))
    if not clips:
        raise SystemExit(f"{SHARED}: no clips (the shared folder beside the repository)")
    torch.set_num_threads(2)
    settings = pp.Settings(short_side=pp.default_short_side())
    print(f"settings: {settings.describe()}")
    nets = {}
    for name in ("resnet50", "efficientnet_b3"):
        bb = backbones.get(name)
        model, _ = backbones.load_weights(bb, "none", seed=0)
        nets[name] = (bb, model.eval())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        floor = pp.Settings(short_side=100_000, crf=12)
        for clip, s in [(c, s) for c in clips for s in (settings, floor)]:
            out = Path(tmp) / f"{s.crf}-{clip.name}"
            t0 = time.perf_counter()
            n = pp.transcode(clip, out, s)
            seconds = time.perf_counter() - t0
            vr = decord.VideoReader(str(clip))
            duration = len(vr) / vr.get_avg_fps()
            a, b = frames(clip), frames(out)
            row = {
                "clip": clip.name if s is settings else "  noise floor (crf 12, full size)",
                "size": f"{vr[0].shape[1]}x{vr[0].shape[0]}",
                "fps": n / seconds,
                "orig GB/h": clip.stat().st_size / duration * 3600 / 1e9,
                "copy GB/h": out.stat().st_size / duration * 3600 / 1e9,
            }
            for name, (bb, model) in nets.items():
                t = bb.weights.DEFAULT.transforms()
                xa, xb = t(a), t(b)
                # random weights: calibrate BatchNorm on these very inputs (as extract does)
                backbones.calibrate_batchnorm(model, [torch.cat([xa, xb])])
                with torch.no_grad():
                    fa, fb = model.eval()(xa), model(xb)
                cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
                std = torch.tensor(t.std)[:, None, None]
                mean = torch.tensor(t.mean)[:, None, None]
                row[f"{name} PSNR"] = psnr(xa * std + mean, xb * std + mean)
                row[f"{name} cos min"] = float(cos.min())
                row[f"{name} cos mean"] = float(cos.mean())
            rows.append(row)
            print(
                f"{row['clip']:<42} {row['size']:>9}  transcode {row['fps']:6.0f} frames/s  "
                f"{row['orig GB/h']:5.2f} -> {row['copy GB/h']:5.2f} GB/h  "
                + "  ".join(
                    f"{m}: PSNR {row[f'{m} PSNR']:4.1f} dB cos {row[f'{m} cos min']:.4f}/{row[f'{m} cos mean']:.4f}"
                    for m in nets
                ),
                flush=True,
            )
    epic = [r for r in rows if r["clip"].startswith("epic")]
    floor_rows = [r for r in rows[1::2] if rows[rows.index(r) - 1]["clip"].startswith("epic")]
    print(
        f"EPIC clips: copy {np.mean([r['copy GB/h'] for r in epic]):.2f} GB per hour of video "
        f"(originals here {np.mean([r['orig GB/h'] for r in epic]):.2f} GB/h); "
        f"resnet50 feature cosine min {min(r['resnet50 cos min'] for r in epic):.4f}, "
        f"efficientnet_b3 min {min(r['efficientnet_b3 cos min'] for r in epic):.4f} (noise floor: "
        f"{min(r['resnet50 cos min'] for r in floor_rows):.4f}, "
        f"{min(r['efficientnet_b3 cos min'] for r in floor_rows):.4f})"
    )


if __name__ == "__main__":
    main()
