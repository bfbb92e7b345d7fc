"""Several caches or dense stores of the same segments as one input (`--features a.h5+b.h5`,
`--backbone resnet50+audio:auditory_slowfast`): features concatenated per view and
position, rows aligned by narration id, each part keeping its own identity.

Parts may be of different modalities - frames beside sound - and then differ in K and views:

- **time**: a per-segment cache's K positions are the centres of K equal parts of the
  segment (the per-segment rule; a dense part gathers its 16 positions by the same rule,
  and audio caches place their windows' centres so), so any two parts are already aligned
  by time and differ only in how finely they sample the segment. The fused split takes the
  finest grid (K = the largest K) and a coarser part gives each fused position its own
  position nearest in time - the one whose equal part holds that time,
  floor((j + 0.5) * K_p / K) - so 4 one-second audio windows beside 16 frames each
  stand beside the 4 frames they cover. Pooling the finer part down instead would leave the
  order-aware heads 4 frames where the cache holds 16; repeating invents no feature.
- **views**: view 0 is every part's clean view; fused view v reads a part's view
  v mod V_p (one view of sound gives its clean features beside every augmented frame view,
  as TIM draws each modality's augmentation on its own).

Dense stores on the same positions are held once ([P, V, D1 + D2 + ...], through the
first's index); the context head reads every dense part as its own token stream (`Stream`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ekx import EkxError
from ekx.cache import identity
from ekx.heads.context import Stream, Timeline

if TYPE_CHECKING:  # data imports this module; a fused split is made by `replace` on the first
    from ekx.heads.data import Split

FUSE = "+"  # the separator of the parts (`--features a.h5+b.h5`)
SAME_FEATURES = "a fusion of a store with itself would train on every feature doubled: join different stores"


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of features may go to ``device`` (70% of a GPU's free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.7 * free


def time_map(k_part: int, k: int) -> torch.Tensor:
    """[k] the position of a part of ``k_part`` per segment nearest each of ``k`` fused
    positions (centres of equal parts both): the part's equal part holding that centre."""
    return (2 * torch.arange(k) + 1) * k_part // (2 * k)


def view_map(v_part: int, v: int) -> torch.Tensor:
    """[v] the part's view read for each fused view: view 0 clean in every part."""
    return torch.arange(v) % v_part


def fuse(parts: list[Split], path: Path, device: torch.device) -> Split:
    """Several caches of the same segments as one: features concatenated per view and
    position ([N, V, K, D1 + D2 + ...], K and V the largest of the parts', see the module's
    docstring), rows aligned by narration id (the first part's order), a row done only where
    it is done in every part. The parts must hold the same segments and labels; each keeps
    its own identity (`Split.identity`)."""
    first = parts[0]
    for i, p in enumerate(parts):  # a copy under another name: the same identity
        same = next(
            (q for q in parts[:i] if not identity.mismatch(identity.identity(q.attrs), identity.identity(p.attrs))),
            None,
        )
        if same is not None:
            raise EkxError(f"{path}: {same.path} and {p.path} hold the same features (equal identity); {SAME_FEATURES}")
    order = {nid: i for i, nid in enumerate(first.narration_id)}
    # parts align by narration id, each dense one having mapped the segments' times to its
    # own positions (alignment by time); `_join` then writes the features side by side
    invs: list[torch.Tensor | None] = [None]  # each part's rows in the first's order
    done = np.zeros(len(order), dtype=bool)
    done[first.rows.numpy()] = True
    timelines = [first.timeline]
    for p in parts[1:]:
        if set(p.narration_id) != set(order):
            extra = len(set(p.narration_id) - set(order))
            lacking = len(set(order) - set(p.narration_id))
            raise EkxError(
                f"{p.path} and {first.path} hold different segments ({lacking} of the first missing, {extra} "
                "others): fuse caches extracted from the same annotation file"
            )
        read = identity.mismatch(first.attrs, p.attrs, (str(first.path), str(p.path)), [identity.VIDEOS])
        if read:  # one part from the originals, another from re-encoded copies
            raise EkxError(f"{p.path} and {first.path} read their videos from other files ({read[0]}); fuse caches "
                           "extracted from the same video files")  # fmt: skip
        idx = torch.tensor([order[n] for n in p.narration_id])  # p's row i is the first's row idx[i]
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(len(idx))
        if not (torch.equal(p.verbs[inv], first.verbs) and torch.equal(p.nouns[inv], first.nouns)):
            raise EkxError(f"{p.path} and {first.path} label the same segments differently")
        invs.append(inv)
        tl = p.timeline  # its segments put in the first part's order
        if tl is not None:
            tl = replace(tl, seg_video=tl.seg_video[inv], seg_start=tl.seg_start[inv], seg_stop=tl.seg_stop[inv])
        timelines.append(tl)
        mine = np.zeros(len(order), dtype=bool)
        mine[idx[p.rows].numpy()] = True
        done &= mine
    rows = np.flatnonzero(done)
    if len(rows) == 0:
        raise EkxError(f"{path}: no segment is done in every part")
    joined, index = _join(parts, invs, device)
    attrs = dict(first.attrs)
    attrs.update(
        backbone=FUSE.join(str(p.attrs["backbone"]) for p in parts),
        feature_dim=int(joined.shape[-1]),
        frames_per_segment=int(index.shape[1] if index is not None else joined.shape[2]),
    )
    return replace(
        first,
        path=path,
        feats=joined,
        rows=torch.from_numpy(rows),
        attrs=attrs,
        extractor={"fused": [p.extractor for p in parts]},
        parts=[p.attrs for p in parts],
        index=index,
        timeline=None,
        streams=_streams(parts, timelines, device),
    )


