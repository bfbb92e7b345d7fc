"""[optuna] searches (pruning, resume after kill -9, parallel workers), sweeps across caches,
phase1.toml, and what `ekx compare` leaves behind for a search; run-directory locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cache
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cli import app
from ekx.heads import runlock
from ekx.heads import search as se
from ekx.heads import sweep as sw
from ekx.heads.runlog import read_metrics

runner = CliRunner()
PHASE1 = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "phase1.toml"


def caches(root: Path, backbones=("resnet50",), n: int = 48) -> Path:
    """features/<backbone>/{train,validation}.h5 under root for each backbone."""
    for i, b in enumerate(backbones):
        make_cache(root / b / "train.h5", n=n, seed=10 * i, backbone=b)
        make_cache(root / b / "validation.h5", n=16, seed=10 * i + 1, backbone=b, split="validation")
    return root


def search_file(path: Path, optuna: str, base: str = 'head = "pooling"\nepochs = 3\nframes = 4\n') -> Path:
    path.write_text(f"[base]\n{base}\n[optuna]\n{optuna}\n")
    return path


def states(sweep_dir: Path) -> dict[int, str]:
    study = se.open_study(sweep_dir, create=False)
    return {ft.number: ft.state.name for ft in study.get_trials()}


def test_optuna_files_are_checked_and_name_the_key(tmp_path):
    spec = se.parse({"base": {"head": "lstm"}, "optuna": {"trials": 5, "lr": {"log_uniform": [1e-5, 1e-2]}}})
    assert (spec.trials, spec.sampler, spec.pruner, spec.objective, spec.direction) == (
        5,
        "tpe",
        "successive-halving",
        "val_action_top1",
        "maximize",
    )
    assert se.parse({"optuna": {"trials": 1, "objective": "val_loss"}}).direction == "minimize"
    for data, message in [
        ({"optuna": {"trials": 2, "lrr": {"uniform": [0, 1]}}}, r"unknown key\(s\) lrr"),
        ({"optuna": {"trials": 2, "pruner": "asha"}}, r"pruner 'asha'; use one of"),
        ({"optuna": {"trials": 0}}, r"'trials' must be a positive integer"),
        ({"optuna": {"trials": 2, "lr": [1e-4]}}, r"'lr' must be one of"),
        ({"optuna": {"trials": 2}, "grid": {"lr": [1e-4]}}, r"takes only \[base\] and \[optuna\]"),
    ]:
        with pytest.raises(EkxError, match=message):
            se.parse(data)
    with pytest.raises(EkxError, match="no fixed list of configurations"):
        sw.expand({"optuna": {"trials": 2}})


def test_phase1_file_lists_the_seeds_six_models():
    configs = {c.name: c.cfg for c in sw.load(PHASE1)}
    got = {n: (c.backbone, c.head, c.epochs) for n, c in configs.items()}
    assert sorted(got.values()) == sorted(
        [
            ("resnet50", "pooling", 25),
            ("resnet50", "lstm", 25),
            ("resnet50", "transformer", 35),
            ("r2plus1d_18", "pooling", 20),
            ("efficientnet_b3", "lstm", 20),
            ("efficientnet_b3", "transformer", 20),
        ]
    )


def test_a_cross_backbone_sweep_loads_each_cache_once(tmp_path, monkeypatch):
    from ekx.heads import train as tr

    feats = caches(tmp_path / "features", ("resnet50", "efficientnet_b3"))
    loads: list[tuple[str, str]] = []
    real = tr.load_data

    def counting(train_path, val_path, *args, **kwargs):
        loads.append((str(train_path), str(val_path)))
        return real(train_path, val_path, *args, **kwargs)

    monkeypatch.setattr(tr, "load_data", counting)
    configs = sw.expand(
        {
            "base": {"epochs": 1, "frames": 4},
            "grid": {"backbone": ["resnet50", "efficientnet_b3"], "head": ["pooling", "lstm"]},
        }
    )
    results = sw.run_sweep(configs, tmp_path / "runs" / "x", None, None, "cpu", features_root=feats)
    assert all(r["status"] == "done" for r in results.values()), results
    assert sorted(loads) == sorted(
        [(str(feats / b / "train.h5"), str(feats / b / "validation.h5")) for b in ("resnet50", "efficientnet_b3")]
    )
    for sc in configs:  # each run trained on its own backbone's cache
        config = (tmp_path / "runs" / "x" / sc.name / "config.toml").read_text()
        assert f'train_features = "{feats / sc.cfg.backbone / "train.h5"}"' in config
    # a search whose space holds the backbone: each cache once in the worker, too
    loads.clear()
    spec = se.parse(
        {
            "base": {"head": "pooling", "epochs": 1, "frames": 4},
            "optuna": {"trials": 5, "sampler": "random", "backbone": {"choice": ["resnet50", "efficientnet_b3"]}},
        }
    )
    out = se.run_search(spec, tmp_path / "runs" / "s", feats, "cpu")
    assert len(out) == 5 and all(r["status"] == "done" for r in out.values()), out
    assert len(loads) == len(set(loads)) == 2


def test_a_pruned_trial_is_recorded_as_pruned_and_compare_reports_the_search(tmp_path):
    feats = caches(tmp_path / "features")
    # lr 1e-7 cannot move in 3 epochs, 3e-2 can: successive halving (rate 2) stops the slow ones
    file = search_file(
        tmp_path / "s.toml",
        'trials = 8\nseed = 1\nsampler = "random"\nreduction_factor = 2\n'
        "lr = { choice = [3e-2, 1e-7] }\ndropout = { uniform = [0.0, 0.5] }",
        'head = "pooling"\nepochs = 3\nframes = 4\nwarmup_epochs = 0.0\n',
    )
    args = ["sweep", str(file), "--features", str(feats), "--runs", str(tmp_path / "runs"), "--device", "cpu"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "s"
    st = states(sweep_dir)
    assert len(st) == 8 and set(st.values()) <= {"COMPLETE", "PRUNED"}
    pruned = [n for n, s in st.items() if s == "PRUNED"]
    assert pruned, result.output
    for n in pruned:  # marked, and the partial curve and checkpoints stay
        d = se.trial_dir(sweep_dir, n)
        mark = json.loads((d / "pruned.json").read_text())
        assert [r["epoch"] for r in read_metrics(d)] == list(range(1, mark["epoch"] + 1)) and mark["epoch"] < 3
        assert (d / "last.pt").is_file() and not (d / "done.json").exists()
        assert f"trial-{n:04d} pruned after epoch {mark['epoch']}" in result.output
    # running it again trains nothing: the study already has its 8 trials
    again = runner.invoke(app, args, terminal_width=200)
    assert again.exit_code == 0 and "started" not in again.output and len(states(sweep_dir)) == 8
    # compare: importance of each parameter, objective-vs-parameter plot, the best trial's command
    out = runner.invoke(app, ["compare", str(sweep_dir)], terminal_width=300)
    assert out.exit_code == 0, out.output
    importance = json.loads((sweep_dir / "importance.json").read_text())
    assert set(importance) == {"lr", "dropout"} and abs(sum(importance.values()) - 1) < 1e-6
    assert (sweep_dir / "objective.png").stat().st_size > 5_000
    study = se.open_study(sweep_dir, create=False)
    best = f"trial-{study.best_trial.number:04d}"
    assert f"best trial: {best}" in out.output
    assert f"ekx train-head pooling --config {sweep_dir / best / 'config.toml'} --name {best}-again" in out.output


@pytest.mark.slow
def test_a_study_resumes_after_kill_9_of_a_worker_without_duplicating_or_losing_trials(tmp_path):
    feats = caches(tmp_path / "features", n=96)
    file = search_file(
        tmp_path / "s.toml",
        'trials = 3\nseed = 0\npruner = "none"\nlr = { log_uniform = [1e-4, 1e-2] }',
        'head = "lstm"\nepochs = 3\nframes = 8\n',
    )
    args = ["sweep", str(file), "--features", str(feats), "--runs", str(tmp_path / "runs"), "--device", "cpu"]
    sweep_dir = tmp_path / "runs" / "s"
    proc = subprocess.Popen([sys.executable, "-m", "ekx", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    victim = se.trial_dir(sweep_dir, 1)
    deadline = time.time() + 120
    while len(read_metrics(victim)) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-trial: trial 1 has 1 epoch checkpointed, 2 to go
    proc.wait(30)
    first = read_metrics(victim)
    assert 1 <= len(first) < 3, first
    assert states(sweep_dir)[1] == "RUNNING"
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "trial-0001 resumed" in result.output
    st = states(sweep_dir)
    assert st == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE"}  # none lost, none added
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["trial-0000", "trial-0001", "trial-0002"]
    rows = read_metrics(victim)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[: len(first)] == first  # the finished epochs were kept, not trained again
    study = se.open_study(sweep_dir, create=False)
    assert sorted(study.trials[1].intermediate_values) == [1, 2, 3]
    assert f"lr = {study.trials[1].params['lr']!r}" in (victim / "config.toml").read_text()  # its own parameters


@pytest.mark.slow
def test_two_concurrent_workers_never_run_the_same_trial(tmp_path):
    feats = caches(tmp_path / "features")
    spec = se.parse(
        {
            "base": {"head": "pooling", "epochs": 2, "frames": 4},
            "optuna": {"trials": 6, "pruner": "none", "lr": {"log_uniform": [1e-4, 1e-2]}},
        }
    )
    starts: list[str] = []
    se.run_search(
        spec, tmp_path / "runs" / "s", feats, "cpu", jobs=2, on_event=lambda k, n, r: k == "start" and starts.append(n)
    )
    assert sorted(starts) == [f"trial-{i:04d}" for i in range(6)]  # each trial started exactly once
    for i in range(6):
        assert [r["epoch"] for r in read_metrics(se.trial_dir(tmp_path / "runs" / "s", i))] == [1, 2]
    assert set(states(tmp_path / "runs" / "s").values()) == {"COMPLETE"}


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out |= {k} | _descendants(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sweep_workers_die_with_a_killed_parent(tmp_path):
    feats = caches(tmp_path / "features", n=400)
    file = tmp_path / "g.toml"
    file.write_text('[base]\nhead = "lstm"\nepochs = 50\n\n[grid]\nlr = [1e-4, 2e-4, 3e-4, 4e-4]\n')
    args = ["sweep", str(file), "--jobs", "2", "--features", str(feats), "--runs", str(tmp_path / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "ekx", *args, "--device", "cpu"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "runs" / "g").glob("*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.1)
    kids = _descendants(proc.pid)
    assert len(kids) >= 2, kids  # the pool's workers (and spawn's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if _alive(k)]
    done = {p.parent.name: p.stat().st_mtime for p in (tmp_path / "runs" / "g").glob("*/metrics.jsonl")}
    time.sleep(1.5)  # nothing goes on writing
    assert done == {p.parent.name: p.stat().st_mtime for p in (tmp_path / "runs" / "g").glob("*/metrics.jsonl")}


def test_a_sweep_refuses_a_run_another_live_process_trains(tmp_path):
    feats = caches(tmp_path / "features")
    configs = sw.expand(
        {"base": {"epochs": 1, "head": "pooling", "frames": 4}, "config": [{"name": "a"}, {"name": "b"}]}
    )
    sweep_dir = tmp_path / "runs" / "x"
    other = subprocess.Popen(["sleep", "60"])
    try:
        for name, pid in (("a", other.pid), ("b", 2**22 + 7)):  # a live process, a pid nobody has
            (sweep_dir / name).mkdir(parents=True)
            record = {"pid": pid, "host": os.uname().nodename, "start": runlock._start_time(pid), "since": 0, "beat": 0}
            (sweep_dir / name / runlock.RECORD).write_text(json.dumps(record))
        results = sw.run_sweep(configs, sweep_dir, None, None, "cpu", features_root=feats)
    finally:
        other.kill()
        other.wait()
    assert results["a"]["status"] == "failed" and f"being trained by pid {other.pid}" in results["a"]["error"]
    assert not (sweep_dir / "a" / "metrics.jsonl").exists()
    assert results["b"]["status"] == "done"  # a dead owner's run is taken over
    assert not (sweep_dir / "b" / runlock.RECORD).exists()  # and released when done


@pytest.mark.slow
def test_phase1_sweep_runs_on_three_backbones_and_compare_prints_its_table(tmp_path):
    feats = caches(tmp_path / "features", ("resnet50", "efficientnet_b3", "r2plus1d_18"), n=24)
    runs = tmp_path / "runs"
    args = ["sweep", str(PHASE1), "--features", str(feats), "--runs", str(runs), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--set", "epochs=1", "--set", "frames=4"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "6/6 configurations finished" in result.output
    out = runner.invoke(app, ["compare", str(runs / "phase1")], terminal_width=300)
    assert out.exit_code == 0, out.output
    table = (runs / "phase1" / "comparison.md").read_text()
    for name in sw.load(PHASE1):
        line = next(x for x in table.splitlines() if x.startswith(f"| {name.name} |"))
        assert f"| {name.cfg.head} | {name.cfg.backbone} | done |" in line


# ---------------------------------------------------------------- issue 23 points 6-8


def test_best_pt_follows_the_searchs_objective(tmp_path, monkeypatch):
    """Objective val_loss: best.pt, the trial's value, done.json and compare's row are all the
    epoch of the lowest validation loss - not the epoch of the best action top-1."""
    from ekx.heads import compare
    from ekx.heads import train as tr

    loss, action = [3.0, 2.0, 1.0, 1.5], [10.0, 20.0, 30.0, 40.0]  # lowest loss at 3, best action at 4
    real, calls = tr.score, iter(range(len(loss)))

    def scripted(*args, **kwargs):
        i = next(calls)
        return {**real(*args, **kwargs), "val_loss": loss[i], "val_action_top1": action[i]}

    monkeypatch.setattr(tr, "score", scripted)
    feats = caches(tmp_path / "features")
    spec = se.parse(
        {
            "base": {"head": "pooling", "epochs": 4, "frames": 4},
            "optuna": {"trials": 1, "pruner": "none", "objective": "val_loss", "lr": {"log_uniform": [1e-4, 1e-3]}},
        }
    )
    sweep_dir = tmp_path / "runs" / "s"
    out = se.run_search(spec, sweep_dir, feats, "cpu")
    assert out["trial-0000"] == {"status": "done", "value": 1.0}
    run = se.trial_dir(sweep_dir, 0)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 3
    assert json.loads((run / "done.json").read_text())["best"]["epoch"] == 3
    (row,) = compare.collect([sweep_dir])
    assert row["best_epoch"] == 3 and row["val_loss"] == 1.0


@pytest.mark.slow
def test_two_searches_on_one_study_with_the_same_worker_get_distinct_seeds(tmp_path, capsys):
    """`ekx sweep` twice at once on one directory, both worker 0: the second becomes worker 1,
    with its own sampler seed (it used to propose the first's parameters, trial for trial)."""
    feats = caches(tmp_path / "features", n=400)
    space = 'trials = 3\nseed = 0\nsampler = "random"\npruner = "none"\nlr = { log_uniform = [1e-5, 1e-2] }\n'
    slow = search_file(tmp_path / "slow.toml", space, 'head = "lstm"\nepochs = 1000\nframes = 8\n')
    runs, sweep_dir = tmp_path / "runs", tmp_path / "runs" / "s"
    args = ["sweep", str(slow), "--name", "s", "--features", str(feats), "--runs", str(runs), "--device", "cpu"]
    first = subprocess.Popen([sys.executable, "-m", "ekx", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (se.trial_dir(sweep_dir, 0) / "metrics.jsonl").exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.time() < deadline, "the first search did not start its trial"
            time.sleep(0.1)
        # the same study, objective and space; a quick base: the second takes trials 1 and 2
        quick = search_file(tmp_path / "quick.toml", space)
        out = se.run_search(se.load(quick), sweep_dir, feats, "cpu", worker=0)
        assert first.poll() is None  # both ran at once
    finally:
        first.kill()
        first.wait()
    assert sorted(out) == ["trial-0001", "trial-0002"]
    study = se.open_study(sweep_dir, create=False)
    lrs = [t.params["lr"] for t in study.get_trials()]
    assert len(lrs) == 3 and len(set(lrs)) == 3, lrs
    assert f"worker 0 of {sweep_dir} is held by another live process: this one is worker 1" in capsys.readouterr().err


def test_a_worker_slot_is_freed_when_its_holder_ends(tmp_path):
    with runlock.slot(tmp_path / ".worker", 0) as a, runlock.slot(tmp_path / ".worker", 0) as b:
        with runlock.slot(tmp_path / ".worker", 1) as c:
            assert (a, b, c) == (0, 1, 2)
    with runlock.slot(tmp_path / ".worker", 0) as again:
        assert again == 0


def _study_of_two(sweep_dir: Path):
    spec = se.parse({"optuna": {"trials": 5, "sampler": "random", "lr": {"log_uniform": [1e-5, 1e-2]}}})
    study = se.open_study(sweep_dir, spec)
    for _ in range(2):
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        study.tell(trial, 1.0)
    return spec


def test_a_torn_last_journal_record_is_dropped_before_the_next_append(tmp_path, capsys):
    sweep_dir = tmp_path / "runs" / "s"
    spec = _study_of_two(sweep_dir)
    journal = se.journal_path(sweep_dir)
    lines = journal.read_bytes().count(b"\n")
    with journal.open("ab") as f:  # a kill -9 (or a full disk) mid-append: half a record, no newline
        f.write(b'{"op_code":5,"worker_id":"0-x","trial_id":2,"sta')
    study = se.open_study(sweep_dir, spec)  # Optuna's reader ignores the torn last line
    trial = study.ask()  # the next append cuts it off first
    trial.suggest_float("lr", 1e-5, 1e-2, log=True)
    study.tell(trial, 2.0)
    assert f"{journal}: line {lines + 1}, its last record, was cut short" in capsys.readouterr().err
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())  # nothing after a torn line
    again = se.open_study(sweep_dir, create=False)  # readable by a fresh process, every trial there
    assert [t.state.name for t in again.get_trials()] == ["COMPLETE"] * 3
    # a torn record that ends in a newline (a full disk mid-line, then one more byte) is cut too
    with journal.open("ab") as f:
        f.write(b'{"op_code":5,"wor\n')
    se.open_study(sweep_dir, spec).ask()
    assert len(se.open_study(sweep_dir, create=False).get_trials()) == 4


def test_a_damaged_line_inside_the_journal_is_named(tmp_path):
    sweep_dir = tmp_path / "runs" / "s"
    spec = _study_of_two(sweep_dir)
    journal = se.journal_path(sweep_dir)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:3], b'{"op_code":5,"wor' + lines[3], *lines[4:]]))  # written after a tear
    for call in (lambda: se.open_study(sweep_dir, spec), lambda: se.open_study(sweep_dir, create=False)):
        with pytest.raises(EkxError, match=rf"^{journal} line 4 is not a whole record .*head -n 3"):
            call()
