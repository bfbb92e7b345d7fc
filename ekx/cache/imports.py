"""`ekx import FORMAT SRC`: published per-video features -> a dense store (`ekx.cache.dense`).

Formats (the layouts as their tools write them):

- ``npy-dir``: a folder of per-video arrays [T, D]. Either video_features' own output
  (v-iashin/video_features, ``on_extraction: save_numpy``: ``<video>_<feature_type>.npy``
  beside ``<video>_timestamps_ms.npy`` and ``<video>_fps.npy``; the times are its
  timestamps), or plain ``<video>.npy`` with ``--rate`` (row j at (j + 0.5) / rate s, ekx's
  own grid).
- ``pickle``: one file holding a dict video id -> array [T, D] (as mmaction2 and several
  EPIC repositories write), with ``--rate``. Read by an unpickler that builds only dicts,
  lists and numpy arrays: a pickle from elsewhere cannot run code here.
- ``lmdb``: RULSTM's layout, key ``<video>_frame_<10 digits>.jpg`` -> float32 vector,
  frame numbers 1-based at the video's own rate (``--fps``, else the annotation folder's
  EPIC_100_video_info.csv): frame n at (n - 1) / fps s.

Before anything is written, every video of the annotation file must be in the source (the
missing ones are named, count and first few) and every array 2-D with one width; a NaN or
Inf row (or a value beyond float16's range) refuses the import with the file named. The
store is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekx import EkxError, __version__, epic
from ekx.cache import dense, store

FORMATS = ("npy-dir", "pickle", "lmdb")
F16_MAX = float(np.finfo(np.float16).max)
RULSTM_KEY = re.compile(r"^(?P<video>.+)_frame_(?P<frame>\d{10})\.jpg$")


@dataclass
class Video:
    """One video of the source: how to read its features, and their times (s)."""

    video_id: str
    where: str  # the file (or file and key) named in errors
    length: int
    dim: int
    read: Callable[[], np.ndarray]  # [length, dim]
    times: np.ndarray  # [length]


# ---------------------------------------------------------------- the formats


def _grid(n: int, rate: float | None, fmt: str) -> np.ndarray:
    if rate is None:
        raise EkxError(f"ekx import {fmt}: give --rate (features per second; row j at (j + 0.5) / rate s)")
    return (np.arange(n) + 0.5) / rate


def _shape(a, where: str) -> tuple[int, int]:
    if len(a.shape) != 2:
        raise EkxError(f"{where}: an array of shape {tuple(a.shape)}; a video's features must be [T, D]")
    return int(a.shape[0]), int(a.shape[1])


def npy_dir(src: Path, rate: float | None, key: str | None, **_) -> tuple[dict[str, Video], list[Path]]:
    """video_features' layout where its timestamps files are there, else ``<video>.npy``."""
    if not src.is_dir():
        raise EkxError(f"{src}: not a folder; npy-dir reads a folder of <video>.npy (or video_features' output)")
    stamps = {p.name[: -len("_timestamps_ms.npy")]: p for p in src.glob("*_timestamps_ms.npy")}
    out: dict[str, Video] = {}
    used: list[Path] = []
    if stamps:
        for vid, ts in sorted(stamps.items()):
            keys = sorted(
                p.name[len(vid) + 1 : -4]
                for p in src.glob(f"{glob_escape(vid)}_*.npy")
                if p.name[len(vid) + 1 : -4] not in ("fps", "timestamps_ms")
            )
            name = key or (keys[0] if len(keys) == 1 else None)
            if name is None or name not in keys:
                raise EkxError(
                    f"{src}: {vid} has feature files {', '.join(keys) or 'none'}; choose one with --key"
                    if keys
                    else f"{src}: {vid} has timestamps but no feature file <video>_<feature_type>.npy"
                )
            path = src / f"{vid}_{name}.npy"
            arr = np.load(path, mmap_mode="r")
            n, d = _shape(arr, str(path))
            times = np.load(ts).astype(np.float64).reshape(-1) / 1000.0
            if len(times) != n:
                raise EkxError(f"{ts}: {len(times)} timestamps for {n} feature rows in {path.name}")
            out[vid] = Video(vid, str(path), n, d, functools.partial(np.load, path), times)
            used += [path, ts]
        return out, used
    for path in sorted(src.glob("*.npy")):
        arr = np.load(path, mmap_mode="r")
        n, d = _shape(arr, str(path))
        out[path.stem] = Video(path.stem, str(path), n, d, functools.partial(np.load, path), _grid(n, rate, "npy-dir"))
        used.append(path)
    if not out:
        raise EkxError(f"{src}: no .npy files here")
    return out, used


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, tuples and numpy arrays only; anything else is refused by name."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to build {module}.{name} (only dicts of numpy arrays are read)")


