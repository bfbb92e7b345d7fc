"""`ekx split`: a held-out split of the training annotations by video - the seed's "true
validation set" - so hyperparameters are chosen without touching the official validation.

No video is on both sides; among many seeded random candidate splits of about the asked
size, the one whose verb distribution is closest (total variation) to the whole's wins.
Rows are copied verbatim, so the outputs are official-format CSVs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from ekx import EkxError, epic

CANDIDATES = 256


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a / max(a.sum(), 1) - b / max(b.sum(), 1)).sum())


def choose_videos(segments: list[epic.Segment], fraction: float, seed: int) -> set[str]:
    if not 0 < fraction < 1:
        raise EkxError(f"--fraction {fraction}: must be between 0 and 1")
    videos = sorted({s.video_id for s in segments})
    if len(videos) < 2:
        raise EkxError("a split by video needs at least two videos")
    n_verbs = max(s.verb_class for s in segments) + 1
    per_video = {v: np.zeros(n_verbs) for v in videos}
    for s in segments:
        per_video[s.video_id][s.verb_class] += 1
    total = np.sum(list(per_video.values()), axis=0)
    target = fraction * len(segments)
    rng = np.random.default_rng(seed)
    best: set[str] = set()
    best_score: float | None = None
    for _ in range(CANDIDATES):
        order = rng.permutation(len(videos))
        chosen: list[str] = []
        counts = np.zeros(n_verbs)
        for i in order:
            if counts.sum() >= target or len(chosen) == len(videos) - 1:
                break
            chosen.append(videos[i])
            counts += per_video[videos[i]]
        score = _tv(counts, total) + abs(counts.sum() - target) / len(segments)
        if best_score is None or score < best_score:
            best, best_score = set(chosen), score
    return best


def write_split(annotations: Path, out: Path, fraction: float = 0.2, seed: int = 0, source: str = "train") -> dict:
    """Write out/EPIC_100_train.csv (the rest) and out/EPIC_100_validation.csv (held out),
    plus the class and tail lists, so `out` is a complete annotations directory."""
    ann = epic.Annotations(Path(annotations))
    src = ann.split_path(source)
    segments = ann.segments(source)
    held = choose_videos(segments, fraction, seed)
    out = Path(out)
    if out.resolve() == Path(annotations).resolve():
        raise EkxError("--out must differ from the annotations directory (the official files stay untouched)")
    out.mkdir(parents=True, exist_ok=True)
    with open(src, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        col = header.index("video_id")
        rows = list(reader)
    for name, keep in ((epic.SPLIT_FILES["train"], False), (epic.SPLIT_FILES["validation"], True)):
        with open(out / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(r for r in rows if (r[col] in held) == keep)
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES, epic.TAIL_VERBS, epic.TAIL_NOUNS):
        if (ann.root / name).is_file():
            shutil.copyfile(ann.root / name, out / name)
    n_val = sum(1 for s in segments if s.video_id in held)
    verbs = np.bincount([s.verb_class for s in segments])
    val_verbs = np.bincount([s.verb_class for s in segments if s.video_id in held], minlength=len(verbs))
    return {
        "videos": len(held),
        "segments": n_val,
        "train_segments": len(segments) - n_val,
        "verb_tv_distance": _tv(val_verbs, verbs),
        "out": out,
    }
