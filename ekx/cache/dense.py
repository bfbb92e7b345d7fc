"""Dense stores: per-video feature sequences at known times, read by stage 2 for any annotation.

A dense store is an ekx cache - same file format, identity, checksums, resume, shards,
merge and `cache info/verify` - whose rows are *runs* of K consecutive positions of one
video instead of annotated segments: row ``<video>@<c>`` holds the video's positions
cK .. cK+K-1. Root attribute ``kind = "dense"``; a ``time [N, K]`` float64 dataset gives each
position's time in seconds on the video's timeline (NaN: padding after the video's last
position, never read).

`ekx extract --dense RATE` puts positions on a grid, position j at (j + 0.5) / RATE s (a clip
model: the clip's centre). A run of K positions is then the "segment" [cK, (c+1)K) / RATE
under the per-segment sampling rule (centres of K equal parts), so the stage-1 pipeline
extracts runs unchanged, in order, one reader per video. ``every:N`` is the grid at the
video's own frame rate / N: one feature per N frames, the middle one of each N. `ekx import`
writes the same layout from published features, with their own times.

Stage 2 (`gather`) gives each segment of an annotation file its K positions by the
per-segment sampling rule (the centres of K equal parts of [start, stop)), each mapped to the
nearest dense time of its video; a segment with no dense time within half a dense period
of its span, or with a position in a row that failed (or is pending), is missing (the
`--allow-missing` policy counts it), never silently skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekx import EkxError, epic
from ekx.cache import store

KIND = "dense"
# positions gathered per segment from a dense store (the architecture document's 16 frames);
# `train-head --frames T` picks T of them as it picks T of a per-segment cache's K
SEGMENT_POSITIONS = 16
GATHER_RULE = (
    "K = {k} positions per segment: centres of K equal parts of [start, stop), each the nearest dense "
    "time of its video; a segment with no dense time within half a period of its span is missing"
)  # and one with a position in a row not done (`gather`): the same features for every segment read
SPANS = ("video", "annotated")
# the separator of a dense store and the annotation file whose segments to read from it
SEGMENTS = "@"


@dataclass(frozen=True)
class Rate:
    """``4`` (positions per second) or ``every:N`` (one per N frames of the video)."""

    text: str
    per_second: float | None
    every: int | None

    @classmethod
    def parse(cls, text: str) -> Rate:
        t = str(text).strip()
        try:
            if t.startswith("every:"):
                n = int(t.split(":", 1)[1])
                if n >= 1:
                    return cls(t, None, n)
            else:
                r = float(t)
                if math.isfinite(r) and r > 0:
                    return cls(t, r, None)
        except ValueError:
            pass
        raise EkxError(f"--dense {text!r}: give positions per second (e.g. 4 or 7.5) or every:N (every Nth frame)")

    def of(self, fps: float) -> float:
        """Positions per second on a video of ``fps`` frames per second."""
        return self.per_second if self.per_second is not None else fps / float(self.every or 1)

    def tag(self) -> str:
        """For file names: 4fps, 7.5fps, every2."""
        return f"every{self.every}" if self.every else f"{self.per_second:g}fps"


def video_length(path: Path) -> tuple[float, float]:
    """(duration s, frames per second) from the container's header - no frame is read."""
    import av

    try:
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            fps = float(v.average_rate or v.guessed_rate or 0)
            if v.duration is not None and v.time_base is not None:
                duration = float(v.duration * v.time_base)
            else:
                duration = (c.duration or 0) / 1e6
    except Exception as e:
        raise EkxError(f"{path}: cannot read its length for a dense store ({type(e).__name__}: {e})") from None
    if not duration > 0 or not fps > 0:
        raise EkxError(f"{path}: its header gives no duration or frame rate; make an MP4 copy with `ekx prepare`")
    return duration, fps


def grid_count(duration: float, rate: float) -> int:
    """Positions (j + 0.5) / rate that lie before ``duration``."""
    return max(0, math.ceil(duration * rate - 0.5 - 1e-9))


def plan(
    segments: list[epic.Segment],
    lengths: dict[str, tuple[float, float]],
    rate: Rate,
    k: int,
    span: str = "video",
    margin: float = 0.0,
) -> tuple[list[epic.Segment], np.ndarray]:
    """The runs of a dense extraction, as segments (see the module docstring), and their
    positions' times [runs, K] (NaN past the video's end). Videos in their order in the
    annotation file; ``span`` annotated keeps the runs that meet a segment +- ``margin`` s."""
    if span not in SPANS:
        raise EkxError(f"--dense-span {span!r}: choose {' or '.join(SPANS)}")
    spans: dict[str, list[tuple[float, float]]] = {}
    for s in segments:
        spans.setdefault(s.video_id, []).append((s.start - margin, s.stop + margin))
    runs: list[epic.Segment] = []
    times: list[np.ndarray] = []
    for vid, wanted in spans.items():
        duration, fps = lengths[vid]
        r = rate.of(fps)
        n = grid_count(duration, r)
        starts = np.array([a for a, _ in wanted])
        stops = np.array([b for _, b in wanted])
        for c in range(math.ceil(n / k)):
            lo, hi = c * k / r, (c + 1) * k / r
            if span == "annotated" and not ((starts < hi) & (stops > lo)).any():
                continue
            j = c * k + np.arange(k)
            times.append(np.where(j < n, (j + 0.5) / r, np.nan))
            runs.append(epic.Segment(f"{vid}@{c}", vid.split("_")[0], vid, lo, hi))
    out = np.stack(times) if times else np.zeros((0, k))
    return runs, out


