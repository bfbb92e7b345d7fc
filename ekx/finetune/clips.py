"""Distributed set-up and the slow path's input: segments decoded into clips (stage 1's
sampling and reader) and the seed's clip-consistent augmentation."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ekx import epic
from ekx.extract import backbones
from ekx.extract.video import Request, decode_video
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
    stage 1's sampling (centres of T equal parts) and its reader, at the preprocessing size."""

    def __init__(self, segments: list[epic.Segment], paths: dict[str, Path], frames: int, bb: backbones.Backbone):
        self.segments, self.paths, self.frames, self.backbone = segments, paths, frames, bb.name
        # plain values only: the dataset travels to worker processes
        self.clip_len, self.size_fn = bb.clip_len, bb.preprocess.decode_size

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, i: int):
        s = self.segments[i]
        if s.video_id not in self.paths:
            return i, None, f"video {s.video_id} not found"
        res = next(
            decode_video(
                self.paths[s.video_id], [Request(i, s.start, s.stop)], self.frames, self.clip_len, self.size_fn
            )
        )
        return i, res.frames, res.error


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
