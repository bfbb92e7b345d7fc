"""The [optuna] search targets, side by side in one run (`python bench/sweep_bench.py --only search`).

The cache: 5,000 training and 1,000 validation segments of K=8 frames x D=64, 10 verbs and
20 nouns (200 actions). The signal is planted so that configurations truly differ: each
segment's features are its verb prototype + its noun prototype (random Gaussian vectors,
0.22 per dimension) + noise shared by the segment's frames (std 1, so averaging frames does
not remove it) + per-frame noise (std 0.5). A linear read-out reaches about a quarter of
the actions, and how close a run gets in 12 epochs depends on the learning rate (five decades
searched: too small does not move, too large overshoots), weight decay, dropout, label
smoothing and batch size.

1. Search quality per training epoch: the same budget of trials, TPE + successive halving
   (reduction 3, first decision after 1 epoch) against full random search (every trial
   trains all 12 epochs). Targets: best validation action top-1 within 0.5 points of the
   random search's best, with <= 0.4x its training epochs.
2. Parallel workers: 8 trials (no pruning, 12 epochs each, batch size fixed so that every
   trial costs the same whichever parameters each worker's sampler draws) by one `ekx sweep` process and by
   `ekx sweep --jobs 2` (two workers on one study). Target: two workers <= 0.65x the time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ekx.cache import store
from ekx.heads import search as se
from ekx.heads.runlog import read_metrics

SPACE = """lr = { log_uniform = [1e-5, 1e0] }
weight_decay = { log_uniform = [1e-6, 1e-1] }
dropout = { uniform = [0.0, 0.8] }
label_smoothing = { choice = [0.0, 0.1, 0.2, 0.3] }
"""
BATCH = "batch_size = { choice = [32, 64, 128, 256] }\n"  # part 1 only: part 2's trials cost the same
BASE = 'head = "pooling"\nbatch_size = 64\nepochs = {epochs}\nwarmup_epochs = 0.0\nrestart_epochs = {epochs}\n'


def planted_cache(path: Path, n: int, seed: int, split: str, k: int = 8, dim: int = 64) -> Path:
    """Features = verb prototype + noun prototype + per-segment noise + per-frame noise."""
    protos = np.random.default_rng(1234)  # the same prototypes in train and validation
    verb_p, noun_p = protos.normal(0, 0.22, (10, dim)), protos.normal(0, 0.22, (20, dim))
    rng = np.random.default_rng(seed)
    verbs, nouns = rng.integers(10, size=n), rng.integers(20, size=n)
    feats = (verb_p[verbs] + noun_p[nouns] + rng.normal(0, 1.0, (n, dim)))[:, None, None, :]
    feats = (feats + rng.normal(0, 0.5, (n, 1, k, dim))).astype(np.float16)
    rows = store.Rows(
        [f"P{1 + i % 7:02d}_{i // 7:03d}_{i}" for i in range(n)],
        [f"P{1 + i % 7:02d}_{i // 7:03d}" for i in range(n)],
        verbs,
        nouns,
        np.arange(n),
    )
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "backbone": "resnet50",
        "weights": "none",
        "feature_dim": dim,
        "frames_per_segment": k,
        "views": 1,
        "num_verbs": 10,
        "num_nouns": 20,
        "verb_classes": [f"v{i}" for i in range(10)],
        "noun_classes": [f"n{i}" for i in range(20)],
        "split": split,
        "bn_calibration": "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    store.create(path, attrs, rows, 1, k, dim)
    w = store.Writer(path)
    w.write([(i, feats[i], np.arange(k)) for i in range(n)], [])
    w.close()
    return path


def sweep(file: Path, runs: Path, features: Path, *extra: str) -> float:
    extra = ("--device", "cpu", *extra)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ekx", "sweep", str(file), "--runs", str(runs), "--features", str(features), *extra],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def outcome(sweep_dir: Path) -> tuple[float, int, dict]:
    """(best objective, training epochs spent, trial states) of a search."""
    study = se.open_study(sweep_dir, create=False)
    epochs = sum(len([r for r in read_metrics(d) if r["epoch"] > 0]) for d in sweep_dir.glob("trial-*"))
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return study.best_value, epochs, states


def main(trials: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        feats = root / "features"
        t0 = time.perf_counter()
        planted_cache(feats / "resnet50" / "train.h5", 5000, 0, "train")
        planted_cache(feats / "resnet50" / "validation.h5", 1000, 1, "validation")
        print(f"planted cache: 5,000 + 1,000 segments (8 x 64) in {time.perf_counter() - t0:.1f} s")
        results = {}
        for name, options in {
            "tpe-sh": f'trials = {trials}\nseed = 0\nsampler = "tpe"\npruner = "successive-halving"\n',
            "random": f'trials = {trials}\nseed = 0\nsampler = "random"\npruner = "none"\n',
        }.items():
            file = root / f"{name}.toml"
            file.write_text(f"[base]\n{BASE.format(epochs=12)}\n[optuna]\n{options}{SPACE}{BATCH}")
            seconds = sweep(file, root / "runs", feats)
            results[name] = (*outcome(root / "runs" / name), seconds)
        (tpe_best, tpe_ep, tpe_st, tpe_s), (rnd_best, rnd_ep, rnd_st, rnd_s) = results["tpe-sh"], results["random"]
        print(f"\n1. {trials} trials x up to 12 epochs, val action top-1 (best epoch of the best trial)")
        print("| search | best val action top-1 | training epochs | trials | wall time |")
        print("|---|---|---|---|---|")
        print(f"| TPE + successive halving | {tpe_best:.1f} | {tpe_ep} | {tpe_st} | {tpe_s:.0f} s |")
        print(f"| random, no pruning | {rnd_best:.1f} | {rnd_ep} | {rnd_st} | {rnd_s:.0f} s |")
        print(
            f"difference {tpe_best - rnd_best:+.1f} points (target >= -0.5); epochs {tpe_ep / rnd_ep:.2f}x "
            f"(target <= 0.4)"
        )
        file = root / "par.toml"
        file.write_text(f'[base]\n{BASE.format(epochs=12)}\n[optuna]\ntrials = 8\nseed = 0\npruner = "none"\n{SPACE}')
        one = sweep(file, root / "one", feats)
        two = sweep(file, root / "two", feats, "--jobs", "2")
        for d in ("one", "two"):
            assert outcome(root / d / "par")[2] == {"COMPLETE": 8}
        print("\n2. 8 trials x 12 epochs, no pruning, one study")
        print("| workers | wall time |")
        print("|---|---|")
        print(f"| 1 (`ekx sweep`) | {one:.1f} s |")
        print(f"| 2 (`ekx sweep --jobs 2`) | {two:.1f} s |")
        load = os.getloadavg()[0]
        print(f"ratio {two / one:.2f} (target <= 0.65); load average now {load:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
