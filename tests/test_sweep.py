"""Sweeps (expansion, resumable runs on real extracted data), held-out split, compare."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ekx import EkxError, epic
from ekx.cli import app
from ekx.heads import sweep as sw
from ekx.heads.runlog import read_metrics
from ekx.split import write_split

runner = CliRunner()
PHASE2 = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "phase2.toml"


def test_phase2_file_holds_the_seed_table_exactly():
    table = [
        (5e-5, 24, 0.5, 0.1, 0.1),
        (1e-4, 24, 0.4, 0.1, 0.1),
        (5e-5, 32, 0.5, 0.15, 0.1),
        (5e-5, 24, 0.6, 0.1, 0.15),
        (3e-5, 24, 0.5, 0.1, 0.1),
        (5e-5, 16, 0.5, 0.1, 0.1),
        (5e-5, 24, 0.5, 0.2, 0.1),
        (5e-5, 24, 0.4, 0.1, 0.05),
    ]
    configs = sw.load(PHASE2)
    assert [c.name for c in configs] == [f"config{i}" for i in range(1, 9)]
    for c, row in zip(configs, table, strict=False):
        assert (c.cfg.lr, c.cfg.batch_size, c.cfg.dropout, c.cfg.label_smoothing, c.cfg.drop_path) == row
        assert (c.cfg.head, c.cfg.weight_decay, c.cfg.grad_clip) == ("transformer", 1e-4, 1.0)


def test_grid_is_a_cartesian_product_over_any_key():
    configs = sw.expand(
        {
            "base": {"epochs": 3},
            "grid": {"head": ["lstm", "pooling"], "lr": [1e-4, 3e-4, 1e-3]},
            "config": [{"name": "first", "head": "transformer"}],
        }
    )
    assert len(configs) == 1 + 2 * 3
    assert configs[0].name == "first" and configs[0].cfg.head == "transformer"
    assert [(c.cfg.head, c.cfg.lr) for c in configs[1:]] == [
        ("lstm", 1e-4),
        ("lstm", 3e-4),
        ("lstm", 1e-3),
        ("pooling", 1e-4),
        ("pooling", 3e-4),
        ("pooling", 1e-3),
    ]
    assert all(c.cfg.epochs == 3 for c in configs) and [c.index for c in configs] == list(range(7))


def test_random_search_is_deterministic_for_a_seed_and_in_range():
    spec = {
        "random": {
            "trials": 20,
            "seed": 3,
            "lr": {"log_uniform": [1e-5, 1e-3]},
            "dropout": {"uniform": [0.3, 0.6]},
            "batch_size": {"choice": [16, 32]},
            "epochs": {"int_uniform": [2, 4]},
        }
    }
    a, b = sw.expand(spec), sw.expand(spec)
    assert len(a) == 20 and [x.cfg for x in a] == [x.cfg for x in b]
    assert all(
        1e-5 <= c.cfg.lr <= 1e-3
        and 0.3 <= c.cfg.dropout <= 0.6
        and c.cfg.batch_size in (16, 32)
        and 2 <= c.cfg.epochs <= 4
        for c in a
    )
    other = sw.expand({"random": {**spec["random"], "seed": 4}})
    assert [x.cfg.lr for x in other] != [x.cfg.lr for x in a]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"grid": {"lr": [1e-4], "learning_rate": [1e-3]}}, r"\[grid\]: unknown key\(s\) learning_rate"),
        ({"base": {"epoch": 3}}, r"\[base\]: unknown key\(s\) epoch"),
        ({"config": [{"name": "a", "dropuot": 0.1}]}, r"\[\[config\]\] #1: unknown key\(s\) dropuot"),
        ({"random": {"trials": 2, "lr": {"gauss": [0, 1]}}}, r"\[random\]: 'lr' must be one of"),
        ({"sweep": {}}, r"unknown section\(s\) sweep"),
        ({"grid": {"lr": 1e-4}}, r"'lr' must be a non-empty list"),
    ],
)
def test_bad_sweep_files_name_the_key(data, message):
    with pytest.raises(EkxError, match=message):
        sw.expand(data)


@pytest.mark.slow
def test_phase2_sweep_on_synth_data_resumes_after_a_kill(demo_workspace, tmp_path):
    workdir, demo = demo_workspace
    assert demo.exit_code == 0, demo.output
    feats = workdir / "features" / "resnet50"
    args = [
        "sweep",
        str(PHASE2),
        "--runs",
        str(tmp_path),
        "--train-features",
        str(feats / "train.h5"),
        "--val-features",
        str(feats / "validation.h5"),
        "--set",
        "epochs=2",
        "--set",
        "frames=4",
        # one narrow layer instead of the head's 20M parameters: the sweep's kill, resume and
        # comparison are the test (each configuration's own values still set what they set)
        "--set",
        "layers=1",
        "--set",
        "width=64",
    ]
    sweep_dir = tmp_path / "phase2"
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ekx", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE"),
    )
    deadline = time.time() + 300
    while not (sweep_dir / "config3" / "done.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    finished = {d.name for d in sweep_dir.iterdir() if (d / "done.json").exists()}
    assert {"config1", "config2", "config3"} <= finished and len(finished) < 8, log.read_text()
    mtimes = {n: (sweep_dir / n / "done.json").stat().st_mtime for n in finished}
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "8/8 configurations finished" in result.output
    for n in finished:  # finished runs were skipped, not retrained
        assert (sweep_dir / n / "done.json").stat().st_mtime == mtimes[n]
    for i in range(1, 9):
        rows = read_metrics(sweep_dir / f"config{i}")
        assert [r["epoch"] for r in rows] == [1, 2]
        assert (sweep_dir / f"config{i}" / "best.pt").is_file()
    # compare: the table matches the metrics files; Markdown, CSV and PNG are written
    png = tmp_path / "phase2.png"
    result = runner.invoke(app, ["compare", str(sweep_dir), "--plot", str(png)], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 10_000
    with open(sweep_dir / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8
    for row in table:
        best = max(read_metrics(sweep_dir / row["run"]), key=lambda r: r["val_action_top1"])
        assert float(row["val_action_top1"]) == pytest.approx(best["val_action_top1"])
        assert float(row["gap"]) == pytest.approx(best["gap"])
        assert float(row["val_noun_top5"]) == pytest.approx(best["val_noun_top5"])
        assert int(row["epochs"]) == 2 and row["head"] == "transformer"
    assert [float(r["val_action_top1"]) for r in table] == sorted(
        (float(r["val_action_top1"]) for r in table), reverse=True
    )
    assert f"ekx train-head transformer --config {sweep_dir / table[0]['run'] / 'config.toml'}" in result.output
    assert (sweep_dir / "comparison.md").read_text().count("\n") == 10


def test_a_failed_configuration_is_reported_and_the_others_go_on(tmp_path):
    from conftest import make_cache

    train = make_cache(tmp_path / "t.h5", n=48, seed=0)
    val = make_cache(tmp_path / "v.h5", n=16, seed=1)
    configs = sw.expand(
        {
            "base": {"epochs": 1, "head": "pooling"},
            "config": [{"name": "ok1"}, {"name": "bad", "frames": 99}, {"name": "ok2"}],
        }
    )
    events = []
    results = sw.run_sweep(
        configs, tmp_path / "s", train, val, "cpu", on_event=lambda k, sc, r: events.append((k, sc.name))
    )
    assert {n: r["status"] for n, r in results.items()} == {"ok1": "done", "bad": "failed", "ok2": "done"}
    assert "exceeds the 8 frames" in results["bad"]["error"]
    again = sw.run_sweep(configs, tmp_path / "s", train, val, "cpu")
    assert again["ok1"]["status"] == "skipped" and again["bad"]["status"] == "failed"


@pytest.mark.slow
def test_jobs_run_configurations_in_parallel_processes(tmp_path):
    from conftest import make_cache

    train = make_cache(tmp_path / "t.h5", n=48, seed=0)
    val = make_cache(tmp_path / "v.h5", n=16, seed=1)
    configs = sw.expand({"base": {"epochs": 2, "head": "lstm", "frames": 4}, "grid": {"lr": [1e-4, 1e-3]}})
    results = sw.run_sweep(configs, tmp_path / "par", train, val, "cpu", jobs=2)
    serial = sw.run_sweep(configs, tmp_path / "ser", train, val, "cpu", jobs=1)
    assert all(r["status"] == "done" for r in [*results.values(), *serial.values()])
    for sc in configs:  # the same seed and device give the same metrics, in or out of a pool
        a = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "par" / sc.name)]
        b = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "ser" / sc.name)]
        assert a == b


def test_split_by_video_is_deterministic_and_keeps_verbs_close(epic100, tmp_path):
    # the shared validation CSV stands in for train (the 67k-row train file is not shipped)
    ann = tmp_path / "ann"
    ann.mkdir()
    for f in epic100.glob("*.csv"):
        target = ann / (epic.SPLIT_FILES["train"] if f.name == epic.SPLIT_FILES["validation"] else f.name)
        target.write_bytes(f.read_bytes())
    a = write_split(ann, tmp_path / "a", fraction=0.2, seed=1)
    write_split(ann, tmp_path / "b", fraction=0.2, seed=1)
    for name in (epic.SPLIT_FILES["train"], epic.SPLIT_FILES["validation"]):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tr_ = epic.Annotations(tmp_path / "a").segments("train")
    va = epic.Annotations(tmp_path / "a").segments("validation")
    assert len(tr_) + len(va) == 9668
    assert {s.video_id for s in tr_}.isdisjoint({s.video_id for s in va})
    assert 0.15 <= len(va) / 9668 <= 0.25
    assert a["verb_tv_distance"] < 0.15
    c = write_split(ann, tmp_path / "c", fraction=0.2, seed=2)
    assert (tmp_path / "c" / epic.SPLIT_FILES["validation"]).read_bytes() != (
        tmp_path / "a" / epic.SPLIT_FILES["validation"]
    ).read_bytes() or c == a
    result = runner.invoke(app, ["split", str(tmp_path / "d"), "--annotations", str(ann)])
    assert result.exit_code == 0 and "held out" in result.output
