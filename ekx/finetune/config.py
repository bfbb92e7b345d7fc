"""FinetuneConfig: train-head's hyperparameters plus the backbone's. Torch-free, so the
CLI builds and checks its flags without importing the fine-tuner."""

from __future__ import annotations

from dataclasses import dataclass

from ekx.extract.config import BACKBONES, RESIZES
from ekx.heads.config import TrainConfig
from ekx.options import again, opt


@dataclass
class FinetuneConfig(TrainConfig):
    """train-head's hyperparameters (defaults: the architecture document's fine-tuning values)
    plus the backbone's; a redefined field keeps what TrainConfig declares it admits."""

    backbone: str = again(TrainConfig, "backbone", "resnet50", f"backbone to fine-tune: {BACKBONES}")
    name: str = again(
        TrainConfig, "name", "", "run directory name under runs/ (default finetune-<head>-<backbone>-<time>)"
    )
    epochs: int = again(TrainConfig, "epochs", 10)
    batch_size: int = again(
        TrainConfig, "batch_size", 8, "segments per step and process (x --accumulate for the optimizer)"
    )
    lr: float = again(TrainConfig, "lr", 5e-5, "peak learning rate (AdamW; small: the backbone is pretrained)")
    frames: int = again(TrainConfig, "frames", 0, "frames T decoded per segment (0: the --init-head run's, else 16)")
    weights: str = opt("DEFAULT", "backbone weights without --init-head: DEFAULT, a torchvision name, a path, none")
    freeze_blocks: int = opt(2, "stages after the stem kept frozen; -1: nothing frozen", ge=-1)
    accumulate: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", ge=1)
    grad_checkpoint: bool = opt(
        False, "recompute the backbone's blocks in the backward pass (timm, OpenCLIP, Hugging Face models): less memory"
    )
    augment: bool = opt(True, "clip-consistent augmentation at training (flip, rotation, colour, grayscale, erasing)")
    train_bn: bool = opt(
        False, "update BatchNorm statistics of the trained stages (else kept as pretrained, see docs/finetune.md)"
    )
    workers: int = opt(2, "decoding worker processes (per process under torchrun; 0: decode in this one)", ge=0)
    resize: str = opt(
        "decoder",
        "decoder: the decoder's scaler resizes at decode (fast); torchvision: the weights' own resize",
        choices=RESIZES,
    )
    group_by_video: bool = opt(
        True, "batches of one video's segments, each video opened once per worker (off: uniform shuffle)"
    )
    init_head: str = opt("", "warm start: a train-head run (dir or name) on the same backbone's cache")
    train_split: str = opt("train", "annotation split (or CSV) to train on")
    val_split: str = opt("validation", "annotation split (or CSV) to evaluate on")
    limit: int = opt(0, "use only the first N segments of each split (0: all)", ge=0)
