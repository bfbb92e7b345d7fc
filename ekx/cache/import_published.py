"""The published feature sets of `ekx import` with their own files: RULSTM's LMDB, TIM's
per-video arrays (visual and audio) with their feature intervals, ActionFormer's .npz - each
converted from its publisher's convention (read from its code) to ekx's (the centre of what a
feature covers)."""

from __future__ import annotations

import csv
import functools
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from ekx import EkxError
from ekx.cache.import_formats import (
    SOURCE_TIMES,
    Options,
    Source,
    Video,
    VideoInfo,
    frame_rate,
    load_npy,
    numbers,
    shape2,
    why,
)

RULSTM_KEY = re.compile(r"^(?P<video>.+)_frame_(?P<frame>\d{10})\.jpg$")
# RULSTM converted every video to 30 fps before numbering frames (its README), and its
# loader (RULSTM/dataset.py, fps=30) reads key floor(t * 30) for time t
RULSTM_FPS = 30.0
# ActionFormer's EPIC-Kitchens config (configs/epic_slowfast_{verb,noun}.yaml): SlowFast
# features of 32-frame clips every 16 frames at 30 fps; its DEFAULTS (libs/core/config.py)
# have the same stride and clip but default_fps None (each video's fps from its JSON)
ACTIONFORMER_EPIC = {"stride": 16, "num_frames": 32, "fps": 30.0}
ACTIONFORMER_DEFAULTS = {"stride": 16, "num_frames": 32, "fps": None}


# ---------------------------------------------------------------- RULSTM


def lmdb_dir(src: Path, o: Options, info: VideoInfo) -> Source:
    """RULSTM's LMDB: key ``<video>_frame_<10 digits>.jpg`` -> float32 vector. Key n is the
    frame its loader reads for t in [n / fps, (n + 1) / fps): time (n + 0.5) / fps."""
    try:
        import lmdb
    except ImportError:
        raise EkxError("ekx import lmdb needs the lmdb package: pip install 'ekx[lmdb]'") from None
    mdb = src / "data.mdb"
    if not mdb.is_file():
        raise EkxError(f"{src}: no data.mdb here; lmdb reads the folder of an LMDB store (RULSTM's features)")
    rate, rate_text = frame_rate(o, RULSTM_FPS, info, "ekx import lmdb")
    # keys first (no values: RULSTM's EPIC-100 stores hold tens of GB); each video's vectors
    # are read when it is written, from the memory-mapped store
    frames: dict[str, list[tuple[int, bytes]]] = {}
    try:
        env = lmdb.open(str(src), readonly=True, lock=False, readahead=False)
        with env.begin() as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                m = RULSTM_KEY.match(k.decode("utf-8", "replace"))
                if m is None:
                    raise EkxError(f"{src}: key {k[:60]!r} is not RULSTM's <video>_frame_<10 digits>.jpg")
                frames.setdefault(m["video"], []).append((int(m["frame"]), k))
            first_key = next(iter(frames.values()))[0][1] if frames else b""
            first = txn.get(first_key) if frames else None
    except lmdb.Error as e:
        raise EkxError(f"{mdb}: not a readable LMDB store ({why(e)})") from None
    if not frames or first is None:
        raise EkxError(f"{src}: the LMDB store is empty")
    if not first or len(first) % 4:
        raise EkxError(f"{src}: {first_key.decode()} holds {len(first)} bytes, not a float32 vector")
    dim = len(first) // 4
    out = {}
    for vid, items in frames.items():
        items.sort()
        n = np.array([f for f, _ in items], np.float64)
        read = functools.partial(_vectors, env, src, [key for _, key in items], dim)
        out[vid] = Video(
            vid, f"{src} ({vid}_frame_*)", len(items), dim, read, (n + 0.5) / rate(vid), f"{src} keys / --fps",
            contiguous=bool((np.diff(n) == 1).all()),
        )  # fmt: skip
    meaning = {
        "dense_rate": SOURCE_TIMES,
        "dense_times": "RULSTM key n (frame n of the video at fps; its loader reads key floor(t * fps) "
        "at time t) -> (n + 0.5) / fps s: the centre of [n, n + 1) / fps",
        "import_fps": rate_text,
    }
    return Source(out, [mdb], meaning, "--fps")


