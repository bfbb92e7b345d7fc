"""FinetuneConfig: train-head's hyperparameters plus the backbone's. Torch-free, so the
CLI builds its flags without importing the fine-tuner."""

from __future__ import annotations

from dataclasses import dataclass

from ekx.heads.config import TrainConfig, opt


@dataclass
class FinetuneConfig(TrainConfig):
    """train-head's hyperparameters (defaults: the seed's fine-tuning values) plus the backbone's."""

    backbone: str = opt("resnet50", "backbone to fine-tune: resnet50, efficientnet_b3, r2plus1d_18")
    name: str = opt("", "run directory name under runs/ (default finetune-<head>-<backbone>-<time>)")
    epochs: int = opt(10, "epochs")
    batch_size: int = opt(8, "segments per step and process (x --accumulate for the optimizer)")
    lr: float = opt(5e-5, "peak learning rate (AdamW; seed phase 2 fine-tuning: 5e-5)")
    frames: int = opt(0, "frames T decoded per segment (0: the --init-head run's, else 16)")
    weights: str = opt("DEFAULT", "backbone weights without --init-head: DEFAULT, a torchvision name, a path, none")
    freeze_blocks: int = opt(2, "frozen stages after the stem (seed: the first 2 blocks); -1: nothing frozen")
    accumulate: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    augment: bool = opt(
        True, "the seed's clip-consistent augmentation at training (flip, rotation, colour, grayscale, erasing)"
    )
    train_bn: bool = opt(False, "update BatchNorm statistics of the trained stages (default: frozen, see README)")
    workers: int = opt(2, "decoding worker processes (per process under torchrun)")
    resize: str = opt(
        "decoder", "decoder: the decoder's scaler resizes at decode (fast); torchvision: the weights' own resize"
    )
    group_by_video: bool = opt(
        True, "batches of one video's segments, each video opened once per worker (off: uniform shuffle)"
    )
    init_head: str = opt("", "warm start: a train-head run (dir or name) on the same backbone's cache")
    train_split: str = opt("train", "annotation split (or CSV) to train on")
    val_split: str = opt("validation", "annotation split (or CSV) to evaluate on")
    limit: int = opt(0, "use only the first N segments of each split (0: all)")
