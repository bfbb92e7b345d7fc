"""ekx vs video_features (v-iashin/video_features), side by side on one clip, every frame.

Both extract ResNet-50 features of every frame of the same clip with the same state dict:
a seeded random ResNet-50 (BatchNorm statistics measured on the clip) saved where
torchvision keeps IMAGENET1K_V1
($TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth), which video_features' ResNet
extractor loads and `ekx extract --weights IMAGENET1K_V1` loads too. Each side runs in its
own process, in rounds that rotate which side goes first, so the machine's drift hits all.
Printed per run: wall seconds, CPU seconds (the process and the children it waited for),
peak RSS of the largest process; then, per ekx variant, video_features' wall time over the
variant's in each round, the median of those ratios (at least 3 rounds: with two, a median
is their mean, and one round where a side collapsed under contention - 1,042 s against 53 s
once - carried the table to 32.6x), any round whose time is more than 2x off the median of
that side's median round (flagged: rerun on a quieter machine), and the cosine per frame
between each variant's features and video_features'.

- video_features: `main.py feature_type=resnet model_name=resnet50 batch_size=1 device=cpu`
  (its config's batch size; OpenCV decodes, PIL transforms, fp32).
- ekx: `ekx extract --dense every:1 --weights IMAGENET1K_V1` (a dense store with one
  position per frame) as it runs by default (the decoder resizes), and with `--resize
  torchvision` (IMAGENET1K_V1's own resize: the same preprocessing as video_features), at
  `--precision auto` unless told (bf16 where the CPU has bf16 matrix math, else fp32: the
  line above the table says which).

Run: `python bench/vs_video_features.py --checkout PATH/TO/video_features [--rounds 3]`.
The checkout needs its own requirements in this interpreter (`pip install omegaconf
opencv-python-headless` beside ekx's); without a checkout, or without those, the bench
says why and exits. About 2 minutes per round on 2 CPU cores (the 14 s 1080p50 clip).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
CLIP = SHARED / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
OUT = HERE / "out" / "vs_video_features"
V1_FILE = "resnet50-0676ba61.pth"  # torchvision's IMAGENET1K_V1 file name (both sides load it)


def skip(reason: str) -> None:
    print(f"skipped: {reason}")
    sys.exit(0)


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB of the largest process) of one command: wall and CPU from
    wait4, the peak from GNU time (a child forked from this process would report this
    process's own RSS as its peak)."""
    rss = log.with_suffix(".rss")
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)  # fmt: skip
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{cmd[0]} ... failed (exit {proc.returncode}); its output: {log}")
    return wall, ru.ru_utime + ru.ru_stime, int(rss.read_text().split()[-1]) / 1024


def ekx_workspace(root: Path, clip: Path) -> tuple[Path, Path]:
    """A video root holding the clip as P90_01 and an annotation directory whose test split
    has one segment over it (a dense store over the whole video needs only the video)."""
    from ekx import epic

    videos, ann = root / "videos", root / "annotations"
    videos.mkdir(parents=True)
    ann.mkdir()
    (videos / "P90_01.mp4").symlink_to(clip.resolve())
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    with open(ann / epic.SPLIT_FILES["test"], "w", newline="") as fh:
        row = ["P90_01_0", "P90", "P90_01", "00:00:00.00", "00:00:00.00", "00:00:01.00", 0, 0]
        csv.writer(fh).writerows([epic.TEST_COLUMNS, row])
    return videos, ann


