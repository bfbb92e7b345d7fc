"""A tracked search: each trial its own tracked run grouped under the sweep (W&B group, MLflow
parent run, TensorBoard sub-directories), a pruned trial marked pruned; and where the trackers
come from (EKX_TRACK, ekx.toml, --track none) and what the CLI imports (issue 34)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_track import ALL, caches, env, mlflow_client, tb_texts, wandb_run  # noqa: F401
from typer.testing import CliRunner

from ekx import EkxError
from ekx.cli import app
from ekx.track import names

runner = CliRunner()


def test_search_trials_are_grouped_and_a_pruned_trial_is_marked(env, caches, tmp_path, monkeypatch):  # noqa: F811
    import optuna

    # trial 1 is pruned after its first epoch (the pruner's verdict, forced: which trial it
    # would choose depends on the figures)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    file = tmp_path / "s.toml"
    file.write_text(
        '[base]\nhead = "pooling"\nepochs = 2\nbatch_size = 8\nframes = 4\nprecision = "fp32"\n'
        '[optuna]\ntrials = 2\nsampler = "random"\nlr = { log_uniform = [1e-4, 1e-3] }\n'
    )
    runs = tmp_path / "runs"
    args = ["sweep", str(file), "--runs", str(runs), "--device", "cpu", "--track", ALL]
    res = runner.invoke(app, [*args, "--train-features", str(caches[0]), "--val-features", str(caches[1])])
    assert res.exit_code == 0, res.output
    assert "trial-0001 pruned after epoch 1" in res.output and "failed" not in res.output, res.output
    trials = {"trial-0000": "finished", "trial-0001": "pruned"}

    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    tb = EventMultiplexer().AddRunsFromDirectory(str(runs / "s"))  # the sweep: one TensorBoard run a trial
    tb.Reload()
    assert sorted(tb.Runs()) == [f"{t}/tensorboard" for t in trials]
    for trial, status in trials.items():
        assert tb_texts(runs / "s" / trial / "tensorboard")["status"] == status

    c = mlflow_client(tmp_path)
    exp = c.get_experiment_by_name("ekx").experiment_id
    by_name = {r.info.run_name: r for r in c.search_runs([exp])}
    assert set(by_name) == {"s", *trials}
    parent = by_name["s"].info.run_id
    for trial, status in trials.items():
        run = by_name[trial]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["ekx.status"] == status
        assert run.info.status == "FINISHED" and float(run.data.params["lr"]) > 0

    for trial, status in trials.items():
        got = wandb_run(runs / "s" / trial)
        assert got["group"] == {"s"} and ("pruned" in got["tags"]) == (status == "pruned")
        assert got["summary"]["status"] == f'"{status}"'


def test_trackers_come_from_the_run_then_ekx_track_then_ekx_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EKX_TRACK", raising=False)
    assert names("") == ()
    (tmp_path / "ekx.toml").write_text('[workspace]\ntrack = "mlflow"\n')
    assert names("") == ("mlflow",)
    monkeypatch.setenv("EKX_TRACK", "tensorboard, wandb")
    assert names("") == ("tensorboard", "wandb")
    assert names("none") == () and names("wandb,wandb") == ("wandb",)
    monkeypatch.setenv("EKX_TRACK", "tensorbored")
    with pytest.raises(EkxError, match="EKX_TRACK 'tensorbored': unknown tracker"):
        names("")


def test_wandb_is_offline_unless_the_users_settings_choose(tmp_path, monkeypatch):
    from ekx.track.to_wandb import user_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert not user_mode()
    (tmp_path / "settings").write_text("[default]\nmode = online\n")  # as `wandb online` writes it
    assert user_mode()
    (tmp_path / "settings").unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert user_mode()


def test_no_tracker_library_is_imported_unless_asked_for():
    code = (
        "import sys, ekx.cli, ekx.track.session, ekx.track.compare, ekx.track.features; "
        "print(sorted(m for m in ('tensorboard', 'wandb', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
