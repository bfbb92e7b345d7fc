"""Cached features in memory, and batches built by tensor indexing.

A split is read once with one bulk read (`Cache.features`) into a float16 tensor - on
the GPU when it fits - and every batch is `feats[rows, view]` plus a gather over time:
no Dataset, no DataLoader, no per-item HDF5 reads. Pending/failed rows are skipped by
index, never by copying the array.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ekx import EkxError
from ekx.cache import identity
from ekx.cache.reader import open_cache
from ekx.cache.store import read_backbone_state
from ekx.extract.backbones import extractor_spec

# what stage 2 cannot work without (the identity as a whole is compared by `ekx.cache.identity`)
REQUIRED = ("backbone", "weights", "frames_per_segment", "feature_dim", "num_verbs", "num_nouns")


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
    extractor: dict  # rebuilds the backbone that made the features (see backbones.extractor_spec)

    @property
    def labelled(self) -> bool:
        return bool((self.verbs[self.rows] >= 0).all())

    def from_participants(self, participants: set[str] | None) -> torch.Tensor | None:
        """[M] bool over done rows: segment recorded by one of these participants (video P01_02 -> P01)."""
        if participants is None:
            return None
        return torch.tensor([self.video_id[r].split("_")[0] in participants for r in self.rows.tolist()])

    def identity(self) -> dict:
        """What its features mean (`ekx.cache.identity.identity`): equal for any two caches
        a head may be trained, validated and evaluated on together."""
        return identity.identity(self.attrs)


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.7 * free


def load_split(path: Path, device: torch.device, mmap: bool = False) -> Split:
    cache = open_cache(path)
    missing = [k for k in REQUIRED if k not in cache.attrs]
    if missing:
        raise EkxError(f"{path}: cache lacks attribute(s) {', '.join(missing)}; re-extract it with this ekx")
    rows = np.flatnonzero(cache.done)
    if len(rows) == 0:
        raise EkxError(f"{path}: no extracted segments (status done); finish `ekx extract` first")
    array = cache.features(mmap=mmap)
    with warnings.catch_warnings():  # a read-only memory map: ekx never writes to it
        warnings.simplefilter("ignore", UserWarning)
        feats = torch.from_numpy(array)
    if _fits_on(device, feats.numel() * 2):
        feats = feats.to(device)
    return Split(
        Path(path),
        feats,
        torch.from_numpy(rows),
        torch.from_numpy(cache.verb_class.astype(np.int64)),
        torch.from_numpy(cache.noun_class.astype(np.int64)),
        cache.narration_id,
        cache.video_id,
        cache.attrs,
        extractor_spec(cache.attrs, read_backbone_state(path)),
    )


def feature_stats(split: Split, max_rows: int = 16384, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the split (all views and frames) in float64 sums.

    Beyond ``max_rows`` segments an evenly spaced subset is used: 16k segments x K frames
    pin every dimension's statistics far below their spread, and the full 67k x 16 x 2048
    pass would cost more than an epoch of batches (measured in bench/heads_bench.py)."""
    d = split.feats.shape[-1]
    rows = split.rows
    if len(rows) > max_rows:
        rows = rows[torch.linspace(0, len(rows) - 1, max_rows).long()]
    s = torch.zeros(d, dtype=torch.float64, device=split.feats.device)
    ss = torch.zeros_like(s)
    n = 0
    for i in range(0, len(rows), chunk):
        x = split.feats[rows[i : i + chunk].to(split.feats.device)].reshape(-1, d).float()
        s += x.sum(0, dtype=torch.float64)
        ss += (x * x).sum(0, dtype=torch.float64)
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


def draw(split: Split, n: int, t: int, train: bool, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(view [n, 1], positions [n, T]) for n samples - drawn for a whole epoch at once, so a
    training step only slices them: random view and jittered positions at training, view 0
    and centre positions at evaluation."""
    _, v, k, _ = split.feats.shape
    view = torch.randint(v, (n, 1), generator=gen) if train and v > 1 else torch.zeros(n, 1, dtype=torch.long)
    return view, positions(k, t, n, train, gen)


def make_batch(
    split: Split,
    idx: torch.Tensor,
    view: torch.Tensor,
    pos: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """Standardised float32 [B, T, D] on the device for rows ``idx``: one gather of exactly
    the B x T frames needed (view and time picked in the same indexing op), then in place."""
    dev = split.feats.device
    x = split.feats[idx.to(dev)[:, None], view.to(dev), pos.to(dev)]  # [B, T, D] float16
    return x.to(device, non_blocking=True).float().sub_(mean).div_(std)
