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
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 4}
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
