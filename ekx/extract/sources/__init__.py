"""Frame sources: one contract for every way of getting frames, a registry of them.

A source turns a video id's file (a video, or the official RGB-frame JPEGs) and the
wanted frames into uint8 frames ``[n, H, W, 3]`` at the size the backbone's
preprocessing asks for. Stage 1, the calibration of random weights, fine-tuning and
`ekx predict` read through it, so changing decoder is a flag and never an edit:

- ``decord`` (default): `ekx.extract.video`'s reader;
- ``torchcodec``: PyTorch's decoder (optional extra ``ekx[torchcodec]``), CPU or CUDA;
- ``pyav``: PyAV, every frame in order and told by its pts, as `ekx prepare` reads a video:
  ``auto`` picks it where a wanted video is an MPEG-TS/PS file, which the other two misread;
- ``frames``: the official ``<pid>/rgb_frames/<vid>/frame_0000000001.jpg`` JPEGs, from a
  folder or straight from the per-video tar.

A source opens a `Reader` per video (frame count, nominal fps, per-frame timestamps,
``get(sorted indices)``), says where a segment's K positions and their clips are
(`Reader.positions`: the frames displayed at the sampled times for videos, see
`ekx.extract.video`; the CSV's frame numbers for JPEGs), and `decode_segments` turns
that into one `Result` per segment, reading each wanted frame once, with FFmpeg's own log
lines counted rather than printed (`ffmpeg_log`). A new source is one file with
`@register`; a duplicate name is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from ekx import EkxError, epic
from ekx.extract import config
from ekx.extract.video import CLIP_RATE, Request, Result, centre_times, clip_times, frame_at, is_mpeg_system

BUILTIN = ("decord", "torchcodec", "frames", "pyav")  # modules of ekx.extract.sources, imported on first use
DEFAULT = "decord"
RGB_FRAMES = "official RGB frames (JPEG)"  # the cache's video_input for the frames source
REGISTRY: dict[str, Source] = {}

SizeFn = Callable[[int, int], tuple[int, int]] | None


class SegmentError(Exception):
    """One segment cannot be served (beyond the video's end, no frame numbers): its reason."""


class Reader(Protocol):
    num_frames: int
    fps: float  # nominal; NaN where the source has no clock (JPEG frames)

    def timestamps(self) -> np.ndarray: ...  # [num_frames] seconds each frame is shown from

    # (K centre indices, K * clip_len indices of their clips), 0-based; SegmentError
    def positions(self, req: Request, k: int, clip_len: int = 1) -> tuple[np.ndarray, np.ndarray]: ...

    def get(self, indices: np.ndarray) -> np.ndarray: ...  # sorted indices -> uint8 [n, H, W, 3]

    def close(self) -> None: ...


class Source:
    """A registered frame source; subclasses set ``name``/``library`` and implement `open`."""

    name: ClassVar[str] = ""
    library: ClassVar[str] = ""  # the Python package doing the decoding (its version is recorded)
    reads: ClassVar[str] = "videos"  # which workspace root it reads: "videos" or "frames"
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def missing(self) -> str | None:
        """Why this source cannot run here (with the way out), or None."""
        try:
            importlib.import_module(self.library)
        except ImportError:
            return f"--source {self.name} needs the {self.library} package: pip install 'ekx[{self.name}]'"
        except Exception as e:  # torchcodec raises RuntimeError where the FFmpeg libraries are missing
            return (
                f"--source {self.name}: {self.library} cannot load ({first_line(e)}); it needs the system "
                "FFmpeg libraries (Debian: apt-get install ffmpeg)"
            )
        return None

    def version(self) -> str:
        mod = importlib.import_module(self.library)
        return str(getattr(mod, "__version__", "unknown"))

    def identity(self, decode_device: str, resize: str = "decoder") -> dict[str, str]:
        """Cache attributes naming where the frames came from and how they were resized
        (all but ``resize_method``, its description, part of the cache identity)."""
        return {
            "source": self.name,
            "decoder": f"{self.library} {self.version()}",
            "decode_device": decode_device,
            "resize": resize,
            "resize_method": self.resize_method(resize),
        }

    def resize_method(self, resize: str) -> str:
        """What actually resized the frames to the backbone's resize size (``--resize``)."""
        if resize == "decoder":
            return f"{self.library}'s scaler (FFmpeg swscale) at decode, then the weights' crop and normalisation"
        return "torchvision.transforms.functional.resize of the full-size frames (the weights' own transforms)"

    def resolve_device(self, want: str, probe: Path | None = None) -> tuple[str, str | None]:
        """(device to decode on, a one-line note when that is not what was asked)."""
        if want == "cpu" or want in self.devices:
            return want, None
        return "cpu", f"--source {self.name} decodes on the CPU only; decoding on the CPU (GPU: --source torchcodec)"

    def index(self, root: Path) -> dict[str, Path]:
        """video id -> the file (or folder/tar) this source reads for it."""
        return epic.index_videos(root)

    def missing_message(self, missing: list[str], total: int, root: Path) -> str:
        return epic.missing_videos_message(missing, total, root)

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> Reader:
        raise NotImplementedError

    def decode(
        self, path: Path, requests: list[Request], k: int, clip_len: int, size_fn: SizeFn = None, device: str = "cpu"
    ) -> Iterator[Result]:
        """One Result per request (frames uint8 [K * clip_len, H, W, 3], or the error), with
        the FFmpeg log lines of the decode so far (`ffmpeg_log.captured`)."""
        from ekx.extract.sources.ffmpeg_log import captured

        return captured(lambda: decode_segments(self, path, requests, k, clip_len, size_fn, device))


def register(cls: type[Source]) -> type[Source]:
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a source needs a name")
    if cls.name in REGISTRY:
        raise ValueError(f"frame source {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls()
    config.SOURCES.add(cls.name)  # the CLI's and ExtractConfig's check accepts it from now on
    return cls


def _load_builtins() -> None:
    for name in BUILTIN:
        if name not in REGISTRY:
            importlib.import_module(f"ekx.extract.sources.{name}")


def names() -> list[str]:
    _load_builtins()
    return sorted(REGISTRY)


def get(name: str) -> Source:
    _load_builtins()
    if name not in REGISTRY:
        raise EkxError(f"unknown frame source {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def choose(name: str, video_ids: set[str], videos: Path, frames: Path | None) -> Source:
    """``--source auto``: the videos where any of the wanted ones is there - read by decord,
    or by PyAV for the whole run where one of them is an MPEG-TS/PS file (decord and
    torchcodec return other frames there; one decoder per run keeps the cache's identity
    one) - else the JPEG frames where any is there, else decord (whose error then names
    the missing videos)."""
    if name != "auto":
        src = get(name)
    else:
        src = get(DEFAULT)
        here = src.index(videos)
        if not video_ids & set(here) and frames is not None and video_ids & set(get("frames").index(frames)):
            src = get("frames")
        elif any(is_mpeg_system(here[v]) for v in sorted(video_ids & set(here))):
            src = get("pyav")
    why = src.missing()
    if why:
        raise EkxError(why)
    return src


def locate(source: Source, segments: list[epic.Segment], root: Path) -> tuple[dict[str, Path], list[str]]:
    """What ``source`` reads for each video of the segments: (found, missing video ids)."""
    index = source.index(root)
    needed = sorted({s.video_id for s in segments})
    return {v: index[v] for v in needed if v in index}, [v for v in needed if v not in index]


# ---------------------------------------------------------------- the shared decode loop


def time_positions(req: Request, k: int, clip_len: int, times: np.ndarray, end: float) -> tuple[np.ndarray, np.ndarray]:
    """Video sources: the frames displayed at the segment's K centre times (and at their
    clips' times, `video.clip_times`), through the stream's frame times; ``end``: when the
    last frame stops showing (`video.display_end`, computed once per reader)."""
    t = centre_times(req.start, req.stop, k) if req.times is None else req.times
    if t[-1] > end + 0.5 * (end - float(times[-1])):  # half a frame of slack at the very end
        raise SegmentError(
            f"segment {req.start:.2f}-{req.stop:.2f} s is beyond the video's end ({end:.2f} s, {len(times)} frames)"
        )
    centres = frame_at(times, t)
    return centres, (centres if clip_len == 1 else frame_at(times, clip_times(t, clip_len, CLIP_RATE)))


def decode_video(
    path: Path, requests: list[Request], k: int, clip_len: int, size_fn: SizeFn = None
) -> Iterator[Result]:
    """The default source's decode of every requested segment of one video: one Result per request."""
    return get(DEFAULT).decode(Path(path), requests, k, clip_len, size_fn)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def decode_segments(
    source: Source,
    path: Path,
    requests: list[Request],
    k: int,
    clip_len: int,
    size_fn: SizeFn = None,
    device: str = "cpu",
) -> Iterator[Result]:
    """Every requested segment of one video through ``source``'s reader: the union of the
    wanted frames is read once, in increasing order, in batches up to each segment's last
    frame; a frame is kept only until every segment needing it has been yielded."""
    try:
        reader = source.open(path, size_fn, device)
    except Exception as e:
        for r in requests:
            what = "video" if source.reads == "videos" else "frames"
            yield Result(r.row, None, None, f"cannot open {what} {path.name}: {first_line(e)}")
        return
    try:
        plans = []
        for r in requests:
            try:
                centres, idx = reader.positions(r, k, clip_len)
            except SegmentError as e:
                yield Result(r.row, None, None, str(e))
                continue
            plans.append((r, centres, idx))
        plans.sort(key=lambda p: int(p[2].max()))
        users: dict[int, int] = {}
        for _, _, idx in plans:
            for i in np.unique(idx):
                users[int(i)] = users.get(int(i), 0) + 1
        todo = np.array(sorted(users), dtype=np.int64)
        kept: dict[int, object] = {}
        # a reader with `get_each` puts an exception in place of each frame it cannot serve (a bad
        # JPEG): only the segments needing that frame fail, each with its own message
        read = getattr(reader, "get_each", reader.get)
        t = 0
        for j, (r, centres, idx) in enumerate(plans):
            stop = int(np.searchsorted(todo, int(idx.max()), side="right"))
            if stop > t:
                try:
                    batch = read(todo[t:stop])
                except Exception as e:
                    reason = f"decode error in frames {todo[t]}-{todo[stop - 1]} of {path.name}: {first_line(e)}"
                    for p in plans[j:]:
                        yield Result(p[0].row, None, None, reason)
                    return
                for i, f in zip(todo[t:stop].tolist(), batch, strict=True):
                    kept[i] = f
                t = stop
            got = [kept[int(i)] for i in idx]
            for i in np.unique(idx):
                users[int(i)] -= 1
                if users[int(i)] == 0:
                    del kept[int(i)]
            bad = next((f for f in got if isinstance(f, Exception)), None)
            yield Result(r.row, None, None, str(bad)) if bad is not None else Result(r.row, _stack(got), centres)
    finally:
        reader.close()


def to_tensor(frames: list):
    """Frames of a reader (numpy or torch) as one uint8 tensor [n, H, W, 3]."""
    import torch

    stacked = _stack(frames)
    return stacked if isinstance(stacked, torch.Tensor) else torch.from_numpy(stacked)


def _stack(frames: list):
    if frames and not isinstance(frames[0], np.ndarray):  # torch tensors (a GPU decode stays on the GPU)
        import torch

        return torch.stack(frames)
    return np.stack(frames)
