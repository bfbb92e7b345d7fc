"""Distributed set-up and the slow path's input: segments decoded into clips (stage 1's
sampling and reader) and the seed's clip-consistent augmentation."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from ekx import epic
from ekx.extract import backbones, sources
from ekx.extract.inputs import check_resize
from ekx.extract.video import Request
from ekx.runtime import resolve_device

# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (nccl), or gloo on CPUs."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


# ---------------------------------------------------------------- data


class Clips(Dataset):
    """Segment i -> (i, uint8 frames [T * clip_len, H, W, 3] or None, error). Decoded with
    stage 1's sampling (centres of T equal parts) through a frame source, at the
    preprocessing size.

    Each process keeps its last ``keep`` readers open: opening a video is costly (decord
    scans the whole file), so samples that arrive grouped by video (`VideoChunks`) open it
    once per worker instead of once per sample. ``opens`` counts the opens of this process."""

    def __init__(
        self,
        segments: list[epic.Segment],
        paths: dict[str, Path],
        frames: int,
        bb: backbones.Backbone,
        source: str = "decord",
        keep: int = 2,
        resize: str = "decoder",
    ):
        self.segments, self.paths, self.frames, self.backbone = segments, paths, frames, bb.name
        # plain values only: the dataset travels to worker processes
        self.clip_len, self.source, self.keep = bb.clip_len, source, keep
        check_resize(resize)
        self.size_fn = bb.preprocess.decode_size if resize == "decoder" else None  # None: torchvision's, full size
        self._readers: OrderedDict[Path, sources.Reader] = OrderedDict()
        self.opens = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"] = OrderedDict()  # readers never travel: each worker opens its own
        return state

    def __len__(self) -> int:
        return len(self.segments)

    def _reader(self, path: Path) -> sources.Reader:
        reader = self._readers.pop(path, None)
        if reader is None:
            reader = sources.get(self.source).open(path, self.size_fn)
            self.opens += 1
        self._readers[path] = reader  # most recently used last
        while len(self._readers) > self.keep:
            self._readers.popitem(last=False)[1].close()
        return reader

    def __getitem__(self, i: int):
        s = self.segments[i]
        if s.video_id not in self.paths:
            return i, None, f"video {s.video_id} not found"
        path = self.paths[s.video_id]
        try:
            reader = self._reader(path)
            req = Request(i, s.start, s.stop, s.start_frame, s.stop_frame)
            _, idx = reader.positions(req, self.frames, self.clip_len)
            wanted = np.unique(idx)  # readers take sorted indices, each once
            frames = reader.get(wanted)[np.searchsorted(wanted, idx)]
        except sources.SegmentError as e:
            return i, None, str(e)
        except Exception as e:
            self._readers.pop(path, None)  # a reader in an unknown state is not reused
            return i, None, f"decode error in {path.name}: {sources.first_line(e)}"
        return i, frames, None


class VideoChunks(Sampler[int]):
    """One rank's epoch as chunks of ``chunk`` segments of one video (the last chunk of a
    video may spill into the next): videos in a seeded random order, segments shuffled
    within each video, chunks dealt to ranks in turn; what is left when fewer than a chunk
    per rank remain is cut into ``world`` equal contiguous pieces, one per rank (each rank's
    last, shorter batch). Every rank gets ceil(N / world) segments, the order padded by
    repeating its first segments - at most world - 1 of them, as DistributedSampler pads.
    With ``chunk`` = the batch size, a batch reads one or two videos, and a worker keeps a
    video's reader open across the batches it gets of it; the shuffle is a function of
    (seed, epoch), so a resumed run continues exactly. The price: a batch's segments share
    a video (and a kitchen) - `--no-group-by-video` draws uniformly instead (one open per
    sample)."""

    def __init__(self, video_ids: list[str], chunk: int, replicas: int = 1, rank: int = 0, seed: int = 0):
        self.video_ids, self.chunk, self.replicas, self.rank, self.seed = video_ids, max(chunk, 1), replicas, rank, seed
        self.epoch = 0
        # every rank the same number of segments (so the same number of steps), as DistributedSampler
        self.per_rank = -(-len(video_ids) // replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        by_video: dict[str, list[int]] = {}
        for i, v in enumerate(self.video_ids):
            by_video.setdefault(v, []).append(i)
        videos = sorted(by_video)
        order: list[int] = []
        for vi in torch.randperm(len(videos), generator=g).tolist():
            idx = by_video[videos[vi]]
            order += [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        total = self.per_rank * self.replicas
        order = (order * -(-total // max(len(order), 1)))[:total]  # pad by repeating, as DistributedSampler
        rounds, rest = divmod(self.per_rank, self.chunk)  # whole chunks per rank, then a shorter piece
        step = self.chunk * self.replicas
        first = [r * step + self.rank * self.chunk for r in range(rounds)]  # each round's chunk of this rank
        mine = [i for a in first for i in order[a : a + self.chunk]]  # (order[a:][:chunk] copied the tail: O(N^2))
        tail = rounds * step + self.rank * rest
        return iter(mine + order[tail : tail + rest])

    def __len__(self) -> int:
        return self.per_rank


def as_list(batch):
    return batch


def clip_augmentation(pre: backbones.Preprocess) -> v2.Compose:
    """The seed's phase-2 augmentation on one clip: geometry and colour drawn once per call."""
    return v2.Compose(
        [
            v2.Resize(list(pre.resize_size), interpolation=v2.InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(list(pre.crop_size)),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomRotation(15, interpolation=v2.InterpolationMode.BILINEAR),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            v2.RandomGrayscale(0.1),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
            v2.RandomErasing(0.15),
        ]
    )


def clip_inputs(frames: np.ndarray, t: int, bb: backbones.Backbone, device, augment: Callable | None) -> torch.Tensor:
    """uint8 [T * clip_len, H, W, 3] -> normalised [T, 3, h, w] (or [T, 3, clip_len, h, w]);
    ``augment`` (training) is called once for the whole clip, so its draws are shared."""
    x = torch.from_numpy(frames).to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = augment(x) if augment is not None else bb.preprocess(x)
    if bb.clip_len > 1:
        x = x.reshape(t, bb.clip_len, *x.shape[1:]).transpose(1, 2)
    return x
