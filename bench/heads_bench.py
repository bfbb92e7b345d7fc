"""Stage-2 data path and training throughput on a full-scale cache, side by side.

A random cache the size of EPIC-100 train (67,217 x 16 x 2048 float16, 4.1 GiB) is
written once to bench/out/full.h5. Then, in one run:

  (iii) time to open the cache and load it (one bulk read), and peak memory;
  (ii)  the data path alone - one pass of batches, no model - ekx (tensor indexing on
        the in-memory split) vs a naive per-item torch Dataset over h5py + DataLoader;
  (i)   training time of the lstm and transformer heads fed by ekx vs the same model
        fed from a pre-built in-memory tensor (pure compute), over the same steps.

Targets: ekx <= 1.1 x pure compute; ekx data path >= 20 x the naive one; peak memory
<= cache size + 2 GiB. Run: `python bench/heads_bench.py` (~10 minutes here; the
transformer and the naive loader are timed on a slice of the epoch and extrapolated);
`--precision fp32,bf16` times each head in both precisions (rows side by side).

`--tracking` instead times the overhead of experiment trackers (ekx.track) on stage-2 epochs:
whole runs of `fit` (train, evaluate, checkpoint, metrics row, trackers) on a cache of
`--tracking-segments` segments of EPIC's shape (16 x 2048), untracked and with each tracker,
alternating in rounds; each epoch timed from one epoch's end to the next (the first of a run
left out: warm-up), medians side by side, plus the seconds spent inside the trackers' calls and
each run's start and finish. Target: <= 3% per epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import resource
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ekx import runtime
from ekx.cache import store
from ekx.heads import checkpoint as ck
from ekx.heads import config as hc
from ekx.heads import epoch as ep
from ekx.heads import train as tr
from ekx.heads.data import draw, feature_stats, load_split, make_batch

OUT = Path(__file__).resolve().parent / "out"
N, K, D = 67_217, 16, 2048


class NaiveDataset(torch.utils.data.Dataset):
    """What a first script does: one h5py read per item."""

    def __init__(self, path: Path):
        self.path, self.f = path, None
        with h5py.File(path, "r") as f:
            self.n = f["features"].shape[0]
            self.verbs, self.nouns = f["verb_class"][...], f["noun_class"][...]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.f is None:
            self.f = h5py.File(self.path, "r")
        return torch.from_numpy(self.f["features"][i, 0].astype(np.float32)), int(self.verbs[i]), int(self.nouns[i])


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ekx_data_pass(split, norm, batch: int) -> float:
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()  # the epoch's draws are part of the data path
    perm = split.rows[torch.randperm(len(split.rows), generator=gen)]
    views, pos = draw(split, len(perm), K, True, gen)
    for i in range(0, len(perm), batch):
        make_batch(split, perm[i : i + batch], views[i : i + batch], pos[i : i + batch], *norm, torch.device("cpu"))
    return len(perm) / (time.perf_counter() - t0)


def naive_data_pass(path: Path, batch: int, items: int, workers: int) -> float:
    ds = torch.utils.data.Subset(NaiveDataset(path), torch.randperm(N)[:items].tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return items / (time.perf_counter() - t0)


def train_speed(head: str, data: tr.Loaded, samples: int, batch: int, want: str = "auto") -> tuple[float, float]:
    """(ekx samples/s, pure-compute samples/s) over the same number of steps, at --precision ``want``."""
    cfg = hc.TrainConfig(head=head, batch_size=batch, lr=1e-4, dropout=0.3, drop_path=0.1, precision=want)
    # (the context head: 30 s windows of 50 tokens, its defaults)
    device, precision = data.device, runtime.resolve_precision(want, data.device)
    sub = dataclasses.replace(data.train, rows=data.train.rows[:samples])
    model, _ = ck.build_model(cfg, sub)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    warm = dataclasses.replace(sub, rows=sub.rows[: batch * 3])
    steps, batches = tr.cached_batches(warm, data.norm, cfg, gen, device)
    ep.train_one_epoch(model, opt, batches, steps, cfg, 0, device, precision)  # warm-up
    t0 = time.perf_counter()
    steps, batches = tr.cached_batches(sub, data.norm, cfg, gen, device)
    ep.train_one_epoch(model, opt, batches, steps, cfg, 0, device, precision)
    ekx = samples / (time.perf_counter() - t0)
    # pure compute: one pre-built standardised batch (the first of an epoch: segments, or the
    # context head's windows), reused; same model, loss and optimiser steps
    x, yv, yn = next(iter(tr.cached_batches(sub, data.norm, cfg, gen, device)[1]))
    model.train()
    t0 = time.perf_counter()
    for _ in range(samples // batch):
        with runtime.autocast(device, precision):
            out = model(x)
        loss = ep.loss_fn(out, yv, yn, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    pure = (samples // batch) * batch / (time.perf_counter() - t0)
    return ekx, pure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lstm-samples", type=int, default=12_000)
    ap.add_argument("--transformer-samples", type=int, default=1_200)
    ap.add_argument("--naive-items", type=int, default=6_000)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16, or several: fp32,bf16 (a row each)")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    path = make_cache(OUT / "full.h5", N, "train", 0)
    size = path.stat().st_size / 2**30
    base = peak_gib()
    device = runtime.resolve_device("auto")
    t0 = time.perf_counter()
    split = load_split(path, device)  # open + one bulk read
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, std = feature_stats(split)
    stats_s = time.perf_counter() - t0
    data = tr.Loaded(split, split, (mean.to(device), std.to(device)), device)
    peak = peak_gib()
    print(
        f"(iii) open + bulk load of {size:.2f} GiB: {load_s:.1f} s ({size / load_s:.2f} GiB/s); feature "
        f"statistics {stats_s:.1f} s; peak RSS {peak:.2f} GiB (before load {base:.2f} GiB; target <= cache + 2 "
        f"= {size + 2:.1f} GiB)",
        flush=True,
    )
    ekx_rate = ekx_data_pass(data.train, data.norm, args.batch_size)
    naive_rate = naive_data_pass(path, args.batch_size, args.naive_items, 2)
    print(
        f"(ii) data path, samples/s: ekx {ekx_rate:,.0f}; naive Dataset+h5py+DataLoader(2 workers) "
        f"{naive_rate:,.0f} (on {args.naive_items} items); ratio {ekx_rate / naive_rate:.0f}x "
        f"(target >= 20x); epoch of batches: ekx {N / ekx_rate:.1f} s vs naive {N / naive_rate:.0f} s",
        flush=True,
    )
    auto = runtime.resolve_precision("auto", device)
    print(f"(i) training, samples/s (epoch time extrapolated to 67,217 samples); --precision auto is {auto} here:")
    print("| head | precision | samples timed | ekx | pure compute | ekx / pure time | ekx epoch |")
    print("|---|---|---|---|---|---|---|")
    for head, samples in (("lstm", args.lstm_samples), ("transformer", args.transformer_samples)):
        for want in args.precision.split(","):
            ekx, pure = train_speed(head, data, samples, args.batch_size, want)
            shown = runtime.resolve_precision(want, device) + (" (auto)" if want == "auto" else "")
            cells = f"{samples} | {ekx:.0f} | {pure:.0f} | {pure / ekx:.3f} | {N / ekx / 60:.1f} min"
            print(f"| {head} | {shown} | {cells} |", flush=True)
    print(f"peak RSS over the whole run: {peak_gib():.2f} GiB")


def make_cache(path: Path, n: int, split: str, seed: int) -> Path:
    """A random cache of EPIC's per-segment shape (K x D float16), written once."""
    if path.exists():
        return path
    print(f"writing a random {n} x {K} x {D} float16 cache to {path} (once) ...", flush=True)
    rng = np.random.default_rng(seed)
    rows = store.Rows(
        [f"P01_01_{i}" for i in range(n)],
        ["P01_01"] * n,
        rng.integers(97, size=n),
        rng.integers(300, size=n),
        np.arange(n),
    )
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "backbone": "resnet50",
        "weights": "none",
        "feature_dim": D,
        "frames_per_segment": K,
        "views": 1,
        "num_verbs": 97,
        "num_nouns": 300,
        "split": split,
        "bn_calibration": "",
    }
    store.create(path, attrs, rows, 1, K, D)
    with h5py.File(path, "r+") as f:
        for lo in range(0, n, 2048):
            m = min(2048, n - lo)
            f["features"][lo : lo + m] = rng.standard_normal((m, 1, K, D), dtype=np.float32).astype(np.float16)
        f["status"][...] = store.DONE
    return path


