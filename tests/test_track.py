"""Experiment trackers (issue 34): a tracked run read back with each tracker's own library -
TensorBoard's EventAccumulator, W&B's offline run file (its records decoded with wandb's own
protobuf classes), MLflow's client on the file store - holds the series of metrics.jsonl, the
configuration and the features' identity; a search's trials are grouped; a failing or
unreachable tracker leaves training as it would have been; a missing extra is one line."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from conftest import make_cache
from typer.testing import CliRunner

from ekx.cli import app
from ekx.heads import runlog
from ekx.track.session import metric_name

pytest.importorskip("tensorboard")  # the extras are installed by `make install` (CI); say so if not
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

runner = CliRunner()
EPOCHS = 3
N_TRAIN, BATCH = 48, 2  # 24 steps an epoch: step points at 20 and 24 (session.EVERY = 20)
ALL = "tensorboard,wandb,mlflow"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """No user W&B or MLflow settings leak in; W&B's own settings directory is empty."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.delenv("EKX_TRACK", raising=False)
        mp.setenv("WANDB_CONFIG_DIR", str(tmp_path_factory.mktemp("wandb-config")))
        mp.setenv("WANDB_SILENT", "true")
        yield mp


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("track-caches")
    return (
        make_cache(root / "train.h5", n=N_TRAIN, seed=0),
        make_cache(root / "val.h5", n=24, seed=1, split="validation"),
    )


def train_args(caches, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "train-head",
        "pooling",
        *("--train-features", str(caches[0]), "--val-features", str(caches[1])),
        *("--runs", str(runs), "--name", name, "--epochs", str(EPOCHS), "--batch-size", str(BATCH)),
        *("--frames", "4", "--device", "cpu", "--precision", "fp32", *extra),
    ]


@pytest.fixture(scope="module")
def tracked(env, caches, tmp_path_factory):
    """One run with all three trackers, and the same run untracked."""
    ws = tmp_path_factory.mktemp("ws")
    for name, extra in (("tracked", ("--track", ALL)), ("plain", ())):
        res = runner.invoke(app, train_args(caches, ws / "runs", name, *extra))
        assert res.exit_code == 0, res.output
    return ws


# ---------------------------------------------------------------- each library's own reader


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_texts(log_dir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag.removesuffix("/text_summary"): tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto).item().decode()
        for tag in acc.Tags()["tensors"]
        if tag.endswith("/text_summary")
    }


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): the LevelDB log framing W&B writes
    (":W&B" header; 32 KiB blocks of crc32 + length + type chunks), each record decoded with
    wandb's own protobuf (wandb.proto.wandb_internal_pb2.Record); every chunk's crc checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (crc, n, kind) == (0, 0, 0):  # a block's zero padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: chunk at {pos} is corrupt"
        buf, pos = buf + chunk, pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_run(run_dir: Path) -> dict:
    """Every offline run file of a run directory (a resumed run adds one): the run ids, history
    rows (step -> values), config, tags, group, summary and artifacts."""
    out: dict = {"ids": set(), "history": [], "config": {}, "tags": set(), "group": set(), "summary": {}, "files": []}
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["tags"] |= set(r.run.tags)
                out["group"].add(r.run.run_group)
                out["config"] |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "config":
                out["config"] |= {i.key: json.loads(i.value_json) for i in r.config.update}
            elif kind == "history":
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                out["history"].append((r.history.step.num, values))
            elif kind == "summary":
                out["summary"] |= {i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update}
            elif kind == "artifact":
                out["files"] += [e.path for e in r.artifact.manifest.contents]
    return out


def mlflow_client(ws: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=(ws / "mlruns").as_uri())


def mlflow_run(ws: Path, name: str):
    c = mlflow_client(ws)
    exp = c.get_experiment_by_name("ekx")
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == name]
    assert len(runs) == 1, [r.info.run_name for r in c.search_runs([exp.experiment_id])]
    return c, runs[0]


def epoch_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], r[key]) for r in rows]


def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------- a tracked run


def test_tracked_run_trains_as_an_untracked_one(tracked):
    def figures(name):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in runlog.read_metrics(tracked / "runs" / name)]

    assert figures("tracked") == figures("plain") and len(figures("plain")) == EPOCHS
    assert not (tracked / "runs" / "plain" / "track.json").exists()
    assert (
        not (tracked / "runs" / "plain" / "tensorboard").exists()
        and not (tracked / "runs" / "plain" / "wandb").exists()
    )