def _vectors(env, src: Path, keys: list[bytes], dim: int) -> np.ndarray:
    import lmdb

    out = np.empty((len(keys), dim), np.float32)
    try:
        with env.begin(buffers=True) as txn:
            for i, k in enumerate(keys):
                v = txn.get(k)
                if v is None or len(v) != 4 * dim:
                    got = "nothing" if v is None else f"{len(v)} bytes"
                    raise EkxError(f"{src}: {k.decode()} holds {got}, the first key {4 * dim}")
                out[i] = np.frombuffer(v, np.float32)
    except lmdb.Error as e:
        raise EkxError(f"{src / 'data.mdb'}: not a readable LMDB store ({why(e)})") from None
    return out


# ---------------------------------------------------------------- TIM


def tim_dir(src: Path, o: Options, info: VideoInfo) -> Source:
    """TIM's features: ``<video>.npy`` [N, views, D] (view 0 unaugmented) with its
    feature-interval table; row i is the video's i-th interval by start_sec, as TIM's
    loader pairs them; time = (start_sec + stop_sec) / 2."""
    meaning = {
        "dense_rate": SOURCE_TIMES,
        "dense_times": "TIM's feature intervals: row i = the video's i-th interval by start_sec; "
        "time (start_sec + stop_sec) / 2: the interval's centre",
    }
    aug = "the source's feature sets: TIM's view 0 unaugmented, views 1.. RandAugment (its TEST.NUM_FEATURES)"
    return _tim(src, o, lambda t: t.mean(axis=1), meaning, aug)


# TIM's Auditory SlowFast reads CLIP_SECS of sound from the start of each feature interval
# (its audio_loader_epic.get_start_end_idx: linspace(0, delta, NUM_FEATURES)[0] = 0 for the
# clean view), the whole interval where it is shorter (padded): its configs set 0.999 s
TIM_AUDIO_CLIP_S = 0.999


def tim_audio_dir(src: Path, o: Options, info: VideoInfo) -> Source:
    """TIM's audio features (Auditory SlowFast, EPIC-Sounds' 24 kHz sound): the same
    ``<video>.npy`` [N, views, 2304] and feature-interval table as its visual ones, paired by
    the same load_feats; each row's clean view is the sound of [start, start + 0.999 s]
    (the interval where shorter), so its time is that window's centre. Marked as sound."""
    meaning = {
        "dense_rate": SOURCE_TIMES,
        "dense_times": "TIM's audio feature intervals: row i = the video's i-th interval by start_sec; its clean "
        f"view the {TIM_AUDIO_CLIP_S} s of sound from start_sec (the interval where shorter); time start_sec + "
        "half of that: the sound window's centre",
        "modality": "audio",
    }
    aug = "the source's feature sets: TIM's view 0 unaugmented, views 1.. later windows of the interval, SpecAugment"
    return _tim(src, o, lambda t: t[:, 0] + np.minimum(TIM_AUDIO_CLIP_S, t[:, 1] - t[:, 0]) / 2, meaning, aug)


def _tim(src: Path, o: Options, centre, meaning: dict, aug: str) -> Source:
    """TIM's ``<split>/<video>.npy`` with ``--times``; ``centre`` [n, 2] intervals -> [n] times."""
    if o.times is None:
        raise EkxError("TIM's features need --times, their feature-interval table (CSV: video_id, start_sec, ...)")
    table = tim_times(Path(o.times))
    out: dict[str, Video] = {}
    used = [Path(o.times)]
    for path in sorted(src.glob("*.npy")):
        a = load_npy(path)
        if a.ndim not in (2, 3):
            raise EkxError(f"{path}: an array of shape {a.shape}; TIM's features are [N, views, D]")
        n, views, d = (a.shape[0], 1, a.shape[1]) if a.ndim == 2 else a.shape
        if path.stem not in table:
            raise EkxError(f"{o.times}: no intervals for {path.stem} ({path}); give the table of these features")
        t = table[path.stem]
        if len(t) != n:
            raise EkxError(f"{path}: {n} feature rows, {o.times} has {len(t)} intervals for {path.stem}")
        read = functools.partial(load_npy, path, False)
        out[path.stem] = Video(path.stem, str(path), n, int(d), read, centre(t), str(o.times), int(views))
        used.append(path)
    if not out:
        raise EkxError(f"{src}: no .npy files here (TIM's <split>/<video>.npy)")
    return Source(out, used, meaning, "--times", aug)


