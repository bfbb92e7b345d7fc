"""Training a head on cached features: plain functions, every step of the loop visible.

    main(cfg) -> load caches once -> standardise -> for each epoch:
        train_one_epoch (batches by tensor indexing) -> evaluate -> checkpoint -> log -> trackers

`fit` is the loop for either input source (cached features here, decoded video in
`ekx.finetune`); one epoch of optimisation (schedule, loss, steps) is `heads.epoch`.

Checkpoints hold only tensors and plain values, so they load with weights_only=True.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ekx import EkxError, epic
from ekx.cache import identity
from ekx.config import backbone_folder, default_cache
from ekx.heads import checkpoint, context, metrics, missing, runlock, runlog
from ekx.heads.checkpoint import build_model, check_compatible, load_checkpoint, restore_rng, save_checkpoint
from ekx.heads.config import TrainConfig, resumed_config
from ekx.heads.data import Split, draw, feature_stats, load_split, make_batch, validation_note
from ekx.heads.epoch import Batch, loss_fn, train_one_epoch
from ekx.heads.runlog import OBJECTIVE, append_line, best_row, improves, read_metrics, resume_log
from ekx.runtime import autocast, precision_note, resolve_device, resolve_precision
from ekx.track import features, require
from ekx.track.session import open_run, status_of


def cached_batches(split: Split, norm, cfg: TrainConfig, gen: torch.Generator, device) -> tuple[int, Iterator[Batch]]:
    """A training epoch over cached features: a permutation, views and jittered positions
    drawn at once, each batch one gather (see data.make_batch); the context head's windows."""
    if context.reads_context(cfg.head):
        return context.batches(split, norm, cfg, gen, device)
    t_frames = cfg.frames or split.k
    perm = split.rows[torch.randperm(len(split.rows), generator=gen)]
    views, pos = draw(split, len(perm), t_frames, True, gen)
    steps = math.ceil(len(perm) / cfg.batch_size)

    def batches():
        for step in range(steps):
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            idx = perm[sl]
            yield (
                make_batch(split, idx, views[sl], pos[sl], norm[0], norm[1], device),
                split.verbs[idx].to(device),
                split.nouns[idx].to(device),
            )

    return steps, batches()