def pickle_file(src: Path, rate: float | None, **_) -> tuple[dict[str, Video], list[Path]]:
    if not src.is_file():
        raise EkxError(f"{src}: no such file; pickle reads one file holding a dict video id -> [T, D] array")
    try:
        with open(src, "rb") as fh:
            data = _ArraysOnly(io.BufferedReader(fh)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise EkxError(f"{src}: not a pickle of a dict of arrays ({e})") from None
    if not isinstance(data, dict) or not data:
        raise EkxError(f"{src}: holds a {type(data).__name__}, not a non-empty dict video id -> [T, D] array")
    out = {}
    for vid, arr in data.items():
        where = f"{src} [{vid!r}]"
        arr = np.asarray(arr)
        n, d = _shape(arr, where)
        out[str(vid)] = Video(str(vid), where, n, d, functools.partial(np.asarray, arr), _grid(n, rate, "pickle"))
    return out, [src]


def lmdb_dir(src: Path, fps: dict[str, float], **_) -> tuple[dict[str, Video], list[Path]]:
    try:
        import lmdb
    except ImportError:
        raise EkxError("ekx import lmdb needs the lmdb package: pip install 'ekx[lmdb]'") from None
    if not (src / "data.mdb").is_file():
        raise EkxError(f"{src}: no data.mdb here; lmdb reads the folder of an LMDB store (RULSTM's features)")
    # keys first (no values: RULSTM's EPIC-100 stores hold tens of GB); each video's vectors
    # are read when it is written, from the memory-mapped store
    env = lmdb.open(str(src), readonly=True, lock=False, readahead=False)
    frames: dict[str, list[tuple[int, bytes]]] = {}
    with env.begin() as txn:
        for k in txn.cursor().iternext(keys=True, values=False):
            m = RULSTM_KEY.match(k.decode("utf-8", "replace"))
            if m is None:
                raise EkxError(f"{src}: key {k[:60]!r} is not RULSTM's <video>_frame_<10 digits>.jpg")
            frames.setdefault(m["video"], []).append((int(m["frame"]), k))
        first = txn.get(next(iter(frames.values()))[0][1]) if frames else None
    if not frames or first is None:
        raise EkxError(f"{src}: the LMDB store is empty")
    if len(first) % 4:
        raise EkxError(f"{src}: its values are {len(first)} bytes, not float32 vectors")
    dim = len(first) // 4
    out = {}
    for vid, items in frames.items():
        items.sort()
        if vid not in fps:
            raise EkxError(
                f"{src}: no frame rate for {vid}: pass --fps, or put EPIC_100_video_info.csv in the annotations folder"
            )
        numbers = np.array([n for n, _ in items], np.float64)
        read = functools.partial(_vectors, env, src, [key for _, key in items], dim)
        out[vid] = Video(vid, f"{src} ({vid}_frame_*)", len(items), dim, read, (numbers - 1) / fps[vid])
    return out, [src / "data.mdb"]


def _vectors(env, src: Path, keys: list[bytes], dim: int) -> np.ndarray:
    out = np.empty((len(keys), dim), np.float32)
    with env.begin(buffers=True) as txn:
        for i, k in enumerate(keys):
            v = txn.get(k)
            if len(v) != 4 * dim:
                raise EkxError(f"{src}: {k.decode()} holds {len(v)} bytes, the first key {4 * dim}")
            out[i] = np.frombuffer(v, np.float32)
    return out


READERS: dict[str, Callable[..., tuple[dict[str, Video], list[Path]]]] = {
    "npy-dir": npy_dir,
    "pickle": pickle_file,
    "lmdb": lmdb_dir,
}


def video_fps(annotations: Path, given: float | None) -> dict[str, float]:
    """Each video's frame rate: --fps for all, else EPIC_100_video_info.csv's fps column."""
    if given is not None:
        return _Every(given)
    path = annotations / "EPIC_100_video_info.csv"
    if not path.is_file():
        return {}
    import csv

    with open(path, newline="") as fh:
        return {r["video_id"]: float(r["fps"]) for r in csv.DictReader(fh) if r.get("fps")}


class _Every(dict):
    """One frame rate for every video."""

    def __init__(self, fps: float):
        super().__init__()
        self.fps = fps

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key) -> float:
        return self.fps


