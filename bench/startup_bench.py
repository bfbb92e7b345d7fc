"""Start-up of `ekx extract`: what runs before the first segment, phase by phase, and the
wall time of a one-segment extraction - optionally beside another checkout of ekx (the
code before a change), alternately, in one run.

Phases, each timed in a fresh interpreter (the import lines are cumulative):
  import torch; import torchvision (which imports torch._dynamo through torchvision.ops);
  import ekx's extraction pipeline (decord, h5py, ekx); build resnet50 and load its
  weights (a state dict in $TORCH_HOME, as IMAGENET1K_V1); fold BatchNorm + channels_last;
  the first forward of 8 frames (oneDNN builds its kernels) minus a second one.
Then `ekx extract --limit 1 --frames 8` on the 1080p50 EPIC clip (one segment), wall time,
median of --runs alternating runs per checkout.

Run: `python bench/startup_bench.py [--baseline PATH/TO/OTHER/CHECKOUT] [--runs 5]`
(`git worktree add /tmp/ekx-before HEAD~1` makes a baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_video_features import CLIP, V1_FILE, ekx_workspace  # noqa: E402 - the clip as P90_01, one segment

OUT = HERE / "out" / "startup"

PHASES = r"""
import json, sys, time
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
import torchvision
t.append(time.perf_counter())
import ekx.extract.pipeline
from ekx.extract import backbones
t.append(time.perf_counter())
bb = backbones.with_weights(backbones.get("resnet50"), "IMAGENET1K_V1")
model, _ = backbones.load_weights(bb, "IMAGENET1K_V1")
t.append(time.perf_counter())
model = backbones.fuse_for_inference(model).to(memory_format=torch.channels_last)
t.append(time.perf_counter())
x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    a = time.perf_counter(); model(x); b = time.perf_counter(); model(x); c = time.perf_counter()
t.append(t[-1] + (b - a) - (c - b))
print(json.dumps({"file": ekx.__file__, "t": [t[i + 1] - t[i] for i in range(len(t) - 1)]}))
"""
NAMES = ["import torch", "import torchvision", "import ekx pipeline", "build + load weights", "fold BN"]
NAMES += ["first-forward extra"]


def run_phases(tree: Path, env: dict[str, str]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PHASES], env={**env, "PYTHONPATH": str(tree)}, capture_output=True,
                         text=True, check=True, cwd=OUT)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(tree)), (got["file"], tree)  # the checkout asked for, not the installed one
    return got["t"]


def run_extract(tree: Path, env: dict[str, str], ann: Path, videos: Path, i: int) -> float:
    cmd = [sys.executable, "-c", "from ekx.cli import main; main()", "extract", "--backbone", "resnet50",
           "--weights", "IMAGENET1K_V1", "--split", "test", "--annotations", str(ann), "--videos", str(videos),
           "--frames", "8", "--precision", "fp32", "--limit", "1", "--out", str(OUT / f"c{i}.h5")]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, check=True, cwd=OUT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="another ekx checkout, timed alternately with this one")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not CLIP.is_file():
        print(f"skipped: {CLIP} not here (the shared clips sit beside the project)")
        return
    import shutil

    import torch
    import torchvision

    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), OUT / "torch" / "hub" / "checkpoints" / V1_FILE)  # random
    env = {**os.environ, "TORCH_HOME": str(OUT / "torch")}
    videos, ann = ekx_workspace(OUT / "ws", CLIP)
    trees = {"this checkout": HERE.parent}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    phases: dict[str, list[list[float]]] = {k: [] for k in trees}
    walls: dict[str, list[float]] = {k: [] for k in trees}
    for i in range(args.runs):
        for name, tree in trees.items() if i % 2 == 0 else reversed(trees.items()):
            phases[name].append(run_phases(tree, env))
            for f in OUT.glob("c*.h5"):
                f.unlink()
            walls[name].append(run_extract(tree, env, ann, videos, i))
        print(f"run {i + 1}: " + ", ".join(f"{k} {w[-1]:.2f} s" for k, w in walls.items()), flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.runs} runs, seconds")
    print("| phase | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for j, label in enumerate(NAMES):
        print(f"| {label} | " + " | ".join(f"{statistics.median(p[j] for p in phases[k]):.2f}" for k in trees) + " |")
    print("| **`ekx extract --limit 1` (one segment, K = 8), wall** | "
          + " | ".join(f"{statistics.median(walls[k]):.2f}" for k in trees) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
