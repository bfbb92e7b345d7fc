"""A video's own sound track, read with PyAV as windows of a model's input.

One pass over the file per video: the container is demuxed once, the audio packets decoded
and resampled by FFmpeg (libswresample) to the model's rate, mono, float32; the video
packets only give their timestamps (nothing is decoded), which say which frame shows at
each window's centre (the cache's ``frame_index``, as for frames) and where the video ends.

Time: sample j of the resampled track is at ``start + j / rate`` seconds on the file's
timeline (the one the frames use: `video.timeline_origin`), ``start`` being its first
decoded frame's presentation time. A feature at time t reads the ``samples`` samples
centred on t: ``[round(t * rate) - samples // 2, ... + samples)``. The part of a window
that the track does not reach (before 0, after the video's end) is silence - there is no
recording there, as a centred STFT pads; where the track runs past the video's last frame, its
samples are read. A part inside the video that the track does not cover (a track that starts
late or ends early) fails the segment, naming the video and both spans; up to `SLACK` seconds
are tolerated (and silent), the usual misalignment of a track's ends.

Memory: decoded samples are kept only from the earliest window still waiting; a request is
answered once all its windows are cut and the video's timestamps have passed its last
centre, so a long video is never held whole.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ekx import EkxError
from ekx.extract.video import _EPS as FRAME_EPS
from ekx.extract.video import Request, Result, centre_times, display_end, timeline_origin

SLACK = 0.25  # seconds of a track's end (or start) missing that still count as covered (silent)


def missing_sound(path: Path) -> str | None:
    """Why a video file has no sound ekx can read, or None (header only: nothing decoded)."""
    try:
        import av

        with av.open(str(path)) as c:
            if not c.streams.audio:
                return "no sound track"
            if not c.streams.video:
                return "no video stream"
    except Exception as e:
        return f"unreadable ({type(e).__name__})"
    return None


def check_tracks(found: dict[str, Path], video_ids: list[str]) -> None:
    """Refuse, in one line before anything is written, a run whose videos have no sound."""
    bad = [(v, why) for v in dict.fromkeys(video_ids) if v in found and (why := missing_sound(found[v]))]
    if bad:
        shown = "; ".join(f"{v} ({found[v].name}): {why}" for v, why in bad[:4])
        more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise EkxError(
            f"{len(bad)} video(s) have no sound to extract audio features from: {shown}{more}. Point --videos at "
            "the videos with their sound (`ekx prepare` copies hold frames only), or extract an annotation CSV "
            "without them"
        )


def window_times(req: Request, k: int) -> np.ndarray:
    """The K times (s) a request's features stand for: the centres of K equal parts of the
    segment (as for frames), or a dense run's own times."""
    return centre_times(req.start, req.stop, k) if req.times is None else np.asarray(req.times, np.float64)


class _Track:
    """The resampled samples decoded so far, as chunks on the absolute sample axis."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.chunks: list[np.ndarray] = []
        self.first: int | None = None  # absolute index of the first sample
        self.end = 0  # one past the last sample

    def add(self, samples: np.ndarray, at: int | None = None) -> None:
        if self.first is None:
            self.first = self.end = int(at or 0)
        self.starts.append(self.end)
        self.chunks.append(samples)
        self.end += len(samples)

    def drop_before(self, index: int) -> None:
        while len(self.starts) > 1 and self.starts[1] <= index:
            self.starts.pop(0)
            self.chunks.pop(0)

    def cut(self, start: int, n: int, out: np.ndarray) -> None:
        """``out[:] = samples[start:start + n]`` where decoded (the rest untouched)."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while i < len(self.chunks) and self.starts[i] < start + n:
            a, c = self.starts[i], self.chunks[i]
            lo, hi = max(start, a), min(start + n, a + len(c))
            if hi > lo:
                out[lo - start : hi - start] = c[lo - a : hi - a]
            i += 1


