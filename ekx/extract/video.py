"""Frame sampling and decoding.

Sampling: K positions per segment, the centres of K equal parts of its time span,
converted to frame indices with the decoded video's own fps (EPIC's start/stop_frame
columns are at 50/60 fps whatever the file, so timestamps are the truth).

Decoding: each video is opened once, at the size the backbone's preprocessing resizes
to (the decoder's scaler is ~2x cheaper than converting 1080p to RGB and resizing
after). Frames are read in increasing order; for each one the reader either decodes
forward from where it is (skip_frames: no colour conversion) or seeks, whichever
decodes fewer frames - that is, it seeks only when a keyframe lies between the
current position and the target. Dense segments thus decode in one forward pass,
sparse ones seek.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# decord is imported lazily inside workers: importing it early in the main process
# is harmless, but keeping it out of module import keeps `ekx --help` fast.


def sample_centres(start: float, stop: float, fps: float, k: int) -> np.ndarray:
    """Frame indices of the centres of K equal parts of [start, stop)."""
    t = start + (np.arange(k) + 0.5) * (stop - start) / k
    return np.round(t * fps).astype(np.int64)


def clip_frames(centres: np.ndarray, clip_len: int, n_frames: int) -> np.ndarray:
    """[K * clip_len] indices of consecutive frames centred on each position (clamped to the video)."""
    if clip_len == 1:
        return centres
    offsets = np.arange(clip_len) - clip_len // 2
    return np.clip(centres[:, None] + offsets[None, :], 0, n_frames - 1).reshape(-1)


@dataclass
class Request:
    row: int
    start: float
    stop: float
    start_frame: int = -1  # the CSV's frame numbers (1-based, inclusive): the frames source's
    stop_frame: int = -1  # sampling; video sources use the timestamps


@dataclass
class Result:
    row: int
    frames: np.ndarray | None  # uint8 [K * clip_len, H, W, 3]
    centres: np.ndarray | None  # [K]
    error: str | None = None


def open_reader(path: Path, size_fn=None):
    """A decord VideoReader, at the size ``size_fn(h, w) -> (h, w)`` asks for."""
    import decord

    if size_fn is None:
        return decord.VideoReader(str(path), num_threads=1)
    # the frame size from the container's headers (PyAV), so decord - which scans the whole
    # file on every open - opens the video once, already at the decode size
    shape = _header_shape(path)
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


def _header_shape(path: Path) -> tuple[int, int] | None:
    try:
        import av

        with av.open(str(path)) as c:
            cc = c.streams.video[0].codec_context
            return (cc.height, cc.width) if cc.height and cc.width else None
    except Exception:  # not readable by PyAV: decord's own probe decides
        return None


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


def decode_video(path: Path, requests: list[Request], k: int, clip_len: int, size_fn=None) -> Iterator[Result]:
    """Decode the sampled frames of every requested segment of one video.

    Yields one Result per request, in order of the segments' last frame; frames are
    kept only until every segment that needs them has been yielded.
    """
    try:
        vr = open_reader(path, size_fn)
        n, fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:
        for r in requests:
            yield Result(r.row, None, None, f"cannot open video {path.name}: {str(e).splitlines()[0][:160]}")
        return
    plans = []
    for r in requests:
        centres = sample_centres(r.start, r.stop, fps, k)
        if centres[-1] > n:  # one frame of slack for rounding at the very end
            yield Result(
                r.row,
                None,
                None,
                f"segment {r.start:.2f}-{r.stop:.2f} s is beyond the video's "
                f"end ({n / fps:.2f} s, {n} frames at {fps:g} fps)",
            )
            continue
        centres = np.minimum(centres, n - 1)
        plans.append((r, centres, clip_frames(centres, clip_len, n)))
    plans.sort(key=lambda p: int(p[2].max()))
    users: dict[int, int] = {}
    for _, _, idx in plans:
        for i in np.unique(idx):
            users[int(i)] = users.get(int(i), 0) + 1
    reader, kept, todo = ForwardReader(vr), {}, sorted(users)
    t = 0
    for j, (r, centres, idx) in enumerate(plans):
        last = int(idx.max())
        try:
            while t < len(todo) and todo[t] <= last:
                kept[todo[t]] = reader.read(todo[t])
                t += 1
        except Exception as e:
            reason = f"decode error at frame {todo[t]} of {path.name}: {str(e).splitlines()[0][:160]}"
            for p in plans[j:]:
                yield Result(p[0].row, None, None, reason)
            return
        frames = np.stack([kept[int(i)] for i in idx])
        for i in np.unique(idx):
            users[int(i)] -= 1
            if users[int(i)] == 0:
                del kept[int(i)]
        yield Result(r.row, frames, centres)
