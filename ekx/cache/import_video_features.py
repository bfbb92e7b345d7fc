"""video_features' (v-iashin/video_features) ``save_numpy`` output -> per-video features at
ekx's times (the centre of the frames a feature covers; frame i shows from i / fps).

It writes ``<video>_<feature type>.npy`` [T, D] (I3D: ``<video>_rgb.npy`` and
``<video>_flow.npy``), and for the models that time their rows ``<video>_timestamps_ms.npy``
and ``<video>_fps.npy`` (the rate of the frames it read: the file's, or its
``extraction_fps``). What a timestamp means differs per model (read from its code):

- frame-wise models (resnet, clip, timm: ``VideoLoader``): row j = frame j, timestamp =
  j / fps, the frame's start -> + 0.5 / fps;
- raft: row j = the flow from frame j to j + 1, one timestamp per frame (T + 1 of them)
  -> timestamp j + 1 / fps, the centre of frames j and j + 1;
- i3d: a stack of S frames [a, a + S) (and for flow the frame after, a + S) is run once
  S + 1 frames are read, and its timestamp is OpenCV's position then: frame a + S, the
  *end* of the stack -> - S / (2 fps) for rgb, - (S - 1) / (2 fps) for flow (frames
  [a, a + S]); S (``stack_size``, 64 by default) is not in the files: ``--stack-size``,
  checked against the first timestamp (S / fps);
- r21d, s3d: no timestamps; row i covers frames [i * step, i * step + S) of the frames
  read (``--fps``: s3d re-encodes to 25 fps by default, r21d reads the file's rate)
  -> (i * step + S / 2) / fps; ``--stack-size`` (r21d 16, s3d 64 by default),
  ``--step-size`` (default: the stack size, as in every model's defaults);
- vggish: no timestamps; example i covers the audio [0.96 i, 0.96 i + 0.975) s (96 log-mel
  frames of 25 ms every 10 ms, no overlap) -> 0.96 i + 0.4875.

ekx does not guess a stack size: the flag is required where the stack length matters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekx import EkxError
from ekx.cache.import_formats import (
    SOURCE_TIMES,
    Options,
    Source,
    Video,
    VideoInfo,
    flag,
    frame_rate,
    load_npy,
    refuse_unused,
    shape2,
)

META = ("fps", "timestamps_ms")
VGGISH_HOP, VGGISH_SPAN = 0.96, 0.975  # vggish_params: 0.96 s examples of 10 ms frames, 25 ms windows


@dataclass(frozen=True)
class Kind:
    """How one feature type's rows are timed."""

    stamped: bool  # it writes <video>_timestamps_ms.npy and <video>_fps.npy
    options: frozenset[str]  # the import flags it takes
    rule: str  # dense_times: the source's instant and ekx's conversion
    # (rows, timestamps s or None, fps, stack size, step size, where) -> times s
    times: Callable[[int, np.ndarray | None, float, int, int, str], np.ndarray]


def _frames(n, ts, fps, s, step, where):
    _count(ts, n, where, "one per row")
    return ts + 0.5 / fps


def _flows(n, ts, fps, s, step, where):
    _count(ts, n + 1, where, "one per frame: rows + 1")
    return ts[:n] + 1.0 / fps


def _i3d(extra: float):
    def times(n, ts, fps, s, step, where):
        _count(ts, n, where, "one per stack")
        first = float(ts[0]) * fps if n else float(s)
        if abs(first - s) > 1.5:  # the first stack is frames [0, S): stamped at frame S
            raise EkxError(
                f"{where}: the first stack is stamped {ts[0] * 1000:.1f} ms = frame {first:.1f} at {fps:g} fps, "
                f"a stack of about {round(first)} frames, not --stack-size {s}"
            )
        return ts - (s - extra) / (2 * fps)

    return times


def _stacks(n, ts, fps, s, step, where):
    return (np.arange(n) * step + s / 2) / fps


def _vggish(n, ts, fps, s, step, where):
    return np.arange(n) * VGGISH_HOP + VGGISH_SPAN / 2


def _count(ts, n: int, where: str, what: str) -> None:
    if len(ts) != n:
        raise EkxError(f"{where}: {len(ts)} timestamps for {n} feature rows (video_features writes {what})")


