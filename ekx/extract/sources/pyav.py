"""PyAV: FFmpeg through its Python binding, read as `ekx prepare` reads a video - every frame
decoded in order, each told by its presentation time (pts), never by its position.

`--source auto` reads MPEG-TS/PS files with it, where decord and torchcodec return other
frames than asked, silently (`video.refuses_mpeg_systems`). It never seeks: on those
containers a seek lands where the timestamps say rather than on a keyframe, and the frames
after it decode concealed. So every frame up to the last one wanted is decoded (the colour
conversion and resize run only on the wanted ones): slower than decord on long videos
sampled sparsely, for which `ekx prepare`'s MP4 copy is the fast way. A frame the decoder
drops (a file cut mid-GOP starts with frames whose references are gone) fails only the
segments that need it, naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ekx.extract import video
from ekx.extract.sources import Request, SegmentError, SizeFn, Source, register, time_positions


class PyAVReader:
    def __init__(self, path: Path, size_fn: SizeFn):
        info = video.scan(path)  # pts (float64, file timeline), header size; no decoding
        self.path = Path(path)
        self._start()
        self.fps = float(self.stream.average_rate or self.stream.guessed_rate or 0.0)
        self.tb = float(self.stream.time_base or 0.0)
        self.origin = video.timeline_origin(self.container)
        # where a packet carries no pts (H.264 in MPEG-PS: one per PES), the frame's time is
        # the one before plus a frame period, as `ekx prepare` times it: known only by decoding
        rate = self.stream.average_rate or self.stream.guessed_rate or 30
        self.tick = max(1, round(1 / (float(rate) * self.tb))) if self.tb else 1
        if len(info.times) and len(info.times) == info.packets:
            self.times = info.times
        else:
            self.times = np.array([t for _, t in self._timed()], dtype=np.float64)
            self.close()
            self._start()
        if not len(self.times):
            raise ValueError("no frame decodes with a presentation time: cannot tell its frames apart")
        self.index = {float(t): i for i, t in enumerate(self.times)}
        self.num_frames = len(self.times)
        self.end = video.display_end(self.times)
        shape = info.shape or (self.stream.codec_context.height, self.stream.codec_context.width)
        self.size = size_fn(*shape) if size_fn is not None else None  # (height, width)

    def _start(self) -> None:
        """The decoder at the file's first frame."""
        import av

        self.container = av.open(str(self.path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_count = 1  # one video per worker process, as decord's num_threads=1
        self.frames = self._timed()
        self.at = -1  # index of the last frame taken from the decoder

    def _timed(self):
        """(frame, time s on the file's timeline) in the decoder's order: its pts, else the
        previous one's plus a frame period (`ekx prepare`'s rule), kept strictly increasing;
        times in the same float64 arithmetic as `video.scan`'s, so looking them up is exact."""
        prev = None
        for frame in self.container.decode(self.stream):
            pts = frame.pts if frame.pts is not None else (0 if prev is None else prev + self.tick)
            if prev is not None and pts <= prev:
                pts = prev + 1
            prev = pts
            yield frame, float(np.float64(pts) * self.tb - self.origin)

    def timestamps(self) -> np.ndarray:
        return self.times

    def positions(self, req: Request, k: int, clip_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return time_positions(req, k, clip_len, self.times, self.end)

    def get_each(self, indices: np.ndarray) -> list:
        """Frames for sorted ``indices``, an exception in place of each one never decoded."""
        if len(indices) and int(indices[0]) <= self.at:  # backwards: decode again from the start
            self.close()
            self._start()
        out: list = []
        pending = [int(i) for i in indices]
        while pending:
            frame, t = next(self.frames, (None, None))
            i = self.num_frames if t is None else self.index.get(t, -1)
            if i < 0:  # a time the container never listed
                continue
            while pending and pending[0] < i:  # passed without being decoded
                j = pending.pop(0)
                out.append(SegmentError(f"frame {j} ({self.times[j]:.3f} s) of {self.path.name} did not decode"))
            if pending and pending[0] == i and frame is not None:
                pending.pop(0)
                kw = {"height": self.size[0], "width": self.size[1]} if self.size else {}
                out.append(frame.to_ndarray(format="rgb24", threads=video.SWS_THREADS, **kw))
            self.at = max(self.at, i)
        return out

    def get(self, indices: np.ndarray) -> np.ndarray:
        frames = self.get_each(indices)
        bad = next((f for f in frames if isinstance(f, Exception)), None)
        if bad is not None:
            raise bad
        return np.stack(frames)

    def close(self) -> None:
        self.container.close()


@register
class PyAV(Source):
    name = "pyav"
    library = "av"

    def resize_method(self, resize: str) -> str:
        if resize == "decoder":
            return "PyAV's scaler (FFmpeg swscale, bilinear) at decode, then the weights' crop and normalisation"
        return super().resize_method(resize)

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> PyAVReader:
        return PyAVReader(path, size_fn)
