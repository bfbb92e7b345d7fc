"""What a run leaves on disk: best.pt holds what evaluation, predict and warm starts need
(weights + config), last.pt what a resume needs (optimizer state, random streams)."""

from __future__ import annotations

import torch
from conftest import make_cache

from ekx.heads import train as tr
from ekx.heads.config import TrainConfig
from ekx.heads.evaluate import evaluate_run


def test_best_pt_has_no_optimizer_state_and_still_evaluates(tmp_path):
    """(main: best.pt carried AdamW's two moments too - 287 MB per cross-attention run in the
    demo, 1.2 GB in /tmp for the four heads.)"""
    train = make_cache(tmp_path / "train.h5", n=48)
    val = make_cache(tmp_path / "val.h5", n=16, seed=1, split="validation")
    cfg = TrainConfig(head="transformer", epochs=2, batch_size=16, device="cpu", name="r")
    run_dir = tmp_path / "runs" / "r"
    tr.run(cfg, run_dir, tr.load_data(train, val, "cpu"))
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert "optimizer" not in best and "rng" not in best
    assert "optimizer" in last and "rng" in last
    assert (run_dir / "best.pt").stat().st_size < 0.5 * (run_dir / "last.pt").stat().st_size
    assert evaluate_run(run_dir, val, device_name="cpu")["metrics"]["action_top1"] >= 0
