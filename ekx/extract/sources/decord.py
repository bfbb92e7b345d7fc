"""The default source: decord, through `ekx.extract.video`'s reader (opened once per
video at the decode size, reading forward and seeking only past a keyframe). Frame times
are the container's pts (PyAV, float64); MPEG-TS/PS files are refused, naming the way out
(`video.refuses_mpeg_systems`): decord returns other frames than asked there."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ekx.extract import video
from ekx.extract.sources import Request, SizeFn, Source, register, time_positions


class DecordReader:
    def __init__(self, path: Path, size_fn: SizeFn):
        info = video.scan(path, refuse=video.refuses_mpeg_systems)
        self.vr = video.open_reader(path, size_fn, info.shape)
        # full-size frames (--resize torchvision) through PyAV: decord would queue the video's
        # frames ahead without bound, 6 MB each at 1080p (`video.AVForwardReader`)
        full = size_fn is None
        self.forward = video.full_size_reader(path, self.vr, info.times) if full else video.ForwardReader(self.vr)
        self.num_frames = len(self.vr)
        self.fps = float(self.vr.get_avg_fps())
        self.times = video.decord_times(self.vr, info.start, info.times)
        self.end = video.display_end(self.times)

    def timestamps(self) -> np.ndarray:
        return self.times

    def positions(self, req: Request, k: int, clip_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return time_positions(req, k, clip_len, self.times, self.end)

    def get(self, indices: np.ndarray) -> np.ndarray:
        out = None  # filled frame by frame: a list and its stack held the frames twice
        for j, i in enumerate(indices):
            frame = self.forward.read(int(i))
            if out is None:
                out = np.empty((len(indices), *frame.shape), dtype=frame.dtype)
            out[j] = frame
        return out if out is not None else np.stack([])

    def close(self) -> None:
        del self.forward, self.vr


@register
class Decord(Source):
    name = "decord"
    library = "decord"

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> DecordReader:
        return DecordReader(path, size_fn)
