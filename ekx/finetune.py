"""`ekx finetune`: backbone + head trained end to end on decoded video - the slow path.

One loop, two input sources: this module only builds a `train.Task` whose batches come
from video (stage 1's sampling and decoding, in DataLoader workers) instead of the
cache; `train.fit` runs it exactly as it runs `train-head` (schedule, clipping, mixed
precision, checkpoints, resume, metrics). Under `torchrun` the model is wrapped in
DistributedDataParallel, each rank decodes its part of every epoch, and rank 0 alone
writes the run directory.

Augmentation (the seed's phase 2) runs on the device with torchvision.transforms.v2 on
a whole clip [T, 3, H, W] at once, so every frame of a clip gets the same flip, angle,
colour jitter, grayscale and erased box - per-frame jitter would destroy the temporal
signal the heads learn from - while every clip draws its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from ekx import EkxError, epic, heads
from ekx.extract import backbones
from ekx.extract.pipeline import (ExtractConfig, _calibrate, _calibration_plan, _worker_init, autocast, resolve_device,
                                  resolve_precision)
from ekx.extract.video import Request, decode_video
from ekx.heads import train as tr
from ekx.heads.train import _opt


@dataclass
class FinetuneConfig(tr.TrainConfig):
    """train-head's hyperparameters (defaults: the seed's fine-tuning values) plus the backbone's."""

    backbone: str = _opt("resnet50", "backbone to fine-tune: resnet50, efficientnet_b3, r2plus1d_18")
    name: str = _opt("", "run directory name under runs/ (default finetune-<head>-<backbone>-<time>)")
    epochs: int = _opt(10, "epochs")
    batch_size: int = _opt(8, "segments per step and process (x --accumulate for the optimizer)")
    lr: float = _opt(5e-5, "peak learning rate (AdamW; seed phase 2 fine-tuning: 5e-5)")
    frames: int = _opt(0, "frames T decoded per segment (0: the --init-head run's, else 16)")
    weights: str = _opt("DEFAULT", "backbone weights without --init-head: DEFAULT, a torchvision name, a path, none")
    freeze_blocks: int = _opt(2, "frozen stages after the stem (seed: the first 2 blocks); -1: nothing frozen")
    accumulate: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    augment: bool = _opt(True, "the seed's clip-consistent augmentation at training (flip, rotation, colour, grayscale, erasing)")
    train_bn: bool = _opt(False, "update BatchNorm statistics of the trained stages (default: frozen, see README)")
    workers: int = _opt(2, "decoding worker processes (per process under torchrun)")
    init_head: str = _opt("", "warm start: a train-head run (dir or name) on the same backbone's cache")
    train_split: str = _opt("train", "annotation split (or CSV) to train on")
    val_split: str = _opt("validation", "annotation split (or CSV) to evaluate on")
    limit: int = _opt(0, "use only the first N segments of each split (0: all)")


# ---------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (nccl), or gloo on CPUs."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


# ---------------------------------------------------------------- data

class Clips(Dataset):
    """Segment i -> (i, uint8 frames [T * clip_len, H, W, 3] or None, error). Decoded with
    stage 1's sampling (centres of T equal parts) and its reader, at the preprocessing size."""

    def __init__(self, segments: list[epic.Segment], paths: dict[str, Path], frames: int, bb: backbones.Backbone):
        self.segments, self.paths, self.frames, self.backbone = segments, paths, frames, bb.name
        # plain values only: the dataset travels to worker processes
        self.clip_len, self.size_fn = bb.clip_len, bb.preprocess.decode_size

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, i: int):
        s = self.segments[i]
        if s.video_id not in self.paths:
            return i, None, f"video {s.video_id} not found"
        res = next(decode_video(self.paths[s.video_id], [Request(i, s.start, s.stop)], self.frames,
                                self.clip_len, self.size_fn))
        return i, res.frames, res.error


def _as_list(batch):
    return batch


