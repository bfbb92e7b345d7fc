"""A newcomer's first hour (issue 24, points 1-5): bad numbers and names are refused at once,
in one line naming the flag, before torch loads, a file is written or a progress bar drawn;
every help text describes every parameter in words that survive the rendering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cli import app

runner = CliRunner()


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------- 1. bad numbers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-head", "pooling", "--epochs", "-3"], "--epochs must be >= 1, got -3"),
        (["train-head", "pooling", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["train-head", "lstm", "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["train-head", "lstm", "--dropout", "1.5"], "--dropout must be >= 0 and < 1, got 1.5"),
        (["train-head", "lstm", "--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        (["finetune", "lstm", "--accumulate", "0"], "--accumulate must be >= 1, got 0"),
        (["finetune", "lstm", "--freeze-blocks", "-2"], "--freeze-blocks must be >= -1, got -2"),
        (["extract", "--frames", "0"], "--frames must be >= 1, got 0"),
        (["extract", "--workers", "-1"], "--workers must be >= 0, got -1"),
        (["extract", "--decode-timeout", "-5"], "--decode-timeout must be >= 0, got -5.0"),
        (["extract", "--resize", "bilinear"], "--resize must be one of decoder, torchvision, got 'bilinear'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_number_out_of_range_is_one_line_naming_flag_and_range_and_writes_nothing(
    argv, message, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert lines(result.output) == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []  # no run directory, no cache, no lock


def test_a_config_file_value_out_of_range_is_named_with_its_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hp.toml").write_text("[train]\nbatch_size = 0\n")
    result = runner.invoke(app, ["train-head", "pooling", "--config", "hp.toml"])
    assert result.exit_code == 1, result.output
    assert lines(result.output) == ["error: hp.toml: 'batch_size' must be >= 1, got 0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hp.toml"]


def test_every_number_and_choice_of_the_config_dataclasses_declares_its_range():
    import dataclasses

    from ekx.extract.config import ExtractConfig
    from ekx.finetune.config import FinetuneConfig
    from ekx.heads.config import HEADS, TrainConfig
    from ekx.heads.search import Search

    for cls in (TrainConfig, FinetuneConfig, ExtractConfig, Search):
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", "int | None", "float | None"):
                assert f.metadata.get("valid"), f"{cls.__name__}.{f.name} declares no valid range"
    ft, tr = ({f.name: f for f in dataclasses.fields(c)} for c in (FinetuneConfig, TrainConfig))
    assert ft["epochs"].default != tr["epochs"].default  # redefined, and still what TrainConfig declares:
    assert ft["epochs"].metadata["valid"] is tr["epochs"].metadata["valid"]
    assert tr["head"].metadata["valid"].choices is HEADS


def test_sweep_files_are_checked_against_the_same_ranges_before_anything_runs(tmp_path):
    from ekx.heads import sweep as sw

    with pytest.raises(EkxError, match=r"configuration 1 .*'batch_size' must be >= 1, got 0"):
        sw.expand({"grid": {"batch_size": [16, 0]}}, "s.toml")
    with pytest.raises(EkxError, match=r"s.toml \[base\]: 'dropout' must be >= 0 and < 1, got 1.0"):
        sw.expand({"base": {"dropout": 1.0}}, "s.toml")
    bad_spaces = [
        ({"lr": {"log_uniform": [0.0, 1e-3]}}, r"'lr'.*log.*above 0"),
        ({"dropout": {"uniform": [0.6, 0.3]}}, r"'dropout'.*low 0.6 is above high 0.3"),
        ({"dropout": {"uniform": [0.3, 1.5]}}, r"'dropout'.*must be >= 0 and < 1, got 1.5"),
        ({"batch_size": {"choice": [16, 0]}}, r"'batch_size'.*must be >= 1, got 0"),
        ({"batch_size": {"uniform": [8, 32]}}, r"'batch_size'.*int_uniform"),
    ]
    for space, message in bad_spaces:
        with pytest.raises(EkxError, match=r"\[random\]: " + message):
            sw.expand({"random": {"trials": 2, **space}}, "s.toml")
        with pytest.raises(EkxError, match=r"\[optuna\]: " + message):
            from ekx.heads import search as se

            se.parse({"optuna": {"trials": 2, **space}}, "s.toml")


def test_search_options_have_declared_ranges(tmp_path):
    from ekx.heads import search as se

    with pytest.raises(EkxError, match=r"'reduction_factor' must be >= 2, got 1"):
        se.parse({"optuna": {"trials": 2, "reduction_factor": 1}}, "s.toml")
    with pytest.raises(EkxError, match=r"'min_epochs' must be >= 1, got 0"):
        se.parse({"optuna": {"trials": 2, "min_epochs": 0}}, "s.toml")


def test_sweep_list_refuses_a_bad_value_in_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text("[grid]\nepochs = [2, -1]\n")
    result = runner.invoke(app, ["sweep", "s.toml", "--list"])
    assert result.exit_code == 1, result.output
    assert "'epochs' must be >= 1, got -1" in result.output


# ---------------------------------------------------------------- 2. names at parse time


def test_a_mistyped_head_is_refused_first_with_the_close_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # empty: no cache, no annotations
    for cmd in ("train-head", "finetune"):
        result = runner.invoke(app, [cmd, "lsmt"])
        assert result.exit_code == 1, result.output
        [line] = lines(result.output)  # no progress line, no missing-cache complaint
        assert line.startswith("error: unknown head 'lsmt'; did you mean 'lstm'?"), line
        assert "pooling, lstm, transformer, cross-attention" in line


def test_cross_attention_is_accepted_with_an_underscore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train-head", "cross_attention", "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert "unknown head" not in result.output
    assert "no feature cache" in result.output  # it got past the name, to the (missing) cache


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "--backbone", "resnet51"], "--backbone: unknown backbone 'resnet51'; did you mean 'resnet50'?"),
        (
            ["extract", "--backbone", "resnet50,efficientnet-b3,r2plus1d_81"],
            "--backbone: unknown backbone 'r2plus1d_81'; did you mean 'r2plus1d_18'?",
        ),
        (["extract", "--backbone", "tim:vit_small"], "--backbone: unknown backbone family 'tim'"),
        (["extract", "--source", "torchcodex"], "--source: unknown frame source 'torchcodex'; did you mean"),
        (["train-head", "lstm", "--backbone", "resnet5"], "--backbone: unknown backbone 'resnet5'; did you mean"),
        (["sweep", "s.toml", "--backbone", "resnet51"], "--backbone: unknown backbone 'resnet51'; did you mean"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_backbone_and_source_names_are_checked_at_parse_time(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    [line] = lines(result.output)
    assert line.startswith(f"error: {message}"), line


def test_names_are_listed_in_help_and_completed_by_the_shell():
    from ekx.heads.config import HEADS

    help_text = " ".join(runner.invoke(app, ["train-head", "--help"], terminal_width=200).output.split())
    assert "pooling, lstm, transformer, cross-attention" in help_text
    extract_help = " ".join(runner.invoke(app, ["extract", "--help"], terminal_width=200).output.split())
    assert "resnet50, efficientnet_b3, r2plus1d_18" in extract_help
    assert "auto, decord, torchcodec, frames" in extract_help
    env = {"_EKX_COMPLETE": "complete_bash", "COMP_WORDS": "ekx train-head ", "COMP_CWORD": "2"}
    completed = runner.invoke(app, [], env=env, prog_name="ekx")
    assert set(completed.output.split()) >= set(HEADS), completed.output
    env = {"_EKX_COMPLETE": "complete_bash", "COMP_WORDS": "ekx extract --backbone r", "COMP_CWORD": "3"}
    assert runner.invoke(app, [], env=env, prog_name="ekx").output.split() == ["resnet50", "r2plus1d_18"]


def test_the_torch_free_name_lists_match_the_registries():
    from ekx.extract import backbones, sources
    from ekx.extract.config import BACKBONES, SOURCES
    from ekx.heads import models
    from ekx.heads.config import HEADS

    # the built-in names; a test's own registration (a plugin) adds to `plugins`, not `known`
    assert sorted(HEADS.known) == sorted(set(models.REGISTRY) - HEADS.plugins)
    assert sorted(BACKBONES.known) == sorted(set(backbones.REGISTRY) - BACKBONES.plugins)
    assert sorted(SOURCES.known) == sorted(["auto", *sources.BUILTIN])
    assert set(sources.names()) - SOURCES.plugins == set(sources.BUILTIN)


def test_a_registered_plugin_source_is_accepted_by_the_config_check():
    """A user's own `@register` source (the frame-source docs' "one file") passes ExtractConfig's
    name check, which is torch-free and lists only the built-in names."""
    from ekx.extract import sources
    from ekx.extract.config import SOURCES, ExtractConfig
    from ekx.options import checked as check

    with pytest.raises(EkxError, match="unknown frame source 'my-reader'"):
        check(ExtractConfig(source="my-reader"))
    sources.register(type("Mine", (sources.Source,), {"name": "my-reader"}))
    try:
        check(ExtractConfig(source="my-reader"))
        assert "my-reader" in str(SOURCES)
    finally:
        del sources.REGISTRY["my-reader"]
        SOURCES.plugins.discard("my-reader")


# ---------------------------------------------------------------- 3. no progress display before an error


def test_no_progress_bar_is_drawn_before_an_extract_error(synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ann = str(synth_data / "annotations")
    monkeypatch.setenv("EKX_VIDEOS", str(tmp_path / "no-such-dir"))  # the workspace's, not a flag
    result = runner.invoke(app, ["extract", "--annotations", ann, "--weights", "none", "--limit", "2"])
    assert result.exit_code == 1, result.output
    assert "no-such-dir does not exist" in result.output
    assert "frames/s" not in result.output and "segments" not in result.output.split("error:")[0]
    result = runner.invoke(app, ["extract", "--annotations", ann, "--videos", str(tmp_path / "nowhere")])
    assert result.exit_code == 1, result.output
    [line] = lines(result.output)
    assert line.startswith(f"error: --videos {tmp_path / 'nowhere'}: no such directory"), line


def test_no_progress_line_is_drawn_before_a_train_head_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "annotations").mkdir()
    result = runner.invoke(app, ["train-head", "lstm", "--annotations", "annotations"])
    assert result.exit_code == 1, result.output
    assert lines(result.output) == [
        "error: features/resnet50/train.h5: no feature cache here; run `ekx extract` first (or check --features)"
    ]


# ---------------------------------------------------------------- 4. help texts


def _leaf_commands() -> list[list[str]]:
    import typer.main

    out = []
    for name, cmd in typer.main.get_command(app).commands.items():
        out += [[name, sub] for sub in cmd.commands] if hasattr(cmd, "commands") else [[name]]
    return sorted(out)


def _command(argv: list[str]):
    import typer.main

    cmd = typer.main.get_command(app)
    for name in argv:
        cmd = cmd.commands[name]
    return cmd


DOCUMENT_SEED = re.compile(r"\bthe seed\b(?!s? of)|\bseed'?s\b(?! its)|\bseed (phase|table|finding)|\(seed\b", re.I)


@pytest.mark.parametrize("argv", _leaf_commands(), ids=" ".join)
def test_every_help_describes_every_parameter_in_words_that_survive(argv):
    result = runner.invoke(app, [*argv, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    cmd = _command(argv)
    texts = [cmd.help or ""]
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        name = p.opts[0] if p.opts else p.name
        assert (p.help or "").strip(), f"ekx {' '.join(argv)}: {name} has no description"
        texts.append(p.help)
    for text in texts:
        for word in re.findall(r"\[[^\]\s]+\]", text):  # [optuna], ekx[torchcodec], cuda[:N]
            assert word in shown, f"ekx {' '.join(argv)} --help lost {word!r}:\n{result.output}"
        assert not DOCUMENT_SEED.search(text), f"ekx {' '.join(argv)}: 'seed' names the document: {text!r}"
    assert "<bool>" not in result.output  # a flag takes no value
    assert "--help" in result.output


def test_flags_read_as_flags_and_bracketed_words_survive():
    sweep = " ".join(runner.invoke(app, ["sweep", "--help"], terminal_width=200).output.split())
    assert "or run an [optuna] search" in sweep
    extract = " ".join(runner.invoke(app, ["extract", "--help"], terminal_width=200).output.split())
    assert "pip install 'ekx[torchcodec]'" in extract
    train = runner.invoke(app, ["train-head", "--help"], terminal_width=200).output
    for flag in ("--config", "--resume", "--features", "--runs", "--annotations"):
        [row] = [line for line in train.splitlines() if line.strip().startswith(flag + " ")]
        assert len(row.split()) > 2, row  # flag, value label or not, then words


# ---------------------------------------------------------------- 5. errors before heavy imports


def test_importing_the_cli_loads_no_torch():
    code = (
        "import ekx.cli, sys; heavy = [m for m in ('torch', 'timm', 'open_clip', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "  # any import of them fails
    "from ekx.cli import main; sys.argv = ['ekx', *sys.argv[1:]]; main()"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-head", "lsmt"], "unknown head 'lsmt'; did you mean 'lstm'?"),
        (["train-head", "pooling", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["train-head", "pooling", "--config", "nope.toml"], "nope.toml: config file not found"),
        (["train-head", "pooling", "--annotations", "nope"], "--annotations nope: no such directory"),
        (["finetune", "transformer", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["finetune", "lstm", "--videos", "nope"], "--videos nope: no such directory"),
        (["extract", "--backbone", "resnet51"], "--backbone: unknown backbone 'resnet51'"),
        (["extract", "--videos", "nope"], "--videos nope: no such directory"),
        (["extract", "--shard", "4/4"], "--shard '4/4': I must be in 0..N-1"),
        (["sweep", "nope.toml"], "nope.toml: sweep file not found"),
        (["sweep", "bad.toml", "--list"], "bad.toml configuration 1 (001-lr=-1): 'lr' must be > 0, got -1.0"),
        (["sweep", "search.toml", "--set", "batch_size=0"], "'batch_size' must be >= 1, got 0"),
        (["sweep", "space.toml"], "space.toml [optuna]: 'lr' = { log_uniform = [0.0, 0.001] }: a log range"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
@pytest.mark.slow
def test_mistakes_are_reported_without_loading_torch(argv, message, tmp_path):
    (tmp_path / "bad.toml").write_text("[grid]\nlr = [1e-4, -1.0]\n")
    (tmp_path / "search.toml").write_text("[optuna]\ntrials = 2\nlr = { log_uniform = [1e-5, 1e-3] }\n")
    (tmp_path / "space.toml").write_text("[optuna]\ntrials = 2\nlr = { log_uniform = [0.0, 1e-3] }\n")
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = lines(result.stdout + result.stderr)  # one line naming the fault, no ImportError
    assert line.startswith("error: ") and message in line, line


def test_the_head_names_need_no_torch():
    code = "import sys; from ekx.heads.config import HEADS; assert HEADS and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