def tim_times(path: Path) -> dict[str, np.ndarray]:
    """video -> [n, 2] (start_sec, stop_sec), sorted by start_sec as TIM's load_feats does."""
    with open(path, "rb") as fh:
        if fh.read(1) == b"\x80":  # TIM's own tables are pickled pandas DataFrames
            raise EkxError(
                f"{path}: a pickle; ekx reads TIM's feature-interval table as CSV, written once with pandas: "
                f"python -c \"import pandas as pd; pd.read_pickle('{path.name}').to_csv('{path.stem}.csv')\""
            )
    rows: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"video_id", "start_sec", "stop_sec"}
        if not need <= set(reader.fieldnames or ()):
            raise EkxError(f"{path}: needs the columns video_id, start_sec, stop_sec (has {reader.fieldnames})")
        for r in reader:
            try:
                a, b = float(r["start_sec"]), float(r["stop_sec"])
            except ValueError:
                a = b = math.nan
            if not (math.isfinite(a) and math.isfinite(b) and 0 <= a <= b):
                raise EkxError(f"{path}:{reader.line_num}: interval [{r['start_sec']}, {r['stop_sec']}] s")
            rows.setdefault(r["video_id"], []).append((a, b))
    out = {}
    for vid, t in rows.items():
        arr = np.array(t, np.float64)
        out[vid] = arr[np.argsort(arr[:, 0], kind="stable")]
    return out


# ---------------------------------------------------------------- ActionFormer


def actionformer_dir(src: Path, o: Options, info: VideoInfo) -> Source:
    """ActionFormer's ``<video>.npz`` (``feats`` [T, D]): feature i covers frames
    [i * stride, i * stride + num_frames) at fps, time (i * stride + num_frames / 2) / fps."""
    base = actionformer_config(Path(o.config)) if o.config is not None else ACTIONFORMER_EPIC
    stride = o.stride or int(base["stride"])
    clip = o.num_frames or int(base["num_frames"])
    rate, rate_text = frame_rate(o, base["fps"], info, "ekx import actionformer (its config's default_fps is null)")
    key = o.key or "feats"
    out: dict[str, Video] = {}
    used: list[Path] = []
    for path in sorted(src.glob("*.npz")):
        n, d = shape2(_npz_shape(path, key), f"{path} [{key}]")
        t = (np.arange(n) * stride + clip / 2) / rate(path.stem)
        read = functools.partial(_npz_read, path, key)
        out[path.stem] = Video(path.stem, f"{path} [{key}]", n, d, read, t, "--stride/--num-frames/--fps")
        used.append(path)
    if not out:
        raise EkxError(f"{src}: no .npz files here (ActionFormer's <video>.npz)")
    meaning = {
        "dense_rate": SOURCE_TIMES,
        "dense_times": "ActionFormer: feature i covers frames [i * stride, i * stride + num_frames) at fps; "
        "time (i * stride + num_frames / 2) / fps: their centre",
        "import_key": key,
        "import_fps": rate_text,
        "import_stride": stride,
        "import_num_frames": clip,
    }
    return Source(out, used, meaning, "--stride, --num-frames, --fps (or --config)")


def actionformer_config(path: Path) -> dict:
    """feat_stride, num_frames and default_fps of an ActionFormer YAML config's dataset
    section, over its DEFAULTS as its load_config merges them."""
    try:
        import yaml
    except ImportError:
        raise EkxError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give the flags") from None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise EkxError(f"{path}: not a readable YAML config ({why(e)})") from None
    ds = cfg.get("dataset") if isinstance(cfg, dict) else None
    if not isinstance(ds, dict):
        raise EkxError(f"{path}: no dataset section (ActionFormer's configs hold feat_stride, num_frames, default_fps)")
    out: dict = {
        "stride": ds.get("feat_stride", ACTIONFORMER_DEFAULTS["stride"]),
        "num_frames": ds.get("num_frames", ACTIONFORMER_DEFAULTS["num_frames"]),
        "fps": ds.get("default_fps", ACTIONFORMER_DEFAULTS["fps"]),
    }
    for name in ("stride", "num_frames"):
        if not isinstance(out[name], int) or isinstance(out[name], bool) or out[name] < 1:
            raise EkxError(f"{path}: dataset {name} {out[name]!r} is not a whole number of frames")
    fps = out["fps"]
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise EkxError(f"{path}: dataset default_fps {fps!r} is not a frame rate")
    out["fps"] = None if fps is None else float(fps)
    return out


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """The shape of one member of an .npz, from its header (no data read)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key not in names:
                raise EkxError(f"{path}: no array {key!r} (it holds {', '.join(names) or 'none'}); --key picks one")
            with z.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise EkxError(f"{path}: not a readable .npz file ({why(e)}); write it with numpy.savez") from None
    numbers(np.empty(0, dtype), f"{path} [{key}]")
    return shape


def _npz_read(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        raise EkxError(f"{path}: not a readable .npz file ({why(e)})") from None
