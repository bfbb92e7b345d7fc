"""kill -9 of `ekx train-head` (mid-epoch, and between last.pt and its metrics row) and of
`ekx sweep` mid-configuration, then --resume / the same command: the finished metrics equal
an uninterrupted run's, and nothing looks finished before it is (issues 17 and 19)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_cache
from typer.testing import CliRunner

from ekx.cli import app
from ekx.heads import checkpoint as ck
from ekx.heads import runlog

runner = CliRunner()
EPOCHS = 3

# A child that runs the CLI with a fault injected: SIGKILL itself at a chosen point.
# mid-epoch: at the 2nd batch built after a last.pt exists in a run not yet done (epoch 2);
# after-last: right after last.pt of epoch 2 is written, before its metrics row.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from ekx.heads import train as tr
    root, mode = Path(sys.argv[1]), sys.argv[2]

    def unfinished_with_ckpt():
        return any(not (p.parent / "done.json").exists() for p in root.rglob("last.pt"))

    if mode == "mid-epoch":
        from ekx.heads import context  # the context head's batches are windows
        seen = [0]
        def killing(real):
            def build(*a, **k):
                if unfinished_with_ckpt():
                    seen[0] += 1
                    if seen[0] == 2:
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            return build
        tr.make_batch = killing(tr.make_batch)
        context.windows = killing(context.windows)
    else:
        real_save = tr.save_checkpoint
        def save_checkpoint(path, parts, opt, cfg, epoch, *a, **k):
            real_save(path, parts, opt, cfg, epoch, *a, **k)
            if path.name == "last.pt" and epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        tr.save_checkpoint = save_checkpoint
    from ekx.cli import app
    app(sys.argv[3:])
    """
)


@pytest.fixture()
def caches(tmp_path):
    return (
        make_cache(tmp_path / "train.h5", n=96, views=2, seed=0),
        make_cache(tmp_path / "val.h5", n=40, seed=1, split="validation"),
    )


def _args(caches, runs: Path, name: str, head: str = "lstm") -> list[str]:
    shape = ["--window", "8", "--layers", "1", "--width", "32"] if head == "context" else ["--frames", "4"]
    return [
        "train-head",
        head,
        *shape,
        "--train-features",
        str(caches[0]),
        "--val-features",
        str(caches[1]),
        "--runs",
        str(runs),
        "--name",
        name,
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "16",
        "--dropout",
        "0.1",
        "--device",
        "cpu",
    ]


def _killed(root: Path, mode: str, args: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), mode, *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runlog.read_metrics(run_dir)]


@pytest.mark.parametrize(("mode", "head"), [("mid-epoch", "lstm"), ("after-last", "lstm"), ("mid-epoch", "context")])
@pytest.mark.slow
def test_train_head_killed_then_resumed_equals_an_uninterrupted_run(mode, head, caches, tmp_path):
    """17.6 (mid-epoch) and 19.3 (kill between last.pt and its metrics row); the context head
    on dense stores (its batches are windows, built by another function)."""
    if head == "context":
        from test_context import stores

        caches = stores(tmp_path)[:2]
    runs = tmp_path / "runs"
    full = runner.invoke(app, _args(caches, runs, "full", head))
    assert full.exit_code == 0, full.output
    killed = runs / "killed"
    _killed(killed, mode, _args(caches, runs, "killed", head))
    assert ck.load_checkpoint(killed / "last.pt")["epoch"] in (1, 2)  # killed after a checkpoint
    # nothing looks finished: no curves, fewer rows than epochs, no temporary files left
    assert not (killed / "curves.png").exists()
    assert len(runlog.read_metrics(killed)) < EPOCHS
    assert not list(killed.glob(".*.tmp"))
    result = runner.invoke(app, [*_args(caches, runs, "killed", head), "--resume"])
    assert result.exit_code == 0, result.output
    assert _metrics(killed) == _metrics(runs / "full")
    assert ck.load_checkpoint(killed / "last.pt")["epoch"] == EPOCHS


@pytest.mark.slow
def test_sweep_killed_mid_configuration_reruns_to_the_same_metrics(caches, tmp_path):
    """17.6: kill -9 of `ekx sweep` inside its second configuration, then the same command."""
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'[base]\nhead = "lstm"\nepochs = {EPOCHS}\nbatch_size = 16\nframes = 4\ndropout = 0.1\n'
        '[[config]]\nname = "a"\nlr = 1e-3\n[[config]]\nname = "b"\nlr = 3e-4\n'
    )

    def args(runs: Path) -> list[str]:
        return [
            "sweep",
            str(sweep),
            "--runs",
            str(runs),
            "--train-features",
            str(caches[0]),
            "--val-features",
            str(caches[1]),
            "--device",
            "cpu",
        ]

    ref = runner.invoke(app, args(tmp_path / "ref"))
    assert ref.exit_code == 0, ref.output
    runs = tmp_path / "runs"
    # the child kills itself mid-epoch 2 of the first run that has a last.pt and no done.json
    _killed(runs, "mid-epoch", args(runs))
    killed = [d.name for d in (runs / "s").iterdir() if d.is_dir() and not (d / "done.json").exists()]
    assert killed == ["a"] and len(runlog.read_metrics(runs / "s" / "a")) < EPOCHS
    result = runner.invoke(app, args(runs))
    assert result.exit_code == 0 and "2/2 configurations finished" in result.output, result.output
    for name in ("a", "b"):
        assert _metrics(runs / "s" / name) == _metrics(tmp_path / "ref" / "s" / name)