def clip_augmentation(pre: backbones.Preprocess) -> v2.Compose:
    """The seed's phase-2 augmentation on one clip: geometry and colour drawn once per call."""
    return v2.Compose([
        v2.Resize(list(pre.resize_size), interpolation=v2.InterpolationMode(pre.interpolation), antialias=True),
        v2.CenterCrop(list(pre.crop_size)),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(15, interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
        v2.RandomGrayscale(0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(pre.mean), list(pre.std)),
        v2.RandomErasing(0.15),
    ])


def clip_inputs(frames: np.ndarray, t: int, bb: backbones.Backbone, device, augment: Callable | None) -> torch.Tensor:
    """uint8 [T * clip_len, H, W, 3] -> normalised [T, 3, h, w] (or [T, 3, clip_len, h, w]);
    ``augment`` (training) is called once for the whole clip, so its draws are shared."""
    x = torch.from_numpy(frames).to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = augment(x) if augment is not None else bb.preprocess(x)
    if bb.clip_len > 1:
        x = x.reshape(t, bb.clip_len, *x.shape[1:]).transpose(1, 2)
    return x


# ---------------------------------------------------------------- model

class VideoModel(nn.Module):
    """Backbone -> [B, T, D] features -> the cache's standardisation -> head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 frozen: list[nn.Module], train_bn: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        # plain lists: not registered twice. BatchNorm statistics stay fixed unless asked:
        # a batch holds B clips x T frames of the same few scenes, so its statistics are
        # poor estimates, and drifting ones shift every feature the (warm-started) head reads
        self.fixed = frozen + ([] if train_bn else [m for m in backbone.modules()
                                                    if isinstance(m, nn.modules.batchnorm._BatchNorm)])
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


def warm_start(cfg: FinetuneConfig, run: Path) -> Start:
    """From a train-head run: its head, its feature standardisation and the exact backbone
    its cache was extracted with (rebuilt from the checkpoint's extractor spec)."""
    return start_from_checkpoint(cfg, tr.load_checkpoint(run / "best.pt" if run.is_dir() else run), run)


def start_from_checkpoint(cfg: FinetuneConfig, ckpt: dict, run: Path) -> Start:
    spec = ckpt.get("extractor")
    if not spec:
        raise EkxError(f"--init-head {run}: the run does not record its backbone (trained by an older ekx)")
    if spec["backbone"] != cfg.backbone:
        raise EkxError(f"--init-head {run} was trained on {spec['backbone']} features; pass --backbone {spec['backbone']}")
    if ckpt["config"]["head"] != cfg.head:
        raise EkxError(f"--init-head {run} holds a {ckpt['config']['head']} head, not {cfg.head}")
    t = int(ckpt["head_kwargs"]["frames"])
    if cfg.frames and cfg.frames != t:
        raise EkxError(f"--frames {cfg.frames}: the head of {run} reads {t} frames; leave --frames at 0")
    backbone = backbones.run_backbone(ckpt)  # a fine-tuned run's own, or its cache's extractor
    kwargs = {**ckpt["head_kwargs"], "dropout": cfg.dropout, "drop_path": cfg.drop_path}
    head = heads.create(cfg.head, **kwargs)
    head.load_state_dict(ckpt["model"])
    return Start(backbone, head, kwargs, ckpt["norm"]["mean"], ckpt["norm"]["std"], ckpt["classes"]["verb"],
                 ckpt["classes"]["noun"], t, ckpt.get("started_from", f"init-head {run}"))


@torch.no_grad()
def cold_start(cfg: FinetuneConfig, ann: epic.Annotations, segments, paths, device) -> Start:
    """From --weights: a fresh head; BatchNorm calibrated on the data for random weights
    (as stage 1 does), feature standardisation measured on the first training segments."""
    bb = backbones.get(cfg.backbone)
    t = cfg.frames or 16
    backbone, weights_id = backbones.load_weights(bb, cfg.weights, cfg.seed)
    backbone.to(device)
    ecfg = ExtractConfig(backbone=cfg.backbone, frames=t, seed=cfg.seed)
    if weights_id == "none":  # the same calibration `ekx extract --weights none` does
        _calibrate(backbone, bb, ecfg, _calibration_plan(ann, segments, ecfg), paths, device)
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1  # calibration used a cumulative average; training uses the usual
    feats, clips = [], Clips(segments, paths, t, bb)
    for i in range(min(len(segments), 8)):
        _, frames, err = clips[i]
        if err is None:
            feats.append(backbone(clip_inputs(frames, t, bb, device, None)).float())
    if not feats:
        raise EkxError("none of the first training segments could be decoded")
    f = torch.cat(feats)
    verbs, nouns = ann.verbs(), ann.nouns()
    torch.manual_seed(cfg.seed)
    kwargs = {"dim": bb.dim, "num_verbs": len(verbs), "num_nouns": len(nouns), "frames": t,
              "dropout": cfg.dropout, "drop_path": cfg.drop_path}
    return Start(backbone.cpu(), heads.create(cfg.head, **kwargs), kwargs, f.mean(0).cpu(),
                 f.std(0).clamp_min(1e-6).cpu(), list(verbs.keys), list(nouns.keys), t, f"weights {weights_id}")


# ---------------------------------------------------------------- the task

def _segments(ann: epic.Annotations, split: str, limit: int) -> list[epic.Segment]:
    segs = ann.segments(split)
    return segs[:limit] if limit else segs


def video_logits(model: nn.Module, data: Clips, classes: tuple[int, int], device, precision, d: Dist,
                 batch: int, workers: int, on_error: Callable[[str], None] = lambda m: None):
    """Logits of every segment of ``data`` (clean preprocessing), each rank a share; rank 0
    gathers them in order (others get None). An undecodable segment scores uniform."""
    mine = list(range(d.rank, len(data), d.world))
    loader = DataLoader(torch.utils.data.Subset(data, mine), batch_size=batch, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=_worker_init if workers else None)
    core = model.module if hasattr(model, "module") else model
    core.eval()
    bb = backbones.get(data.backbone)
    idx, verb, noun = [], [], []
    with torch.no_grad():
        for items in loader:
            for i, _, err in items:
                if err is not None:
                    on_error(f"{data.segments[i].narration_id}: {err}")
            good = [(i, f) for i, f, err in items if err is None]
            if not good:
                continue
            x = torch.stack([clip_inputs(f, data.frames, bb, device, None) for _, f in good])
            with autocast(device, precision):
                out = core(x)
            idx += [i for i, _ in good]
            verb.append(out["verb"].float().cpu())
            noun.append(out["noun"].float().cpu())
    part = (idx, torch.cat(verb) if verb else torch.zeros(0, classes[0]),
            torch.cat(noun) if noun else torch.zeros(0, classes[1]))
    parts = [part]
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, part)
    if not d.rank0:
        return None
    all_v, all_n = torch.zeros(len(data), classes[0]), torch.zeros(len(data), classes[1])
    for ids, pv, pn in parts:
        if ids:
            all_v[ids], all_n[ids] = pv, pn
    return all_v, all_n


def _labels(segments: list[epic.Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([s.verb_class for s in segments], dtype=torch.long),
            torch.tensor([s.noun_class for s in segments], dtype=torch.long))


def _unseen_mask(segments: list[epic.Segment], unseen: set | None) -> torch.Tensor | None:
    return torch.tensor([s.participant_id in unseen for s in segments]) if unseen is not None else None


def build_model(start: Start, cfg: FinetuneConfig, device) -> VideoModel:
    bb = backbones.get(cfg.backbone)
    model = VideoModel(start.backbone, start.head, start.mean, start.std,
                       frozen_modules(bb, start.backbone, cfg.freeze_blocks), cfg.train_bn).to(device)
    fmt = torch.channels_last if bb.clip_len == 1 else torch.channels_last_3d
    model.backbone.to(memory_format=fmt)
    return model


def finetune_task(cfg: FinetuneConfig, d: Dist, device, precision: str, start: Start, train_data: Clips,
                  val_data: Clips, tails, unseen: set | None, warn: Callable[[str], None]) -> tr.Task:
    bb = backbones.get(cfg.backbone)
    model = build_model(start, cfg, device)
    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    augment = clip_augmentation(bb.preprocess) if cfg.augment else None
    sampler = DistributedSampler(train_data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=_as_list, worker_init_fn=_worker_init if cfg.workers else None,
                        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers else None,
                        pin_memory=device.type == "cuda")
    yv_all, yn_all = _labels(train_data.segments)
    classes = (start.head_kwargs["num_verbs"], start.head_kwargs["num_nouns"])

    def epoch_batches(epoch: int, gen) -> tuple[int, Iterator[tr.Batch]]:
        # the shuffle and every augmentation draw are functions of (seed, rank, epoch): a
        # resumed run continues exactly, and each rank draws its own augmentations
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed + 1000 * d.rank + 1_000_003 * epoch)

        def batches():
            last_good: list = []
            for items in loader:
                good = [(i, f) for i, f, err in items if err is None]
                for i, _, err in items:
                    if err is not None:
                        warn(f"skipped {train_data.segments[i].narration_id}: {err}")
                # every rank must take the same steps under DDP: an undecodable batch is
                # replaced by the last good one rather than skipped
                good = good or last_good
                if not good:
                    raise EkxError("the first batch of segments could not be decoded; check the videos with "
                                   "`ekx extract` (it lists failures)")
                last_good = good
                while len(good) < len(items):  # keep the batch size fixed
                    good = good + good[: len(items) - len(good)]
                ids = torch.tensor([i for i, _ in good])
                x = torch.stack([clip_inputs(f, train_data.frames, bb, device, augment) for _, f in good])
                yield x, yv_all[ids].to(device), yn_all[ids].to(device)
        return len(loader), batches()

    def val_logits():
        return video_logits(net, val_data, classes, device, precision, d, cfg.batch_size, cfg.workers, warn)

    def parts() -> dict:
        return {"model": model.head.state_dict(), "backbone": model.backbone.state_dict(),
                "head_kwargs": start.head_kwargs, "norm": {"mean": start.mean.cpu(), "std": start.std.cpu()},
                "cache": {"backbone": bb.name, "weights": "finetuned", "frames_per_segment": start.frames,
                          "feature_dim": bb.dim, "num_verbs": classes[0], "num_nouns": classes[1]},
                "classes": {"verb": start.verbs, "noun": start.nouns},
                "extractor": {"backbone": bb.name, "weights": "finetuned", "weights_path": "", "seed": cfg.seed,
                              "frames": start.frames, "bn_state": {}},
                "started_from": start.source}

    def load(ckpt: dict) -> None:
        model.head.load_state_dict(ckpt["model"])
        model.backbone.load_state_dict(ckpt["backbone"])
        model.mean.copy_(ckpt["norm"]["mean"])
        model.std.copy_(ckpt["norm"]["std"])

    return tr.Task(net, epoch_batches, val_logits, _labels(val_data.segments), parts, load, tails,
                   _unseen_mask(val_data.segments, unseen), cfg.accumulate, d.rank0,
                   initial_eval=bool(cfg.init_head))


def _run_name(cfg: FinetuneConfig, d: Dist) -> str:
    import time

    names = [cfg.name or f"finetune-{cfg.head}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if d.world > 1:  # every rank writes into rank 0's directory
        dist.broadcast_object_list(names, src=0)
    return names[0]


def main(cfg: FinetuneConfig, annotations: Path, videos: Path, runs_root: Path, resume: bool = False,
         on_epoch=None, on_step=None, warn: Callable[[str], None] = print) -> tuple[Path, dict]:
    """`ekx finetune` (also one rank of `torchrun ... -m ekx finetune`)."""
    from ekx.heads.evaluate import subsets
    from ekx.predict import resolve_run

    d, device = init_distributed(cfg.device)
    try:
        if cfg.accumulate < 1 or cfg.batch_size < 1:
            raise EkxError("--accumulate and --batch-size must be >= 1")
        precision = resolve_precision(cfg.precision, device)
        run_dir = Path(runs_root) / _run_name(cfg, d)
        if resume and not (run_dir / "last.pt").is_file():
            raise EkxError(f"{run_dir}/last.pt not found: nothing to resume (pass --name of the run)")
        if not resume and (run_dir / "metrics.jsonl").is_file():
            raise EkxError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
        ann = epic.Annotations(annotations)
        train_segs, val_segs = _segments(ann, cfg.train_split, cfg.limit), _segments(ann, cfg.val_split, cfg.limit)
        if any(s.verb_class < 0 for s in train_segs + val_segs):
            raise EkxError("fine-tuning needs labelled train and validation splits (the test split has no labels)")
        calib = _calibration_plan(ann, train_segs, ExtractConfig()) if not (cfg.init_head or resume) else []
        paths, missing = epic.locate_videos(train_segs + val_segs + calib, videos)
        missing = [v for v in missing if v in {s.video_id for s in train_segs + val_segs}]
        if missing and d.rank0:
            warn(epic.missing_videos_message(missing, len({s.video_id for s in train_segs + val_segs}), videos))
        train_segs = [s for s in train_segs if s.video_id in paths]
        if not train_segs:
            raise EkxError(f"no training segment has its video under {videos}")
        if resume:  # backbone, head and standardisation from the run itself
            start = warm_start(replace(cfg, frames=0), run_dir / "last.pt")
        elif cfg.init_head:
            start = warm_start(cfg, resolve_run(cfg.init_head, runs_root))
        else:
            start = cold_start(cfg, ann, train_segs, paths, device)
        cfg = replace(cfg, frames=start.frames, name=run_dir.name)
        bb = backbones.get(cfg.backbone)
        train_data, val_data = Clips(train_segs, paths, start.frames, bb), Clips(val_segs, paths, start.frames, bb)
        tails, unseen = subsets(annotations, cfg.val_split)
        task = finetune_task(cfg, d, device, precision, start, train_data, val_data, tails, unseen,
                             warn if d.rank0 else (lambda m: None))
        opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        best = tr.fit(cfg, run_dir, task, opt, device, precision, resume, on_epoch if d.rank0 else None,
                      on_step if d.rank0 else None, barrier=d.barrier)
        return run_dir, best
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def evaluate_video(run_dir: Path, annotations: Path, videos: Path, split: str = "validation",
                   device_name: str = "auto", checkpoint: str = "best.pt", workers: int = 2) -> dict:
    """`ekx evaluate` of a fine-tuned run: decode the split's segments, run backbone + head."""
    from ekx.heads import metrics
    from ekx.heads.evaluate import subsets

    ckpt = tr.load_checkpoint(Path(run_dir) / checkpoint)
    if "backbone" not in ckpt:
        raise EkxError(f"{run_dir}: not a fine-tuned run (evaluate it on a cache with --features)")
    cfg = FinetuneConfig.from_dict({k: v for k, v in ckpt["config"].items() if k in FinetuneConfig.keys()},
                                   str(Path(run_dir) / checkpoint))
    device = resolve_device(device_name)
    bb = backbones.get(cfg.backbone)
    start = start_from_checkpoint(cfg, ckpt, Path(run_dir))
    model = build_model(start, replace(cfg, freeze_blocks=-1), device)
    ann = epic.Annotations(annotations)
    segs = ann.segments(split)
    paths, _ = epic.locate_videos(segs, videos)
    errors: list[str] = []
    data = Clips(segs, paths, start.frames, bb)
    classes = (ckpt["head_kwargs"]["num_verbs"], ckpt["head_kwargs"]["num_nouns"])
    verb, noun = video_logits(model, data, classes, device, resolve_precision(cfg.precision, device), Dist(),
                              cfg.batch_size, workers, errors.append)
    result = {"run": str(run_dir), "features": f"decoded video ({split})", "segments": len(segs),
              "epoch": ckpt["epoch"], "verb": verb, "noun": noun, "errors": errors,
              "narration_ids": [s.narration_id for s in segs]}
    yv, yn = _labels(segs)
    if len(segs) and bool((yv >= 0).all()):
        tails, unseen = subsets(annotations, split)
        result["metrics"] = metrics.compute(verb, noun, yv, yn, *(tails or (None, None)),
                                            unseen=_unseen_mask(segs, unseen))
    return result