def tracking_overhead(args) -> None:
    import os
    import shutil
    import statistics

    from ekx.track import session as ts

    os.environ.setdefault("WANDB_SILENT", "true")
    n = args.tracking_segments
    train = make_cache(OUT / f"track-train-{n}.h5", n, "train", 0)
    val = make_cache(OUT / f"track-val-{n // 4}.h5", n // 4, "validation", 1)
    data = tr.load_data(train, val, "auto")
    work = OUT / f"track-ws-{os.getpid()}"  # a run of its own: two benches never share it
    shutil.rmtree(work, ignore_errors=True)
    inside: dict[str, float] = {}  # seconds in the trackers' calls (Session.epoch), per setting
    real_epoch = ts.Session.epoch

    def timed_epoch(self, row):
        t0 = time.perf_counter()
        real_epoch(self, row)
        inside[current] = inside.get(current, 0.0) + time.perf_counter() - t0

    ts.Session.epoch = timed_epoch
    settings = ["none", "tensorboard", "wandb", "mlflow", "tensorboard,wandb,mlflow"]
    epochs: dict[str, list[float]] = {s: [] for s in settings}
    run_s: dict[str, list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for current in settings if r % 2 == 0 else settings[::-1]:
            cfg = hc.TrainConfig(
                head=args.tracking_head,
                epochs=args.tracking_epochs,
                batch_size=args.batch_size,
                device="auto",
                track=current,
                name=f"{current.replace(',', '+')}-{r}",
                frames=K,
            )
            marks = [time.perf_counter()]
            tr.run(cfg, work / "runs" / cfg.name, data, on_epoch=lambda row, m=marks: m.append(time.perf_counter()))
            run_s[current].append(time.perf_counter() - marks[0])
            epochs[current] += [b - a for a, b in itertools.pairwise(marks[1:])]  # the first epoch: warm-up
            print(
                f"round {r + 1} {current}: epochs {[f'{b - a:.2f}' for a, b in itertools.pairwise(marks)]} s",
                flush=True,
            )
    ts.Session.epoch = real_epoch  # (the EPIC-size calls below time themselves)
    if not args.rounds:  # --rounds 0: only the trackers' calls on an EPIC-size epoch
        epic_epoch_calls(work)
        return
    base = statistics.median(epochs["none"])
    print(
        f"\n{n} train + {n // 4} validation segments ({K} x {D}), {args.tracking_head} head, batch "
        f"{args.batch_size}, {args.tracking_epochs} epochs a run, {args.rounds} rounds; device {data.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| trackers | epoch (median s) | vs untracked | in tracker calls (s / epoch) | whole run (median s) |")
    print("|---|---|---|---|---|")
    for s in settings:
        med = statistics.median(epochs[s])
        calls = inside.get(s, 0.0) / (args.rounds * args.tracking_epochs) if s != "none" else 0.0
        print(
            f"| {s} | {med:.2f} | {100 * (med / base - 1):+.1f}% | {calls:.3f} ({100 * calls / base:.2f}%) | "
            f"{statistics.median(run_s[s]):.1f} |"
        )
    epic_epoch_calls(work)
    shutil.rmtree(work, ignore_errors=True)


def epic_epoch_calls(work: Path, epochs: int = 10) -> None:
    """The trackers' own time for an epoch of EPIC-100's size (67,217 segments, batch 24: 2,801
    steps -> 141 step points, and an epoch row of 17 figures), on a synthetic trace: what every
    epoch of a full run pays, whatever the head and device."""
    import random
    import statistics

    from ekx.track import session as ts

    steps = -(-N // 24)
    print(f"\ntracker calls for one EPIC-size epoch ({steps} steps, synthetic trace), median of {epochs}:")
    print("| trackers | seconds per epoch (median) | max |")
    print("|---|---|---|")
    for name in ("tensorboard", "wandb", "mlflow", "tensorboard,wandb,mlflow"):
        run = work / "epic" / name.replace(",", "+")
        run.mkdir(parents=True)
        session = ts.open_run(name, {"lr": 1e-4}, run, 0, lambda: {"features.backbone": "resnet50"})
        times = []
        for e in range(1, epochs + 1):
            assert session.trace is not None
            session.trace.update(
                loss=[random.random() for _ in range(steps)], lr=[1e-4] * steps, segments=N, seconds=100.0
            )
            row = {"epoch": e, **{f"val_m{i}": random.random() for i in range(16)}, "lr": 1e-4}
            t0 = time.perf_counter()
            session.epoch(row)
            times.append(time.perf_counter() - t0)
        session.finish("finished")
        print(f"| {name} | {statistics.median(times):.3f} | {max(times):.3f} |", flush=True)


def entry() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--tracking", action="store_true")
    ap.add_argument("--tracking-segments", type=int, default=8192)
    ap.add_argument("--tracking-head", default="lstm")
    ap.add_argument("--tracking-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=24)
    args, _ = ap.parse_known_args()
    if args.tracking:
        OUT.mkdir(exist_ok=True)
        tracking_overhead(args)
    else:
        main()


if __name__ == "__main__":
    entry()
