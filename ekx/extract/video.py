"""Frame timing, sampling and decord's reader.

Timing: a time t (seconds on the file's timeline, which starts at 0 like a player's
clock) shows the frame displayed at t - the last frame whose presentation time (pts) is
<= t (the first frame before it). Frame times come from the stream itself, never from
``index / avg_fps``: EPIC holds 29.97, 47.95, 50, 59.94, 60 and 90 fps files, phone
footage has a variable rate, and a video stream may start after the file's 0 (after its
audio). EPIC's start/stop_frame columns are at 50/60 fps whatever the file, so the
timestamps are the truth.

Sampling: K positions per segment, the centres of K equal parts of its time span. A
backbone reading clips (R(2+1)D) gets ``clip_len`` frames 1 / CLIP_RATE s apart around
each centre - the same duration on a 50 and a 60 fps video; the centre frame is the
clip's position ``clip_len // 2``, so a per-frame backbone sharing the decode takes it.

Frame times are the container's pts, read by PyAV in float64 (`scan`: one demux pass, no
decoding), for every video source: decord's own timestamps are float32, which an hour into
a video are off by up to 1.2e-4 s and pick the neighbouring frame for some sampled times.

Reading (decord): each video is opened once, at the size the backbone's preprocessing
resizes to where the decoder's scaler is asked for (~2x cheaper than converting 1080p to
RGB and resizing after; the cache records which resize ran). Frames are read in
increasing order; for each one the reader either decodes forward from where it is
(skip_frames: no colour conversion) or seeks, whichever decodes fewer frames - it seeks
only when a keyframe lies between the current position and the target. MPEG-TS/PS files
are refused (`refuses_mpeg_systems`): decord and torchcodec return other frames there, silently;
`--source auto` reads them with PyAV instead (`is_mpeg_system`, `sources.pyav`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekx import EkxError

# decord is imported lazily inside workers: importing it early in the main process
# is harmless, but keeping it out of module import keeps `ekx --help` fast.

# Kinetics-400 R(2+1)D (torchvision's R2Plus1D_18_Weights) is trained and evaluated on
# clips resampled to 15 fps (its docs: frame_rate=15, clip_len=16): a clip's frames are
# 1/15 s apart, whatever the file's rate.
CLIP_RATE = 15.0
# the sampling rule, recorded in every cache (`sampling` attribute, part of the identity):
# caches made under another rule refuse to mix
SAMPLING = (
    "centres of K equal parts of [start, stop); frame = the one displayed at t (last pts <= t, "
    "pts on the file's timeline); clips: clip_len frames at t + (j - clip_len // 2) / {rate:g} s"
)
_EPS = 1e-6  # a frame whose pts is within this of t counts as displayed at t (float pts)

# swscale's own threads: none. ekx decodes one video per process and core, so slice threads
# would only oversubscribe the cores. (The forked decoders that hung in swscale's slice-thread
# teardown were PyAV 18.1.1's bug, pinned out in pyproject.toml; this setting did not cure it.)
SWS_THREADS = 1


def sampling_rule(clip_rate: float = CLIP_RATE) -> str:
    return SAMPLING.format(rate=clip_rate)


def centre_times(start: float, stop: float, k: int) -> np.ndarray:
    """Times (s) of the centres of K equal parts of [start, stop)."""
    return start + (np.arange(k) + 0.5) * (stop - start) / k


def clip_times(centres_t: np.ndarray, clip_len: int, clip_rate: float = CLIP_RATE) -> np.ndarray:
    """[K * clip_len] times: ``clip_len`` per centre, 1 / clip_rate s apart, the centre at
    position clip_len // 2 (for clip_len 1, the centres themselves)."""
    offsets = (np.arange(clip_len) - clip_len // 2) / clip_rate
    return (np.asarray(centres_t, dtype=np.float64)[:, None] + offsets[None, :]).reshape(-1)


def frame_at(times: np.ndarray, t) -> np.ndarray:
    """Index of the frame displayed at each time ``t``: the last frame whose start time is
    <= t (frame 0 before the first one)."""
    i = np.searchsorted(times, np.asarray(t, dtype=np.float64) + _EPS, side="right") - 1
    return np.clip(i, 0, len(times) - 1).astype(np.int64)


def sample_centres(start: float, stop: float, fps: float, k: int) -> np.ndarray:
    """Frame indices of the centres of K equal parts of [start, stop) at a constant ``fps``
    from 0 (frame i is shown from i / fps): the displayed frame, floor(t * fps)."""
    return np.floor(centre_times(start, stop, k) * fps + _EPS).astype(np.int64)


def frame_period(times: np.ndarray) -> float:
    """Typical duration of one frame (the median gap; 1/30 s for a one-frame video)."""
    return float(np.median(np.diff(times))) if len(times) > 1 else 1 / 30


# containers whose timeline starts at pts 0 by definition (edit lists included): a video
# stream starting later shows after that much time, even in a video-only file. Elsewhere
# (MPEG-PS/TS) timestamps start at an arbitrary value and the file's first one is 0.
_ZERO_BASED = ("mov", "mp4", "matroska", "webm", "avi")


def timeline_origin(container) -> float:
    """Seconds of raw pts that are time 0 of a PyAV container's timeline."""
    names = set((container.format.name or "").split(","))
    if names & set(_ZERO_BASED) or container.start_time is None:
        return 0.0
    return container.start_time / 1e6


@dataclass
class Scan:
    """What one PyAV pass over a video's container tells its reader (`scan`)."""

    shape: tuple[int, int] | None  # (height, width) from the header; None where PyAV cannot say
    start: float  # where the video stream starts on the file's timeline (s)
    times: np.ndarray  # [n] float64 pts (s, file timeline) in display order; empty where unreadable
    container: str  # PyAV's format name ("mov,mp4,...", "mpegts", "mpeg"); "" where unreadable
    packets: int = 0  # the video packets read; more than len(times) where some carry no pts


def scan(path: Path, refuse: Callable[[Path, str], str | None] | None = None) -> Scan:
    """The header's frame size and stream start, and every frame's presentation time from
    the packets, in one PyAV open (demuxing reads the file; nothing is decoded). The size
    lets a decoder that scans the whole file on open (decord, torchcodec's exact mode) open
    once, already at the decode size; the start places a decoder's own clock, which counts
    from the stream's first frame, where players show it (`timeline_origin`). ``refuse``
    (path, format name) -> a reason: raised as EkxError before the packets are read."""
    empty = np.zeros(0)
    try:
        import av

        c = av.open(str(path))
    except Exception:  # not readable by PyAV: the decoder's own probe and clock decide
        return Scan(None, 0.0, empty, "")
    with c:
        container = c.format.name or ""
        why = refuse(path, container) if refuse is not None else None
        if why:
            raise EkxError(why)
        try:
            v = c.streams.video[0]
            cc = v.codec_context
            shape = (cc.height, cc.width) if cc.height and cc.width else None
            origin, start = timeline_origin(c), 0.0
            if v.start_time is not None and v.time_base is not None:
                start = max(0.0, float(v.start_time * v.time_base) - origin)
        except Exception:
            return Scan(None, 0.0, empty, container)
        try:
            if v.time_base is None:
                return Scan(shape, start, empty, container)
            tb = float(v.time_base)  # float64: pts x time base is exact to ~1e-16 relative
            packets = [p.pts for p in c.demux(v) if p.size]
            pts = sorted(p for p in packets if p is not None)
            times = np.asarray(pts, dtype=np.float64) * tb - origin
        except Exception:  # a damaged file: the decoder's clock, else a constant rate
            return Scan(shape, start, empty, container)
    return Scan(shape, start, times, container, len(packets))


# MPEG system streams (PyAV's format names): program and transport streams
MPEG_SYSTEMS = ("mpeg", "mpegts", "mpegtsraw")


def is_mpeg_system(path: Path) -> bool:
    """Whether the file is an MPEG program or transport stream, from its first bytes (what
    `--source auto` asks of every video before choosing a decoder; opening each with PyAV
    would cost 10-50 ms a file): a pack header (00 00 01 BA) opens a program stream; a
    transport stream has its sync byte 0x47 every 188 bytes (192 in M2TS), at most a packet in."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8 * 192 + 192)
    except OSError:
        return False
    if head.startswith(b"\x00\x00\x01\xba"):
        return True
    for size in (188, 192):
        for first in range(min(size, max(0, len(head) - 4 * size))):
            if all(head[first + j * size] == 0x47 for j in range(5)):
                return True
    return False


def refuses_mpeg_systems(path: Path, container: str) -> str | None:
    """Why neither decord nor torchcodec may read this file, or None (callers name the file).
    On MPEG-TS/PS both return other frames than asked, with no error. decord (measured on
    stamped videos): one GOP late for H.264 with B-frames and for MPEG-2 in TS, one GOP late
    on the shared MPEG-2 program stream, other frames again for MPEG-2 and H.264 in PS.
    torchcodec 0.17 (exact mode): the first frames of an H.264 TS all read as frame 30, the
    rest of the file then fails; an H.264 PS reads as frame 0 throughout; the shared MPEG-2
    program stream's frames 0-10 read as frame 12. Only some codec/container pairs read
    right, which neither library promises: the whole container family is refused, and
    `ekx prepare` (PyAV, decoding in order) makes the MP4 copy both read right."""
    if set(container.split(",")) & set(MPEG_SYSTEMS):
        return (
            f"decord and torchcodec return wrong frames from MPEG-TS/PS files ({container}); "
            "make an MP4 copy with `ekx prepare`, or extract with --source pyav (or auto)"
        )
    return None


def display_end(times: np.ndarray) -> float:
    """When the last frame stops being shown: its start plus one typical frame period."""
    return float(times[-1]) + frame_period(times)


def usable_times(times: np.ndarray, n: int) -> bool:
    """Whether ``times`` are n increasing finite values (one per frame of the decoder)."""
    times = np.asarray(times, dtype=np.float64)
    return bool(len(times) == n and n and np.isfinite(times).all() and (np.diff(times) > 0).all())


def times_or_nominal(times: np.ndarray, n: int, fps: float, start: float = 0.0) -> np.ndarray:
    """``times`` where they are usable (`usable_times`), else a constant rate from
    ``start`` (a stream without timestamps)."""
    if usable_times(times, n):
        return np.asarray(times, dtype=np.float64)
    return start + np.arange(n) / fps


@dataclass
class Request:
    row: int
    start: float
    stop: float
    start_frame: int = -1  # the CSV's frame numbers (1-based, inclusive): the frames source's
    stop_frame: int = -1  # sampling; video sources use the timestamps
    # a dense store's run: its K positions' times (s), which are not a segment's centres
    # at the video's end (the positions past it repeat the last one; ekx.cache.dense)
    times: np.ndarray | None = None


@dataclass
class Result:
    row: int
    frames: np.ndarray | None  # uint8 [K * clip_len, H, W, 3]
    centres: np.ndarray | None  # [K]
    error: str | None = None
    # FFmpeg log lines of this video's decode so far, and the first (sources.ffmpeg_log)
    decoder_log: int = 0
    decoder_note: str = ""


def open_reader(path: Path, size_fn=None, shape: tuple[int, int] | None = None):
    """A decord VideoReader, at the size ``size_fn(h, w) -> (h, w)`` asks for; ``shape``:
    the frame size from `scan` (decord scans the whole file on every open, so knowing the
    size first opens it once, already at the decode size)."""
    import decord

    if size_fn is None:
        return decord.VideoReader(str(path), num_threads=1)
    if shape is None:
        vr = decord.VideoReader(str(path), num_threads=1)
        shape = _probe_shape(vr)
        if size_fn(*shape) == shape:
            return vr
        del vr
    th, tw = size_fn(*shape)
    if (th, tw) == shape:
        return decord.VideoReader(str(path), num_threads=1)
    return decord.VideoReader(str(path), width=tw, height=th, num_threads=1)


def _probe_shape(vr) -> tuple[int, int]:
    shape = vr.next().shape  # cheap: the first frame; the reader is re-created or re-seeked
    vr.seek(0)
    return shape[0], shape[1]


class ForwardReader:
    """Reads increasing frame indices, seeking only when a keyframe lies in between."""

    def __init__(self, vr):
        self.vr = vr
        self.keys = list(vr.get_key_indices()) or [0]
        self.pos: int | None = None  # index the next `next()` returns
        self.decoded = 0  # frames the decoder went through (cost measure)

    def _keyframe_before(self, i: int) -> int:
        return self.keys[max(bisect.bisect_right(self.keys, i) - 1, 0)]

    def read(self, i: int) -> np.ndarray:
        kf = self._keyframe_before(i)
        if self.pos is not None and kf <= self.pos <= i:
            if i > self.pos:
                self.vr.skip_frames(i - self.pos)
            frame = self.vr.next().asnumpy()
            self.decoded += i - self.pos + 1
        else:
            # get_batch seeks accurately (decord's seek()+next() can land off by frames)
            frame = self.vr.get_batch([i]).asnumpy()[0]
            self.decoded += i - kf + 1
        self.pos = i + 1
        return frame


# pixel formats whose RGB frames PyAV gives exactly as decord does (the shared clips, and
# BT.709 / full-range encodes: tests/test_memory.py); 10-bit ones differ, decord reads them
AV_EXACT_RGB = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p")


class AVForwardReader:
    """`ForwardReader`'s contract (increasing indices, a seek only past a keyframe) through
    PyAV, decoding on the calling thread: the decord source's reader of full-size frames.

    decord 0.6.0 holds decoded frames without bound: after an open or a seek its calling
    thread pushes packets until the decoding thread has a first frame (its Pop returns at
    once while none is ready), and the decoding thread converts every packet pushed to RGB,
    into a queue only later reads drain. One second after one read of the 1080p50 clip it
    held 270 MB more, then the whole clip (700 frames, 4.3 GiB: the 4.6 GiB peak of
    `--resize torchvision`); 4,300 frames of a 7,000-frame video. Frames at the decoder's
    resize are 1/18 of that; full-size ones are read here, where only the frame being decoded
    is held. Frames are told apart by their pts (`scan`'s arithmetic, so the lookup is exact)."""

    def __init__(self, path: Path, times: np.ndarray, keys: list[int]):
        import av

        self.c = av.open(str(path))
        self.s = self.c.streams.video[0]
        self.s.thread_count = 1  # one thread per decoder, as decord's num_threads=1
        self.tb, self.origin = float(self.s.time_base or 0), timeline_origin(self.c)
        self.times, self.keys = times, keys or [0]
        self.frames: Iterator | None = None  # the decoder's frames since the last seek
        self.pos: int | None = None  # index of the next frame `frames` yields
        self.decoded = 0  # frames the decoder went through (cost measure)

    def _keyframe_before(self, i: int) -> int:
        return self.keys[max(bisect.bisect_right(self.keys, i) - 1, 0)]

    def _seek(self, kf: int) -> None:
        self.c.seek(round((float(self.times[kf]) + self.origin) / self.tb), stream=self.s, backward=True)
        self.frames, self.pos = self.c.decode(self.s), None

    def _index(self, frame) -> int:
        """The frame's index in ``times``, or -1 for a time the container never listed."""
        if frame.pts is None:
            return self.pos if self.pos is not None else -1
        t = float(np.float64(frame.pts) * self.tb - self.origin)
        j = int(np.searchsorted(self.times, t))
        return j if j < len(self.times) and self.times[j] == t else -1

    def read(self, i: int) -> np.ndarray:
        kf = self._keyframe_before(i)
        if self.pos is None or not kf <= self.pos <= i:
            self._seek(kf)
        for retry in (False, True):  # a seek landing past frame i: once more from the first frame
            assert self.frames is not None
            for frame in self.frames:
                self.decoded += 1
                j = self._index(frame)
                if j > i:
                    break
                if j >= 0:
                    self.pos = j + 1
                if j == i:  # only the frame asked for is converted to RGB (SWS_THREADS: why one thread)
                    return frame.to_ndarray(format="rgb24", threads=SWS_THREADS)
            if not retry:
                self._seek(0)
        raise ValueError(f"frame {i} ({self.times[i]:.3f} s) did not decode")

    def close(self) -> None:
        self.c.close()


def full_size_reader(path: Path, vr, pts: np.ndarray) -> ForwardReader | AVForwardReader:
    """The reader of a full-size decord ``vr``'s frames: `AVForwardReader` where the
    container lists every frame's pts (``pts``, `scan`) and PyAV's RGB is decord's
    (`AV_EXACT_RGB`), else decord's own `ForwardReader`."""
    if usable_times(pts, len(vr)):
        try:
            r = AVForwardReader(path, np.asarray(pts, dtype=np.float64), list(vr.get_key_indices()))
        except Exception:  # PyAV cannot open it: decord reads, as before
            return ForwardReader(vr)
        if r.tb > 0 and r.s.codec_context.pix_fmt in AV_EXACT_RGB:
            return r
        r.close()
    return ForwardReader(vr)


def decord_times(vr, start: float, pts: np.ndarray | None = None) -> np.ndarray:
    """[n] presentation time (s, file timeline) of every frame of a decord reader: the
    container's pts (`scan`, float64) where there is one per frame, else decord's own
    float32 timestamps placed at the stream's ``start`` (decord counts from the stream's
    first frame), else a constant rate."""
    n = len(vr)
    if pts is not None and usable_times(pts, n):
        return np.asarray(pts, dtype=np.float64)
    try:
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
    except Exception:
        ts = np.zeros(0)
    return times_or_nominal(ts + start, n, float(vr.get_avg_fps()), start)
