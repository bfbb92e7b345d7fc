"""Cached features in memory, and batches built by tensor indexing.

A split is read once with one bulk read (`Cache.features`) into a float16 tensor - on
the GPU when it fits - and every batch is `feats[rows, view]` plus a gather over time:
no Dataset, no DataLoader, no per-item HDF5 reads. Pending/failed rows are skipped by
index, never by copying the array.

A dense store (`ekx.cache.dense`) is held as one [positions, V, D] tensor with an index
[segments, K] into it (each segment's positions, from an annotation file): a batch is the
same one indexing op through the index, so an epoch costs what it costs on a cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ekx import EkxError, epic
from ekx.cache import dense, identity, store
from ekx.cache.reader import open_cache
from ekx.cache.store import read_backbone_state
from ekx.heads import missing
from ekx.heads.context import Stream, Timeline, timeline
from ekx.heads.fusion import FUSE, SAME_FEATURES, fits_on, fuse

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
    extractor: dict  # rebuilds the backbone that made the features (`extractor_spec`)
    parts: list[dict] | None = None  # a fused split: each part's attributes, in order
    # a dense store: feats is [P, V, D] (every stored position) and index [N, K] the
    # positions of each segment; None: feats is [N, V, K, D]
    index: torch.Tensor | None = None
    # a dense split: every position's time and each segment's interval (the context head's windows)
    timeline: Timeline | None = None
    # a fused split of dense stores only: each store as its own token stream (the context head)
    streams: list[Stream] | None = None

    @property
    def k(self) -> int:
        """Positions per segment."""
        return int(self.index.shape[1] if self.index is not None else self.feats.shape[2])

    @property
    def views(self) -> int:
        return int(self.feats.shape[1])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[-1])

    def per_segment(self) -> torch.Tensor:
        """[N, V, K, D]: a dense split's features gathered per segment (fusion needs them so)."""
        if self.index is None:
            return self.feats
        return self.feats[self.index.to(self.feats.device)].permute(0, 2, 1, 3)

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
        a head may be trained, validated and evaluated on together. A fused split: every
        part's identity, its keys prefixed ``part1.``, ``part2.``... (a refusal names the part)."""
        if self.parts is None:
            return identity.identity(self.attrs)
        out: dict = {"fusion": FUSE.join(str(p["backbone"]) for p in self.parts)}
        for i, attrs in enumerate(self.parts, 1):
            out.update({f"part{i}.{k}": v for k, v in identity.identity(attrs).items()})
        return out


AUDIO = "audio"


def modality(attrs) -> str:
    """What a cache's features were computed from: ``audio`` (an imported store's ``modality``;
    an extracted cache's ``audio_rate``, the rate its sound was read at; an ``audio:``
    backbone) or ``visual`` (frames: every cache without these)."""
    audio = (
        attrs.get("modality") == AUDIO
        or "audio_rate" in attrs
        or str(attrs.get("backbone", "")).startswith(AUDIO + ":")
    )
    return AUDIO if audio else "visual"


def sound_parts(cache: dict) -> list[str]:
    """The backbones of a run's features that were computed from sound: its cache's, or each
    part's of a fused one (``partN.`` keys of its identity, `Split.identity`)."""
    parts: dict[str, dict] = {}
    for key, value in cache.items():
        part, dot, name = key.partition(".")
        if dot and part.startswith("part") and part[4:].isdigit():
            parts.setdefault(part, {})[name] = value
    return [str(a.get("backbone")) for a in (parts.values() if parts else [cache]) if modality(a) == AUDIO]


def load_split(path: Path, device: torch.device, mmap: bool = False) -> Split:
    """A cache, or several joined with ``+`` (`fuse`)."""
    names = str(path).split(FUSE)
    if len(names) > 1:
        stores = [dense.split_spec(n)[0].resolve() for n in names]
        twice = next((n for i, n in enumerate(stores) if n in stores[:i]), None)
        if twice is not None:  # said before anything is read
            raise EkxError(f"{path}: {twice} is named twice; {SAME_FEATURES}")
        return fuse([_load_one(Path(n), torch.device("cpu"), mmap) for n in names], Path(path), device)
    return _load_one(Path(path), device, mmap)


def _load_one(path: Path, device: torch.device, mmap: bool = False) -> Split:
    store_path, segments_csv = dense.split_spec(path)
    cache = open_cache(store_path)
    if cache.dense:
        return _load_dense(cache, segments_csv, device)
    if segments_csv is not None:
        raise EkxError(f"{path}: {store_path} is a per-segment cache; only a dense store takes @<segments.csv>")
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
    if fits_on(device, feats.numel() * 2):
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


