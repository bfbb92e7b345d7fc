"""The slow path's run: a `train.Task` whose batches come from decoded video, `main`
(also one rank under torchrun) and `evaluate_video`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ekx import EkxError, epic
from ekx.cache import identity
from ekx.extract import backbones, sources
from ekx.extract.inputs import calibration_plan
from ekx.extract.pipeline import ExtractConfig, worker_init
from ekx.finetune.clips import Clips, Dist, VideoChunks, as_list, clip_augmentation, clip_inputs, init_distributed
from ekx.finetune.config import FinetuneConfig
from ekx.finetune.model import Start, build_model, cold_start, start_from_checkpoint, warm_start
from ekx.heads import checkpoint as ck
from ekx.heads import missing
from ekx.heads import train as tr
from ekx.prepare import read_manifest
from ekx.runtime import autocast, resolve_device, resolve_precision
from ekx.track import require


def _segments(ann: epic.Annotations, split: str, limit: int) -> list[epic.Segment]:
    segs = ann.segments(split)
    return segs[:limit] if limit else segs


def video_logits(
    model: nn.Module,
    data: Clips,
    classes: tuple[int, int],
    device,
    precision,
    d: Dist,
    batch: int,
    workers: int,
    on_error: Callable[[str], None] = lambda m: None,
):
    """(verb, noun, present) for every segment of ``data`` (clean preprocessing), each rank a
    share; rank 0 gathers them in order (others get None). An undecodable segment has zero
    logits and present False: the metrics count it as wrong (heads.missing)."""
    # in video order: a worker's reader of a video serves all its segments (Clips keeps it open)
    order = sorted(range(len(data)), key=lambda i: (data.segments[i].video_id, i))
    mine = order[d.rank :: d.world]
    loader = DataLoader(
        torch.utils.data.Subset(data, mine),
        batch_size=batch,
        num_workers=workers,
        collate_fn=as_list,
        worker_init_fn=worker_init if workers else None,
    )
    core: nn.Module = getattr(model, "module", model)
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
    part = (
        idx,
        torch.cat(verb) if verb else torch.zeros(0, classes[0]),
        torch.cat(noun) if noun else torch.zeros(0, classes[1]),
    )
    parts: list[Any] = [part]
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, part)
    if not d.rank0:
        return None
    all_v, all_n = torch.zeros(len(data), classes[0]), torch.zeros(len(data), classes[1])
    present = torch.zeros(len(data), dtype=torch.bool)
    for ids, pv, pn in parts:
        if ids:
            all_v[ids], all_n[ids] = pv, pn
            present[ids] = True
    return all_v, all_n, present


def _labels(segments: list[epic.Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([s.verb_class for s in segments], dtype=torch.long),
        torch.tensor([s.noun_class for s in segments], dtype=torch.long),
    )


def _unseen_mask(segments: list[epic.Segment], unseen: set | None) -> torch.Tensor | None:
    return torch.tensor([s.participant_id in unseen for s in segments]) if unseen is not None else None


def finetune_task(
    cfg: FinetuneConfig,
    d: Dist,
    device,
    precision: str,
    start: Start,
    train_data: Clips,
    val_data: Clips,
    tails,
    unseen: set | None,
    warn: Callable[[str], None],
) -> tr.Task:
    bb = backbones.with_weights(backbones.get(cfg.backbone), start.weights)
    model = build_model(start, cfg, device)
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    augment = clip_augmentation(bb.preprocess) if cfg.augment else None
    sampler: VideoChunks | DistributedSampler = (
        VideoChunks([s.video_id for s in train_data.segments], cfg.batch_size, d.world, d.rank, cfg.seed)
        if cfg.group_by_video
        else DistributedSampler(train_data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    )
    loader = DataLoader(
        train_data,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=as_list,
        worker_init_fn=worker_init if cfg.workers else None,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None,
        pin_memory=device.type == "cuda",
    )
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
                    raise EkxError(
                        "the first batch of segments could not be decoded; check the videos with "
                        "`ekx extract` (it lists failures)"
                    )
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
        return {
            "model": model.head.state_dict(),
            "backbone": model.backbone.state_dict(),
            "head_kwargs": start.head_kwargs,
            "norm": {"mean": start.mean.cpu(), "std": start.std.cpu()},
            "cache": {
                "backbone": bb.name,
                "weights": "finetuned",
                "frames_per_segment": start.frames,
                "feature_dim": bb.dim,
                "num_verbs": classes[0],
                "num_nouns": classes[1],
            },
            "classes": {"verb": start.verbs, "noun": start.nouns},
            "extractor": {
                "backbone": bb.name,
                "weights": "finetuned",
                "preprocess_weights": start.weights,  # fine-tuned from these: their transforms apply
                "weights_path": "",
                "seed": cfg.seed,
                "frames": start.frames,
                "bn_state": {},
            },
            "started_from": start.source,
        }

    def load(ckpt: dict) -> None:
        model.head.load_state_dict(ckpt["model"])
        model.backbone.load_state_dict(ckpt["backbone"])
        model.mean.copy_(ckpt["norm"]["mean"])
        model.std.copy_(ckpt["norm"]["std"])

    return tr.Task(
        net,
        epoch_batches,
        val_logits,
        _labels(val_data.segments),
        parts,
        load,
        tails,
        _unseen_mask(val_data.segments, unseen),
        cfg.accumulate,
        d.rank0,
        initial_eval=bool(cfg.init_head),
        kind="finetune",  # what trackers are told (ekx.track): the backbone it fine-tunes
        tags=lambda: {
            "features.backbone": cfg.backbone,
            "features.weights": str(start.weights),
            "features.store": "decoded video",
        },
    )


def _run_name(cfg: FinetuneConfig, d: Dist) -> str:
    import time

    names = [cfg.name or f"finetune-{cfg.head}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if d.world > 1:  # every rank writes into rank 0's directory
        dist.broadcast_object_list(names, src=0)
    return names[0]


def main(
    cfg: FinetuneConfig,
    annotations: Path,
    videos: Path,
    runs_root: Path,
    resume: bool = False,
    on_epoch=None,
    on_step=None,
    warn: Callable[[str], None] = print,
    given: set[str] | None = None,
) -> tuple[Path, dict]:
    """`ekx finetune` (also one rank of `torchrun ... -m ekx finetune`). ``given``: the keys
    of ``cfg`` the user set (None: all); a resumed run takes the rest from its checkpoint."""
    from ekx.predict import resolve_run

    d, device = init_distributed(cfg.device)
    try:
        require(cfg.track)  # a tracker asked for and not installed: said before any work
        if cfg.accumulate < 1 or cfg.batch_size < 1:
            raise EkxError("--accumulate and --batch-size must be >= 1")
        run_dir = Path(runs_root) / _run_name(cfg, d)
        if resume and not (run_dir / "last.pt").is_file():
            raise EkxError(f"{run_dir}/last.pt not found: nothing to resume (pass --name of the run)")
        if resume:  # the run's own hyperparameters; flags may only extend --epochs
            cfg = tr.resume_config(run_dir, cfg, given)
        precision = resolve_precision(cfg.precision, device)
        if not resume and (run_dir / "metrics.jsonl").is_file():
            raise EkxError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
        ann = epic.Annotations(annotations)
        train_segs, val_segs = _segments(ann, cfg.train_split, cfg.limit), _segments(ann, cfg.val_split, cfg.limit)
        if any(s.verb_class < 0 for s in train_segs + val_segs):
            raise EkxError("fine-tuning needs labelled train and validation splits (the test split has no labels)")
        calib = calibration_plan(ann, train_segs, ExtractConfig()) if not (cfg.init_head or resume) else []
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
            if start.resize != cfg.resize:  # the head learnt features of frames resized the cache's way
                raise EkxError(
                    f"--init-head {cfg.init_head}: its cache was extracted with --resize {start.resize}; "
                    f"pass --resize {start.resize} (this run asked for {cfg.resize})"
                )
            check_input(cfg, start, videos)
        else:
            start = cold_start(cfg, ann, train_segs, paths, device)
        cfg = replace(cfg, frames=start.frames, name=run_dir.name)
        bb = backbones.with_weights(backbones.get(cfg.backbone), start.weights)
        train_data = Clips(train_segs, paths, start.frames, bb, resize=cfg.resize)
        val_data = Clips(val_segs, paths, start.frames, bb, resize=cfg.resize)
        tails, unseen = epic.subsets(annotations, cfg.val_split)
        task = finetune_task(
            cfg, d, device, precision, start, train_data, val_data, tails, unseen, warn if d.rank0 else (lambda m: None)
        )
        opt = torch.optim.AdamW(
            [p for p in task.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        best = tr.fit(
            cfg,
            run_dir,
            task,
            opt,
            device,
            precision,
            resume,
            on_epoch if d.rank0 else None,
            on_step if d.rank0 else None,
            barrier=d.barrier,
        )
        return run_dir, best
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_input(cfg: FinetuneConfig, start: Start, videos: Path) -> None:
    """A warm-started head learnt features of frames read, resized and preprocessed its
    cache's way: refuse this run's input where it differs in any field of the identity
    that says how frames become inputs (`identity.input_attrs`), naming each."""
    bb = backbones.with_weights(backbones.get(cfg.backbone), start.weights)
    prepared = read_manifest(videos)
    mine = identity.input_attrs(
        bb,
        sources.get("decord").identity("cpu", cfg.resize),  # what `Clips` reads with
        prepared.describe() if prepared else identity.ORIGINAL_VIDEOS,
        identity.decode_size_of(bb, [], cfg.resize),
    )
    keys = [k for k in mine if k not in identity.PROVENANCE and (start.whole or k in start.cache)]
    bad = identity.mismatch(start.cache, mine, ("its cache", "this run"), keys)
    if bad:
        raise EkxError(
            f"--init-head {cfg.init_head}: the head learnt features of frames made another way than this run "
            f"makes them ({identity.describe(bad)}); fine-tune from a run whose cache was extracted from "
            "these videos with the default source, or extract one"
        )


def evaluate_video(
    run_dir: Path,
    annotations: Path,
    videos: Path,
    split: str = "validation",
    device_name: str = "auto",
    checkpoint: str = "best.pt",
    workers: int = 2,
    allow_missing: bool = False,
) -> dict:
    """`ekx evaluate` of a fine-tuned run: decode the split's segments, run backbone + head.
    The cache's policy: a segment that does not decode (or whose video is not found) is
    refused, or with ``allow_missing`` counted as wrong in every metric."""

    ckpt = ck.load_checkpoint(Path(run_dir) / checkpoint)
    if "backbone" not in ckpt:
        raise EkxError(f"{run_dir}: not a fine-tuned run (evaluate it on a cache with --features)")
    cfg = FinetuneConfig.from_dict(
        {k: v for k, v in ckpt["config"].items() if k in FinetuneConfig.keys()}, str(Path(run_dir) / checkpoint)
    )
    device = resolve_device(device_name)
    start = start_from_checkpoint(cfg, ckpt, Path(run_dir))
    bb = backbones.with_weights(backbones.get(cfg.backbone), start.weights)
    model = build_model(start, replace(cfg, freeze_blocks=-1), device)
    ann = epic.Annotations(annotations)
    segs = ann.segments(split)
    paths, _ = epic.locate_videos(segs, videos)
    errors: list[str] = []
    data = Clips(segs, paths, start.frames, bb, resize=cfg.resize)
    classes = (ckpt["head_kwargs"]["num_verbs"], ckpt["head_kwargs"]["num_nouns"])
    verb, noun, present = video_logits(
        model,
        data,
        classes,
        device,
        resolve_precision(cfg.precision, device),
        Dist(),
        cfg.batch_size,
        workers,
        errors.append,
    )
    result = {
        "run": str(run_dir),
        "features": f"decoded video ({split})",
        "segments": len(segs),
        "epoch": ckpt["epoch"],
        "verb": verb,
        "noun": noun,
        "errors": errors,
        "missing_ids": [s.narration_id for s, ok in zip(segs, present.tolist(), strict=True) if not ok],
        "split": split,
        "narration_ids": [s.narration_id for s, ok in zip(segs, present.tolist(), strict=True) if ok],
    }
    result["verb"], result["noun"] = verb[present], noun[present]  # rows of narration_ids
    yv, yn = _labels(segs)
    if len(segs) and bool((yv >= 0).all()):
        missing.refuse_unless_allowed(
            f"{run_dir} on {split} videos under {videos}",
            result["missing_ids"],
            len(segs),
            allow_missing,
            f"Undecodable: {'; '.join(errors[:2]) or 'see the warnings'}. Check those videos",
        )
        tails, unseen = epic.subsets(annotations, split)
        tail_verbs, tail_nouns = tails or (None, None)
        result["metrics"] = missing.compute(
            verb[present], noun[present], present, yv, yn, tail_verbs, tail_nouns, unseen=_unseen_mask(segs, unseen)
        )
    return result
