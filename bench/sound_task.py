"""The synthetic task that needs sound (issue 33): frames alone, sound alone, and both fused.

    python bench/sound_task.py [--workdir DIR] [--videos 12] [--segments 16] [--seeds 0,1,2]
                               [--heads pooling,transformer] [--inputs frames,sound,frames+sound]

`ekx synth --audio-pair` adds pour and stir, which look identical on screen and sound
different (running water, a spoon's clicks). This extracts resnet50 (frames) and
audio:auditory_slowfast (sound), both with random weights, per segment, then trains each
head on frames, on sound and on frames+sound fused with `+` (K 8 frames beside K 4 windows
of sound, aligned by time) with the demo's settings (`ekx.demo.head_config`) and prints, on
validation, verb top-1 on the pour/stir segments and how often the true one of the two
scores above the other (chance 50%: frames alone can only guess), verb top-1 on every
other segment and overall, averaged over seeds. The same as commands:

    ekx synth data --audio-pair
    ekx extract --backbone resnet50 --weights none --frames 8 --split train   (and validation)
    ekx extract --backbone audio:auditory_slowfast --weights none --frames 4 --split train   (and validation)
    ekx train-head transformer --backbone resnet50+audio:auditory_slowfast
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ekx import demo, epic
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.heads import train as tr
from ekx.heads.evaluate import evaluate_run
from ekx.synth import AUDIO_PAIR, SynthConfig, synthesize

FRAMES, SOUND = "resnet50", "audio:auditory_slowfast"
K = {FRAMES: 8, SOUND: 4}  # 1 s windows of sound: 4 per segment of 0.5-6 s
INPUTS = {"frames": (FRAMES,), "sound": (SOUND,), "frames+sound": (FRAMES, SOUND)}
HEADS = ("pooling", "transformer")


def prepare(workdir: Path, videos: int, segments: int) -> tuple[Path, dict[str, float]]:
    data, features = workdir / "data", workdir / "features"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if not (data / "annotations" / epic.SPLIT_FILES["validation"]).exists():
        synthesize(data, SynthConfig(videos=videos, segments=segments, audio_pair=True))
    seconds["synth"] = time.perf_counter() - t0
    for backbone, k in K.items():
        t0 = time.perf_counter()
        for split in ("train", "validation"):
            cfg = ExtractConfig(backbone=backbone, split=split, weights="none", frames=k, workers=1)
            extract(cfg, data / "annotations", data / "videos", features, warn=lambda m: None, info=lambda m: None)
        seconds[backbone] = time.perf_counter() - t0
    return features, seconds


def scores(verb_logits: torch.Tensor, verbs: torch.Tensor, keys: list[str]) -> dict[str, float]:
    """Verb top-1 on the pour/stir segments, on the others and on all; and on pour/stir,
    how often the true verb scores above its partner (chance 50%: frames cannot tell)."""
    a, b = (keys.index(v) for v in AUDIO_PAIR)
    pair = (verbs == a) | (verbs == b)
    right = (verb_logits.argmax(1) == verbs).float()
    rows = torch.arange(len(verbs))
    above = (verb_logits[rows, verbs] > verb_logits[rows, torch.where(verbs == a, b, a)]).float()
    return {"pair": 100 * float(right[pair].mean()), "vs": 100 * float(above[pair].mean()),
            "others": 100 * float(right[~pair].mean()), "verb": 100 * float(right.mean()),
            "segments": int(pair.sum())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--inputs", default=",".join(INPUTS), help="of frames, sound, frames+sound")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ekx-sound-"))
    features, seconds = prepare(workdir, args.videos, args.segments)
    print(f"workdir {workdir}; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| head | input | pour/stir top-1 | pour vs stir | others top-1 | verb top-1 | seeds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for head in args.heads.split(","):
        for name in args.inputs.split(","):
            parts = INPUTS[name]
            paths = ["+".join(str(features / p / f"{split}.h5") for p in parts) for split in ("train", "validation")]
            loaded = tr.load_data(Path(paths[0]), Path(paths[1]), "auto")
            rows = []
            for seed in seeds:
                cfg = demo.head_config(head, f"{head}-{name}-{seed}", seed=seed)
                cfg.train_features, cfg.val_features = paths
                run_dir = workdir / "runs" / cfg.name
                tr.run(cfg, run_dir, loaded, resume=(run_dir / "last.pt").is_file())
                result = evaluate_run(run_dir, loaded.val.path)
                truth = loaded.val.verbs[loaded.val.rows]
                rows.append(scores(result["verb"], truth, list(loaded.val.attrs["verb_classes"])))
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("pair", "vs", "others", "verb")}
            print(f"| {head} | {name} | {mean['pair']:.1f} | {mean['vs']:.1f} | {mean['others']:.1f} | "
                  f"{mean['verb']:.1f} | "
                  f"{len(seeds)} ({rows[0]['segments']} pair segments) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
