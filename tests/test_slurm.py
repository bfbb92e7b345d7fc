"""The job files against a real one-node SLURM cluster (slurm/cluster.sh; .ci/run starts it)."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
from conftest import make_cache
from typer.testing import CliRunner

from ekx import epic
from ekx.cache.reader import open_cache
from ekx.cli import app
from ekx.extract.pipeline import ExtractConfig, extract
from ekx.slurm import Resources, submit_extract, submit_sweep

pytestmark = pytest.mark.slurm
runner = CliRunner()


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    states = {f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")}
    if not states:
        return "GONE"
    for s in ("FAILED", "CANCELLED", "RUNNING", "PENDING", "CONFIGURING", "COMPLETING"):
        if s in states:
            return s
    return states.pop()


def wait(job: str, timeout: float = 600) -> str:
    """Poll scontrol (no accounting here, so no sacct) until the job (all its array tasks) ends."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(job)} after {timeout} s")


@pytest.mark.slow
def test_sharded_extraction_merges_to_the_single_process_cache(slurm_cluster, synth_data, tmp_path):
    extra = ["--weights", "none", "--frames", "2", "--workers", "1", "--batch-size", "2", "--limit", "10"]
    result = submit_extract(
        "resnet50",
        "train",
        2,
        extra,
        synth_data / "annotations",
        synth_data / "videos",
        tmp_path / "features",
        Resources(cpus=1),
        log_dir=tmp_path / "logs",
    )
    assert wait(result["merge"]) == "COMPLETED", list((tmp_path / "logs").glob("*"))
    for i in range(2):
        assert (tmp_path / "features" / "resnet50" / f"train.shard{i}of2.h5").is_file()
    single = tmp_path / "single.h5"
    extract(
        ExtractConfig(split="train", weights="none", frames=2, workers=1, batch_size=2, limit=10, out=single),
        synth_data / "annotations",
        synth_data / "videos",
        tmp_path,
        warn=lambda m: None,
    )
    merged, ref = open_cache(result["out"]), open_cache(single)
    assert merged.narration_id == ref.narration_id and merged.counts()["done"] == 10
    np.testing.assert_array_equal(merged.features(), ref.features())


@pytest.mark.slow
def test_a_failed_shard_cancels_the_merge_and_says_why(slurm_cluster, synth_data, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    found = epic.index_videos(synth_data / "videos")
    for vid, path in found.items():
        if vid != "P02_01":  # one video missing: the shard holding it fails
            (videos / f"{vid}.mp4").symlink_to(path)
    extra = ["--weights", "none", "--frames", "2", "--workers", "1", "--limit", "8"]
    result = submit_extract(
        "resnet50",
        "train",
        2,
        extra,
        synth_data / "annotations",
        videos,
        tmp_path / "features",
        Resources(cpus=1),
        log_dir=tmp_path / "logs",
    )
    # the array as a whole: the shard without its video exits non-zero, so the array FAILED
    # (COMPLETED here would mean a failed shard reports success and the merge could run)
    assert wait(result["array"]) == "FAILED"
    assert wait(result["merge"], 60) in ("CANCELLED", "GONE")  # not pending forever
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("ekx-extract-*.out"))
    assert "video P02_01 not found" in logs and "segments failed" in logs
    assert not (tmp_path / "features" / "resnet50" / "train.h5").exists()


@pytest.mark.slow
def test_sweep_array_produces_every_run(slurm_cluster, tmp_path):
    train = make_cache(tmp_path / "t.h5", n=32, seed=0)
    val = make_cache(tmp_path / "v.h5", n=12, seed=1)
    sweep_file = tmp_path / "mini.toml"
    sweep_file.write_text('[base]\nepochs = 1\nframes = 4\n\n[grid]\nhead = ["pooling", "lstm"]\nlr = [1e-4, 1e-3]\n')
    extra = ["--train-features", str(train), "--val-features", str(val), "--device", "cpu"]
    result = submit_sweep(sweep_file, extra, Resources(cpus=1), runs=tmp_path / "runs", log_dir=tmp_path / "logs")
    assert result["configurations"] == 4
    wait(result["array"])
    assert wait(result["compare"]) == "COMPLETED"
    runs = sorted(p.name for p in (tmp_path / "runs" / "mini").iterdir() if (p / "done.json").is_file())
    assert len(runs) == 4 and (tmp_path / "runs" / "mini" / "comparison.md").is_file()


def test_dry_run_prints_the_sbatch_commands(tmp_path):
    result = runner.invoke(
        app,
        [
            "slurm",
            "extract",
            "--shards",
            "3",
            "--dry-run",
            "--partition",
            "gpu",
            "--gpus",
            "1",
            "--time",
            "4:00:00",
            "--features",
            str(tmp_path),
            "--weights",
            "none",
        ],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("sbatch")]
    assert len(lines) == 2
    assert "--array=0-2" in lines[0] and "--partition=gpu" in lines[0] and "--gres=gpu:1" in lines[0]
    assert lines[0].endswith("--weights none")
    assert "--dependency=afterok:$EXTRACT_JOB" in lines[1] and "--kill-on-invalid-dep=yes" in lines[1]
    assert "--gres" not in lines[1] and f"{tmp_path}/resnet50/train.shard2of3.h5" in lines[1]


