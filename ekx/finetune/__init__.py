"""`ekx finetune`: backbone + head trained end to end on decoded video - the slow path.

One loop, two input sources: this package only builds a `train.Task` whose batches come
from video (stage 1's sampling and decoding, in DataLoader workers) instead of the
cache; `train.fit` runs it exactly as it runs `train-head` (schedule, clipping, mixed
precision, checkpoints, resume, metrics). Under `torchrun` the model is wrapped in
DistributedDataParallel, each rank decodes its part of every epoch, and rank 0 alone
writes the run directory.

Augmentation (the seed's phase 2) runs on the device with torchvision.transforms.v2 on
a whole clip [T, 3, H, W] at once, so every frame of a clip gets the same flip, angle,
colour jitter, grayscale and erased box - per-frame jitter would destroy the temporal
signal the heads learn from - while every clip draws its own.

Modules: `config` (FinetuneConfig, torch-free for the CLI), `clips` (distributed set-up,
decoded clips and their augmentation), `model` (backbone + head and where they start),
`run` (the task for `train.fit`, `main`, `evaluate_video`).
"""
