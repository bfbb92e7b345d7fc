"""Dense stores, side by side in one run (bench/out/dense/):

  (a) import speed, vectors/s, of each `ekx import` format on the same features
      (24 videos x 2,500 vectors of D = 1024: 60,000 vectors), files written as each tool
      writes them (plain .npy, video_features' layout, one pickle, RULSTM's LMDB keys);
  (b) stage-2 training, samples/s: the lstm head on the dense store read through 8,000
      segments vs on the per-segment cache holding exactly the positions the gather picks
      vs pure compute (one pre-built batch) - target: dense <= 1.1 x per-segment time;
      and the context head (30 s windows of 50 tokens around each segment) on the same store
      vs pure compute (one pre-built window batch) - target: <= 1.1 x pure compute;
  (c) extraction of the 1080p50 EPIC clip (14 s): a dense store at 4 positions per second
      (56 positions) vs per-segment extraction of 5 segments x K = 8 (40 frames), useful
      frames per second of each (resnet50, random weights, fp32, this machine's threads).

Run: `python bench/dense_bench.py` (about 3 minutes here; `--skip-extract` leaves out (c)).
"""

from __future__ import annotations

import argparse
import csv
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads_bench import train_speed  # the same timing as the full-scale stage-2 bench

from ekx import epic, runtime
from ekx.cache import store
from ekx.cache.imports import import_features
from ekx.heads import train as tr
from ekx.heads.data import feature_stats, load_split

OUT = Path(__file__).resolve().parent / "out" / "dense"
SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEOS, LENGTH, D, RATE = 24, 2500, 1024, 4.0


def workspace(root: Path, n_segments: int, rng) -> Path:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    for name, n in ((epic.VERB_CLASSES, 97), (epic.NOUN_CLASSES, 300)):
        (ann / name).write_text("id,key,instances,category\n" + "".join(f"{i},c{i},['c{i}'],c\n" for i in range(n)))
    rows = []
    for i in range(n_segments):
        vid = f"P{1 + i % VIDEOS:02d}_01"
        a = round(float(rng.uniform(0, LENGTH / RATE - 6)), 2)
        b = round(a + float(rng.uniform(1, 5)), 2)
        t = [f"00:{int(x // 60):02d}:{x % 60:05.2f}" for x in (a, b)]
        v, n = int(rng.integers(97)), int(rng.integers(300))
        rows.append([f"{vid}_{i}", vid[:3], vid, t[0], t[0], t[1], 0, 0, "x", "v", v, "n", n, "['n']", f"[{n}]"])
    with open(ann / epic.SPLIT_FILES["train"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.LABELLED_COLUMNS, *rows])
    return ann


