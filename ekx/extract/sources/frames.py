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


class FramesReader:
    def __init__(self, path: Path, size_fn: SizeFn, device: str):
        self.path, self.size_fn, self.device = Path(path), size_fn, device
        self.fps = float("nan")  # JPEGs have no clock: the CSV's frame numbers are the truth
        self.fh = None
        self.members: dict[int, tuple[int, int]] = {}  # frame number -> (offset, size) in the tar
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

    def _bytes(self, number: int) -> bytes:
        if self.fh is None:
            p = self.path / NAME.format(number)
            try:
                return p.read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"{p} is missing") from None
        if number not in self.members:
            raise FileNotFoundError(f"{NAME.format(number)} is missing from {self.path}")
        offset, size = self.members[number]
        self.fh.seek(offset)
        return self.fh.read(size)

    def get(self, indices: np.ndarray):
        import torch
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F

        data = [torch.frombuffer(bytearray(self._bytes(int(i) + 1)), dtype=torch.uint8) for i in indices]
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its image codecs in favour of torchcodec's; torchcodec
                # is an optional extra here, so torchvision's (core) decoder stays the one used
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg(data, device=self.device)
        except RuntimeError as e:
            raise ValueError(f"corrupt JPEG among frames {int(indices[0]) + 1}-{int(indices[-1]) + 1}: {e}") from None
        x = torch.stack(images)  # [n, 3, H, W]; a video's frames share one size
        h, w = x.shape[-2:]
        size = self.size_fn(h, w) if self.size_fn is not None else (h, w)
        if tuple(size) != (h, w):
            x = F.resize(x, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        x = x.permute(0, 2, 3, 1).contiguous()
        return x if self.device != "cpu" else x.numpy()

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
