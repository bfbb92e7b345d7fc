"""Windows of a dense store around each segment: the context head's input (`models.context`).

A dense split carries a `Timeline`: every stored position's time on one sorted key (video
index x OFFSET + seconds) and each segment's video and interval. A batch of windows is then
built on the device in a few tensor operations, like a batch of segments: W seconds around
each segment's centre (moved by up to W / 4 at training, so the query is not always in the
middle), split into TOKENS equal parts whose centres each take the nearest dense position
of the video - the per-segment sampling rule, applied to the window - followed by the
segment's own SEGMENT_TOKENS positions by the per-segment rule (the centres of equal parts
of [start, stop)), the tokens a segment head reads. Without these, a short segment would
get one or two of the window's tokens, while its order is what a segment head reads from
its 16 (measured on the demo: the context head then stayed 30 points of verb top-1 below
the transformer head). A token with no dense feature within half a period (before the
video's start, after its end) is masked. Dense stores joined with `+` enter as separate
token streams (`Stream`), each with its own window tokens and its own timeline, told apart
by a learned stream embedding in the head: a second modality needs no new head.

Training queries each segment once per epoch in its own window; evaluation queries each
segment once in the window centred on it. (TIM also supervises every other action that
falls in a window; here each segment is a sample of its own, which gives every segment
the same weight per epoch at a cost of TOKENS tokens per segment.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ekx import EkxError
from ekx.heads.models import REGISTRY
from ekx.heads.models.context import EXTRA

TOKENS = 50  # TIM's recognition setting: 50 features per window
SEGMENT_TOKENS = 16  # and the segment's own positions, as the segment heads read them (dense.SEGMENT_POSITIONS)
OFFSET = 1.0e5  # seconds between two videos on the sorted key (a video is shorter than 27 h)
WINDOW_RULE = (
    "window of W s centred on the segment (moved by up to W/4 at training), {tokens} tokens at the centres "
    "of equal parts, then the segment's 16 (centres of equal parts of [start, stop)), each the nearest dense "
    "time of the video; tokens past the video's ends masked"
)


def reads_context(head: str) -> bool:
    return bool(getattr(REGISTRY.get(head), "reads_context", False))


@dataclass
class Timeline:
    key: torch.Tensor  # [P'] float64, sorted: video index * OFFSET + time (valid positions only)
    flat: torch.Tensor  # [P'] long: each key's row in the split's [P, V, D] features
    period: torch.Tensor  # [videos] float64: each video's median spacing of positions
    seg_video: torch.Tensor  # [S] long (-1: the video is not in the store)
    seg_start: torch.Tensor  # [S] float64
    seg_stop: torch.Tensor  # [S] float64

    def to(self, device: torch.device) -> Timeline:
        return Timeline(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def timeline(times: np.ndarray, video_id: list[str], done: np.ndarray, segments) -> Timeline:
    """From a dense store's ``times`` [rows, K], row videos and done rows, and the segments read."""
    k = times.shape[1]
    valid = np.isfinite(times) & done[:, None]
    flat = np.flatnonzero(valid.reshape(-1))
    videos = list(dict.fromkeys(video_id))
    number = {v: i for i, v in enumerate(videos)}
    row_video = np.array([number[v] for v in video_id], np.int64)
    t = times.reshape(-1)[flat]
    key = row_video[flat // k] * OFFSET + t
    order = np.argsort(key, kind="stable")
    key, flat = key[order], flat[order]
    period = np.ones(len(videos))
    which = (key // OFFSET).astype(np.int64)
    for i in range(len(videos)):
        mine = key[which == i]
        period[i] = float(np.median(np.diff(mine))) if len(mine) > 1 else 1.0
    return Timeline(
        torch.from_numpy(key),
        torch.from_numpy(flat),
        torch.from_numpy(period),
        torch.tensor([number.get(s.video_id, -1) for s in segments], dtype=torch.long),
        torch.tensor([s.start for s in segments], dtype=torch.float64),
        torch.tensor([s.stop for s in segments], dtype=torch.float64),
    )


@dataclass
class Stream:
    """One dense store of a fused split, read as its own token stream: its [P, V, D] features
    and its timeline (segments in the fused split's order)."""

    feats: torch.Tensor
    timeline: Timeline


def _nearest(s, idx: torch.Tensor, t: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream ``s``'s features [B, T, D] at the dense times nearest ``t`` [B, T] of segments
    ``idx``, and whether each lies within half a period of its time (else masked). View v
    reads the stream's view v mod V (a stream of sound with one view: its clean view)."""
    tl: Timeline = s.timeline
    vid = tl.seg_video[idx]
    want = vid[:, None].double() * OFFSET + t
    j = torch.searchsorted(tl.key, want).clamp_(1, len(tl.key) - 1)
    left, right = tl.key[j - 1], tl.key[j]
    pick = torch.where((want - left).abs() <= (right - want).abs(), j - 1, j)
    gap = (tl.key[pick] - want).abs()
    valid = (gap <= tl.period[vid.clamp(min=0)][:, None] / 2 + 1e-6) & (vid[:, None] >= 0)
    return s.feats[tl.flat[pick].to(s.feats.device), view.to(s.feats.device) % s.feats.shape[1]], valid


def windows(
    split,
    idx: torch.Tensor,
    window: float,
    shift: torch.Tensor | None,
    view: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    tokens: int = TOKENS,
) -> torch.Tensor:
    """[B, S * tokens + SEGMENT_TOKENS, D + EXTRA] on the device for segments ``idx``:
    standardised features (zeros where masked), then each token's stream, its time in the
    window, its validity, and the query's start and stop in the window (see
    `models.context`). ``shift`` [B] in [-1, 1]: the window's centre moves by shift * W / 4
    (None: centred). A fused split of S dense stores (``split.streams``) gives each store its
    own ``tokens`` window tokens, its features in its own channels (D = D1 + D2 + ...) and
    zeros in the others, so one linear layer projects each stream with its own weights; the
    segment's own tokens hold every store's features side by side, as the segment heads read
    a fused split."""
    streams = getattr(split, "streams", None) or [split]
    tl: Timeline = streams[0].timeline
    dev = tl.key.device
    idx = idx.to(dev)
    start, stop = tl.seg_start[idx], tl.seg_stop[idx]
    centre = (start + stop) / 2
    if shift is not None:
        centre = centre + shift.to(dev, torch.float64) * window / 4
    half = window / 2
    offsets = (torch.arange(tokens, device=dev, dtype=torch.float64) + 0.5) * window / tokens - half
    parts = (torch.arange(SEGMENT_TOKENS, device=dev, dtype=torch.float64) + 0.5) / SEGMENT_TOKENS
    own_t = start[:, None] + parts[None, :] * (stop - start)[:, None]  # the segment's own positions
    win_t = centre[:, None] + offsets[None, :]
    b, n_s, d = len(idx), len(streams), int(mean.shape[-1])
    # one float32 tensor, the extra channels included, each stream standardised in place in
    # its channels: at the evaluation batch (1024 windows of 116 tokens of a fused 3072-dim
    # store: 1.4 GiB) a float copy per stream and a final concatenation doubled the peak
    x = torch.zeros(b, n_s * tokens + SEGMENT_TOKENS, d + EXTRA, device=device)
    valid = torch.zeros(b, n_s * tokens + SEGMENT_TOKENS, dtype=torch.bool, device=device)
    c = 0
    for i, s in enumerate(streams):
        f, ok = _nearest(s, idx, torch.cat([win_t, own_t], dim=1), view)
        ch, ok = slice(c, c + f.shape[-1]), ok.to(device)
        for rows, got, m in ((slice(i * tokens, (i + 1) * tokens), f[:, :tokens], ok[:, :tokens]),
                             (slice(n_s * tokens, None), f[:, tokens:], ok[:, tokens:])):  # fmt: skip
            part = x[:, rows, ch]
            part.copy_(got, non_blocking=True)
            part.sub_(mean[ch]).div_(std[ch]).mul_(m[..., None])
        del f
        valid[:, i * tokens : (i + 1) * tokens] = ok[:, :tokens]
        valid[:, -SEGMENT_TOKENS:] |= ok[:, tokens:]
        c += ch.stop - ch.start
    q = torch.stack([start - centre, stop - centre], dim=1).div(half).clamp(-1, 1).float().to(device)
    n = x.shape[1]
    rel = ((torch.cat([win_t.repeat(1, n_s), own_t], dim=1) - centre[:, None]) / half).float().to(device)
    stream = torch.arange(n_s, device=device).repeat_interleave(tokens)
    stream = torch.cat([stream, stream.new_zeros(SEGMENT_TOKENS)]).float().expand(b, -1)
    x[..., d:] = torch.stack([stream, rel, valid.float(), q[:, :1].expand(-1, n), q[:, 1:].expand(-1, n)], dim=-1)
    return x


def check(split, head: str) -> None:
    if getattr(split, "timeline", None) is None and not getattr(split, "streams", None):
        raise EkxError(
            f"the {head} head reads windows of a dense store (`ekx extract --dense`, `ekx import`); "
            f"{split.path} is a per-segment cache or joins one with `+`"
        )


def batches(split, norm, cfg, gen: torch.Generator, device) -> tuple[int, Iterator]:
    """A training epoch of windows: a permutation, shifts and views drawn at once."""
    check(split, cfg.head)
    perm = split.rows[torch.randperm(len(split.rows), generator=gen)]
    shift = torch.rand(len(perm), generator=gen) * 2 - 1
    view = torch.randint(split.views, (len(perm),), generator=gen) if split.views > 1 else torch.zeros_like(perm)
    steps = math.ceil(len(perm) / cfg.batch_size)

    def gen_batches():
        for step in range(steps):
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            idx = perm[sl]
            x = windows(split, idx, cfg.window, shift[sl], view[sl, None], norm[0], norm[1], device)
            yield x, split.verbs[idx].to(device), split.nouns[idx].to(device)

    return steps, gen_batches()


def eval_inputs(split, norm, cfg, device) -> Iterator[torch.Tensor]:
    """Every done segment once, in the window centred on it (view 0)."""
    check(split, cfg.head)
    for i in range(0, len(split.rows), cfg.eval_batch_size):
        idx = split.rows[i : i + cfg.eval_batch_size]
        view = torch.zeros(len(idx), 1, dtype=torch.long)
        yield windows(split, idx, cfg.window, None, view, norm[0], norm[1], device)


__all__ = [
    "EXTRA",
    "SEGMENT_TOKENS",
    "TOKENS",
    "WINDOW_RULE",
    "Stream",
    "Timeline",
    "batches",
    "eval_inputs",
    "reads_context",
    "windows",
]