def sources(root: Path, feats: dict[str, np.ndarray]) -> dict[str, tuple[str, Path, dict]]:
    """The same features in each format, as each tool writes them."""
    plain, vf, pkl, mdb = root / "npy", root / "video_features", root / "feats.pkl", root / "lmdb"
    plain.mkdir()
    vf.mkdir()
    for vid, x in feats.items():
        np.save(plain / f"{vid}.npy", x)
        np.save(vf / f"{vid}_resnet.npy", x)
        np.save(vf / f"{vid}_timestamps_ms.npy", (np.arange(len(x)) + 0.5) * 1000 / RATE)
        np.save(vf / f"{vid}_fps.npy", np.array(RATE))
    pkl.write_bytes(pickle.dumps(feats, protocol=4))
    out = {
        "npy-dir (plain)": ("npy-dir", plain, {"rate": RATE}),
        "npy-dir (video_features)": ("npy-dir", vf, {}),
        "pickle": ("pickle", pkl, {"rate": RATE}),
    }
    try:
        import lmdb
    except ImportError:
        print("lmdb not installed: no lmdb row (pip install 'ekx[lmdb]')")
        return out
    env = lmdb.open(str(mdb), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for vid, x in feats.items():
            for i, row in enumerate(x):  # RULSTM: frame numbers at the video's fps (here RATE)
                txn.put(f"{vid}_frame_{i + 1:010d}.jpg".encode(), row.astype(np.float32).tobytes())
    env.close()
    out["lmdb (RULSTM keys)"] = ("lmdb", mdb, {"fps": RATE})
    return out


def per_segment_copy(split, path: Path) -> None:
    """The per-segment cache of exactly the positions a dense split's gather picks."""
    feats = split.per_segment().numpy()
    attrs = {k: v for k, v in split.attrs.items() if not k.startswith("dense") and k != "kind"}
    n = len(split.narration_id)
    rows = store.Rows(split.narration_id, split.video_id, split.verbs.numpy(), split.nouns.numpy(), np.arange(n))
    store.create(path, attrs, rows, 1, split.k, split.dim)
    w = store.Writer(path)
    for lo in range(0, n, 512):
        w.write([(i, feats[i], np.arange(split.k)) for i in range(lo, min(n, lo + 512))], [])
    w.close()


def extraction(root: Path) -> None:
    from ekx.extract.pipeline import ExtractConfig, extract

    clip = SHARED / "clips" / "epic55_wall_04x04_zoom2_h264_1080p50.mp4"
    if not clip.is_file():
        print(f"(c) skipped: {clip} not here (the shared clips sit beside the project)")
        return
    videos = root / "videos"
    videos.mkdir()
    (videos / "P90_01.mp4").symlink_to(clip)
    ann = root / "clip-annotations"
    ann.mkdir()
    for name in (epic.VERB_CLASSES, epic.NOUN_CLASSES):
        (ann / name).write_text("id,key,instances,category\n0,x,['x'],x\n")
    segs = [(0.5 + 2.7 * i, 2.5 + 2.7 * i) for i in range(5)]
    rows = [[f"P90_01_{i}", "P90", "P90_01", "00:00:00.00", f"00:00:{a:05.2f}", f"00:00:{b:05.2f}", 0, 0]
            for i, (a, b) in enumerate(segs)]  # fmt: skip
    with open(ann / epic.SPLIT_FILES["test"], "w", newline="") as fh:
        csv.writer(fh).writerows([epic.TEST_COLUMNS, *rows])
    common = dict(backbone="resnet50", split="test", weights="none", precision="fp32", workers=1)
    print("(c) extraction of the 1080p50 clip (14 s), resnet50 random weights, fp32:")
    print("| what | positions | seconds | useful frames/s |")
    print("|---|---|---|---|")
    for label, cfg in (
        ("per segment, 5 x K=8", ExtractConfig(**common, frames=8)),
        ("dense, 4 per s", ExtractConfig(**common, frames=16, dense="4")),
        ("per segment, 5 x K=8 (again)", ExtractConfig(**common, frames=8, out=root / "again.h5")),
    ):
        t0 = time.perf_counter()
        s = extract(cfg, ann, videos, root / "features", warn=lambda m: None)
        dt = time.perf_counter() - t0
        n = s.frames if not cfg.dense else 56
        print(f"| {label} | {n} | {dt:.1f} | {n / dt:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ann = workspace(OUT, args.segments, rng)
    feats = {f"P{1 + i:02d}_01": rng.normal(size=(LENGTH, D)).astype(np.float32) for i in range(VIDEOS)}
    print(f"(a) import of {VIDEOS * LENGTH:,} vectors of D={D} ({VIDEOS * LENGTH * D * 4 / 2**20:,.0f} MiB float32):")
    print("| format | seconds | vectors/s |")
    print("|---|---|---|")
    stores = {}
    for label, (fmt, src, kw) in sources(OUT, feats).items():
        out = OUT / f"{fmt}-{len(stores)}.h5"
        t0 = time.perf_counter()
        s = import_features(fmt, src, ann, "train", out, "bench", **kw)
        dt = time.perf_counter() - t0
        stores[label] = out
        print(f"| {label} | {dt:.2f} | {s['vectors'] / dt:,.0f} |", flush=True)
    device = runtime.resolve_device("auto")
    dense_path = next(iter(stores.values()))
    dense_split = load_split(dense_path, device)
    per_path = OUT / "per-segment.h5"
    per_segment_copy(dense_split, per_path)
    per_split = load_split(per_path, device)
    print(f"(b) stage-2 training, lstm head, {len(dense_split.rows):,} segments x K=16 x D={D}, samples/s:")
    print("| features | ekx | pure compute | ekx / pure time |")
    print("|---|---|---|---|")
    rates = {}
    for label, split in (
        ("per-segment cache", per_split),
        ("dense store", dense_split),
        ("per-segment (again)", per_split),
    ):
        mean, std = feature_stats(split)
        data = tr.Loaded(split, split, (mean.to(device), std.to(device)), device)
        ekx, pure = train_speed("lstm", data, min(args.samples, len(split.rows)), 24)
        rates[label] = ekx
        print(f"| {label} | {ekx:.0f} | {pure:.0f} | {pure / ekx:.3f} |", flush=True)
    per = (rates["per-segment cache"] + rates["per-segment (again)"]) / 2
    print(f"dense / per-segment epoch time: {per / rates['dense store']:.3f} (target <= 1.1)")
    mean, std = feature_stats(dense_split)
    data = tr.Loaded(dense_split, dense_split, (mean.to(device), std.to(device)), device)
    ekx, pure = train_speed("context", data, min(args.samples, len(dense_split.rows)), 24)
    print(f"| context head, dense store (30 s, 50 tokens) | {ekx:.0f} | {pure:.0f} | {pure / ekx:.3f} |", flush=True)
    if not args.skip_extract:
        extraction(OUT)


if __name__ == "__main__":
    main()