def test_tensorboard_holds_the_run(tracked):
    run = tracked / "runs" / "tracked"
    rows = runlog.read_metrics(run)
    scalars = tb_scalars(run / "tensorboard")
    for key in ("val_action_top1", "val_verb_top5", "val_noun_top1", "val_loss", "train_loss", "lr", "gap"):
        assert close(scalars[metric_name(key)], epoch_series(rows, key)), key
    # step points every 20 steps and at each epoch's last: their mean loss is the epoch's train loss
    steps = [s for s, _ in scalars["step/loss"]]
    assert steps == [20, 24, 44, 48, 68, 72]
    loss = dict(scalars["step/loss"])
    for e, r in enumerate(rows):
        mean = (20 * loss[24 * e + 20] + 4 * loss[24 * e + 24]) / 24
        assert abs(mean - r["train_loss"]) < 1e-4
    assert [s for s, _ in scalars["epoch/segments_per_s"]] == [1, 2, 3]
    texts = tb_texts(run / "tensorboard")
    assert "| features.backbone | resnet50 |" in texts["tags"] and "features.checksums" in texts["tags"]
    assert "| lr | 0.0003 |" in texts["config"] and texts["status"] == "finished"
    best = runlog.best_row(rows)
    assert f"| best/epoch | {float(best['epoch'])} |" in texts["best"]


def test_wandb_offline_run_holds_the_run(tracked):
    run = tracked / "runs" / "tracked"
    rows = runlog.read_metrics(run)
    got = wandb_run(run)
    assert len(got["ids"]) == 1 and got["config"]["lr"] == 3e-4 and got["config"]["head"] == "pooling"
    assert "features.backbone:resnet50" in got["tags"]
    epochs = [(v["epoch"], v) for _, v in got["history"] if "epoch" in v]
    assert close([(e, v["val/action_top1"]) for e, v in epochs], epoch_series(rows, "val_action_top1"))
    assert [s for s, v in got["history"] if "step/loss" in v] == [20, 24, 44, 48, 68, 72]
    assert int(float(got["summary"]["best/epoch"])) == runlog.best_row(rows)["epoch"]
    assert {"curves.png", "metrics.jsonl", "config.toml"} <= set(got["files"])


def test_mlflow_file_store_holds_the_run(tracked):
    rows = runlog.read_metrics(tracked / "runs" / "tracked")
    c, run = mlflow_run(tracked, "tracked")
    history = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val/action_top1"))
    assert close(history, epoch_series(rows, "val_action_top1"))
    assert [m.step for m in c.get_metric_history(run.info.run_id, "step/loss")] == [20, 24, 44, 48, 68, 72]
    assert run.data.params["lr"] == "0.0003" and run.data.params["epochs"] == str(EPOCHS)
    assert run.data.tags["features.backbone"] == "resnet50" and run.info.status == "FINISHED"
    assert run.data.tags["best_epoch"] == str(runlog.best_row(rows)["epoch"])
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"curves.png", "metrics.jsonl", "config.toml"}


def test_compare_writes_the_table_to_each_tracker(tracked):
    runs = tracked / "runs"
    res = runner.invoke(app, ["compare", str(runs / "tracked"), str(runs / "plain"), "--track", ALL])
    assert res.exit_code == 0, res.output
    c, run = mlflow_run(tracked, f"comparison-{runs.name}")
    table = Path(c.download_artifacts(run.info.run_id, "comparison.csv")).read_text()
    assert {line.split(",")[0] for line in table.splitlines()[1:]} == {"tracked", "plain"}
    where = runs / ".comparison-track"
    assert "tracked" in tb_texts(where / "tensorboard")["comparison"]
    tables = [v for _, v in wandb_run(where)["history"] if "comparison/_type" in v]
    assert tables and tables[0]["comparison/_type"] == "table-file"
    (saved,) = where.glob(f"wandb/offline-run-*/files/{tables[0]['comparison/path']}")
    table = json.loads(saved.read_text())  # the W&B table file the history row points to
    assert {row[0] for row in table["data"]} == {"tracked", "plain"} and table["columns"][0] == "run"
