"""What a newcomer met on the results side (issue 34, point 5): tables that keep the run
name and the figures at 80 columns and whole when piped, `ekx compare` over `runs/*` (again),
its state and backbone columns, a refused run that leaves nothing, `--version`, mistakes
answered before torch loads, help texts without Python types, docs whose references hold."""

from __future__ import annotations

import glob
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


# ---------------------------------------------------------------- ekx compare over runs/*

ROW = {k: 10.0 for k in ("train_loss", "val_loss", "train_action_top1", "gap", "seconds", "lr")}
ROW |= {f"val_{t}_top{k}": 20.0 for t in ("verb", "noun", "action") for k in (1, 5)}


def _run(root: Path, name: str, epochs: int, logged: int, head: str = "lstm") -> Path:
    """A run directory as train-head leaves it: config.toml and `logged` epochs of metrics."""
    import json

    from ekx.heads import runlog
    from ekx.heads.config import TrainConfig

    d = root / name
    d.mkdir(parents=True)
    runlog.write_config(d, TrainConfig(head=head, epochs=epochs, name=name))
    rows = [{**ROW, "epoch": e, "val_action_top1": 20.0 + e + len(name) / 10} for e in range(1, logged + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs in every state a run directory can say: done, interrupted, empty (a refusal left by
    an older ekx), failed (its trainer raised), running (a live trainer holds it), pruned."""
    from ekx.heads import runlock

    root = tmp_path_factory.mktemp("w") / "runs"
    _run(root, "transformer-very-long-run-name-a", 3, 3)
    _run(root, "transformer-very-long-run-name-b", 3, 2)
    _run(root, "context-refused-earlier", 20, 0, head="context")
    with pytest.raises(RuntimeError), runlock.claim_or_refuse(_run(root, "trial-0001", 3, 1), root / ".claim.lock"):
        raise RuntimeError("out of memory")
    (_run(root, "trial-0002", 3, 1) / "pruned.json").write_text("{}")
    live = runlock.claim_or_refuse(_run(root, "trial-0003", 3, 1), root / ".claim.lock")
    yield root
    live.release()


STATES = {
    "transformer-very-long-run-name-a": "done",
    "transformer-very-long-run-name-b": "interrupted",
    "context-refused-earlier": "empty",
    "trial-0001": "failed",
    "trial-0002": "pruned",
    "trial-0003": "running",
}


def test_compare_runs_glob_works_again_and_fills_the_state_of_every_run(runs):
    for _ in range(2):  # the second glob picks up the comparison.md/.csv the first one wrote
        result = runner.invoke(app, ["compare", *sorted(glob.glob(f"{runs}/*"))])  # as the shell expands runs/*
        assert result.exit_code == 0, result.output
    assert "skipped (no run in them)" in result.output and "comparison.csv" in result.output
    # piped (no terminal): the whole table, as Markdown, every name whole
    table = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    for name, state in STATES.items():
        assert f"| {state} |" in table[name], table[name]
    assert "…" not in result.output and max(map(len, result.output.splitlines())) > 80
    assert list(table)[-1] == "context-refused-earlier"  # an empty run is listed last, without figures


def test_compare_in_an_80_column_terminal_keeps_names_and_figures(runs):
    import csv
    import os

    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "80", "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "ekx", "compare", str(runs), "--out", str(runs.parent / "cmp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shown = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    table = shown.split("-> ")[0]
    assert max(map(len, table.splitlines())) <= 80 and "…" not in table, table
    cells = re.split(r"\s{2,}|\n", table)
    with open(runs.parent / "cmp.csv") as fh:
        for row in csv.DictReader(fh):
            assert row["run"] in cells, (row["run"], table)  # a name is never cut
            for key in ("val_action_top1", "val_noun_top5", "gap"):
                if row[key]:
                    assert f"{float(row[key]):.1f}" in table


def test_the_demo_table_at_80_columns_and_piped():
    import io

    from rich.console import Console

    from ekx import demo

    row = {"params": 5_410_000, "train_action_top1": 98.41, "val_action_top1": 56.25, "gap": 42.16, "epoch": 20}
    row |= {"val_verb_top1": 63.2, "val_noun_top1": 77.9, "direction": 100.0, "cue": 98.0, "others": 75.0}
    rows = [{**row, "head": h} for h in ("context", "transformer (dense 4/s)", "cross-attention")]
    cells = demo.comparison_rows(rows)
    for terminal in (True, False):
        console = Console(file=io.StringIO(), width=80, force_terminal=terminal, color_system=None)
        from ekx import tables

        tables.show(console, demo.COLUMNS, cells, "model comparison", demo.CAPTION)
        text = console.file.getvalue()
        assert "…" not in text and "..." not in text
        for cell in {c for r in cells for c in r}:
            assert cell in text, (cell, text)
        if terminal:
            assert max(map(len, text.splitlines())) <= 80, text
        else:
            assert "| transformer (dense 4/s) | 5.41M | 98.4 | 56.2 | +42.2 |" in text, text


# ---------------------------------------------------------------- refused runs, the features' identity


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Per-segment caches of resnet50 and of imported features (same segments)."""
    from conftest import make_cache

    root = tmp_path_factory.mktemp("features")
    for b in ("resnet50", "imported:rulstm-tsn-rgb"):
        make_cache(root / b / "train.h5", n=32, k=4, seed=1, backbone=b)
        make_cache(root / b / "validation.h5", n=16, k=4, seed=2, backbone=b, split="validation")
    return root


def test_a_refused_context_run_leaves_no_run_directory(features, tmp_path):
    args = ["train-head", "context", "--features", str(features), "--runs", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--name", "ctx", "--device", "cpu"])
    assert result.exit_code == 1 and "reads windows of a dense store" in result.output, result.output
    assert not (tmp_path / "runs" / "ctx").exists()


@pytest.mark.parametrize(
    ("parts", "shown"),
    [(("imported:rulstm-tsn-rgb",), "imported:rulstm-tsn-rgb"), (("resnet50", "imported:rulstm-tsn-rgb"), None)],
    ids=["imported", "fused"],
)
def test_runs_on_imported_or_fused_features_show_their_own_identity(features, tmp_path, parts, shown):
    shown = shown or "+".join(parts)
    train = "+".join(str(features / p / "train.h5") for p in parts)
    val = "+".join(str(features / p / "validation.h5") for p in parts)
    args = ["train-head", "pooling", "--train-features", train, "--val-features", val, "--epochs", "1"]
    result = runner.invoke(app, [*args, "--runs", str(tmp_path), "--name", "r", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "r" / "config.toml").read_text()
    assert f"# features: {shown} " in config, config
    from ekx.heads.config import resolve_config

    assert resolve_config(tmp_path / "r" / "config.toml", {}).head == "pooling"  # still usable as --config
    table = runner.invoke(app, ["compare", str(tmp_path / "r")]).output
    assert f"| r | pooling | {shown} | done |" in table, table


# ---------------------------------------------------------------- docs: what they name exists

REPO = Path(__import__("ekx").__file__).resolve().parents[1]  # the checkout whose ekx is tested
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("ekx", "configs", "bench", "docs", "tests", "slurm")


def _slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (MkDocs' default)."""
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a shell comment is no heading
    return [h.strip() for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_paths_and_sections_the_docs_name_exist(doc):
    text = doc.read_text()
    for path in re.findall(r"`((?:%s)/[\w./-]*\w/?)`" % "|".join(TOP), text):  # noqa: UP031
        if not any(c in path for c in "<*"):
            assert (REPO / path).exists(), f"{doc.name} names {path}, which is not in the repository"
    for target, anchor in re.findall(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)", text):
        page = (doc.parent / target).resolve()
        assert page.is_file(), f"{doc.name} links to {target}"
        if anchor:
            assert anchor in map(_slug, _headings(page)), f"{doc.name} links to {target}#{anchor}: no such section"
    readme = " ".join(_headings(REPO / "README.md")).lower()
    for section in re.findall(r"README(?:'s|:) (\w+)", text):
        assert section.lower() in readme, f"{doc.name} cites the README's {section!r}: it has no such section"


def test_sweep_files_cite_sections_that_exist():
    for toml in sorted((REPO / "configs" / "sweeps").glob("*.toml")):
        text = toml.read_text()
        readme = " ".join(_headings(REPO / "README.md")).lower()
        for section in re.findall(r"README: (\w+)", text):
            assert section.lower() in readme, f"{toml.name} cites the README's {section!r}: no such section"
        for page, section in re.findall(r"(docs/[\w-]+\.md), \"([^\"]+)\"", text):
            assert any(section in h for h in _headings(REPO / page)), f"{toml.name} cites {page} {section!r}"


def test_commands_in_the_docs_compare_what_the_sweep_wrote():
    """`ekx sweep configs/sweeps/X.toml` writes runs/X/ (the file's stem): a compare after it names that."""
    for doc in DOCS:
        for stem, runs in re.findall(
            r"ekx sweep configs/sweeps/([\w-]+)\.toml[^\n]*?&& ekx compare (\S+)", doc.read_text()
        ):
            assert runs.rstrip("/") == f"runs/{stem}", f"{doc.name}: ekx compare {runs} after the sweep {stem}"


def test_head_lists_in_the_docs_name_every_head_and_extras_lists_the_makefiles():
    from ekx.heads.config import HEADS

    makefile = (REPO / "Makefile").read_text()
    installed = set(re.search(r"pip install -q -e '\.\[([\w,-]+)\]'", makefile).group(1).split(","))
    for doc in DOCS:
        text = " ".join(doc.read_text().split())
        for listed in re.findall(r"pooling, lstm, transformer, cross-attention[\w ,-]*", text):
            names = {n.strip() for n in listed.split(",")}
            assert set(HEADS) <= names, f"{doc.name} lists heads {listed!r} without {set(HEADS) - names}"
        for listed in re.findall(
            r"installs ekx[^.]*?extras \(([^)]*)\)|with the ((?:`[\w-]+`,? )+and `[\w-]+`) extras", text
        ):
            names = set(re.findall(r"[\w-]+", " ".join(listed))) - {"and"}
            assert names == installed, (
                f"{doc.name} lists extras {sorted(names)}; the Makefile installs {sorted(installed)}"
            )


def test_the_demos_cpu_seconds_count_its_finished_worker_processes():
    from ekx.demo import cpu_seconds

    before = cpu_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # a worker's CPU time, on no core of ours
    assert cpu_seconds() - before >= 0.3
