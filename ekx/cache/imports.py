"""`ekx import FORMAT SRC`: published per-video features -> a dense store (`ekx.cache.dense`).

Every store holds each feature at **ekx's time: the centre of what it covers** on the video's
timeline (frame i shows from i / fps to (i + 1) / fps). Each format is read in its publisher's
own convention and converted; the rule and its numbers are root attributes (``dense_times``,
``dense_rate``, ``import_*``), so part of the store's identity:

- ``npy-dir``: plain ``<video>.npy`` [T, D] with ``--rate``: row j at (j + 0.5) / rate s. Or
  video_features' ``save_numpy`` output (its ``<video>_timestamps_ms.npy`` there, or ``--key``
  naming a feature type): per model, see `ekx.cache.import_video_features` (frames: + half a
  frame; i3d: its timestamps mark the *end* of each stack, - half a stack).
- ``pickle``: one file, a dict video id -> [T, D] array, with ``--rate`` (as plain npy-dir).
  Read by an unpickler that builds only dicts, lists and numpy arrays.
- ``lmdb``: RULSTM's keys ``<video>_frame_<10 digits>.jpg``, frames of the video converted to
  30 fps (``--fps`` for another rate, ``--fps video`` for EPIC_100_video_info.csv's); its
  loader reads key floor(t * fps) at time t, so key n -> (n + 0.5) / fps s.
- ``tim``: TIM's ``<video>.npy`` [N, views, D] with ``--times``, its feature-interval table
  (CSV): row i = the video's i-th interval by start, time (start + stop) / 2; all views kept.
- ``tim-audio``: TIM's audio arrays (Auditory SlowFast, [N, views, 2304]), the same layout and
  table; the clean view is the 0.999 s of sound from each interval's start, time its centre;
  the store's ``modality`` is ``audio``.
- ``actionformer``: ``<video>.npz`` (``feats`` [T, D]); feature i covers frames
  [i * stride, i * stride + num_frames) at fps: time (i * stride + num_frames / 2) / fps
  (its EPIC config: 16, 32, 30 fps; ``--stride/--num-frames/--fps`` or ``--config``).

Before anything is written: each flag's value (finite, above 0), every video of the annotation
file present (the missing ones named), one width, each video's times finite, >= 0 and
increasing, and - where EPIC_100_video_info.csv lies in the annotation folder - each video's
span within 10% + 2 s + two feature periods of its duration (a wrong rate or frame rate is
refused naming the video, both durations and the flag). A NaN or Inf feature (or one beyond
float16) refuses the import naming the file. The store is written under a temporary name and
renamed when whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ekx import EkxError, __version__, epic
from ekx.cache import dense, store
from ekx.cache import import_video_features as vf
from ekx.cache.import_formats import (
    Options,
    Source,
    Video,
    VideoInfo,
    check_options,
    pickle_file,
    plain_npy,
    refuse_unused,
)
from ekx.cache.import_published import actionformer_dir, lmdb_dir, tim_audio_dir, tim_dir

F16_MAX = float(np.finfo(np.float16).max)
SPAN_SLACK, SPAN_MARGIN_S = 0.10, 2.0


def npy_dir(src: Path, o: Options, info: VideoInfo) -> Source:
    if not src.is_dir():
        raise EkxError(f"{src}: not a folder; npy-dir reads a folder of <video>.npy (or video_features' output)")
    return vf.read(src, o, info) if vf.is_layout(src, o) else plain_npy(src, o, info)


def _folder(reader: Callable[[Path, Options, VideoInfo], Source], what: str):
    def read(src: Path, o: Options, info: VideoInfo) -> Source:
        if not src.is_dir():
            raise EkxError(f"{src}: not a folder; {what}")
        return reader(src, o, info)

    return read


# format -> (reader, the flags it takes)
READERS: dict[str, tuple[Callable[[Path, Options, VideoInfo], Source], set[str]]] = {
    "npy-dir": (npy_dir, {"rate", "key", "stack_size", "step_size", "fps"}),
    "pickle": (pickle_file, {"rate"}),
    "lmdb": (lmdb_dir, {"fps"}),
    "tim": (_folder(tim_dir, "tim reads TIM's <split>/ folder of <video>.npy"), {"times"}),
    "actionformer": (
        _folder(actionformer_dir, "actionformer reads a folder of <video>.npz"),
        {"stride", "num_frames", "fps", "config", "key"},
    ),
    "tim-audio": (_folder(tim_audio_dir, "tim-audio reads TIM's <split>/ folder of <video>.npy"), {"times"}),
}
FORMATS = tuple(READERS)
# every store has each of these (0 or "" where the format has no such number): one shape of
# identity across formats
IMPORT_ATTRS = {
    "import_key": "",
    "import_fps": "",
    "import_stack_size": 0,
    "import_step_size": 0,
    "import_stride": 0,
    "import_num_frames": 0,
}


def check_flags(fmt: str, o: Options) -> None:
    """Up front: a known format, each flag's value, and only the flags the format takes."""
    if fmt not in READERS:
        raise EkxError(f"unknown import format {fmt!r}; choose {', '.join(FORMATS)}")
    check_options(o)
    refuse_unused(o, READERS[fmt][1], f"ekx import {fmt}")