@pytest.mark.slow
def test_finetune_job_two_processes_then_resumes_when_resubmitted(slurm_cluster, synth_data, tmp_path):
    """slurm/finetune.sbatch: srun -> torchrun (c10d rendezvous from the SLURM environment) with
    2 gloo processes; a second submission under the same name continues from last.pt."""
    import json

    from ekx.slurm import submit_finetune

    # timm's 0.4M-parameter test ResNet: the job's launch and resume are the test, not resnet50
    extra = ["--backbone", "timm:test_resnet", "--weights", "none", "--frames", "2", "--limit", "4"]
    extra += ["--batch-size", "1", "--workers", "0"]
    extra += ["--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu"]
    runs = tmp_path / "runs"

    def submit(epochs: int) -> dict:
        return submit_finetune(
            "pooling",
            "ft",
            1,
            2,
            [*extra, "--epochs", str(epochs)],
            synth_data / "annotations",
            synth_data / "videos",
            runs,
            Resources(cpus=2),
            log_dir=tmp_path / "logs",
        )

    first = submit(1)
    state = wait(first["job"])
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("ekx-finetune-*.out"))
    assert state == "COMPLETED", logs
    assert "rendezvous" in logs and "1 node(s) x 2 process(es)" in logs
    rows = [json.loads(x) for x in (runs / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    second = submit(2)  # as after a cancel or a requeue: the same name, last.pt present
    assert wait(second["job"]) == "COMPLETED"
    logs = (tmp_path / "logs" / f"ekx-finetune-{second['job']}.out").read_text()
    assert "resuming" in logs
    rows = [json.loads(x) for x in (runs / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_prepare_and_finetune_dry_runs(tmp_path):
    out = runner.invoke(
        app,
        ["slurm", "prepare", str(tmp_path / "v"), str(tmp_path / "c"), "--shards", "4", "--dry-run", "--crf", "25"],
        terminal_width=400,
    )
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("sbatch"))
    assert "--array=0-3" in line and "prepare.sbatch" in line and line.endswith("4 --crf 25")
    out = runner.invoke(
        app,
        ["slurm", "finetune", "lstm", "--name", "ft-a", "--nodes", "8", "--gpus", "1", "--dry-run", "--epochs", "3"],
        terminal_width=400,
    )
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("sbatch"))
    assert "--nodes=8" in line and "--gres=gpu:1" in line and " ft-a 1 lstm " in line and line.endswith("--epochs 3")
    bad = runner.invoke(app, ["slurm", "finetune", "lstm", "--name", "../x", "--dry-run"])
    assert bad.exit_code == 1 and "plain run name" in bad.output


@pytest.mark.slow
def test_search_workers_share_one_study(slurm_cluster, tmp_path):
    """`ekx slurm sweep FILE --workers 2` on an [optuna] file: two array tasks take trials
    from the one journal file, none twice; the compare job reports the search."""
    import json

    from ekx.heads import search as se

    feats = tmp_path / "features" / "resnet50"
    make_cache(feats / "train.h5", n=32, seed=0)
    make_cache(feats / "validation.h5", n=12, seed=1, split="validation")
    sweep_file = tmp_path / "mini.toml"
    sweep_file.write_text(
        '[base]\nhead = "pooling"\nepochs = 2\nframes = 4\n\n[optuna]\ntrials = 4\npruner = "none"\n'
        "lr = { log_uniform = [1e-4, 1e-2] }\n"
    )
    extra = ["--features", str(tmp_path / "features"), "--device", "cpu"]
    result = submit_sweep(
        sweep_file, extra, Resources(cpus=1), runs=tmp_path / "runs", log_dir=tmp_path / "logs", workers=2
    )
    assert result["workers"] == 2 and "--array=0-1" in result["commands"][0]
    wait(result["array"])
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("ekx-sweep-*.out"))
    assert wait(result["compare"]) == "COMPLETED", logs
    starts = [line.split()[0] for line in logs.splitlines() if " started: " in line]
    assert sorted(starts) == [f"trial-{i:04d}" for i in range(4)], logs  # each trial once, across both
    study = se.open_study(tmp_path / "runs" / "mini", create=False)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for i in range(4):
        done = json.loads((tmp_path / "runs" / "mini" / f"trial-{i:04d}" / "done.json").read_text())
        assert done["epochs"] == 2
    assert (tmp_path / "runs" / "mini" / "comparison.md").is_file()


def test_a_dense_extraction_merges_its_own_files(tmp_path):
    """`ekx slurm extract ... --dense 4`: the merge job names the dense shards and store."""
    result = runner.invoke(
        app,
        ["slurm", "extract", "--shards", "2", "--dry-run", "--features", str(tmp_path), "--dense", "4",
         "--dense-span=annotated"],
        terminal_width=400,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    merge = [line for line in result.output.splitlines() if line.startswith("sbatch")][1]
    assert f"{tmp_path}/resnet50/train.dense-4fps-annotated.h5 " in merge
    assert f"{tmp_path}/resnet50/train.dense-4fps-annotated.shard1of2.h5" in merge
