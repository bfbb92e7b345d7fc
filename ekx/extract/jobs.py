"""Stage 1's decoding workers: the DataLoader dataset that decodes whole videos (each opened
once, under the decode watchdog) and the worker set-up (moved out of `pipeline`, which
re-exports them)."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ekx.extract import sources
from ekx.extract.sources.watchdog import guarded
from ekx.extract.video import Request, Result


class VideoJobs(IterableDataset):
    """Yields decoded segments; each worker takes whole videos (each opened once, each
    under the decode watchdog unless ``timeout`` <= 0)."""

    def __init__(
        self,
        jobs: list[tuple[Path, list[Request]]],
        k: int,
        clip_len: int,
        size_fn,
        source: str = sources.DEFAULT,
        device: str = "cpu",
        timeout: float = 0.0,
        post: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.jobs, self.k, self.clip_len, self.size_fn = jobs, k, clip_len, size_fn
        self.source, self.device, self.timeout, self.post = source, device, timeout, post

    def __iter__(self) -> Iterator[Result]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        src = sources.get(self.source)
        for path, reqs in self.jobs[wid::nw]:
            decode = functools.partial(src.decode, path, reqs, self.k, self.clip_len, self.size_fn, self.device)
            if self.post is not None:  # runs where the frames are decoded (the watchdog's child)
                decode = functools.partial(_post, decode, self.post)
            yield from guarded(decode, path, reqs, self.timeout)


def _post(decode: Callable[[], Iterator[Result]], post: Callable[[np.ndarray], np.ndarray]) -> Iterator[Result]:
    for res in decode():
        yield res if res.frames is None else dataclasses.replace(res, frames=post(res.frames))


def worker_init(_):
    # Ctrl-C goes to the whole process group: the main process handles it, workers just stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # Decoding yields to the backbone: when workers and the backbone's threads compete
    # for the same cores, a descheduled compute thread stalls the others at every
    # parallel barrier; at lower priority the decoder fills the idle gaps instead.
    os.nice(10)
    try:  # Linux: die with the main process, even when it is SIGKILLed
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def identity_collate(batch):
    return batch


# why a segment's features are refused (every extraction loop: frames and sound)
NOT_FINITE = (
    "features not finite (NaN, or Inf: beyond float16's +-65504): broken weights, or an overflow "
    "in reduced precision; check --weights, or extract with --precision fp32"
)


def plan_jobs(targets, plan, found: dict[str, Path], times: np.ndarray | None) -> list[tuple[Path, list[Request]]]:
    """Every row some target still lacks, as one decode job per video (frames and sound alike):
    a row whose video is absent fails in each target lacking it. Biggest videos first, so the
    last worker does not finish long after the others."""
    todo = np.flatnonzero(np.any([t.todo for t in targets], axis=0))
    by_video: dict[str, list[Request]] = {}
    for row in todo:
        s = plan[row]
        if s.video_id not in found:
            for t in targets:
                if t.todo[row]:
                    t.thread.put(("failed", int(row), f"video {s.video_id} not found"))
            continue
        req = Request(int(row), s.start, s.stop, s.start_frame, s.stop_frame)
        if times is not None:  # a dense run: its own times, the padding past the end on the last one
            t = times[row]
            req.times = np.where(np.isfinite(t), t, np.nanmax(t))
        by_video.setdefault(s.video_id, []).append(req)
    return sorted(((found[v], r) for v, r in by_video.items()), key=lambda j: -len(j[1]))
