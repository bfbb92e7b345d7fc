"""Cached features in memory, and batches built by tensor indexing.

A split is read once with one bulk read (`Cache.features`) into a float16 tensor - on
the GPU when it fits - and every batch is `feats[rows, view]` plus a gather over time:
no Dataset, no DataLoader, no per-item HDF5 reads. Pending/failed rows are skipped by
index, never by copying the array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ekx import EkxError
from ekx.cache.reader import open_cache

# attributes a head's checkpoint must share with any cache it is evaluated on
IDENTITY = ("backbone", "weights", "frames_per_segment", "feature_dim", "num_verbs", "num_nouns")


@dataclass
class Split:
    path: Path
    feats: torch.Tensor  # [N, V, K, D] float16
    rows: torch.Tensor  # [M] rows that are done
    verbs: torch.Tensor  # [N] long (-1 unlabelled)
    nouns: torch.Tensor
    narration_id: list[str]
    video_id: list[str]
    attrs: dict

    @property
    def labelled(self) -> bool:
        return bool((self.verbs[self.rows] >= 0).all())

    def identity(self) -> dict:
        return {k: self.attrs.get(k) for k in IDENTITY}


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.7 * free


def load_split(path: Path, device: torch.device, mmap: bool = False) -> Split:
    cache = open_cache(path)
    missing = [k for k in IDENTITY if k not in cache.attrs]
    if missing:
        raise EkxError(f"{path}: cache lacks attribute(s) {', '.join(missing)}; re-extract it with this ekx")
    rows = np.flatnonzero(cache.done)
    if len(rows) == 0:
        raise EkxError(f"{path}: no extracted segments (status done); finish `ekx extract` first")
    array = cache.features(mmap=mmap)
    feats = torch.from_numpy(np.asarray(array)) if not mmap else torch.from_numpy(array)
    if _fits_on(device, feats.numel() * 2):
        feats = feats.to(device)
    return Split(Path(path), feats, torch.from_numpy(rows), torch.from_numpy(cache.verb_class.astype(np.int64)),
                 torch.from_numpy(cache.noun_class.astype(np.int64)), cache.narration_id, cache.video_id,
                 cache.attrs)


def feature_stats(split: Split, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over the split's done rows (all views and frames),
    accumulated in float64 chunk by chunk so no float32 copy of the whole split exists."""
    d = split.feats.shape[-1]
    s = torch.zeros(d, dtype=torch.float64, device=split.feats.device)
    ss = torch.zeros_like(s)
    n = 0
    for i in range(0, len(split.rows), chunk):
        x = split.feats[split.rows[i:i + chunk].to(split.feats.device)].reshape(-1, d).double()
        s += x.sum(0)
        ss += (x * x).sum(0)
        n += len(x)
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def positions(k: int, t: int, batch: int, train: bool, gen: torch.Generator | None) -> torch.Tensor:
    """[B, T] indices into the K cached frames: the centres of T equal parts at evaluation,
    a random frame within each part at training (when K > T)."""
    edges = torch.linspace(0, k, t + 1)
    if train and k > t:
        u = torch.rand(batch, t, generator=gen)
        pos = edges[:-1] + u * (edges[1:] - edges[:-1])
    else:
        pos = ((edges[:-1] + edges[1:]) / 2).expand(batch, t)
    return pos.floor().long().clamp_(0, k - 1)


def make_batch(split: Split, idx: torch.Tensor, t: int, train: bool, gen: torch.Generator | None,
               mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Standardised float32 [B, T, D] on the device for rows ``idx``."""
    _, v, k, d = split.feats.shape
    b = len(idx)
    view = torch.randint(v, (b,), generator=gen) if train and v > 1 else torch.zeros(b, dtype=torch.long)
    pos = positions(k, t, b, train, gen)
    dev = split.feats.device
    x = split.feats[idx.to(dev), view.to(dev)]  # [B, K, D]
    x = x.gather(1, pos.to(dev)[:, :, None].expand(-1, -1, d))
    return (x.to(device, non_blocking=True).float() - mean) / std
