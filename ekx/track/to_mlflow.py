"""MLflow: to MLFLOW_TRACKING_URI when set, else a local file store, mlruns/ in the workspace
(beside runs/: `mlflow ui --backend-store-uri ./mlruns` shows it). MLflow 3 keeps its file
store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE: ekx allows it for its own local
store only (a server or a database is the user's choice, by the variable).

Metrics (epoch figures at the epoch number, step points at the global step), the
configuration as params, the features' identity as tags, the best epoch as best/* metrics
and a tag, curves.png, metrics.jsonl and config.toml as artefacts. A sweep is a parent run
(its id kept in the sweep directory's track.json) and each trial a nested run under it; a
pruned trial ends FINISHED with the tag ekx.status = pruned. The experiment is
MLFLOW_EXPERIMENT_NAME, else "ekx"; a resumed run continues its run id (kept in track.json)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ekx.track import base

BATCH = 1000  # metrics per log_batch call (MLflow's limit)
END = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def tracking_uri(workspace: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # our own local store (see above)
    return (Path(workspace).resolve() / "mlruns").as_uri()


def client(workspace: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(workspace))


def experiment(c) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ekx")
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another worker created it meanwhile
        return c.get_experiment_by_name(name).experiment_id


def parent_run(c, exp: str, group_dir: Path) -> str:
    """The sweep's run, created by the first trial to start (under a lock: workers race)."""
    from ekx.heads import runlock

    path = group_dir / "track.json"
    with runlock.mutex(group_dir / ".track.lock"):
        held = json.loads(path.read_text()).get("mlflow", {}) if path.is_file() else {}
        if held.get("uri") == c.tracking_uri and held.get("parent"):
            c.update_run(held["parent"], status="RUNNING")
            return held["parent"]
        run = c.create_run(exp, run_name=group_dir.name, tags={"ekx.kind": "sweep"})
        path.write_text(json.dumps({"mlflow": {"parent": run.info.run_id, "uri": c.tracking_uri}}))
        return run.info.run_id


class Backend(base.Backend):
    def start(self, run: base.RunInfo) -> dict[str, Any]:
        self.c = client(run.workspace)
        self.parent = None
        if run.resume:
            self.run_id = run.resume["run_id"]
            self.parent = run.resume.get("parent")
            self.c.update_run(self.run_id, status="RUNNING")
            return dict(run.resume)
        exp = experiment(self.c)
        tags = {"ekx.kind": run.kind}
        if run.group_dir is not None:
            self.parent = parent_run(self.c, exp, run.group_dir)
            tags["mlflow.parentRunId"] = self.parent
        self.run_id = self.c.create_run(exp, run_name=run.name, tags=tags).info.run_id
        return {"run_id": self.run_id, "parent": self.parent, "uri": self.c.tracking_uri}

    def log(self, metrics: list[tuple[int, dict[str, float]]], epoch: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [
            Metric(k, v, now, epoch if epoch is not None else step)
            for step, values in metrics
            for k, v in values.items()
        ]
        for i in range(0, len(points), BATCH):
            self.c.log_batch(self.run_id, metrics=points[i : i + BATCH])

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.c.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def summary(self, values: dict[str, float]) -> None:
        self.log([(0, values)], epoch=int(values.get("best/epoch", 0)))

    def artifact(self, path: Path) -> None:
        self.c.log_artifact(self.run_id, str(path))

    def table(self, key: str, columns: list[str], rows: list[list[Any]], markdown: str) -> None:
        import csv
        import io

        out = io.StringIO()
        csv.writer(out).writerows([columns, *rows])
        self.c.log_text(self.run_id, markdown, f"{key}.md")
        self.c.log_text(self.run_id, out.getvalue(), f"{key}.csv")

    def finish(self, status: str) -> None:
        self.c.set_tag(self.run_id, "ekx.status", status)
        self.c.set_terminated(self.run_id, END.get(status, "FAILED"))
        if self.parent:
            self.c.update_run(self.parent, status="FINISHED")  # its last trial ended (a next one reopens it)
