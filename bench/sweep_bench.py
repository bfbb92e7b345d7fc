"""`ekx sweep` vs separate `ekx train-head` processes, measured side by side.

The eight phase-2 configurations (configs/sweeps/phase2.toml) for E epochs on a random
cache of S segments (16 x 2048 float16; the issue's scale is S=5000, E=3 - about
1.5 hours of transformer training on a 2-core CPU, so the default here is smaller; the
ratios are what the benchmark is for):

  - total wall time of one `ekx sweep` process vs the sum of eight `ekx train-head`
    processes (each loads the caches, builds its model and trains);
  - training seconds per configuration inside the sweep vs the same configuration in its
    own process (target <= 1.1x);
  - per-epoch FLOPs of the transformer head (torch.utils.flop_counter), turned into what a
    full-scale phase-2 sweep costs on one datacentre GPU.

`--only search` (the [optuna] targets, side by side, on a planted-signal cache - see
`planted_cache`): TPE + successive halving against full random search with the same trial
budget (best validation action top-1 and training epochs spent), then one worker against two
workers on one study finishing the same 8 trials (wall time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_cache  # noqa: E402  (the same random-cache writer the tests use)

from ekx.heads import config as hc  # noqa: E402  (after the path set-up above)
from ekx.heads import runlog  # noqa: E402
from ekx.heads import sweep as sw  # noqa: E402

PHASE2 = ROOT / "configs" / "sweeps" / "phase2.toml"
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense BF16 tensor core)


def ekx(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ekx", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def flops_per_sample(cfg: hc.TrainConfig, k: int = 16, d: int = 2048) -> tuple[float, float]:
    """(train fwd+bwd, eval fwd) FLOPs per sample of the phase-2 transformer head."""
    from torch.utils.flop_counter import FlopCounterMode

    from ekx.heads import models

    model = models.create(
        cfg.head, dim=d, num_verbs=97, num_nouns=300, frames=k, dropout=cfg.dropout, drop_path=cfg.drop_path
    )
    x = torch.randn(cfg.batch_size, k, d)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        (out["verb"].sum() + out["noun"].sum()).backward()
    train = fc.get_total_flops() / cfg.batch_size
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()
        model(x)
    return train, fc.get_total_flops() / cfg.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", choices=("phase2", "search"), default="phase2")
    ap.add_argument("--trials", type=int, default=24, help="search: trial budget of both searches")
    args = ap.parse_args()
    if args.only == "search":
        from search_bench import main as search_main

        search_main(args.trials)
        return
    configs = sw.apply_overrides(sw.load(PHASE2), [f"epochs={args.epochs}"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = make_cache(tmp / "train.h5", n=args.segments, k=16, dim=2048, num_verbs=97, num_nouns=300, seed=0)
        val = make_cache(
            tmp / "val.h5",
            n=max(args.segments // 5, 8),
            k=16,
            dim=2048,
            num_verbs=97,
            num_nouns=300,
            seed=1,
            split="validation",
        )
        feats = ["--train-features", str(train), "--val-features", str(val)]
        t_sweep = ekx("sweep", str(PHASE2), "--set", f"epochs={args.epochs}", "--runs", str(tmp / "sweep"), *feats)
        separate = []
        for sc in configs:
            cfg_file = tmp / f"{sc.name}.toml"
            runlog.write_config(tmp, sc.cfg)
            (tmp / "config.toml").rename(cfg_file)
            separate.append(
                ekx(
                    "train-head",
                    sc.cfg.head,
                    "--config",
                    str(cfg_file),
                    "--runs",
                    str(tmp / "sep"),
                    "--name",
                    sc.name,
                    *feats,
                )
            )
        per_sweep = [
            sum(r["seconds"] for r in runlog.read_metrics(tmp / "sweep" / "phase2" / sc.name)) for sc in configs
        ]
        per_sep = [sum(r["seconds"] for r in runlog.read_metrics(tmp / "sep" / sc.name)) for sc in configs]
    print(
        f"phase-2 sweep, 8 configurations x {args.epochs} epochs on {args.segments} segments (16 x 2048), "
        f"{torch.get_num_threads()} CPU threads"
    )
    print("| | wall time |")
    print("|---|---|")
    print(f"| `ekx sweep` (one process, caches loaded once) | {t_sweep:.1f} s |")
    print(f"| 8 x `ekx train-head` (separate processes) | {sum(separate):.1f} s |")
    print(f"| ratio sweep / separate | {t_sweep / sum(separate):.2f} |")
    print(
        "training seconds per configuration, in the sweep / alone: "
        + ", ".join(f"{a / b:.2f}" for a, b in zip(per_sweep, per_sep, strict=False))
        + f"; total {sum(per_sweep) / sum(per_sep):.2f} (target <= 1.1)"
    )
    train_f, eval_f = flops_per_sample(configs[0].cfg)
    n_train, n_val, epochs = 67_217, 9_668, 20
    per_epoch = train_f * n_train + eval_f * n_val
    total = per_epoch * epochs * len(configs)
    print(
        f"\ntransformer head (phase 2): {train_f / 1e9:.2f} GFLOP per training sample (fwd+bwd), "
        f"{eval_f / 1e9:.2f} GFLOP per evaluated sample; one full-scale epoch (67,217 train + 9,668 val) "
        f"= {per_epoch / 1e12:.1f} TFLOP; the whole phase-2 sweep (8 x {epochs} epochs) = {total / 1e15:.2f} PFLOP"
    )
    for util in (1.0, 0.3):
        print(
            f"  on one H100 (989 TFLOP/s dense bf16) at {util:.0%} utilisation: "
            f"{total / (H100_BF16_DENSE * util):.0f} s"
        )
    print(
        json.dumps({"sweep_s": t_sweep, "separate_s": sum(separate), "per_config_ratio": sum(per_sweep) / sum(per_sep)})
    )


if __name__ == "__main__":
    main()
