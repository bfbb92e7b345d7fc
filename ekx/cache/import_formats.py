"""The readers of `ekx import`: each publisher's layout -> per-video features at ekx's times.

ekx's convention: a feature's time is the centre of what it covers on the video's timeline
(frame i shows from i / fps to (i + 1) / fps, as `ekx.extract.video` reads it). Each reader
converts its source's own convention - the instant its publisher's code means - and says so
in ``Source.meaning``, root attributes of the store and so part of its identity. Here: the
shared pieces, plain arrays on ekx's grid and pickles; video_features' layout is in
`ekx.cache.import_video_features`, RULSTM, TIM and ActionFormer in `ekx.cache.import_published`.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import pickle
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ekx import EkxError

SOURCE_TIMES = "the source's own times"


@dataclass(frozen=True)
class Options:
    """The import flags; None: not given (the format's default where it has one)."""

    rate: float | None = None  # --rate: rows per second on ekx's grid
    fps: float | str | None = None  # --fps: a number, or "video" (EPIC_100_video_info.csv's)
    key: str | None = None  # --key: which array (video_features' feature type, an .npz member)
    stack_size: int | None = None  # --stack-size: frames per stack (video_features' i3d/r21d/s3d)
    step_size: int | None = None  # --step-size: frames between stacks (r21d/s3d)
    stride: int | None = None  # --stride: frames between features (ActionFormer's feat_stride)
    num_frames: int | None = None  # --num-frames: frames per feature (ActionFormer's num_frames)
    times: Path | None = None  # --times: TIM's feature-interval table
    config: Path | None = None  # --config: an ActionFormer YAML config

    def given(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: Options) -> None:
    """Each flag's value on its own, before anything is read: a rate of inf puts every
    feature at 0 s, a NaN anywhere."""
    if o.rate is not None and not (math.isfinite(o.rate) and o.rate > 0):
        raise EkxError(f"--rate {o.rate}: give features per second, a finite number above 0")
    fps = o.fps
    if (
        fps is not None
        and fps != "video"
        and not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0)
    ):
        raise EkxError(f"--fps {fps}: give frames per second (a finite number above 0), or video")
    for name in ("stack_size", "step_size", "stride", "num_frames"):
        v = getattr(o, name)
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise EkxError(f"{flag(name)} {v}: give a whole number of frames, 1 or more")
    for name in ("times", "config"):
        p = getattr(o, name)
        if p is not None and not Path(p).is_file():
            raise EkxError(f"{flag(name)} {p}: no such file")


def parse_fps(text: str | float | None) -> float | str | None:
    """``--fps``: a number, or ``video`` for each video's rate in EPIC_100_video_info.csv."""
    if text is None or text == "video":
        return text
    try:
        return float(text)
    except ValueError:
        raise EkxError(f"--fps {text!r}: give frames per second (e.g. 30) or video") from None


def refuse_unused(o: Options, used: Collection[str], what: str) -> None:
    extra = sorted(o.given() - set(used))
    if extra:
        fit = ", ".join(flag(n) for n in sorted(used)) or "none of the time flags"
        raise EkxError(f"{', '.join(flag(n) for n in extra)} does not apply to {what} (it takes {fit})")


@dataclass
class Video:
    """One video of the source: how to read its features, and their times (s, ekx's convention)."""

    video_id: str
    where: str  # the file (or file and key) named in errors
    length: int
    dim: int
    read: Callable[[], np.ndarray]  # [length, dim] or [length, views, dim]
    times: np.ndarray  # [length]
    times_from: str  # the file or flag the times come from, named in errors
    views: int = 1
    contiguous: bool = True  # the rows tile the video end to end (a short span is then an error)


@dataclass
class Source:
    """What a reader found: the videos, the files read, and what the times mean (identity)."""

    videos: dict[str, Video]
    used: list[Path]
    meaning: dict
    flags: str  # the flags that set the times, named when a span disagrees with the video
    augmentation: str = ""


