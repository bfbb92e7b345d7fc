from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ekx.cli import app

runner = CliRunner()


def _leaf_commands() -> list[list[str]]:
    """Every command, with the subcommands of groups (cache, slurm) as their own entries."""
    import typer.main

    out = []
    for name, cmd in typer.main.get_command(app).commands.items():
        if hasattr(cmd, "commands"):  # a group
            out += [[name, sub] for sub in cmd.commands]
        else:
            out.append([name])
    return sorted(out)


@pytest.mark.parametrize("argv", _leaf_commands(), ids=" ".join)
def test_every_command_help_has_an_example(argv):
    result = runner.invoke(app, [*argv, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert re.search(r"Example: ekx " + " ".join(argv), " ".join(result.output.split())), result.output


def test_config_shows_values_and_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ekx.toml").write_text('videos = "/data/epic"\n')
    monkeypatch.setenv("EKX_RUNS", "/scratch/runs")
    result = runner.invoke(app, ["config", "--features", "/fast/features"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # not a terminal: the table comes whole, as Markdown (ekx.tables)
    lines = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.count("|") >= 4}
    assert "/data/epic" in lines["videos"] and "ekx.toml" in lines["videos"]
    assert "/scratch/runs" in lines["runs"] and "EKX_RUNS" in lines["runs"]
    assert "/fast/features" in lines["features"] and "flag" in lines["features"]
    assert "default" in lines["annotations"]


def test_errors_are_one_red_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--fps", "thirty"])
    assert result.exit_code == 1
    assert "error:" in result.output and "--fps 'thirty'" in result.output
    assert "Traceback" not in result.output


def test_synth_command_writes_dataset(tmp_path):
    result = runner.invoke(
        app,
        [
            "synth",
            str(tmp_path / "d"),
            "--videos",
            "2",
            "--segments",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 videos" in result.output
    assert (tmp_path / "d" / "annotations" / "EPIC_100_train.csv").is_file()


# ---------------------------------------------------------------- values refused up front (issue 32 D)


def _extract(synth_data, tmp_path, *extra: str):
    args = ["extract", "--split", "validation", "--weights", "none", "--workers", "0"]
    args += ["--annotations", str(synth_data / "annotations"), "--videos", str(synth_data / "videos")]
    return runner.invoke(app, [*args, "--features", str(tmp_path / "f"), *extra], terminal_width=300)


@pytest.mark.parametrize(
    ("rate", "said"),
    [
        ("", r"--dense '': give positions per second"),  # '' would quietly mean a per-segment cache
        ("1e-9", r"--dense 1e-9: no position falls within P\d+_\d+ \([\d.]+ s; the first is at 5e\+08 s\)"),
        ("240", r"--dense 240: above the frame rate of P\d+_\d+ \((\d+) fps\).*at most \1 per second"),
        ("1e6", r"--dense 1e6: above the frame rate of P\d+_\d+ \(\d+ fps\)"),
    ],
)
def test_a_dense_rate_no_video_can_hold_is_refused_before_any_work(synth_data, tmp_path, monkeypatch, rate, said):
    from ekx.cache import dense

    def plan(*a, **k):
        raise AssertionError("planned")  # 1e6/s planned millions of positions before any check

    monkeypatch.setattr(dense, "plan", plan)
    result = _extract(synth_data, tmp_path, "--dense", rate)
    assert result.exit_code == 1, result.output
    assert re.search(said, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output and not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--window", "inf", "--window must be > 0 and <= 3600, got inf"),  # trained on nan before
        ("--window", "nan", "--window must be > 0 and <= 3600, got nan"),
        ("--width", "1", "--width must be >= 0 and a multiple of 8, got 1"),  # torch's AssertionError before
        ("--width", "7", "--width must be >= 0 and a multiple of 8, got 7"),
    ],
)
def test_head_settings_that_cannot_train_are_refused_by_flag_and_by_config_file(tmp_path, flag, value, said):
    result = runner.invoke(app, ["train-head", "context", flag, value, "--runs", str(tmp_path)], terminal_width=300)
    assert result.exit_code == 1 and said in " ".join(result.output.split()), result.output
    key = flag.lstrip("-")
    toml = tmp_path / "c.toml"
    toml.write_text(f"{key} = {value}\n")
    result = runner.invoke(app, ["train-head", "context", "--config", str(toml)], terminal_width=300)
    assert result.exit_code == 1, result.output
    assert f"'{key}' must be" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not list(tmp_path.glob("context-*"))  # no run directory left behind


@pytest.mark.parametrize("width", [0, 7, -8])
def test_a_head_built_in_code_names_its_width(width):
    from ekx import EkxError
    from ekx.heads import models

    for head in ("transformer", "context", "cross-attention"):
        with pytest.raises(EkxError, match=rf"width {width}: .*positive multiple of its 8 heads"):
            models.create(head, dim=16, num_verbs=3, num_nouns=3, frames=4, d_model=width)
