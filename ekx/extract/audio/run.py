"""The audio extraction loop (stage 1 for `Backbone.audio` models), beside the frames' one
(`pipeline._run`): the same plan, caches, writer threads, resume and failures; windows of
sound instead of frames, decoded in worker processes (each video once, under the decode
watchdog), the model's front end and network in this process.

Each segment's windows run in forward passes of their own (at most --batch-size each), as
frames do: a row's features never depend on which segments shared a batch, so a resumed or
sharded run writes the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ekx import EkxError, epic
from ekx.cache import identity
from ekx.extract import backbones
from ekx.extract.audio.decode import check_tracks, decode_windows
from ekx.extract.jobs import NOT_FINITE, identity_collate, plan_jobs, worker_init
from ekx.extract.sources.watchdog import guarded
from ekx.extract.video import Request, Result

if TYPE_CHECKING:
    from ekx.extract.config import ExtractConfig
    from ekx.extract.targets import Target

SAMPLING = (
    "sound: one window of audio_window_samples samples centred on each time (times: centres of K equal "
    "parts of [start, stop), or a dense store's); mono, resampled to audio_rate; outside the track: silence"
)


def is_audio(names: list[str]) -> bool:
    """Whether a run's backbones read sound; a run of sound and frames together is refused."""
    kinds = {backbones.get(n).audio is not None for n in names}
    if len(kinds) > 1:
        raise EkxError(
            f"--backbone {','.join(names)}: sound and frame backbones extract in separate commands (their "
            "caches fuse in stage 2 with +, e.g. resnet50+audio:auditory_slowfast)"
        )
    return kinds == {True}


def check(cfg: ExtractConfig, bbs: list[backbones.Backbone], src, found: dict[str, Path], videos: list[str]) -> None:
    """Refuse what an audio run cannot do, before anything is written."""
    if src.reads != "videos":
        raise EkxError(f"audio backbones read the videos' sound; --source {src.name} reads RGB frames")
    if cfg.views != 1:
        raise EkxError(f"--views {cfg.views}: audio features have one view (no augmented sound); use --views 1")
    specs = {(b.audio.rate, b.audio.samples) for b in bbs if b.audio is not None}
    if len(specs) > 1:
        raise EkxError(
            "these audio backbones read sound at different rates or windows: extract them in separate commands"
        )
    check_tracks(found, videos)


def source_attrs(bb: backbones.Backbone, videos_read: list[str], video_input: str) -> dict:
    """The identity attributes of an audio cache's input (what `identity.input_attrs` is for
    frames): the backbone and its front end, the decoder, the rate and window, the videos."""
    import av

    assert bb.audio is not None
    return {
        "backbone": bb.name,
        "clip_len": 1,
        "sampling": SAMPLING,
        "source": "pyav sound",
        "decoder": f"av {av.__version__}",
        "decode_device": "cpu",
        "resize": "none (sound)",
        "decode_size": "none (sound)",
        "video_input": video_input,
        "audio_rate": bb.audio.rate,
        "audio_window_samples": bb.audio.samples,
        "audio_channels": "mono (FFmpeg's downmix), float32, libswresample",
        **bb.audio.attrs,
        **bb.attrs,
        identity.VIDEOS: videos_read,
    }


class AudioJobs(IterableDataset):
    """Yields each requested segment's windows; each worker takes whole videos."""

    def __init__(self, jobs: list[tuple[Path, list[Request]]], k: int, rate: int, samples: int, timeout: float):
        self.jobs, self.k, self.rate, self.samples, self.timeout = jobs, k, rate, samples, timeout

    def __iter__(self) -> Iterator[Result]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for path, reqs in self.jobs[wid::nw]:
            decode = functools.partial(decode_windows, path, reqs, self.k, self.rate, self.samples)
            yield from guarded(decode, path, reqs, self.timeout)


def features(model, bb: backbones.Backbone, windows: np.ndarray, bs: int, device, precision: str) -> torch.Tensor:
    """[K, D] float32 features of one segment's windows (front end in float32, the network
    under the run's autocast), in passes of at most ``bs`` windows."""
    from ekx.runtime import autocast

    assert bb.audio is not None
    wave = torch.from_numpy(np.ascontiguousarray(windows))
    outs = []
    with torch.inference_mode():
        for i in range(0, len(wave), bs):
            x = bb.audio.frontend(wave[i : i + bs], device)
            with autocast(device, precision):
                outs.append(model(x).float())
    return torch.cat(outs)


def calibrate(model, bb: backbones.Backbone, cfg: ExtractConfig, plan_all: list[epic.Segment], found, device) -> str:
    """BatchNorm statistics of random weights from the windows of the first decodable
    segments of ``plan_all`` (`inputs.calibrate`'s rule, on sound)."""
    if not backbones.has_batchnorm(model):
        return "none needed: no BatchNorm"
    assert bb.audio is not None
    calib = [s for s in plan_all if s.video_id in found][: cfg.calibration_segments]
    inputs, used = [], []
    for s in calib:
        req = Request(0, s.start, s.stop, s.start_frame, s.stop_frame)
        for res in decode_windows(found[s.video_id], [req], cfg.frames, bb.audio.rate, bb.audio.samples):
            if res.error is None and res.frames is not None:
                inputs.append(bb.audio.frontend(torch.from_numpy(res.frames), device))
                used.append(s.narration_id)
    if not inputs:
        raise EkxError("--weights none: none of the calibration segments' sound could be decoded")
    x = torch.cat(inputs)
    x = x[torch.linspace(0, len(x) - 1, min(len(x), 64)).long()]
    torch.manual_seed(cfg.seed)
    backbones.calibrate_batchnorm(model, [x[i : i + 32] for i in range(0, len(x), 32)])
    return "first segments (sound): " + ",".join(used)


def run(
    cfg: ExtractConfig,
    targets: list[Target],
    device: torch.device,
    precision: str,
    plan: list[epic.Segment],
    found: dict[str, Path],
    on_progress: Callable[[int, int], None] | None,
    times: np.ndarray | None,
    decoder_log,
) -> None:
    """`pipeline._run` for audio targets: every row some target lacks is decoded once."""
    jobs = plan_jobs(targets, plan, found, times)
    if not jobs:
        return
    spec = targets[0].bb.audio
    assert spec is not None
    workers = max(0, min(cfg.workers, len(jobs)))
    loader = DataLoader(
        AudioJobs(jobs, cfg.frames, spec.rate, spec.samples, cfg.decode_timeout),
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    for res in loader:
        decoder_log.add(plan[res.row].video_id, res)
        mine = [t for t in targets if t.todo[res.row]]
        if res.error is not None or res.frames is None:
            for t in mine:
                t.thread.put(("failed", res.row, res.error or "no sound decoded"))
        else:
            for t in mine:
                f = features(t.model, t.bb, res.frames, t.cfg.batch_size or 16, device, precision)
                with np.errstate(over="ignore"):  # beyond float16's range: Inf, refused below
                    f16 = f.cpu().numpy().astype(np.float16)
                if np.isfinite(f16).all():
                    t.thread.put(("done", res.row, f16.reshape(1, cfg.frames, t.bb.dim), res.centres))
                else:
                    t.thread.put(("failed", res.row, NOT_FINITE))
                t.summary.processed += 1
                t.summary.frames += len(res.frames)
        if on_progress:
            on_progress(1, 0 if res.frames is None else len(res.frames))
