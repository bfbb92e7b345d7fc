"""The default source: decord, through today's reader and sampling (`ekx.extract.video`).

`decode` is `video.decode_video` itself, so stage 1 with this source reads exactly as it
always has (and follows that module's changes); `open` gives the same reader behind the
common `Reader` contract for the contract tests and the other sources' comparisons.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ekx.extract import video
from ekx.extract.sources import Request, Result, SizeFn, Source, register, time_positions


class DecordReader:
    def __init__(self, path: Path, size_fn: SizeFn):
        self.vr = video.open_reader(path, size_fn)
        self.forward = video.ForwardReader(self.vr)
        self.num_frames = len(self.vr)
        self.fps = float(self.vr.get_avg_fps())

    def timestamps(self) -> np.ndarray:
        return np.asarray(self.vr.get_frame_timestamp(np.arange(self.num_frames))[:, 0], dtype=np.float64)

    def positions(self, req: Request, k: int) -> np.ndarray:
        return time_positions(req, k, self.fps, self.num_frames)

    def get(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.forward.read(int(i)) for i in indices])

    def close(self) -> None:
        del self.forward, self.vr


@register
class Decord(Source):
    name = "decord"
    library = "decord"

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> DecordReader:
        return DecordReader(path, size_fn)

    def decode(
        self, path: Path, requests: list[Request], k: int, clip_len: int, size_fn: SizeFn = None, device: str = "cpu"
    ) -> Iterator[Result]:
        return video.decode_video(path, requests, k, clip_len, size_fn)