# ---------------------------------------------------------------- the import


def sha256_of(paths: list[Path]) -> str:
    """One digest over the source files, in name order (each file's bytes, then its name)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=str):
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
        order = np.argsort(v.times, kind="stable")
        if not (order == np.arange(v.length)).all():
            raise EkxError(f"{v.where}: the times are not in increasing order")
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


def import_features(
    fmt: str,
    src: Path,
    annotations: Path,
    split: str,
    out: Path,
    name: str,
    rate: float | None = None,
    fps: float | None = None,
    key: str | None = None,
    describe: str = "",
    k: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``out``, a dense store of the split's videos from ``src``; returns a summary."""
    if fmt not in READERS:
        raise EkxError(f"unknown import format {fmt!r}; choose {', '.join(FORMATS)}")
    if out.exists():
        raise EkxError(f"{out} exists; ekx import writes a new store (delete it or choose another --out)")
    ann = epic.Annotations(annotations)
    ann_path = ann.split_path(split)
    wanted = list(dict.fromkeys(s.video_id for s in ann.segments(split)))
    found, used = READERS[fmt](Path(src), rate=rate, key=key, fps=video_fps(annotations, fps))
    missing = [v for v in wanted if v not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EkxError(
            f"{src}: {len(missing)} of the {len(wanted)} videos of {ann_path.name} are not in the source ({shown}); "
            "import a source that has them, or an annotation CSV of the videos it has"
        )
    videos = [found[v] for v in wanted]
    empty = next((v for v in videos if v.length == 0), None)
    if empty is not None:
        raise EkxError(f"{empty.where}: no features for {empty.video_id} (an empty array)")
    dims = {v.dim for v in videos}
    if len(dims) != 1:
        odd = next(v for v in videos if v.dim != videos[0].dim)
        raise EkxError(f"{odd.where}: {odd.dim} values per feature, {videos[0].where} {videos[0].dim}")
    dim = dims.pop()
    nids, vids, times, where = runs_of(videos, k)
    verbs, nouns = ann.verbs(), ann.nouns()
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "kind": dense.KIND,
        "backbone": f"imported:{name}",
        "weights": "imported",
        "imported_format": fmt,
        "source_sha256": sha256_of(used),
        "source_path": str(Path(src).resolve()),
        "describe": describe,
        "dense_rate": f"{rate:g}" if rate is not None and fmt != "lmdb" else "the source's own times",
        "dense_times": {
            "npy-dir": "video_features' timestamps_ms / 1000, or row j at (j + 0.5) / rate s",
            "pickle": "row j at (j + 0.5) / rate s",
            "lmdb": "frame n (1-based) at (n - 1) / fps s",
        }[fmt],
        "dense_span": "the source's",
        "feature_dim": dim,
        "frames_per_segment": k,
        "views": 1,
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
    store.create(tmp, attrs, rows, 1, k, dim, None, times)
    writer = store.Writer(tmp)
    try:
        row = 0
        for i, v in enumerate(videos):
            x = np.asarray(v.read(), dtype=np.float32)
            if x.shape != (v.length, dim):
                raise EkxError(f"{v.where}: read shape {x.shape}, expected {(v.length, dim)}")
            bad = ~np.isfinite(x).all(axis=1) | (np.abs(x) > F16_MAX).any(axis=1)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise EkxError(
                    f"{v.where}: {int(bad.sum())} feature rows hold NaN, Inf or values beyond float16's "
                    f"+-{F16_MAX:.0f} (first: row {j}); fix the source"
                )
            first = row
            while row < len(where) and where[row][0] == i:
                row += 1
            # the video's rows [first, row) as one block: position p of run c is x[c * k + p];
            # padding repeats the last vector (its time is NaN: never read)
            pad = np.concatenate([x, np.repeat(x[-1:], (row - first) * k - v.length, axis=0)])
            block = pad.reshape(row - first, 1, k, dim)
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
