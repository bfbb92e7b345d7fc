"""torchcodec: PyTorch's own decoder (monthly releases), optional extra ``ekx[torchcodec]``.

Exact seek mode (the file is scanned once at open, so frame indices are exact even where
the header's frame count is wrong - decord's `get_batch` can loop forever there);
``get_frames_at`` decodes a sorted batch, seeking only when that is cheaper. The resize to
the preprocessing size runs inside the decoder (bilinear, antialiased), as decord's does.
On ``cuda`` the frames are decoded by NVDEC and stay on the GPU (a torch tensor), so the
backbone gets them without a host copy; the one-line note of `resolve_device` says when
CUDA or NVDEC is missing and decoding falls back to the CPU. MPEG-TS/PS files are refused
as decord's are (`video.refuses_mpeg_systems`): torchcodec returns other frames there too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ekx.extract import video
from ekx.extract.sources import Request, SizeFn, Source, first_line, register, time_positions


class TorchcodecReader:
    def __init__(self, path: Path, size_fn: SizeFn, device: str):
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        if not Path(path).is_file():  # torchcodec's own message is a C++ stack
            raise FileNotFoundError(f"no such file: {path}")

        def decoder(size: tuple[int, int] | None = None):  # exact mode scans the whole file
            return VideoDecoder(
                str(path),
                dimension_order="NHWC",
                seek_mode="exact",
                num_ffmpeg_threads=1,
                device=device,
                transforms=[Resize(list(size))] if size is not None else [],
            )

        # the header's size (one exact-mode scan, already at the decode size) and the frames'
        # pts (float64), in one PyAV pass: torchcodec keeps the pts from its scan but does not
        # expose them
        info = video.scan(path, refuse=video.refuses_mpeg_systems)  # wrong frames there too
        shape, dec = info.shape, None
        if shape is None:  # not readable by PyAV: torchcodec's own metadata (then a rescan to resize)
            dec = decoder()
            shape = (int(dec.metadata.height or 0), int(dec.metadata.width or 0))
        size = size_fn(*shape) if size_fn is not None else shape
        if dec is None or size != shape:
            dec = decoder(size if size != shape else None)
        self.dec, self.device = dec, device
        self.num_frames = len(dec)
        self.fps = float(dec.metadata.average_fps or 0.0)
        self.times = video.times_or_nominal(info.times, self.num_frames, self.fps, info.start)
        self.end = video.display_end(self.times)

    def timestamps(self) -> np.ndarray:
        return self.times

    def positions(self, req: Request, k: int, clip_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return time_positions(req, k, clip_len, self.times, self.end)

    def get(self, indices: np.ndarray):
        data = self.dec.get_frames_at([int(i) for i in indices]).data
        return data if self.device != "cpu" else data.numpy()

    def close(self) -> None:
        del self.dec


@register
class Torchcodec(Source):
    name = "torchcodec"
    library = "torchcodec"
    devices = ("cpu", "cuda")

    def missing(self) -> str | None:
        why = super().missing()
        if why is None:
            import torchcodec

            # `import torchcodec` succeeds without the FFmpeg libraries (its image decoders need
            # none); then every video decoder raises, so every segment would fail: say it once
            if getattr(torchcodec, "ffmpeg_major_version", 0) is None:
                return (
                    f"--source {self.name}: {self.library} cannot load the system FFmpeg libraries; "
                    "install them (Debian: apt-get install ffmpeg)"
                )
        return why

    def resolve_device(self, want: str, probe: Path | None = None) -> tuple[str, str | None]:
        if not want.startswith("cuda"):
            return "cpu", None
        import torch

        if not torch.cuda.is_available():
            return "cpu", "--decode-device cuda: no CUDA device visible to torch; torchcodec decodes on the CPU instead"
        if probe is not None:  # NVDEC (libnvcuvid) may be missing even where CUDA works
            why = None
            try:
                r = TorchcodecReader(probe, None, want)
                r.get(np.array([0]))
                if r.dec.cpu_fallback._is_fallback:
                    why = f"torchcodec reports {r.dec.cpu_fallback}"
            except Exception as e:
                why = f"torchcodec cannot decode on {want}: {first_line(e)}"
            if why:
                return "cpu", f"--decode-device cuda: {why}; decoding on the CPU instead"
        return want, None

    def open(self, path: Path, size_fn: SizeFn = None, device: str = "cpu") -> TorchcodecReader:
        return TorchcodecReader(path, size_fn, device)
