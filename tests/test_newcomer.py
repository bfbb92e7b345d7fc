"""What a newcomer met on the results side (issue 34, point 5): tables that keep the run
name and the figures at 80 columns and whole when piped, `ekx compare` over `runs/*` (again),
its state and backbone columns, a refused run that leaves nothing, `--version`, mistakes
answered before torch loads, help texts without Python types, docs whose references hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ekx import EkxError, __version__
from ekx.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def _leaf_commands() -> list[list[str]]:
    import typer.main

    out = []
    for name, cmd in typer.main.get_command(app).commands.items():
        out += [[name, sub] for sub in cmd.commands] if hasattr(cmd, "commands") else [[name]]
    return sorted(out)


# ---------------------------------------------------------------- --version, help texts


def test_version_prints_the_version_and_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"ekx {__version__}"


@pytest.mark.parametrize("argv", _leaf_commands(), ids=" ".join)
def test_help_shows_no_python_types_and_one_argument_style(argv):
    text = runner.invoke(app, [*argv, "--help"], terminal_width=100).output
    usage = next(line for line in text.splitlines() if line.startswith("Usage:"))
    assert "{" not in text and "<list" not in text and "list[" not in text, text
    # arguments in capitals, optional ones in brackets: RUN, HEAD, [NAME], RUN...
    args = usage.split("[OPTIONS]", 1)[1].split()
    assert all(re.fullmatch(r"\[?[A-Z][A-Z_=]*(\.\.\.)?\]?", a) for a in args), usage
    words = " ".join(text.split())
    assert "architecture document" not in words, words
    # phase-2 is always said with the file it means
    for m in re.finditer(r"phase-2", words):
        assert "configs/sweeps/phase2.toml" in words[m.start() : m.start() + 80], words[m.start() - 40 :]
    # every option says its default once at most
    for option in re.split(r"\n  (?=-)", text):
        assert len(re.findall(r"\bdefault:", option)) <= 1, option
    assert "True" not in words and "False" not in words  # a switch's default is on/off


def test_demo_precision_help_lists_what_its_check_admits():
    from ekx.extract.config import PRECISIONS

    text = " ".join(runner.invoke(app, ["demo", "--help"], terminal_width=200).output.split())
    said = text.split("--precision", 1)[1].split("[default")[0]
    assert all(p in said for p in PRECISIONS), said
    result = runner.invoke(app, ["demo", "--precision", "fp64"])
    assert result.exit_code == 1 and all(p in result.output for p in PRECISIONS), result.output


def test_an_identity_mismatch_names_each_differing_field_on_its_own_line():
    from ekx.heads.checkpoint import check_compatible

    trained = {"backbone": "resnet50", "frames_per_segment": 8, "weights": "IMAGENET1K_V2", "mean": [0.485] * 3}
    have = {**trained, "backbone": "efficientnet_b3", "frames_per_segment": 16, "mean": [0.5] * 3}
    split = SimpleNamespace(path=Path("val.h5"), identity=lambda: have)
    with pytest.raises(EkxError) as e:
        check_compatible({"cache": trained, "identity": "whole"}, split, "the run's checkpoint")
    said = str(e.value).splitlines()
    assert "backbone: checkpoint 'resnet50', cache 'efficientnet_b3'" in [s.strip() for s in said]
    assert "frames_per_segment: checkpoint 8, cache 16" in [s.strip() for s in said]
    assert sum("checkpoint" in s and "cache" in s for s in said[1:]) == 3  # mean too, each once
    assert max(map(len, said)) < 200, said


# ---------------------------------------------------------------- mistakes refused before torch

NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "  # any import of them fails
    "from ekx.cli import main; sys.argv = ['ekx', *sys.argv[1:]]; main()"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "/nope/sub.json"], "/nope/sub.json: submission file not found"),
        (["backbones", "resnet5"], "unknown backbone 'resnet5'; did you mean 'resnet50'?"),
        (["demo", "--precision", "fp64"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp64'"),
        (["score", "s.json", "--split", "valdation"], "--split: unknown split 'valdation'; did you mean 'validation'?"),
        (["extract", "--split", "tran"], "--split: unknown split 'tran'; did you mean 'train'?"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_mistakes_are_answered_before_torch_loads(argv, message, tmp_path):
    (tmp_path / "s.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = lines(result.stdout + result.stderr)  # one line naming the fault, no ImportError
    assert line.startswith("error: ") and message in line, line


def test_describing_a_family_model_blames_no_flag():
    pytest.importorskip("timm")  # an extra; installed in the team's environment
    result = runner.invoke(app, ["backbones", "timm:no_such_model_at_all"])
    assert result.exit_code == 1
    assert "--backbone" not in result.output, result.output
    assert "timm:no_such_model_at_all: timm cannot build it" in result.output