class VideoInfo:
    """EPIC_100_video_info.csv in the annotation folder (video_id, duration, fps): the frame
    rates of ``--fps video`` and the durations an import's span is checked against."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "EPIC_100_video_info.csv"
        self.rows: dict[str, tuple[int, dict]] = {}
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                for r in reader:
                    self.rows[r.get("video_id", "")] = (reader.line_num, r)

    def _number(self, vid: str, column: str, way_out: str) -> float | None:
        if vid not in self.rows:
            return None
        line, r = self.rows[vid]
        try:
            v = float(r.get(column) or "nan")
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v > 0):
            raise EkxError(f"{self.path}:{line}: {vid} has {column} {r.get(column)!r}; {way_out}")
        return v

    def fps(self, vid: str) -> float:
        v = self._number(vid, "fps", "fix the file, or give --fps N")
        if v is None:
            where = f"{self.path} has no row for {vid}" if self.path.is_file() else f"no {self.path}"
            raise EkxError(f"--fps video: {where}; give the frames' rate, e.g. --fps 30")
        return v

    def duration(self, vid: str) -> float | None:
        return self._number(vid, "duration", "fix the file (or move it out of the annotation folder)")


def frame_rate(o: Options, default: float | None, info: VideoInfo, what: str) -> tuple[Callable[[str], float], str]:
    """Each video's frame rate from ``--fps`` (else ``default``), and its words for the identity."""
    fps = o.fps if o.fps is not None else default
    if fps is None:
        raise EkxError(
            f"{what}: give --fps, the rate of the frames the features were computed on "
            "(a number, or video for EPIC_100_video_info.csv's rate of each video)"
        )
    if fps == "video":
        return info.fps, "per video: EPIC_100_video_info.csv"
    return (lambda _vid: float(fps)), f"{float(fps):g}"


# ---------------------------------------------------------------- arrays


def why(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """A .npy array of numbers, or an error naming the file (never numpy's own)."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (EOFError, ValueError, OSError) as e:
        raise EkxError(f"{path}: not a readable .npy array ({why(e)}); write it with numpy.save") from None
    return numbers(a, str(path))


def numbers(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype.kind not in "fiu":
        raise EkxError(f"{where}: holds {a.dtype} values, not numbers (features are float arrays)")
    return a


def shape2(a: np.ndarray | tuple[int, ...], where: str) -> tuple[int, int]:
    shape = tuple(a) if isinstance(a, tuple) else tuple(a.shape)
    if len(shape) != 2:
        raise EkxError(f"{where}: an array of shape {shape}; a video's features must be [T, D]")
    return int(shape[0]), int(shape[1])


def grid(n: int, o: Options, fmt: str) -> np.ndarray:
    if o.rate is None:
        raise EkxError(f"ekx import {fmt}: give --rate (features per second; row j at (j + 0.5) / rate s)")
    return (np.arange(n) + 0.5) / o.rate


def grid_meaning(o: Options) -> dict:
    return {"dense_rate": f"{o.rate:g}", "dense_times": "row j at (j + 0.5) / rate s: the centre of [j, j + 1) / rate"}


def plain_npy(src: Path, o: Options, info: VideoInfo) -> Source:
    """``<video>.npy`` [T, D] per video on ekx's grid (``--rate``)."""
    refuse_unused(o, {"rate"}, "plain <video>.npy files (--key reads video_features' layout)")
    out: dict[str, Video] = {}
    used: list[Path] = []
    for path in sorted(src.glob("*.npy")):
        n, d = shape2(load_npy(path), str(path))
        read = functools.partial(load_npy, path, False)
        out[path.stem] = Video(path.stem, str(path), n, d, read, grid(n, o, "npy-dir"), "--rate")
        used.append(path)
    if not out:
        raise EkxError(f"{src}: no .npy files here")
    return Source(out, used, grid_meaning(o), "--rate")


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


def pickle_file(src: Path, o: Options, info: VideoInfo) -> Source:
    """One pickle: a dict video id -> [T, D] array, on ekx's grid (``--rate``)."""
    if not src.is_file():
        raise EkxError(f"{src}: no such file; pickle reads one file holding a dict video id -> [T, D] array")
    try:
        with open(src, "rb") as fh:
            data = _ArraysOnly(io.BufferedReader(fh)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise EkxError(f"{src}: not a pickle of a dict of arrays ({why(e)})") from None
    if not isinstance(data, dict) or not data:
        raise EkxError(f"{src}: holds a {type(data).__name__}, not a non-empty dict video id -> [T, D] array")
    out = {}
    for vid, value in data.items():
        where = f"{src} [{vid!r}]"
        try:
            arr = np.asarray(value)
        except ValueError as e:  # a ragged list of rows
            raise EkxError(f"{where}: not one [T, D] array ({why(e)})") from None
        n, d = shape2(numbers(arr, where), where)
        out[str(vid)] = Video(str(vid), where, n, d, functools.partial(np.asarray, arr), grid(n, o, "pickle"), "--rate")
    return Source(out, [src], grid_meaning(o), "--rate")
