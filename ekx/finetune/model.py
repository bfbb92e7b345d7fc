"""The fine-tuned model (backbone -> standardisation -> head) and where it starts: a
train-head run (warm) or --weights (cold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ekx import EkxError, epic
from ekx.extract import backbones
from ekx.extract.inputs import calibrate, calibration_plan
from ekx.extract.pipeline import ExtractConfig
from ekx.finetune.clips import Clips, clip_inputs
from ekx.finetune.config import FinetuneConfig
from ekx.heads import checkpoint as ck
from ekx.heads import models


class VideoModel(nn.Module):
    """Backbone -> [B, T, D] features -> the cache's standardisation -> head."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        frozen: list[nn.Module],
        train_bn: bool = False,
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        # plain lists: not registered twice. BatchNorm statistics stay fixed unless asked:
        # a batch holds B clips x T frames of the same few scenes, so its statistics are
        # poor estimates, and drifting ones shift every feature the (warm-started) head reads
        self.fixed = frozen + (
            [] if train_bn else [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        )
        for m in frozen:
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.fixed:  # frozen parts (and, by default, every BatchNorm) stay in eval mode
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        b, t = x.shape[:2]
        f = self.backbone(x.flatten(0, 1)).float().reshape(b, t, -1)
        return self.head((f - self.mean) / self.std)


def frozen_modules(bb: backbones.Backbone, model: nn.Module, blocks: int) -> list[nn.Module]:
    stages = bb.stages(model)
    if blocks >= len(stages):
        raise EkxError(f"--freeze-blocks {blocks}: {bb.name} has a stem and {len(stages) - 1} stages")
    return [m for stage in stages[: blocks + 1] for m in stage] if blocks >= 0 else []


@dataclass
class Start:
    """Where fine-tuning starts: backbone, head, standardisation, classes, frames."""

    backbone: nn.Module
    head: nn.Module
    head_kwargs: dict
    mean: torch.Tensor
    std: torch.Tensor
    verbs: list[str]
    nouns: list[str]
    frames: int
    source: str
    weights: str = "DEFAULT"  # the weights whose transforms preprocess the frames (backbones.with_weights)
    resize: str = "decoder"  # how the warm start's cache resized its frames (--resize)
    cache: dict = field(default_factory=dict)  # the identity of the features the head learnt
    whole: bool = False  # ``cache`` is the whole identity (older checkpoints: a few keys)


def warm_start(cfg: FinetuneConfig, run: Path) -> Start:
    """From a train-head run: its head, its feature standardisation and the exact backbone
    its cache was extracted with (rebuilt from the checkpoint's extractor spec)."""
    return start_from_checkpoint(cfg, ck.load_checkpoint(run / "best.pt" if run.is_dir() else run), run)


def start_from_checkpoint(cfg: FinetuneConfig, ckpt: dict, run: Path) -> Start:
    spec = ckpt.get("extractor")
    if not spec:
        raise EkxError(f"--init-head {run}: the run does not record its backbone (trained by an older ekx)")
    if "fused" in spec:
        raise EkxError(f"--init-head {run}: a fused run (several backbones' features joined); fine-tuning takes one")
    if spec["backbone"] != cfg.backbone:
        raise EkxError(
            f"--init-head {run} was trained on {spec['backbone']} features; pass --backbone {spec['backbone']}"
        )
    if ckpt["config"]["head"] != cfg.head:
        raise EkxError(f"--init-head {run} holds a {ckpt['config']['head']} head, not {cfg.head}")
    t = int(ckpt["head_kwargs"]["frames"])
    if cfg.frames and cfg.frames != t:
        raise EkxError(f"--frames {cfg.frames}: the head of {run} reads {t} frames; leave --frames at 0")
    backbone = backbones.run_backbone(ckpt)  # a fine-tuned run's own, or its cache's extractor
    kwargs = {**ckpt["head_kwargs"], "dropout": cfg.dropout, "drop_path": cfg.drop_path}
    head = models.create(cfg.head, **kwargs)
    head.load_state_dict(ckpt["model"])
    return Start(
        backbone,
        head,
        kwargs,
        ckpt["norm"]["mean"],
        ckpt["norm"]["std"],
        ckpt["classes"]["verb"],
        ckpt["classes"]["noun"],
        t,
        ckpt.get("started_from", f"init-head {run}"),
        spec.get("preprocess_weights", spec["weights"]),
        spec.get("resize", "decoder"),
        dict(ckpt.get("cache", {})),
        ckpt.get("identity") == "whole",
    )


@torch.no_grad()
def cold_start(cfg: FinetuneConfig, ann: epic.Annotations, segments, paths, device) -> Start:
    """From --weights: a fresh head; BatchNorm calibrated on the data for random weights
    (as stage 1 does), feature standardisation measured on the first training segments."""
    bb = backbones.with_weights(backbones.get(cfg.backbone), cfg.weights)
    t = cfg.frames or 16
    backbone, weights_id = backbones.load_weights(bb, cfg.weights, cfg.seed)
    backbone.to(device)
    ecfg = ExtractConfig(backbone=cfg.backbone, frames=t, seed=cfg.seed, resize=cfg.resize)
    if weights_id == "none":  # the same calibration `ekx extract --weights none` does
        calibrate(backbone, bb, ecfg, calibration_plan(ann, segments, ecfg), paths, device)
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1  # calibration used a cumulative average; training uses the usual
    feats, clips = [], Clips(segments, paths, t, bb, resize=cfg.resize)
    for i in range(min(len(segments), 8)):
        _, frames, err = clips[i]
        if err is None:
            feats.append(backbone(clip_inputs(frames, t, bb, device, None)).float())
    if not feats:
        raise EkxError("none of the first training segments could be decoded")
    f = torch.cat(feats)
    verbs, nouns = ann.verbs(), ann.nouns()
    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = {
        "dim": bb.dim,
        "num_verbs": len(verbs),
        "num_nouns": len(nouns),
        "frames": t,
        "dropout": cfg.dropout,
        "drop_path": cfg.drop_path,
    }
    return Start(
        backbone.cpu(),
        models.create(cfg.head, **kwargs),
        kwargs,
        f.mean(0).cpu(),
        f.std(0).clamp_min(1e-6).cpu(),
        list(verbs.keys),
        list(nouns.keys),
        t,
        f"weights {weights_id}",
        cfg.weights,
    )


def build_model(start: Start, cfg: FinetuneConfig, device) -> VideoModel:
    bb = backbones.get(cfg.backbone)
    model = VideoModel(
        start.backbone,
        start.head,
        start.mean,
        start.std,
        frozen_modules(bb, start.backbone, cfg.freeze_blocks),
        cfg.train_bn,
    ).to(device)
    fmt = torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d
    model.backbone.to(memory_format=fmt)
    if getattr(cfg, "grad_checkpoint", False):
        grad_checkpointing(bb, model.backbone)
    return model


def grad_checkpointing(bb: backbones.Backbone, backbone: nn.Module) -> None:
    """Turn on the library's own gradient checkpointing (large ViTs fit a GPU's memory with
    it: activations of a block are recomputed in the backward pass instead of kept)."""
    inner: Any = getattr(backbone, "model", backbone)  # ekx's wrapper of a Hugging Face model
    if hasattr(inner, "set_grad_checkpointing"):  # timm models, OpenCLIP towers
        inner.set_grad_checkpointing(True)
    elif hasattr(inner, "activation_checkpointing_enable"):  # Hugging Face (transformers >= 5)
        inner.activation_checkpointing_enable()
    elif hasattr(inner, "gradient_checkpointing_enable"):  # Hugging Face, older
        inner.gradient_checkpointing_enable()
    else:
        raise EkxError(
            f"--grad-checkpoint: {bb.name} has no gradient checkpointing (timm, OpenCLIP and Hugging Face models have)"
        )