# ---------------------------------------------------------------- checks


def check_times(v: Video) -> None:
    """Finite, not negative, strictly increasing: anything else misplaces or drops rows."""
    t = v.times
    bad = ~np.isfinite(t) | (t < 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        why = "negative" if t[j] < 0 else "not a number"
        raise EkxError(f"{v.times_from}: row {j} of {v.video_id} is at {t[j]} s ({why}); fix the source's times")
    back = np.flatnonzero(np.diff(t) <= 0)
    if len(back):
        j = int(back[0]) + 1
        raise EkxError(
            f"{v.times_from}: row {j} of {v.video_id} at {t[j]:.6g} s is not after row {j - 1} at {t[j - 1]:.6g} s; "
            "a video's times must increase"
        )


def check_span(v: Video, info: VideoInfo, flags: str) -> None:
    """The span the times imply against the video's duration: a wrong rate stretches it."""
    duration = info.duration(v.video_id)
    if duration is None or v.length == 0:
        return
    period = float(np.median(np.diff(v.times))) if v.length > 1 else 0.0
    end = float(v.times[-1]) + period / 2
    slack = SPAN_SLACK * duration + SPAN_MARGIN_S + 2 * period
    if end > duration + slack or (v.contiguous and end < duration - slack):
        raise EkxError(
            f"{v.where}: {v.length} features of {v.video_id} span {end:.1f} s at the times given, "
            f"{info.path.name} gives the video {duration:.1f} s; check {flags}"
        )


def sha256_of(paths: list[Path]) -> str:
    """One digest over the source files, in name order (each file's bytes, then its name)."""
    h = hashlib.sha256()
    for p in sorted(set(paths), key=str):
        with open(p, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        h.update(p.name.encode())
    return "sha256:" + h.hexdigest()


def runs_of(videos: list[Video], k: int) -> tuple[list[str], list[str], np.ndarray, list[tuple[int, int, int]]]:
    """Rows of K positions per video: (narration ids, video ids, times [rows, K], and per row
    (video index, first position, count))."""
    nids, vids, times, where = [], [], [], []
    for i, v in enumerate(videos):
        for c in range(-(-v.length // k)):
            lo = c * k
            n = min(k, v.length - lo)
            t = np.full(k, np.nan)
            t[:n] = v.times[lo : lo + n]
            nids.append(f"{v.video_id}@{c}")
            vids.append(v.video_id)
            times.append(t)
            where.append((i, lo, n))
    return nids, vids, np.stack(times) if times else np.zeros((0, k)), where


# ---------------------------------------------------------------- the import


def import_features(
    fmt: str,
    src: Path,
    annotations: Path,
    split: str,
    out: Path,
    name: str,
    *,
    describe: str = "",
    k: int = 16,
    on_progress: Callable[[int], None] | None = None,
    options: Options | None = None,
    **flags,
) -> dict:
    """Write ``out``, a dense store of the split's videos from ``src``; the import flags as
    ``options`` or as keywords (`Options`' fields: rate, fps, key, stack_size, ...).
    Returns a summary."""
    o = options if options is not None else Options(**flags)
    check_flags(fmt, o)
    if out.exists():
        raise EkxError(f"{out} exists; ekx import writes a new store (delete it or choose another --out)")
    ann = epic.Annotations(annotations)
    ann_path = ann.split_path(split)
    wanted = list(dict.fromkeys(s.video_id for s in ann.segments(split)))
    info = VideoInfo(Path(annotations))
    source = READERS[fmt][0](Path(src), o, info)
    missing = [v for v in wanted if v not in source.videos]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EkxError(
            f"{src}: {len(missing)} of the {len(wanted)} videos of {ann_path.name} are not in the source ({shown}); "
            "import a source that has them, or an annotation CSV of the videos it has"
        )
    videos = [source.videos[v] for v in wanted]
    for v in videos:
        if v.length == 0:
            raise EkxError(f"{v.where}: no features for {v.video_id} (an empty array)")
        check_times(v)
        check_span(v, info, source.flags)
    for attr, what in (("dim", "values per feature"), ("views", "views (feature sets) per row")):
        odd = next((v for v in videos if getattr(v, attr) != getattr(videos[0], attr)), None)
        if odd is not None:
            raise EkxError(f"{odd.where}: {getattr(odd, attr)} {what}, {videos[0].where} {getattr(videos[0], attr)}")
    dim, views = videos[0].dim, videos[0].views
    nids, vids, times, where = runs_of(videos, k)
    verbs, nouns = ann.verbs(), ann.nouns()
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "kind": dense.KIND,
        "backbone": f"imported:{name}",
        "weights": "imported",
        "imported_format": fmt,
        **IMPORT_ATTRS,
        **source.meaning,
        "source_sha256": sha256_of(source.used),
        "source_path": str(Path(src).resolve()),
        "describe": describe,
        "dense_span": "the source's",
        "feature_dim": dim,
        "frames_per_segment": k,
        "views": views,
        **({"augmentation": source.augmentation} if views > 1 else {}),
        "dtype": "float16",
        "precision": "imported",
        "annotation_file": ann_path.name,
        "annotation_sha256": store.sha256_file(ann_path),
        "annotation_path": str(ann_path.resolve()),
        "num_verbs": len(verbs),
        "num_nouns": len(nouns),
        "verb_classes": list(verbs.keys),
        "noun_classes": list(nouns.keys),
        "split": split,
        "shard": "",
        "ekx_version": __version__,
    }
    rows = store.Rows(nids, vids, np.full(len(nids), -1), np.full(len(nids), -1), np.arange(len(nids)))
    tmp = out.with_name(out.name + ".importing")
    tmp.unlink(missing_ok=True)
    store.create(tmp, attrs, rows, views, k, dim, None, times)
    writer = store.Writer(tmp)
    try:
        row = 0
        for i, v in enumerate(videos):
            x = _features(v, dim)
            first = row
            while row < len(where) and where[row][0] == i:
                row += 1
            # the video's rows [first, row) as one block: position p of run c is x[c * k + p];
            # padding repeats the last vector (its time is NaN: never read)
            pad = np.concatenate([x, np.repeat(x[-1:], (row - first) * k - v.length, axis=0)])
            block = pad.reshape(row - first, k, views, dim).transpose(0, 2, 1, 3)
            writer.write_block(first, block, np.full((row - first, k), -1, np.int64))
            if on_progress:
                on_progress(v.length)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"videos": len(videos), "vectors": int(sum(v.length for v in videos)), "rows": len(nids), "dim": dim}


def _features(v: Video, dim: int) -> np.ndarray:
    """One video's features [length, views, dim] float32, each row finite within float16."""
    x = np.asarray(v.read(), dtype=np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.shape != (v.length, v.views, dim):
        raise EkxError(f"{v.where}: read shape {x.shape}, expected {(v.length, v.views, dim)}")
    bad = ~np.isfinite(x).all(axis=(1, 2)) | (np.abs(x) > F16_MAX).any(axis=(1, 2))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise EkxError(
            f"{v.where}: {int(bad.sum())} feature rows hold NaN, Inf or values beyond float16's "
            f"+-{F16_MAX:.0f} (first: row {j}); fix the source"
        )
    return x