def _join(parts: list[Split], invs: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused features, float16, written part by part into one tensor (never every part's
    copy and their concatenation at once). Dense parts on the same positions (stores
    extracted at one rate from the same videos): each position's features side by side,
    [P, V, D1 + D2 + ...], read through the first part's index, and each part's features
    become a view of its channels, so the context head's streams are no second copy.
    Otherwise: per segment, [N, V, K, D1 + D2 + ...] on the finest K and the most views
    (`time_map`, `view_map`), and no index."""
    first = parts[0]
    shared = first.index is not None and all(
        p.index is not None
        and p.timeline is not None
        and first.timeline is not None
        and p.feats.shape[:2] == first.feats.shape[:2]
        and torch.equal(p.timeline.key, first.timeline.key)
        and torch.equal(p.timeline.flat, first.timeline.flat)
        and torch.equal(p.index if inv is None else p.index[inv.to(p.index.device)], first.index)
        for p, inv in zip(parts, invs, strict=True)
    )
    k, views = max(p.k for p in parts), max(p.views for p in parts)
    lead = tuple(first.feats.shape[:2]) if shared else (len(first.narration_id), views, k)
    dims = [int(p.feats.shape[-1]) for p in parts]
    out = torch.empty(*lead, sum(dims), dtype=torch.float16)
    c = 0
    for p, inv, d in zip(parts, invs, dims, strict=True):
        if shared:  # the part's own copy is freed at once: its stream reads these channels
            out[..., c : c + d] = p.feats.cpu()
            p.feats = out[..., c : c + d]
        else:
            out[..., c : c + d] = _aligned(p, inv, views, k)
        c += d
    if fits_on(device, out.numel() * 2):
        out = out.to(device)
    if not shared:
        return out, None
    c = 0
    for p, d in zip(parts, dims, strict=True):  # on the device the fused tensor went to
        p.feats, c = out[..., c : c + d], c + d
    assert first.index is not None
    return out, first.index.to(out.device)


def _aligned(p: Split, inv: torch.Tensor | None, views: int, k: int) -> torch.Tensor:
    """Part ``p``'s features [N, views, k, D] in the first part's row order, on the fused
    grid of time and views: one gather (rows, views and positions in one indexing op)."""
    f = p.per_segment()
    dev = f.device
    rows = torch.arange(len(f)) if inv is None else inv
    if inv is None and (p.views, p.k) == (views, k):
        return f.cpu()
    at = (rows[:, None, None].to(dev), view_map(p.views, views)[None, :, None].to(dev), time_map(p.k, k).to(dev))
    return f[at].cpu()


def _streams(parts: list[Split], timelines: list[Timeline | None], device: torch.device) -> list[Stream] | None:
    """Each dense part's [P, V, D] features and its timeline, on the device where they fit
    (None where a part is a per-segment cache: the parts then have no common timeline)."""
    if any(tl is None for tl in timelines):
        return None
    fits = fits_on(device, sum(p.feats.numel() * 2 for p in parts))
    return [
        Stream(p.feats.to(device) if fits else p.feats, tl.to(device) if fits else tl)
        for p, tl in zip(parts, timelines, strict=True)
        if tl is not None
    ]