def decode_windows(path: Path, requests: list[Request], k: int, rate: int, samples: int) -> Iterator[Result]:
    """One Result per request: ``frames`` holds its K windows, float32 [K, samples] (mono at
    ``rate``), ``centres`` the video frame shown at each window's centre; or the error."""
    import av

    half = samples // 2
    plans = []
    for r in requests:
        t = window_times(r, k)
        plans.append((r, t, np.round(t * rate).astype(np.int64) - half))
    try:
        c = av.open(str(path))
    except Exception as e:
        for r in requests:
            yield Result(r.row, None, None, f"cannot open video {path.name}: {type(e).__name__}")
        return
    with c:
        if not c.streams.audio or not c.streams.video:
            what = "sound track" if not c.streams.audio else "video stream"
            for r in requests:
                yield Result(r.row, None, None, f"{path.name} has no {what}")
            return
        a, v = c.streams.audio[0], c.streams.video[0]
        origin, vtb = timeline_origin(c), float(v.time_base or 0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        track, pts, seen = _Track(), list[float](), -np.inf  # video frame times so far; the latest video dts (s)
        # requests by the end of their last window; the earliest window start still needed, lazily
        order = sorted(range(len(plans)), key=lambda i: int(plans[i][2][-1]) + samples)
        starts = [(int(plans[i][2].min()), i) for i in order]
        heapq.heapify(starts)
        done: set[int] = set()
        nxt, at = 0, None

        def ready(eof: bool) -> Iterator[Result]:
            nonlocal nxt
            end = round(display_end(np.asarray(pts)) * rate) if eof and pts else None  # the video's, at EOF
            while nxt < len(order):
                i = order[nxt]
                r, t, first = plans[i]
                if not eof and (int(first[-1]) + samples > track.end or seen <= float(t[-1])):
                    return
                nxt += 1
                done.add(i)
                yield _answer(r, t, first, track, samples, rate, pts, path, end)
            while starts and starts[0][1] in done:
                heapq.heappop(starts)
            if starts:
                track.drop_before(starts[0][0])

        try:
            for packet in c.demux(a, v):
                if packet.stream is v:
                    if packet.pts is not None:
                        bisect.insort(pts, float(np.float64(packet.pts) * vtb - origin))
                    if packet.dts is not None:
                        seen = max(seen, float(np.float64(packet.dts) * vtb - origin))
                    continue
                frame: Any
                for frame in packet.decode():
                    if at is None:  # the first decoded frame places the track (the resampler may hold it back)
                        at = 0
                        if frame.pts is not None and frame.time_base is not None:
                            at = round((float(frame.pts * frame.time_base) - origin) * rate)
                    for out in resampler.resample(frame):
                        track.add(out.to_ndarray().reshape(-1).astype(np.float32, copy=False), at)
                yield from ready(False)
            for out in resampler.resample(None):
                track.add(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        except Exception as e:
            reason = f"sound of {path.name} does not decode: {type(e).__name__}: {str(e)[:120]}"
            for i in order[nxt:]:
                yield Result(plans[i][0].row, None, None, reason)
            return
        yield from ready(True)


def _answer(r, t, first, track: _Track, samples: int, rate: int, pts: list, path: Path, end: int | None) -> Result:
    """A request's windows cut from the track, or why not: the video's span (0 to ``end``, its
    last frame's end in samples, known at the end of the file) is what the track must cover.
    ``pts``: the sorted frame times so far (all those up to the request's last time)."""
    if not pts:
        return Result(r.row, None, None, f"{path.name}: no video frame has a timestamp")
    lo, hi = int(first.min()), int(first.max()) + samples
    need_lo = max(lo, 0)
    need_hi = hi if end is None else min(hi, end)
    slack = round(SLACK * rate)
    have_lo, have_hi = (track.first or 0), track.end
    if track.first is None or have_lo > need_lo + slack or have_hi < need_hi - slack:
        span = "none" if track.first is None else f"{have_lo / rate:.2f}-{have_hi / rate:.2f} s"
        return Result(
            r.row,
            None,
            None,
            f"sound track of {path.name} covers {span}, shorter than the video: this segment's windows need "
            f"{need_lo / rate:.2f}-{need_hi / rate:.2f} s",
        )
    out = np.zeros((len(first), samples), np.float32)  # silence where the track has nothing
    for j, s in enumerate(first.tolist()):
        track.cut(int(s), samples, out[j])
    # the frame shown at each centre (`video.frame_at`'s rule: the last one starting at or before it)
    shown = [max(bisect.bisect_right(pts, float(x) + FRAME_EPS) - 1, 0) for x in t]
    return Result(r.row, out, np.asarray(shown, np.int64))