def describe(rate: Rate, span: str, margin: float) -> dict:
    """The root attributes that say what a dense extraction holds."""
    where = "whole videos" if span == "video" else f"the split's segments +- {margin:g} s"
    return {
        "kind": KIND,
        "dense_rate": rate.text,
        "dense_times": "position j at (j + 0.5) / rate s on the video's timeline (rate: per second, "
        "or the video's fps / N for every:N); rows of K positions; time NaN past the video's end",
        "dense_span": where,
    }


# ---------------------------------------------------------------- stage 2


def split_spec(path: str | Path) -> tuple[Path, Path | None]:
    """``store.h5@segments.csv`` -> (store, segments file); a plain path -> (path, None)."""
    text = str(path)
    head, at, csv = text.rpartition(SEGMENTS)
    if not at or not csv.endswith(".csv"):
        return Path(text), None
    return Path(head), Path(csv)


def segments_file(path: Path, attrs: dict, given: Path | None) -> Path:
    """The annotation file whose segments stage 2 reads from a dense store: the one named
    after ``@``, else the one the store was made for (if it is still there, unchanged)."""
    if given is not None:
        if not given.is_file():
            raise EkxError(f"{path}{SEGMENTS}{given}: no annotation file {given}")
        return given
    recorded = Path(str(attrs.get("annotation_path", "")))
    way_out = f"name the annotation CSV whose segments to read: {path}{SEGMENTS}<file.csv>"
    if not str(attrs.get("annotation_path", "")) or not recorded.is_file():
        raise EkxError(f"{path} is a dense store made for {attrs.get('annotation_file')!r}, not found here; {way_out}")
    if store.sha256_file(recorded) != attrs.get("annotation_sha256"):
        raise EkxError(f"{path}: {recorded} changed since the store was made; {way_out}")
    return recorded


@dataclass
class Gathered:
    """Segments read from a dense store: each one's K positions in the store's flat
    [rows * K] position order."""

    index: np.ndarray  # [S, K] int64
    present: np.ndarray  # [S] bool: the segment has dense features
    max_gap: float  # largest |segment time - dense time| over present segments (s)


def gather(times: np.ndarray, video_id: list[str], done: np.ndarray, segments: list[epic.Segment], k: int) -> Gathered:
    """Map every segment's K sampled times to the nearest planned dense position of its video
    (`times` [rows, K] of the store, ``done`` [rows] bool). A segment any of whose positions
    lies in a row not done (failed, pending) is missing: a neighbouring row's features never
    stand in for the failed ones, and the missing-segment policy counts it."""
    cols = times.shape[1]
    flat = np.flatnonzero(np.isfinite(times).reshape(-1))  # every planned position, done or not
    row_done = np.repeat(np.asarray(done, bool), cols)  # [rows * K]: the position's row is done
    row_video = np.asarray(video_id, dtype=object)[flat // cols]
    per_video: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for vid in dict.fromkeys(row_video.tolist()):
        mine = flat[row_video == vid]
        t = times.reshape(-1)[mine]
        order = np.argsort(t, kind="stable")
        t, mine = t[order], mine[order]
        period = float(np.median(np.diff(t))) if len(t) > 1 else math.inf
        per_video[vid] = (t, mine, period)
    index = np.zeros((len(segments), k), np.int64)
    present = np.zeros(len(segments), bool)
    gap = 0.0
    from ekx.extract.video import centre_times

    for i, s in enumerate(segments):
        if s.video_id not in per_video:
            continue
        t, pos, period = per_video[s.video_id]
        half = period / 2 if math.isfinite(period) else math.inf
        lo = np.searchsorted(t, s.start - half, side="left")
        if lo >= len(t) or t[lo] > s.stop + half:
            continue  # no dense feature within half a period of the span
        want = centre_times(s.start, s.stop, k)
        j = np.clip(np.searchsorted(t, want), 1, len(t) - 1) if len(t) > 1 else np.zeros(k, np.int64)
        if len(t) > 1:
            j = np.where(np.abs(t[j - 1] - want) <= np.abs(t[j] - want), j - 1, j)
        index[i] = pos[j]
        if row_done[pos[j]].all():
            present[i] = True
            gap = max(gap, float(np.abs(t[j] - want).max()))
    return Gathered(index, present, gap)
