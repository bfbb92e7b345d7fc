"""The official RGB frames: ``<pid>/rgb_frames/<vid>/frame_0000000001.jpg`` (one JPEG per
frame, numbered from 1), as a folder or as the per-video ``<vid>.tar`` the download gives.

A tar is read in place: its member table is scanned once when the video is opened (one
header per frame, no data read) and each wanted JPEG is one seek and one read, so only the
frames a segment samples are touched. JPEGs are decoded as a batch by
``torchvision.io.decode_jpeg`` (on the GPU with ``--decode-device cuda``, nvJPEG) and
resized as the backbone's preprocessing asks (bilinear, antialiased, as the video
decoders' scalers do).

Sampling uses the CSV's ``start_frame``/``stop_frame`` (1-based, inclusive: the very JPEGs
they name), with the video sources' rule on the frame axis: JPEG N is frame N-1, shown
during [N-1, N) in frame units, so a segment covers [start-1, stop) and a centre at c takes
JPEG floor(c) + 1. Clips (R(2+1)D) are 1 / CLIP_RATE s apart like the video sources', in
frames at the rate the CSV's own numbers give (stop_frame / stop timestamp: 50 or 60).
Where the JPEGs are fewer than a segment needs, up to `SLACK` frames past the last one are
clamped to it (EPIC's frame dumps can end a frame or two before the annotation's count);
more than that fails the segment with both counts.

A video's JPEGs must share one size, that of its first JPEG whose header reads (the same
whichever segments a run asks for): a frame of another size fails the segments sampling
it, naming it, rather than being resized with the rest. A missing, empty or corrupt JPEG
likewise fails only the segments that sample it, each with its own file in the message
(`FramesReader.get_each`).
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np

from ekx.extract.sources import Request, SegmentError, SizeFn, Source, register
from ekx.extract.video import CLIP_RATE, clip_times, sample_centres

SLACK = 2
NAME = "frame_{:010d}.jpg"
_NUMBER = re.compile(r"(?:^|/)frame_(\d+)\.jpe?g$")
_TORCHVISION_PLACE = re.compile(r"^.*\.cpp:\d+, ")  # "decode_jpeg, /path/decode_jpeg.cpp:171, " before the reason
AGAIN = "extract or download this video's frames again"


class FrameError(Exception):
    """One JPEG cannot be served (missing, empty, corrupt, another size): the file and why."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(h, w) from a JPEG's frame header (its SOFn segment), or None where there is none."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..15 (not DHT, JPG, DAC)
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        else:  # any other segment: skip it by its length
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


