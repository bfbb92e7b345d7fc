"""A search is checked whole before its first trial (base configuration, space, objective) and
ends with an error when no trial completed, saying how many failed (issue 23 point 9)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_cache
from typer.testing import CliRunner

from ekx.cli import app
from ekx.heads import search as se
from ekx.heads import train as tr

runner = CliRunner()


@pytest.fixture()
def feats(tmp_path) -> Path:
    make_cache(tmp_path / "features" / "resnet50" / "train.h5", n=32, seed=0)
    make_cache(tmp_path / "features" / "resnet50" / "validation.h5", n=12, seed=1, split="validation")
    return tmp_path / "features"


def _sweep(tmp_path: Path, feats: Path, optuna: str, base: str = "", *flags: str):
    """`ekx sweep` of a search; ``base`` lines replace the quick defaults' keys."""
    lines = {line.split("=")[0].strip(): line for line in ['head = "pooling"', "epochs = 1", "frames = 4"]}
    lines |= {line.split("=")[0].strip(): line for line in base.splitlines() if line}
    file = tmp_path / "s.toml"
    file.write_text("[base]\n" + "\n".join(lines.values()) + f"\n\n[optuna]\n{optuna}\n")
    args = ["sweep", str(file), "--features", str(feats), "--runs", str(tmp_path / "runs"), "--device", "cpu"]
    return runner.invoke(app, [*args, *flags], terminal_width=200)


def test_objectives_are_the_validation_columns_training_writes():
    n = 6
    verb, noun = torch.randn(n, 5), torch.randn(n, 7)
    yv, yn = torch.randint(5, (n,)), torch.randint(7, (n,))
    yv[0], yn[0] = 0, 1  # the tail subsets below are not empty
    row = tr.score(verb, noun, yv, yn, ({0}, {1}), torch.ones(n, dtype=torch.bool))
    assert set(se.OBJECTIVES) == set(row)


@pytest.mark.parametrize(
    "optuna, base, flags, message",
    [
        ('objective = "val_nothing"', "", (), r"\[optuna\]: objective 'val_nothing' is not a validation metric"),
        ("", "", ("--select", "val_action_top9"), r"objective 'val_action_top9' is not a validation metric"),
        ("", "", ("--select", "val_tail_action_top1"), r"needs the annotation files"),
        ('objective = "train_loss"', "", (), r"objective 'train_loss' is not a validation metric; use one of val_"),
        # the other cases (refused at parse time since the settings declare their ranges)
        ("", 'head = "nosuchhead"', (), r"unknown head 'nosuchhead'"),
        ("lr = { uniform = [-1e-3, 1e-3] }", "", (), r"'lr' must be > 0"),
        ("dropout = { uniform = [0.1, 1.5] }", "", (), r"'dropout' must be >= 0 and < 1"),
        ("", "epochs = -2", (), r"'epochs' must be >= 1"),
        ("batch_size = { int_uniform = [0, 8] }", "", (), r"'batch_size' must be >= 1"),
        ("lr = { uniform = [1e-3, 1e-4] }", "", (), r"low 0.001 is above high 0.0001"),
        ("lr = { log_uniform = [0.0, 1e-4] }", "", (), r"a log range must lie above 0"),
        ('head = { choice = ["lstm", "gru"] }', "", (), r"unknown head 'gru'"),
        ("", "", ("--set", "dropout=1.5"), r"'dropout' must be >= 0 and < 1"),
    ],
)
def test_a_search_is_refused_before_its_first_trial(tmp_path, feats, optuna, base, flags, message):
    result = _sweep(tmp_path, feats, f"trials = 2\n{optuna}", base, *flags)
    assert result.exit_code == 1, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "runs" / "s.journal").exists() and not (tmp_path / "runs" / "s").exists()


def test_a_search_whose_every_trial_fails_exits_non_zero_and_says_why(tmp_path, feats):
    # frames 99 passes every range check (the cache's 8 frames are known only when it is read)
    result = _sweep(tmp_path, feats, "trials = 2", "frames = 99")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "no trial completed (2 failed, 0 pruned of 2; e.g. trial-0000:" in text, text
    assert "exceeds the 8 frames" in text


def test_failed_trials_are_counted_aloud(tmp_path, feats):
    result = _sweep(tmp_path, feats, 'trials = 6\nseed = 0\nsampler = "random"\nframes = { choice = [4, 99] }')
    study = se.open_study(tmp_path / "runs" / "s", create=False)
    failed = sum(t.state.name == "FAIL" for t in study.get_trials())
    assert 0 < failed < 6, "seed 0 should draw both choices"
    assert result.exit_code == 0, result.output  # some trials completed: the search has a result
    text = " ".join(result.output.split())
    assert f"{failed} of 6 trials of {tmp_path / 'runs' / 's.journal'} failed (e.g. trial-" in text, text
    assert "they count toward trials = 6" in text
