"""ekx from Python: the small, stable surface for notebooks and scripts.

    from ekx import api

    cache = api.open_cache("features/resnet50/validation.h5")   # labels + identity; features memory-mapped
    run = api.load_run("runs/lstm-a")                             # a trained head (+ its backbone, on demand)
    verb, noun = run.predict(cache.features(mmap=True)[cache.done])
    print(api.metrics(verb, noun, cache.verb_class[cache.done], cache.noun_class[cache.done]))

Everything here is a thin layer over the modules the CLI uses (same checkpoints, same
preprocessing, same metrics), so a result from Python equals the CLI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ekx import EkxError
from ekx.cache.reader import Cache
from ekx.cache.reader import open_cache as _open_cache
from ekx.heads import metrics as _metrics
from ekx.heads import models
from ekx.heads.checkpoint import load_checkpoint, model_from_checkpoint
from ekx.heads.data import positions
from ekx.runtime import autocast, resolve_device, resolve_precision

__all__ = ["Cache", "Run", "Segments", "create_head", "heads", "load_run", "metrics", "open_cache", "segments"]


def open_cache(path: str | Path) -> Cache:
    """A feature cache: ``.features(mmap=True)`` [N, V, K, D] float16, ``.done`` (rows
    extracted), ``.narration_id``, ``.verb_class`` / ``.noun_class`` (-1: unlabelled),
    ``.attrs`` (its whole identity: backbone, weights, K, preprocessing, versions)."""
    return _open_cache(Path(path))


@dataclass
class Segments:
    """Features per segment: a cache's rows, or a dense store read through an annotation file."""

    features: np.ndarray  # [N, V, K, D] float16 (rows where present is False: zeros)
    present: np.ndarray  # [N] bool: the segment has features (done in a cache, covered by a store)
    narration_id: list[str]
    video_id: list[str]
    verb_class: np.ndarray  # [N] (-1: unlabelled)
    noun_class: np.ndarray
    attrs: dict  # the identity stage 2 checks (a dense store: plus its gather rule and largest gap)


def segments(path: str | Path, annotations: str | Path | None = None) -> Segments:
    """The features of every segment as stage 2 reads them, from a cache, a dense store (its
    segments from the annotation file it was made for, or ``annotations``: any CSV in the
    official format; each segment's 16 positions by the per-segment rule, nearest dense time)
    or several joined with ``+``."""
    from ekx.heads.data import load_split

    spec = f"{path}@{annotations}" if annotations is not None else str(path)
    split = load_split(Path(spec), torch.device("cpu"))
    present = np.zeros(len(split.narration_id), bool)
    present[split.rows.numpy()] = True
    feats = split.per_segment().numpy()
    feats[~present] = 0
    return Segments(
        feats, present, split.narration_id, split.video_id, split.verbs.numpy(), split.nouns.numpy(), split.attrs
    )


def heads() -> list[str]:
    """Names of the registered heads."""
    return sorted(models.REGISTRY)


def create_head(
    name: str,
    dim: int,
    frames: int,
    num_verbs: int = 97,
    num_nouns: int = 300,
    dropout: float = 0.5,
    drop_path: float = 0.1,
) -> nn.Module:
    """A fresh head: features [B, T, D] -> {"verb": [B, num_verbs], "noun": [B, num_nouns]}."""
    return models.create(
        name, dim=dim, num_verbs=num_verbs, num_nouns=num_nouns, frames=frames, dropout=dropout, drop_path=drop_path
    )


@dataclass
class Run:
    """A trained run: its head, feature standardisation, classes and the cache identity it
    was trained on. ``predict`` takes cached features; ``predict_video`` a video file."""

    path: Path
    head: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    frames: int  # T, the frames the head reads
    cache_identity: dict
    verbs: list[str]
    nouns: list[str]
    config: dict
    device: torch.device
    precision: str
    _checkpoint: str = "best.pt"
    _video_model: Any = field(default=None, repr=False)

    @torch.no_grad()
    def predict(self, features: np.ndarray | torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Verb and noun logits (float32, CPU) for features [N, K, D] or [N, V, K, D] (view 0),
        read exactly as `ekx evaluate` reads a cache: T centred positions of the K frames."""
        from ekx.heads.context import reads_context

        if reads_context(str(self.config.get("head"))):
            raise EkxError(
                f"{self.path}: a context head reads windows of a dense store, not segment features; "
                "score it with `ekx evaluate RUN --features STORE` (or `ekx predict` on a video)"
            )
        x = torch.as_tensor(np.asarray(features)) if not isinstance(features, torch.Tensor) else features
        if x.ndim == 4:
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"features must be [N, K, D] or [N, V, K, D], got shape {tuple(x.shape)}")
        pos = positions(x.shape[1], self.frames, 1, False, None)[0]
        self.head.eval()
        verb, noun = [], []
        for i in range(0, len(x), batch_size):
            b = x[i : i + batch_size, pos].to(self.device).float().sub_(self.mean).div_(self.std)
            with autocast(self.device, self.precision):
                out = self.head(b)
            verb.append(out["verb"].float().cpu())
            noun.append(out["noun"].float().cpu())
        n_v, n_n = len(self.verbs) or 0, len(self.nouns) or 0
        return (torch.cat(verb) if verb else torch.zeros(0, n_v)), (torch.cat(noun) if noun else torch.zeros(0, n_n))

    def predict_video(self, video: str | Path, window: float = 2.0, stride: float = 0.5, top: int = 5):
        """Sliding-window actions over a whole video (what `ekx predict` prints): rebuilds the
        backbone the run's features came from, once, on first use."""
        from ekx import predict as pr

        if self._video_model is None:
            self._video_model = pr.load_run(self.path, str(self.device), self._checkpoint)
        return pr.predict_video(self._video_model, Path(video), window, stride, top)


def load_run(run: str | Path, device: str = "auto", checkpoint: str = "best.pt") -> Run:
    """A run directory written by `ekx train-head` (or a .pt file); loaded with weights_only=True."""
    run = Path(run)
    path = run if run.suffix == ".pt" else run / checkpoint
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    classes = ckpt.get("classes", {})
    return Run(
        run if run.suffix != ".pt" else run.parent,
        model_from_checkpoint(ckpt).to(dev),
        ckpt["norm"]["mean"].to(dev),
        ckpt["norm"]["std"].to(dev),
        int(ckpt["head_kwargs"]["frames"]),
        dict(ckpt["cache"]),
        list(classes.get("verb", [])),
        list(classes.get("noun", [])),
        dict(ckpt["config"]),
        dev,
        resolve_precision(ckpt["config"].get("precision", "auto"), dev),
        path.name,
    )


def metrics(
    verb_logits,
    noun_logits,
    verbs,
    nouns,
    tail_verbs: set[int] | None = None,
    tail_nouns: set[int] | None = None,
    unseen=None,
) -> dict[str, float]:
    """The official EPIC-100 metrics in percent (verb/noun/action top-1/top-5; tail and
    unseen-participant top-1 when those sets are given), from logits and integer labels."""

    def t(a, dtype=None):
        return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype)

    return _metrics.compute(
        t(verb_logits),
        t(noun_logits),
        t(verbs, torch.long),
        t(nouns, torch.long),
        tail_verbs,
        tail_nouns,
        None if unseen is None else t(unseen, torch.bool),
    )