class FramesReader:
    def __init__(self, path: Path, size_fn: SizeFn, device: str):
        self.path, self.size_fn, self.device = Path(path), size_fn, device
        self.fps = float("nan")  # JPEGs have no clock: the CSV's frame numbers are the truth
        self.fh = None
        self.members: dict[int, tuple[int, int]] = {}  # frame number -> (offset, size) in the tar
        self.size: tuple[int, int] | None = None  # (h, w) of every frame, from `_video_size`
        self.size_from = 0  # the JPEG it was read from
        self.scanned = False
        if self.path.is_dir():
            numbers = [int(m[1]) for e in os.scandir(self.path) if (m := _NUMBER.search(e.name))]
        elif self.path.is_file():
            try:
                with tarfile.open(self.path, "r:") as tar:  # uncompressed, as downloaded: seekable
                    for member in tar:
                        if member.isfile() and (hit := _NUMBER.search(member.name)):
                            self.members[int(hit[1])] = (member.offset_data, member.size)
            except tarfile.TarError as e:
                raise ValueError(f"not a readable tar of frames ({e}); re-download it") from None
            numbers = list(self.members)
            self.fh = self.path.open("rb")
        else:
            raise FileNotFoundError(f"no frame folder or tar at {self.path}")
        if not numbers:
            raise ValueError(f"no {NAME.format(1)}-style JPEGs in {self.path}")
        self.numbers = sorted(numbers)
        self.num_frames = max(numbers)

    def timestamps(self) -> np.ndarray:
        return np.full(self.num_frames, np.nan)

    def positions(self, req: Request, k: int, clip_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
        first, last = req.start_frame, req.stop_frame
        if first < 1 or last < first:
            raise SegmentError(
                f"no valid start_frame/stop_frame ({first}, {last}) in the annotation CSV: the frames "
                "source samples by them (use a video source for this file)"
            )
        centres = sample_centres(first - 1, last, 1.0, k)  # 0-based: JPEG N is frame N-1
        n = self.num_frames
        if last > n + SLACK:
            raise SegmentError(
                f"segment frames {first}-{last} go beyond the {n} JPEGs of {self.path.name} (more than "
                f"{SLACK} past the last): the frames and the annotations disagree; check the download"
            )
        centres = np.minimum(centres, n - 1)
        if clip_len == 1:
            return centres, centres
        rate = last / req.stop if req.stop > 0 else 60.0  # frames per second of the numbering
        frames = clip_times(centres + 0.5, clip_len, CLIP_RATE / rate)  # in frames, centred mid-frame
        return centres, np.clip(np.floor(frames), 0, n - 1).astype(np.int64)

    def _where(self, number: int) -> str:
        """How a message names one JPEG: its path, or its name in the tar."""
        name = NAME.format(number)
        return str(self.path / name) if self.fh is None else f"{name} in {self.path}"

    def _bytes(self, number: int) -> bytes:
        """The JPEG's bytes; FrameError where it is missing or empty."""
        if self.fh is None:
            try:
                data = (self.path / NAME.format(number)).read_bytes()
            except FileNotFoundError:
                raise FrameError(f"{self._where(number)} is missing: {AGAIN}") from None
        elif number not in self.members:
            raise FrameError(f"{self._where(number)} is missing: {AGAIN}")
        else:
            offset, size = self.members[number]
            self.fh.seek(offset)
            data = self.fh.read(size)
        if not data:
            raise FrameError(f"{self._where(number)} is empty (0 bytes): {AGAIN}")
        return data

    def _video_size(self) -> tuple[int, int] | None:
        """(h, w) every frame must have: that of the video's first JPEG whose header reads
        (whichever segments are asked for, so a run of any subset agrees)."""
        if self.size is None and not self.scanned:
            self.scanned = True  # once: a video whose every header is unreadable is not rescanned per batch
            for number in self.numbers:
                try:
                    size = jpeg_size(self._bytes(number))
                except FrameError:
                    continue
                if size is not None:
                    self.size, self.size_from = size, number
                    break
        return self.size

    def _decode(self, numbers: list[int], data: list[bytes]) -> list:
        """Each JPEG decoded ([3, H, W] uint8), or the FrameError saying why not: decoded as one
        batch (nvJPEG's fast path), one by one only where the batch fails, to find the culprit."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of torchcodec's; torchcodec
            # is an optional extra here, so torchvision's (core) decoder stays the one used
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                # RGB: a greyscale JPEG among colour ones comes out with 3 channels like the rest
                return list(decode_jpeg(tensors, device=self.device, mode=ImageReadMode.RGB))
            except RuntimeError:
                pass
            out: list = []
            for number, t in zip(numbers, tensors, strict=True):
                try:
                    out.append(decode_jpeg(t, device=self.device, mode=ImageReadMode.RGB))
                except RuntimeError as e:
                    why = _TORCHVISION_PLACE.sub("", str(e).strip().splitlines()[0])[:120]
                    out.append(FrameError(f"{self._where(number)} is a corrupt JPEG ({why}): {AGAIN}"))
            return out

    def get(self, indices: np.ndarray):
        """The frames at ``indices`` as one array; FrameError naming the first JPEG that cannot be served."""
        frames = self.get_each(indices)
        if isinstance(frames, list):
            raise next(f for f in frames if isinstance(f, FrameError))
        return frames

    def get_each(self, indices: np.ndarray):
        """The frames at ``indices``: one array, or, where some JPEG cannot be served, a list
        holding its FrameError in its place (`decode_segments` fails only the segments needing it)."""
        import torch
        from torchvision.transforms.v2 import functional as F

        numbers = [int(i) + 1 for i in indices]
        out: list = [None] * len(numbers)  # a frame, or the FrameError why not
        data = {}
        for j, number in enumerate(numbers):
            try:
                data[j] = self._bytes(number)
            except FrameError as e:
                out[j] = e
        ref = self._video_size()
        for j, img in zip(data, self._decode([numbers[j] for j in data], list(data.values())), strict=True):
            if not isinstance(img, FrameError):
                shape = (int(img.shape[-2]), int(img.shape[-1]))
                if ref is None:  # no JPEG header read: the first frame decoded sets the size
                    ref = self.size = shape
                    self.size_from = numbers[j]
                elif shape != ref:
                    img = FrameError(
                        f"{self._where(numbers[j])} is {shape[1]}x{shape[0]}, the video's frames are "
                        f"{ref[1]}x{ref[0]} ({NAME.format(self.size_from)}): a video's frames must share "
                        "one size - extract this video's frames again"
                    )
            out[j] = img
        good = [j for j, f in enumerate(out) if not isinstance(f, FrameError)]
        if good:
            x = torch.stack([out[j] for j in good])  # [n, 3, H, W]: one size, checked above
            h, w = x.shape[-2:]
            size = self.size_fn(h, w) if self.size_fn is not None else (h, w)
            if tuple(size) != (h, w):
                x = F.resize(x, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            x = x.permute(0, 2, 3, 1).contiguous()
            frames = x if self.device != "cpu" else x.numpy()
            if len(good) == len(out):
                return frames
            for j, f in zip(good, frames, strict=True):
                out[j] = f
        return out

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


@register
class Frames(Source):
    name = "frames"
    library = "torchvision"
    reads = "frames"
    devices = ("cpu", "cuda")

    def missing(self) -> str | None:
        return None  # torchvision is a core dependency

    def resolve_device(self, want: str, probe: Path | None = None) -> tuple[str, str | None]:
        if not want.startswith("cuda"):
            return "cpu", None
        import torch

        if not torch.cuda.is_available():
            return "cpu", "--decode-device cuda: no CUDA device visible to torch; JPEGs are decoded on the CPU instead"
        return want, None

    def index(self, root: Path) -> dict[str, Path]:
        """Both layouts, folder or tar: ``<root>/<pid>/rgb_frames/<vid>[.tar]`` and ``<root>/<vid>[.tar]``."""
        root = Path(root)
        found: dict[str, Path] = {}
        if not root.is_dir():
            return found
        dirs = [root] + [d / "rgb_frames" for d in sorted(root.iterdir()) if (d / "rgb_frames").is_dir()]
        for d in dirs:
            for e in sorted(d.iterdir()):
                if e.is_file() and e.suffix == ".tar":
                    found.setdefault(e.stem, e)
                elif e.is_dir() and (d != root or (e / NAME.format(1)).is_file()):
                    found.setdefault(e.name, e)
        return found

    def missing_message(self, missing: list[str], total: int, root: Path) -> str:
        examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        return (
            f"{len(missing)} of {total} videos have no RGB frames under {root} (e.g. {examples}); expected "
            f"{root}/<participant_id>/rgb_frames/<video_id>.tar (or a folder of that name, or "
            f"{root}/<video_id>[.tar]) - set the frames path (ekx config, --frames-root) or download them"
        )

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> FramesReader:
        return FramesReader(path, size_fn, device)

    def resize_method(self, resize: str) -> str:
        if resize == "decoder":
            return "torchvision bilinear antialiased resize of the JPEGs to the decode size, then the weights' own"
        return "torchvision.transforms.functional.resize of the full-size JPEGs (the weights' own transforms)"


def write_frames(video: Path, out: Path, size: tuple[int, int] | None = None, quality: int = 90) -> int:
    """Every frame of ``video`` as official-style JPEGs: ``out`` a folder, or a tar where
    ``out`` ends in .tar (members ``./frame_0000000001.jpg``, as the download's); ``size``
    (h, w) resizes. For tests, benchmarks and converting a video one has. Returns the count."""
    import io

    import decord
    from torchvision.io import encode_jpeg

    vr = decord.VideoReader(str(video), num_threads=1, **({"height": size[0], "width": size[1]} if size else {}))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tar = tarfile.open(out, "w") if out.suffix == ".tar" else None
    if tar is None:
        out.mkdir(exist_ok=True)
    import torch

    try:
        for i in range(len(vr)):
            with warnings.catch_warnings():  # see FramesReader.get
                warnings.simplefilter("ignore", DeprecationWarning)
                jpg = encode_jpeg(torch.from_numpy(vr[i].asnumpy()).permute(2, 0, 1).contiguous(), quality=quality)
            data = jpg.numpy().tobytes()
            if tar is None:
                (out / NAME.format(i + 1)).write_bytes(data)
            else:
                info = tarfile.TarInfo("./" + NAME.format(i + 1))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
    return len(vr)