@torch.no_grad()
def predict_inputs(model, inputs: Iterable[torch.Tensor], device, precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Verb and noun logits (float32, on the CPU) for a stream of input batches."""
    model.eval()
    verb, noun = [], []
    for x in inputs:
        with autocast(device, precision):
            out = model(x)
        verb.append(out["verb"].float().cpu())
        noun.append(out["noun"].float().cpu())
    return torch.cat(verb), torch.cat(noun)


def predict(model, split: Split, norm, cfg: TrainConfig, device, precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every done row of a cache: view 0, T uniform positions."""
    t_frames = cfg.frames or split.k
    views, pos = draw(split, cfg.eval_batch_size, t_frames, False, None)

    def inputs():
        for i in range(0, len(split.rows), cfg.eval_batch_size):
            idx = split.rows[i : i + cfg.eval_batch_size]
            yield make_batch(split, idx, views[: len(idx)], pos[: len(idx)], norm[0], norm[1], device)

    windows = context.reads_context(cfg.head)
    return predict_inputs(
        model, context.eval_inputs(split, norm, cfg, device) if windows else inputs(), device, precision
    )


def score(
    verb: torch.Tensor,
    noun: torch.Tensor,
    yv: torch.Tensor,
    yn: torch.Tensor,
    tails=None,
    unseen_mask: torch.Tensor | None = None,
    smoothing: float = 0.0,
    present: torch.Tensor | None = None,
) -> dict:
    """Validation figures; ``val_loss`` is the training loss (its label smoothing too), so both
    curves measure the same thing. ``present`` [N] bool: rows with logits (not a failed or pending
    cache row, an undecodable video); the others count as wrong in every accuracy (heads.missing),
    ``val_missing`` says how many, and ``val_loss`` is over the present rows."""
    if present is not None and not bool(present.all()):
        verb, noun = verb[present], noun[present]
    else:
        present = torch.ones(len(yv), dtype=torch.bool)
    result = {"val_loss": float(loss_fn({"verb": verb, "noun": noun}, yv[present], yn[present], smoothing))}
    tail_verbs, tail_nouns = tails or (None, None)
    m = missing.compute(verb, noun, present, yv, yn, tail_verbs, tail_nouns, unseen=unseen_mask)
    lacking = int((~present).sum())
    return {**result, **{f"val_{k}": v for k, v in m.items()}, **({"val_missing": lacking} if lacking else {})}


# ---------------------------------------------------------------- the loop, for either input source


@dataclass
class Task:
    """What a run trains: the model and its two input sources. `train-head` builds one from
    cached tensors, `finetune` from decoded video; `fit` is the same loop for both."""

    model: torch.nn.Module
    epoch_batches: Callable[[int, torch.Generator], tuple[int, Iterable[Batch]]]  # (epoch, gen) -> steps, batches
    # (verb, noun[, present]) logits of the validation rows; None on ranks other than 0
    val_logits: Callable[[], tuple[torch.Tensor, ...] | None]
    val_labels: tuple[torch.Tensor, torch.Tensor]
    parts: Callable[[], dict]  # checkpoint contents besides optimizer, epoch, config, rng
    load: Callable[[dict], None]  # restore the model from a checkpoint of this task
    tails: tuple | None = None
    unseen_mask: torch.Tensor | None = None
    accumulate: int = 1
    rank0: bool = True  # only rank 0 of a distributed run writes checkpoints and logs
    initial_eval: bool = False  # log an epoch-0 evaluation (a warm start's starting point)
    notes: tuple[str, ...] = ()  # what the figures mean, kept in config.toml (validation rows counted wrong)
    tags: Callable[[], dict[str, str]] = dict  # what it trains on, for trackers (ekx.track): asked only by them
    kind: str = "train-head"


def fit(
    cfg: TrainConfig,
    run_dir: Path,
    task: Task,
    opt,
    device,
    precision: str,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    barrier: Callable[[], None] = lambda: None,
    objective: str = OBJECTIVE,
    group_dir: Path | None = None,
) -> dict:
    """Epochs of train -> evaluate -> log -> checkpoint; resumes from last.pt when asked.
    best.pt is the best epoch by ``objective`` (a metrics column; *_loss is minimised), the
    one the run returns and a search selects on - never another epoch than theirs. Trackers
    (cfg.track, ekx.track) hear each epoch once it is on disk; ``group_dir``: a sweep's."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log = run_dir / "metrics.jsonl"
    start, best = 0, None  # best: the objective's best value so far (None: no epoch yet)
    if task.rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "last.pt").is_file():
        ckpt = load_checkpoint(run_dir / "last.pt")
        task.load(ckpt)
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], gen)
        start, best = ckpt["epoch"], ckpt["best"]
        if ckpt.get("objective", OBJECTIVE) != objective:  # best.pt was chosen on another column
            best = best_row([r for r in read_metrics(run_dir) if 0 < r["epoch"] <= start], objective).get(objective)
        if task.rank0:
            resume_log(log, start, ckpt.get("row"))
    elif task.rank0:
        runlog.write_atomic(log, "")
    if task.rank0:
        runlog.write_config(run_dir, cfg, task.notes)

    def parts() -> dict:
        return {**task.parts(), "scaler": scaler.state_dict()}

    def evaluation() -> dict | None:
        logits = task.val_logits()
        if logits is None:
            return None
        verb, noun, *present = logits  # decoded video adds which rows decoded
        return score(verb, noun, *task.val_labels, task.tails, task.unseen_mask, cfg.label_smoothing, *present)

    tracker = open_run(cfg.track, asdict(cfg), run_dir, start, task.tags, group_dir, task.kind, task.rank0)
    try:
        if task.initial_eval and start == 0:
            t0 = time.perf_counter()
            val_m = evaluation()
            if task.rank0:
                assert val_m is not None  # rank 0 always evaluates
                row = {"epoch": 0, **val_m, "lr": 0.0, "seconds": time.perf_counter() - t0}
                append_line(log, json.dumps(row))
                tracker.epoch(row)
                if on_epoch:
                    on_epoch(row)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            steps, batches = task.epoch_batches(epoch, gen)
            model, trace = task.model, tracker.trace  # trace: each step's loss and lr, for the trackers
            train_m = train_one_epoch(
                model, opt, batches, steps, cfg, epoch, device, precision, on_step, task.accumulate, scaler, trace
            )
            val_m = evaluation()
            if task.rank0:
                assert val_m is not None
                row = {
                    "epoch": epoch + 1,
                    **train_m,
                    **val_m,
                    "gap": metrics.overfitting_gap(train_m["train_action_top1"], val_m["val_action_top1"]),
                    "lr": opt.param_groups[0]["lr"],  # the lr of the epoch's last step, not the next epoch's
                    "seconds": time.perf_counter() - t0,
                }
                # a checkpoint and its metrics row, one atomic step; the objective that chose best.pt
                saved = {**parts(), "row": json.dumps(row), "objective": objective}
                if objective not in row:
                    raise EkxError(f"objective {objective!r} is not a column of {log}; e.g. {OBJECTIVE}, val_loss")
                value = float(row[objective])
                if best is None or improves(objective, value, best):
                    best = value
                    save_checkpoint(run_dir / "best.pt", saved, opt, cfg, epoch + 1, best, gen, resumable=False)
                save_checkpoint(run_dir / "last.pt", saved, opt, cfg, epoch + 1, best, gen)
                append_line(log, json.dumps(row))
                tracker.epoch(row)  # before on_epoch, which may stop the run (a pruned trial)
                if on_epoch:
                    on_epoch(row)
            barrier()  # other ranks wait for the checkpoint before the next epoch
        if not task.rank0:
            return {}
        rows = [r for r in read_metrics(run_dir) if r["epoch"] > 0]
        best_of_run = best_row(rows, objective)  # the epoch best.pt was saved at
        runlog.plot_curves(run_dir, rows, runlog.curves_title(cfg, run_dir), best_of_run.get("epoch"))
    except BaseException as e:  # a pruned, failed or interrupted run says so to its trackers
        tracker.finish(status_of(e))
        raise
    tracker.finish("finished", best_of_run, upto=rows[-1]["epoch"] if rows else 0)
    return best_of_run


# ---------------------------------------------------------------- cached features


@dataclass
class Loaded:
    """Caches loaded once per process (a sweep shares them across configurations)."""

    train: Split
    val: Split
    norm: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    tails: tuple | None = None
    unseen: set | None = None
    val_note: str | None = None  # validation rows without features, counted wrong (heads.missing)


def load_data(
    train_path: Path, val_path: Path, device_name: str, tails=None, unseen=None, allow_missing: bool = False
) -> Loaded:
    """Both caches, checked to belong together. A validation cache with failed or pending rows
    is refused (before any training) unless ``allow_missing``: then its every row is scored,
    the missing ones wrong, as `ekx evaluate --allow-missing` scores them."""
    device = resolve_device(device_name)
    train = load_split(train_path, device)
    val = train if Path(val_path) == Path(train_path) else load_split(val_path, device)
    bad = identity.mismatch(train.identity(), val.identity(), ("train cache", "validation cache"))
    if bad:
        raise EkxError(
            f"{train_path} and {val_path} hold features that mean different things ({identity.describe(bad)}); "
            "extract both splits with the same options"
        )
    if not train.labelled or not val.labelled:
        raise EkxError("training needs labelled train and validation caches (the test split has no labels)")
    note = validation_note(val, allow_missing, train)
    mean, std = feature_stats(train)
    return Loaded(train, val, (mean.to(device), std.to(device)), device, tails, unseen, note)


def cached_task(cfg: TrainConfig, data: Loaded, precision: str) -> Task:
    model, head_kwargs = build_model(cfg, data.train)
    model.to(data.device)
    train, val, norm, device = data.train, data.val, data.norm, data.device
    # every validation row is scored: a failed or pending one (allowed by load_data) as wrong
    present = torch.zeros(len(val.narration_id), dtype=torch.bool)
    present[val.rows] = True
    unseen = None if data.unseen is None else torch.tensor([v.split("_")[0] in data.unseen for v in val.video_id])

    def parts() -> dict:
        return {
            "model": model.state_dict(),
            "head_kwargs": head_kwargs,
            "norm": {"mean": norm[0].cpu(), "std": norm[1].cpu()},
            "cache": train.identity(),
            "identity": "whole",  # "cache" is the whole identity (older checkpoints: a few keys)
            "classes": {
                "verb": list(train.attrs.get("verb_classes", [])),
                "noun": list(train.attrs.get("noun_classes", [])),
            },
            "extractor": train.extractor,
        }

    def load(ckpt: dict) -> None:
        check_compatible(ckpt, train, "the checkpoint being resumed")
        model.load_state_dict(ckpt["model"])

    def val_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of every row ([N, C], as decoded video gives them; zeros where ``present``
        is False - score() drops those rows and counts them wrong)."""
        verb, noun = predict(model, val, norm, cfg, device, precision)
        if len(verb) == len(present):
            return verb, noun, present
        all_verb, all_noun = verb.new_zeros(len(present), verb.shape[1]), noun.new_zeros(len(present), noun.shape[1])
        all_verb[present], all_noun[present] = verb, noun  # val.rows ascending, as present's True entries
        return all_verb, all_noun, present

    return Task(
        model,
        lambda epoch, gen: cached_batches(train, norm, cfg, gen, device),
        val_logits,
        (val.verbs, val.nouns),
        parts,
        load,
        data.tails,
        unseen,
        notes=tuple(n for n in (data.val_note, checkpoint.features_note(cfg, train)) if n),
        tags=lambda: features.tags(train),
    )


def run(
    cfg: TrainConfig,
    run_dir: Path,
    data: Loaded,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    objective: str = OBJECTIVE,
    group_dir: Path | None = None,
) -> dict:
    """Train one head on cached features; returns the best epoch's metrics by ``objective``
    (best.pt's epoch). A resumed run keeps its own configuration (``cfg`` may only extend
    epochs, see resume_config)."""
    if resume and (run_dir / "last.pt").is_file():
        cfg = resume_config(run_dir, cfg, None)
    precision = resolve_precision(cfg.precision, data.device)
    task = cached_task(cfg, data, precision)
    opt = torch.optim.AdamW(task.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    args = (cfg, run_dir, task, opt, data.device, precision, resume, on_epoch, on_step)
    return fit(*args, objective=objective, group_dir=group_dir)


# ---------------------------------------------------------------- entry point


def resume_config(run_dir: Path, cfg: TrainConfig, given: set[str] | None):
    """The configuration of the run in ``run_dir`` (its last.pt's), with the epochs of ``cfg``
    when given; any other key of ``given`` (None: all) that differs is refused."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    return resumed_config(ckpt["config"], cfg, given, int(ckpt["epoch"]), str(run_dir / "last.pt"))


def paths(cfg: TrainConfig, features_root: Path, runs_root: Path) -> tuple[Path, Path, Path]:
    train = Path(cfg.train_features or default_cache(features_root, cfg.backbone, "train"))
    val = Path(cfg.val_features or default_cache(features_root, cfg.backbone, "validation"))
    name = cfg.name or f"{cfg.head}-{backbone_folder(cfg.backbone)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train, val, runs_root / name


def main(
    cfg: TrainConfig,
    features_root: Path,
    runs_root: Path,
    annotations: Path | None = None,
    resume: bool = False,
    on_epoch=None,
    on_step=None,
    given: set[str] | None = None,
    warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
    allow_missing: bool = False,
    info: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> tuple[Path, dict]:
    """`ekx train-head`: resolve paths, load the caches once, train, return (run dir, best row).
    ``given``: the keys of ``cfg`` the user set (None: all); on resume only those are
    compared with the run's configuration, the rest comes from the run. ``allow_missing``:
    see load_data."""
    train_path, val_path, run_dir = paths(cfg, features_root, runs_root)
    if resume and not cfg.name:
        raise EkxError("--resume needs --name of the run to continue")
    if (run_dir / "metrics.jsonl").is_file() and not (run_dir / "last.pt").is_file():
        # killed before its first checkpoint: nothing to continue, nothing worth keeping
        warn(f"{run_dir} has no checkpoint (stopped before its first epoch ended): starting it afresh")
        resume = False
    elif resume:
        if not (run_dir / "last.pt").is_file():
            raise EkxError(f"{run_dir}/last.pt not found: nothing to resume")
        cfg = resume_config(run_dir, cfg, given)
        train_path, val_path, run_dir = paths(cfg, features_root, runs_root)
    elif (run_dir / "metrics.jsonl").is_file():
        raise EkxError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    cfg = replace(cfg, train_features=str(train_path), val_features=str(val_path), name=run_dir.name)
    require(cfg.track)  # a tracker asked for (or the resumed run's) and not installed: before any work
    tails, unseen = epic.subsets(annotations, "validation")
    data = load_data(train_path, val_path, cfg.device, tails, unseen, allow_missing)
    if data.val_note:
        warn(data.val_note)
    if context.reads_context(cfg.head):  # refused before the run directory is made
        context.check(data.train, cfg.head)
    if note := precision_note(cfg.precision, data.device, resolve_precision(cfg.precision, data.device)):
        info(note)  # a choice, said once; not a warning
    # never two trainers on one run; while held, `ekx compare` shows the run as running
    with runlock.claim_or_refuse(run_dir, run_dir.parent / ".claim.lock"):
        best = run(cfg, run_dir, data, resume, on_epoch, on_step)
    return run_dir, best