def _load_dense(cache, segments_csv: Path | None, device: torch.device) -> Split:
    """A dense store read through an annotation file's segments (`dense.gather`)."""
    path = cache.path
    missing = [k for k in REQUIRED if k not in cache.attrs]
    if missing or cache.time is None:
        raise EkxError(f"{path}: dense store lacks {', '.join(missing) or 'its time dataset'}; re-make it")
    csv = dense.segments_file(path, cache.attrs, segments_csv)
    a = cache.attrs
    verbs = epic.ClassList(tuple(a["verb_classes"]), tuple(a["verb_classes"]))
    nouns = epic.ClassList(tuple(a["noun_classes"]), tuple(a["noun_classes"]))
    segments = epic.load_segments(csv, verbs, nouns)
    k = dense.SEGMENT_POSITIONS
    g = dense.gather(cache.time, cache.video_id, cache.done, segments, k)
    rows = np.flatnonzero(g.present)
    if len(rows) == 0:
        raise EkxError(f"{path}: none of the {len(segments)} segments of {csv} has dense features (other videos?)")
    array = cache.features()  # [runs, V, K, D] -> one [positions, V, D] tensor (no copy for V = 1)
    n, v, kk, d = array.shape
    feats = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 2, 1, 3)).reshape(n * kk, v, d))
    if fits_on(device, feats.numel() * 2):
        feats = feats.to(device)
    attrs = dict(
        a,
        frames_per_segment=k,
        dense_gather=dense.GATHER_RULE.format(k=k),
        dense_max_gap=round(g.max_gap, 6),
        annotation_file=csv.name,
        annotation_sha256=store.sha256_file(csv),
    )
    return Split(
        Path(f"{path}{dense.SEGMENTS}{csv}" if segments_csv is not None else path),
        feats,
        torch.from_numpy(rows),
        torch.tensor([s.verb_class for s in segments], dtype=torch.long),
        torch.tensor([s.noun_class for s in segments], dtype=torch.long),
        [s.narration_id for s in segments],
        [s.video_id for s in segments],
        attrs,
        extractor_spec(attrs, read_backbone_state(path)),
        index=torch.from_numpy(g.index).to(feats.device),
        timeline=timeline(cache.time, cache.video_id, cache.done, segments).to(feats.device),
    )


def validation_note(val: Split, allow_missing: bool, train: Split | None = None) -> str | None:
    """What the run's figures rest on beyond the features themselves, kept with the run: the
    validation rows without features (`missing.check_validation`, which refuses them unless
    allowed) and, for a dense store, how its segments were read and the largest time gap."""
    done = torch.zeros(len(val.narration_id), dtype=torch.bool)
    done[val.rows] = True
    notes = [missing.check_validation(val.path, val.narration_id, done.tolist(), allow_missing)]
    for name, s in (("train", train), ("validation", val)):
        if s is not None and s.index is not None and not (name == "train" and s is val):
            absent = len(s.narration_id) - len(s.rows)
            notes.append(
                f"{name} features from dense store {s.path} ({s.attrs['dense_rate']} per s): "
                f"{s.attrs['dense_gather']}; largest gap {s.attrs['dense_max_gap']:.3f} s; "
                f"{absent} of {len(s.narration_id)} segments missing"
            )
    return "; ".join(n for n in notes if n) or None


def feature_stats(split: Split, max_rows: int = 16384, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the split (all views and frames) in float64 sums.

    Beyond ``max_rows`` segments an evenly spaced subset is used: 16k segments x K frames
    pin every dimension's statistics far below their spread, and the full 67k x 16 x 2048
    pass would cost more than an epoch of batches (measured in bench/heads_bench.py)."""
    d = split.dim
    rows = split.rows
    if len(rows) > max_rows:
        rows = rows[torch.linspace(0, len(rows) - 1, max_rows).long()]
    s = torch.zeros(d, dtype=torch.float64, device=split.feats.device)
    ss = torch.zeros_like(s)
    n = 0
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk].to(split.feats.device)
        # a dense split: the positions its segments read, each as often as a segment reads it
        x = (split.feats[split.index[r]] if split.index is not None else split.feats[r]).reshape(-1, d).float()
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
    v, k = split.views, split.k
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
    if split.index is not None:  # a dense split: each segment's positions, then the same gather
        x = split.feats[split.index[idx.to(dev)[:, None], pos.to(dev)], view.to(dev)]
    else:
        x = split.feats[idx.to(dev)[:, None], view.to(dev), pos.to(dev)]  # [B, T, D] float16
    return x.to(device, non_blocking=True).float().sub_(mean).div_(std)


def extractor_spec(attrs: dict, bn_state: dict) -> dict:
    """Plain values (and the calibrated BatchNorm buffers of random weights) that rebuild
    the backbone a cache was extracted with (`ekx.extract.backbones.build_extractor`); a
    head's checkpoint carries them, so a run alone is enough for `ekx predict` / `ekx live` /
    `ekx finetune --init-head`. Here, not beside the backbones: stage 2 then starts without
    torchvision, whose import is ~2 s of every head-only process."""
    return {
        "backbone": attrs["backbone"],
        "weights": attrs["weights"],
        "weights_path": attrs.get("weights_path", ""),
        "seed": int(attrs.get("seed", 0)),
        "frames": int(attrs["frames_per_segment"]),
        # how its frames were read and resized: `ekx predict` reads a video the same way
        "source": str(attrs.get("source", "decord")),
        "resize": str(attrs.get("resize", "decoder")),
        "bn_state": {k: torch.as_tensor(v) for k, v in bn_state.items()},
    }
