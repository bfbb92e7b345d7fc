"""One epoch of optimisation, for either input source: the learning-rate schedule, the
loss, and `train_one_epoch` (accumulation, mixed precision, clipping, host syncs)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ekx import EkxError
from ekx.heads.config import TrainConfig
from ekx.runtime import autocast


class NonFiniteLoss(EkxError):
    pass


# ---------------------------------------------------------------- schedule


def lr_at(cfg: TrainConfig, t: float) -> float:
    """Linear warm-up, then cosine annealing with warm restarts (SGDR, the formula of torch's
    CosineAnnealingWarmRestarts) - a pure function of progress t in epochs, so resume is exact."""
    if t < cfg.warmup_epochs:
        return cfg.lr * max(t / cfg.warmup_epochs, 1e-3)
    t -= cfg.warmup_epochs
    t0, mult = max(cfg.restart_epochs, 1), max(cfg.restart_mult, 1)
    if mult == 1:
        cycle, length = t % t0, t0
    else:
        n = int(math.log(t / t0 * (mult - 1) + 1, mult))
        cycle, length = t - t0 * (mult**n - 1) / (mult - 1), t0 * mult**n
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * (1 + math.cos(math.pi * cycle / length)) / 2


# ---------------------------------------------------------------- steps


def loss_fn(out: dict, verbs: torch.Tensor, nouns: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(out["verb"].float(), verbs, label_smoothing=smoothing) + F.cross_entropy(
        out["noun"].float(), nouns, label_smoothing=smoothing
    )


SYNC_EVERY = 20  # steps between host syncs (progress, NaN check): no sync per step on a GPU

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs on the device, verbs, nouns


def train_one_epoch(
    model,
    opt,
    batches: Iterable[Batch],
    steps: int,
    cfg: TrainConfig,
    epoch: int,
    device,
    precision,
    on_step: Callable[[int, int, float], None] | None = None,
    accumulate: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    trace: dict | None = None,
) -> dict:
    """One epoch over ``steps`` batches from either input source (cached features or decoded
    video): lr per optimizer step, gradient accumulation (DDP syncs only on the last
    micro-batch), mixed precision with a gradient scaler for fp16, clipping. ``trace`` (the
    trackers', ekx.track): filled with each step's loss and lr, the segments and the seconds."""
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    # running sums stay on the device; the host reads them every SYNC_EVERY steps
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, verb, noun, action correct
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    seen, t0 = 0, time.perf_counter()
    # each step's loss stays on the device until the epoch ends: no host sync per step
    losses = torch.zeros(steps, dtype=torch.float32, device=device) if trace is not None else None
    lrs: list[float] = []
    for step, (x, yv, yn) in enumerate(batches):
        micro = step % accumulate
        last = micro == accumulate - 1 or step + 1 == steps
        n_micro = min(accumulate, steps - (step - micro))  # the last group may be shorter
        if micro == 0:
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch + step / steps)
            opt.zero_grad(set_to_none=True)
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, precision):
                out = model(x)
            loss = loss_fn(out, yv, yn, cfg.label_smoothing)
            scaler.scale(loss / n_micro).backward()
        if last:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        with torch.no_grad():
            pv, pn = out["verb"].argmax(1) == yv, out["noun"].argmax(1) == yn
            sums += torch.stack([loss.detach().double() * len(yv), pv.sum(), pn.sum(), (pv & pn).sum()]).double()
            nonfinite |= ~torch.isfinite(loss.detach())
        if losses is not None and step < steps:
            losses[step] = loss.detach()
            lrs.append(opt.param_groups[0]["lr"])
        seen += len(yv)
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            if torch.distributed.is_initialized():  # every rank stops together, or none does
                flag = nonfinite.float()
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                nonfinite = flag > 0
            if bool(nonfinite):
                raise NonFiniteLoss(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1} (by step {step + 1}): run "
                    "stopped; the last good checkpoint (last.pt, best.pt) is kept - lower --lr or "
                    "check the features with `ekx cache verify`"
                )
            if on_step:
                on_step(step + 1, steps, float(sums[0]) / max(seen, 1))
    if torch.distributed.is_initialized():  # every rank saw its own share: log figures over all of them
        counts = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(counts)
        sums, seen = counts[:4], int(counts[4])
    total = sums.tolist()
    if losses is not None and trace is not None:
        trace.update(loss=losses[: len(lrs)].tolist(), lr=lrs, segments=seen, seconds=time.perf_counter() - t0)
    seen = max(seen, 1)
    return {
        "train_loss": total[0] / seen,
        **{f"train_{k}_top1": 100 * v / seen for k, v in zip(("verb", "noun", "action"), total[1:], strict=False)},
    }
