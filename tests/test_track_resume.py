"""Trackers across a kill -9 and --resume (the same tracked run, each step once), and trackers
that fail: a backend that raises mid-run, an MLflow server that is not there, a tracker whose
extra is not installed (issue 34)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from test_track import ALL, EPOCHS, caches, env, mlflow_run, tb_scalars, train_args, wandb_run  # noqa: F401
from typer.testing import CliRunner

from ekx.cli import app
from ekx.heads import checkpoint as ck
from ekx.heads import runlog

runner = CliRunner()
STEPS = [20, 24, 44, 48, 68, 72]  # each epoch's step points (24 steps an epoch, a point every 20 and the last)

# the CLI in a child that SIGKILLs itself at the 2nd batch built once a last.pt exists (mid-epoch 2)
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from ekx.heads import train as tr
    run_dir, seen, real = Path(sys.argv[1]), [0], tr.make_batch
    def make_batch(*a, **k):
        if (run_dir / "last.pt").exists():
            seen[0] += 1
            if seen[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    tr.make_batch = make_batch
    from ekx.cli import app
    app(sys.argv[2:])
    """
)


@pytest.mark.slow
def test_kill_9_then_resume_continues_each_tracked_run_with_each_step_once(env, caches, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    args = train_args(caches, runs, "killed", "--track", ALL)
    # a process of its own, as a user's: not attached to this one's W&B service (WANDB_SERVICE)
    child_env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(runs / "killed"), *args], capture_output=True, timeout=300, env=child_env
    )
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
    assert ck.load_checkpoint(runs / "killed" / "last.pt")["epoch"] == 1
    done = runner.invoke(app, [*args, "--resume"])
    assert done.exit_code == 0 and "failed" not in done.output, done.output
    rows = runlog.read_metrics(runs / "killed")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    val = [(r["epoch"], r["val_action_top1"]) for r in rows]

    scalars = tb_scalars(runs / "killed" / "tensorboard")  # TensorBoard's reader applies purge_step
    assert [s for s, _ in scalars["step/loss"]] == STEPS
    assert [(s, round(v, 4)) for s, v in scalars["val/action_top1"]] == [(e, round(v, 4)) for e, v in val]

    got = wandb_run(runs / "killed")  # both processes' offline files: one run id, each step once
    assert len(got["ids"]) == 1 and len(list((runs / "killed" / "wandb").glob("offline-run-*"))) == 2
    steps = Counter(s for s, v in got["history"] if "step/loss" in v)
    assert sorted(steps) == STEPS and set(steps.values()) == {1}
    epochs = [(v["epoch"], round(v["val/action_top1"], 4)) for _, v in got["history"] if "val/action_top1" in v]
    assert epochs == [(e, round(v, 4)) for e, v in val]

    c, run = mlflow_run(tmp_path, "killed")  # one run, continued
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "step/loss")] == STEPS
    history = [(m.step, round(m.value, 4)) for m in c.get_metric_history(run.info.run_id, "val/action_top1")]
    assert sorted(history) == [(e, round(v, 4)) for e, v in val]


def _figures(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runlog.read_metrics(run_dir)]


def test_a_tracker_failing_mid_run_or_unreachable_leaves_training_intact(env, caches, tmp_path, monkeypatch):  # noqa: F811
    """TensorBoard's writer raising ENOSPC from its second epoch (a full disk for event files)
    and MLflow at a server that is not there: a warning each, the run as an untracked one."""
    from ekx.track import to_tensorboard

    real_log = to_tensorboard.Backend.log

    def log(self, metrics, epoch=None):
        if epoch == 2:
            raise OSError(28, "No space left on device")
        real_log(self, metrics, epoch)

    monkeypatch.setattr(to_tensorboard.Backend, "log", log)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    runs = tmp_path / "runs"
    res = runner.invoke(app, train_args(caches, runs, "tracked", "--track", "tensorboard,mlflow"))
    assert res.exit_code == 0, res.output
    assert "tracker tensorboard failed (OSError" in res.output and "No space left" in res.output
    assert "tracker mlflow failed" in res.output and "training goes on without it" in res.output
    plain = runner.invoke(app, train_args(caches, runs, "plain"))
    assert plain.exit_code == 0, plain.output
    assert _figures(runs / "tracked") == _figures(runs / "plain") and len(_figures(runs / "plain")) == EPOCHS
    for name in ("best.pt", "last.pt", "curves.png", "config.toml"):
        assert (runs / "tracked" / name).is_file()
    assert [s for s, _ in tb_scalars(runs / "tracked" / "tensorboard")["val/action_top1"]] == [1]  # then dropped


@pytest.mark.parametrize(
    "command",
    [
        ["train-head", "lstm", "--track", "tensorboard,wandb"],
        ["finetune", "lstm", "--track", "wandb"],
        ["compare", ".", "--track", "wandb"],
    ],
)
def test_a_tracker_not_installed_is_one_line_naming_its_extra(command, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [*command, "--runs", "runs"] if command[0] != "compare" else command)
    assert res.exit_code == 1, res.output
    said = [line for line in res.output.splitlines() if "wandb" in line]  # (a warning may precede it)
    assert len(said) == 1 and said[0].startswith("error: --track wandb") and "pip install 'ekx[wandb]'" in said[0]
    assert not (tmp_path / "runs").exists()  # before any work
