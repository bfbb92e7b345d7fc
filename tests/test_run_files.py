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


def test_curves_png_is_titled_marks_the_best_epoch_and_counts_whole_epochs(tmp_path, monkeypatch):
    """(main: no title, no best epoch, an epoch axis reading 2.5, 7.5.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig=None):  # inspect the figure just before the run closes it
        if fig is not None and hasattr(fig, "axes"):
            seen["fig"] = fig
            seen["title"] = fig._suptitle.get_text() if fig._suptitle else ""
            seen["ticks"] = [t for ax in fig.axes for t in ax.get_xticks()]
            seen["labels"] = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    train = make_cache(tmp_path / "train.h5", n=48)
    val = make_cache(tmp_path / "val.h5", n=16, seed=1, split="validation")
    cfg = TrainConfig(head="pooling", epochs=3, batch_size=16, device="cpu", name="r", train_features=str(train))
    run_dir = tmp_path / "runs" / "curvy"
    tr.run(cfg, run_dir, tr.load_data(train, val, "cpu"))
    best = torch.load(run_dir / "best.pt", weights_only=True)["epoch"]
    assert (run_dir / "curves.png").stat().st_size > 0
    assert seen["title"].startswith("curvy: pooling head on ") and "train.h5" in seen["title"]
    assert f"best.pt (epoch {best})" in seen["labels"]
    assert all(float(t).is_integer() for t in seen["ticks"])


def test_train_head_cli_refuses_missing_validation_rows_unless_allow_missing(tmp_path):
    import h5py
    from typer.testing import CliRunner

    from ekx.cache import store
    from ekx.cli import app

    train = make_cache(tmp_path / "train.h5", n=32)
    val = make_cache(tmp_path / "val.h5", n=8, seed=1, split="validation")
    with h5py.File(val, "r+") as f:
        f["status"][2] = store.FAILED
    args = ["train-head", "pooling", "--train-features", str(train), "--val-features", str(val)]
    args += ["--epochs", "1", "--device", "cpu", "--runs", str(tmp_path / "runs")]
    refused = CliRunner().invoke(app, [*args, "--name", "a"], terminal_width=300)
    assert refused.exit_code == 1 and "--allow-missing" in refused.output, refused.output
    assert not (tmp_path / "runs" / "a").exists()
    allowed = CliRunner().invoke(app, [*args, "--name", "b", "--allow-missing"], terminal_width=300)
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "runs" / "b" / "best.pt").is_file()