FRAME_RULE = "video_features {key}: row j = frame j, timestamp j / fps (its start); time = timestamp + 0.5 / fps"
STACK_RULE = (
    "video_features {key}: row i = frames [i * step, i * step + stack) at fps (no timestamps); "
    "time = (i * step + stack / 2) / fps"
)
I3D_RULE = (
    "video_features i3d {key}: timestamp = frame a + stack, the end of the stack [a, a + stack){flow}; "
    "time = timestamp - {shift} / fps"
)
KINDS: dict[str, Kind] = {
    **{k: Kind(True, frozenset(), FRAME_RULE.format(key=k), _frames) for k in ("resnet", "clip", "timm")},
    "raft": Kind(
        True, frozenset(), "video_features raft: row j = flow of frames j, j + 1, timestamp j / fps; "
        "time = timestamp + 1 / fps", _flows,
    ),
    "rgb": Kind(True, frozenset({"stack_size"}), I3D_RULE.format(key="rgb", flow="", shift="stack / 2"), _i3d(0.0)),
    "flow": Kind(
        True, frozenset({"stack_size"}),
        I3D_RULE.format(key="flow", flow=" and frame a + stack", shift="(stack - 1) / 2"), _i3d(1.0),
    ),
    **{k: Kind(False, frozenset({"stack_size", "step_size", "fps"}), STACK_RULE.format(key=k), _stacks)
       for k in ("r21d", "s3d")},
    "vggish": Kind(
        False, frozenset(), "video_features vggish: example i = audio [0.96 i, 0.96 i + 0.975) s; "
        "time = 0.96 i + 0.4875", _vggish,
    ),
}  # fmt: skip


def is_layout(src: Path, o: Options) -> bool:
    """video_features' layout: its timestamps files are here, or --key names a feature type."""
    return o.key is not None or any(src.glob("*_timestamps_ms.npy"))


def read(src: Path, o: Options, info: VideoInfo) -> Source:
    stamps = {p.name[: -len("_timestamps_ms.npy")]: p for p in src.glob("*_timestamps_ms.npy")}
    key = o.key or _only_key(src, stamps)
    kind = KINDS.get(key)
    if kind is None:
        raise EkxError(
            f"--key {key}: ekx times video_features' {', '.join(KINDS)} (i3d: rgb, flow); "
            "other arrays: plain <video>.npy with --rate"
        )
    what = f"video_features {key}"
    refuse_unused(o, kind.options | {"key"}, what)
    s = o.stack_size or 0
    if "stack_size" in kind.options and not s:
        defaults = "i3d 64" if kind.stamped else "r21d 16 (r2plus1d_18_16_kinetics), s3d 64"
        raise EkxError(f"{what}: give --stack-size, the frames per stack it used (its defaults: {defaults})")
    step = o.step_size or s
    rate, rate_text = frame_rate(o, None, info, what) if "fps" in kind.options else (None, "per video: <video>_fps.npy")
    suffix = f"_{key}.npy"
    out: dict[str, Video] = {}
    used: list[Path] = []
    for path in sorted(src.glob(f"*{suffix}")):
        vid = path.name[: -len(suffix)]
        n, d = shape2(load_npy(path), str(path))
        ts, fps, times_from = None, 0.0, f"{what} (--stack-size/--step-size/--fps)"
        if kind.stamped:
            ts, fps = _stamps(src, vid, stamps, what)
            times_from = str(stamps[vid])
            used += [stamps[vid], src / f"{vid}_fps.npy"]
        elif rate is not None:
            fps = rate(vid)
        times = kind.times(n, ts, fps, s, step, str(times_from))
        out[vid] = Video(vid, str(path), n, d, functools.partial(load_npy, path, False), times, times_from)
        used.append(path)
    if not out:
        raise EkxError(f"{src}: no <video>{suffix} files here (video_features' {key} output)")
    meaning = {
        "dense_rate": SOURCE_TIMES,
        "dense_times": kind.rule,
        "import_key": key,
        "import_fps": rate_text if kind.stamped or "fps" in kind.options else "",
        "import_stack_size": s,
        "import_step_size": step if "step_size" in kind.options else 0,
    }
    flags = " / ".join(flag(n) for n in sorted(kind.options)) or "--key"
    return Source(out, used, meaning, flags)


def _only_key(src: Path, stamps: dict[str, Path]) -> str:
    vid = sorted(stamps)[0]
    names = (p.name[len(vid) + 1 : -4] for p in src.glob(f"{_glob_escape(vid)}_*.npy"))
    keys = sorted(k for k in names if k not in META)
    if len(keys) != 1:
        raise EkxError(
            f"{src}: {vid} has feature files {', '.join(keys)}; choose one with --key"
            if keys
            else f"{src}: {vid} has timestamps but no feature file <video>_<feature_type>.npy"
        )
    return keys[0]


def _stamps(src: Path, vid: str, stamps: dict[str, Path], what: str) -> tuple[np.ndarray, float]:
    """(timestamps in s, fps) of one video, each file checked."""
    if vid not in stamps:
        raise EkxError(f"{src}: no {vid}_timestamps_ms.npy beside {vid}'s features ({what} writes one)")
    fps_path = src / f"{vid}_fps.npy"
    if not fps_path.is_file():
        raise EkxError(f"{src}: no {fps_path.name} beside {vid}'s features ({what} writes one)")
    fps_arr = load_npy(fps_path, False)
    fps = float(fps_arr.reshape(-1)[0]) if fps_arr.size == 1 else math.nan
    if not (math.isfinite(fps) and fps > 0):
        raise EkxError(f"{fps_path}: frame rate {fps_arr.tolist()!r}; video_features writes the rate it read at")
    return np.asarray(load_npy(stamps[vid], False), np.float64).reshape(-1) / 1000.0, fps


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