def calibrated_resnet50(clip: Path):
    """A seeded random ResNet-50 whose BatchNorm statistics are measured on 32 frames of the
    clip: with the default statistics (mean 0, var 1) a random network gives nearly the same
    vector for every frame, and any two preprocessings would agree to cosine 0.99999."""
    import decord
    import torch
    import torchvision

    from ekx.extract.backbones import calibrate_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    vr = decord.VideoReader(str(clip))
    frames = torch.from_numpy(vr.get_batch(list(range(0, len(vr), max(1, len(vr) // 32)))).asnumpy())
    x = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()(frames.permute(0, 3, 1, 2))
    calibrate_batchnorm(model, [x])
    return model


def cosines(vf_out: Path, store: Path, clip: Path) -> np.ndarray:
    """Per-frame cosine, frames matched by index (video_features: row i = frame i)."""
    import h5py

    (path,) = vf_out.rglob(f"{clip.stem}_resnet.npy")  # <output_path>/resnet/resnet50/<stem>_resnet.npy
    vf = np.load(path).astype(np.float64)
    with h5py.File(store, "r") as f:
        feats = f["features"][:, 0].reshape(-1, f["features"].shape[-1]).astype(np.float64)
        index = f["frame_index"][:].reshape(-1)
        time_ = f["time"][:].reshape(-1)
    keep = np.isfinite(time_) & (index >= 0) & (index < len(vf))
    a, b = feats[keep], vf[index[keep]]
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", type=Path, default=os.environ.get("VIDEO_FEATURES"), help="video_features checkout")
    ap.add_argument("--clip", type=Path, default=CLIP)
    ap.add_argument("--rounds", "--pairs", type=int, default=3, help="rounds (one run of each side per round), >= 3")
    ap.add_argument("--precision", default="auto", help="ekx's --precision (auto, fp32, bf16)")
    args = ap.parse_args()
    if args.rounds < MIN_ROUNDS:
        sys.exit(f"--rounds {args.rounds}: at least {MIN_ROUNDS} (a median of two rounds is their mean)")
    if args.checkout is None:
        skip("no video_features checkout given (--checkout PATH or VIDEO_FEATURES=PATH)")
    checkout = args.checkout.resolve()
    if not (checkout / "main.py").is_file() or not (checkout / "models" / "resnet").is_dir():
        skip(f"{checkout} is not a video_features checkout (no main.py / models/resnet)")
    if not args.clip.is_file():
        skip(f"{args.clip} not here (the shared clips sit beside the project)")
    if not Path("/usr/bin/time").is_file():
        skip("GNU time (/usr/bin/time) measures the peak memory: apt-get install time")
    probe = subprocess.run([sys.executable, "-c", "import omegaconf, cv2"], capture_output=True, text=True)
    if probe.returncode:
        skip(f"video_features' requirements are missing here ({probe.stderr.strip().splitlines()[-1]}): "
             "pip install omegaconf opencv-python-headless")  # fmt: skip

    import torch

    from ekx.runtime import cpu_bf16_units, resolve_precision

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    torch_home = OUT / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(calibrated_resnet50(args.clip).state_dict(), torch_home / "hub" / "checkpoints" / V1_FILE)
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    videos, ann = ekx_workspace(OUT / "ekx", args.clip)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    units = cpu_bf16_units() or "no bf16 matrix units"
    print(
        f"clip {args.clip.name}; CPU {cpu_model()} ({units}), {os.cpu_count()} cores; torch {torch.__version__}; "
        f"ekx --precision {args.precision} -> {precision}; video_features {git_head(checkout)} batch_size=1 fp32"
    )
    ekx = Path(sys.executable).with_name("ekx")
    ekx_cmd = [str(ekx), "extract", "--backbone", "resnet50", "--weights", "IMAGENET1K_V1", "--dense", "every:1",
               "--split", "test", "--annotations", str(ann), "--videos", str(videos),
               "--precision", args.precision]  # fmt: skip
    stores = {"ekx": OUT / "ekx" / "store.h5", "ekx --resize torchvision": OUT / "ekx" / "store-tv.h5"}
    cmds = {
        "ekx": [*ekx_cmd, "--out", str(stores["ekx"])],
        "ekx --resize torchvision": [
            *ekx_cmd,
            "--resize",
            "torchvision",
            "--out",
            str(stores["ekx --resize torchvision"]),
        ],
    }
    vf_out = OUT / "vf"
    vf_cmd = [sys.executable, "main.py", "feature_type=resnet", "model_name=resnet50", "device=cpu", "batch_size=1",
              "on_extraction=save_numpy", f"output_path={vf_out}", f"tmp_path={OUT / 'vf_tmp'}",
              f"video_paths=[{args.clip.resolve()}]"]  # fmt: skip
    sides = ["video_features", *cmds]
    runs: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
    for i in range(args.rounds):
        for side in sides[i % 3 :] + sides[: i % 3]:  # each side first in turn
            if side in cmds:
                stores[side].unlink(missing_ok=True)
                r = timed(cmds[side], OUT, env, OUT / "ekx.log")
            else:
                shutil.rmtree(vf_out, ignore_errors=True)
                r = timed(vf_cmd, checkout, env, OUT / "vf.log")
            runs[side].append(r)
            print(f"round {i + 1} {side}: wall {r[0]:.1f} s, CPU {r[1]:.1f} s, peak RSS {r[2]:.0f} MiB", flush=True)
    cos = {}
    for side in cmds:
        c = cosines(vf_out, stores[side], args.clip)
        cos[side] = f"{c.min():.6f} / {np.median(c):.6f} ({len(c)} frames)"
    print()
    print("\n".join(summary(runs, "video_features", cos)))


MIN_ROUNDS = 3
OFF = 2.0  # a round whose wall time is more than this factor off the side's median round


def off_rounds(times: list[float], factor: float = OFF) -> list[int]:
    """Rounds (0-based) whose time differs from the median of all the side's rounds by more
    than ``factor`` x either way (one side collapsing under contention). The median of all,
    not of the others: of three rounds the others' median is the mean of two, which the
    one collapsed round would drag along and flag the sound ones too."""
    m = statistics.median(times)
    return [i for i, t in enumerate(times) if t > factor * m or t * factor < m]


def summary(
    runs: dict[str, list[tuple[float, float, float]]], base: str, extra: dict[str, str] | None = None
) -> list[str]:
    """The report's lines: a table with, per side, the medians of wall and CPU time, the peak
    RSS, ``base``'s wall time over the side's in each round, their median (needs
    MIN_ROUNDS rounds), and ``extra``'s column; then one line per flagged round (`off_rounds`)."""
    extra = extra or {}
    lines = [
        f"| side | wall s (median) | CPU s (median) | peak RSS MiB | {base} / side, wall, per round "
        f"| median of rounds | rounds > {OFF:g}x off | per-frame cosine to {base} (min / median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for side, rs in runs.items():
        walls = [r[0] for r in rs]
        off = off_rounds(walls)
        m = statistics.median(walls)
        notes += [
            f"round {i + 1}, {side}: {walls[i]:.1f} s against a median round of {m:.1f} s ({walls[i] / m:.1f}x): "
            "contention? its ratio is marked (!); rerun on a quieter machine"
            for i in off
        ]
        per, middle = "1", "1"
        if side != base:
            ratios = [v[0] / e[0] for v, e in zip(runs[base], rs, strict=True)]
            bad = set(off) | set(off_rounds([r[0] for r in runs[base]]))
            per = ", ".join(f"{r:.2f}x" + (" (!)" if i in bad else "") for i, r in enumerate(ratios))
            middle = (
                f"**{statistics.median(ratios):.2f}x**"
                if len(ratios) >= MIN_ROUNDS
                else f"- (needs {MIN_ROUNDS} rounds)"
            )
        flagged = ", ".join(str(i + 1) for i in off) or "none"
        cos = extra.get(side, "1" if side == base else "-")
        lines.append(
            f"| {side} | {statistics.median(walls):.1f} | {statistics.median(r[1] for r in rs):.1f} | "
            f"{max(r[2] for r in rs):.0f} | {per} | {middle} | {flagged} | {cos} |"
        )
    return lines + (["", *notes] if notes else [])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown CPU"


def git_head(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "(not a git checkout)"


if __name__ == "__main__":
    main()
