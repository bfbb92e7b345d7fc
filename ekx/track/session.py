"""A run's trackers, driven by the training loop's own events (heads.train.fit):

    open_run(track, config, run_dir, start_epoch, ...)  before the first epoch (after --resume trimmed the log)
    session.trace                  filled by train_one_epoch: each step's loss and lr, segments, seconds
    session.epoch(row)             after the epoch's checkpoint and metrics row are written
    session.finish(status, best)   best epoch, artefacts (curves.png, metrics.jsonl, config.toml), status

An epoch's step points reach the trackers with its row, once its checkpoint is on disk: a kill
-9 mid-epoch has sent nothing of that epoch, so --resume (which redoes it) logs each step once.
track.json in the run directory keeps each tracker's run id and the last epoch it holds; a
resumed run continues the same tracked run, and epochs a tracker lacks (a kill between the
checkpoint and the tracker, or a tracker added on --resume) are sent from metrics.jsonl.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ekx.track import backend, require
from ekx.track.base import Backend, RunInfo, flat

STATE = "track.json"
STEPS = "steps.jsonl"  # each epoch's step points, as sent: a later process may resend them
EVERY = 20  # steps per point of the step series (their mean loss): Lightning logs every 50
ARTEFACTS = ("curves.png", "metrics.jsonl", "config.toml")


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Fanout:
    """Several backends as one: a call goes to each (or ``only`` one); one that raises is said
    once and dropped, so training and the other trackers go on."""

    def __init__(self, backends: dict[str, Backend], warn: Callable[[str], None] = warn_stderr):
        self.backends, self.warn = dict(backends), warn

    def __bool__(self) -> bool:
        return bool(self.backends)

    def call(self, method: str, *args: Any, only: str | None = None, **kwargs: Any) -> dict[str, Any]:
        out = {}
        for name, b in list(self.backends.items()):
            if only not in (None, name):
                continue
            try:
                out[name] = getattr(b, method)(*args, **kwargs)
            except Exception as e:  # a tracker's failure is never the run's
                del self.backends[name]
                self.warn(
                    f"tracker {name} failed ({type(e).__name__}: {str(e)[:300]}); training goes on without "
                    "it, the run's own files (metrics.jsonl, checkpoints) are complete"
                )
        return out


def metric_name(key: str) -> str:
    """metrics.jsonl column -> tracker key: val_action_top1 -> val/action_top1, lr -> epoch/lr."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"epoch/{key}"


def epoch_metrics(row: dict) -> dict[str, float]:
    """An epoch's figures (every numeric column but the epoch number, which is the x axis)."""
    return {metric_name(k): float(v) for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}


def step_points(loss: list[float], lr: list[float], first: int, every: int) -> list[tuple[int, dict[str, float]]]:
    """(global step, {step/loss, step/lr}) at every ``every``-th step and the last: the mean loss
    of the steps since the previous point, the lr of the step itself."""
    ends = [*range(every, len(loss), every), len(loss)] if loss else []
    out, begin = [], 0
    for end in ends:
        out.append((first + end, {"step/loss": sum(loss[begin:end]) / (end - begin), "step/lr": lr[end - 1]}))
        begin = end
    return out


class Session:
    def __init__(self, fanout: Fanout, run_dir: Path, state: dict, warn: Callable[[str], None] = warn_stderr):
        self.fanout, self.run_dir, self.state, self.warn = fanout, Path(run_dir), state, warn
        self.every = EVERY
        self.trace: dict | None = {} if fanout else None  # None: nothing for train_one_epoch to record

    def _held(self, name: str) -> tuple[int, int]:
        """(epoch, global step) a tracker holds: every point up to them is in it."""
        held = self.state["backends"][name]
        return int(held.get("epoch", 0)), int(held.get("step", -1))

    def _save(self) -> None:
        from ekx.heads.runlog import write_atomic

        try:
            write_atomic(self.run_dir / STATE, json.dumps(self.state, indent=1))
        except Exception as e:  # a full disk: the run's own files say so; the trackers go on
            self.warn(f"{self.run_dir / STATE}: not saved ({e}); a --resume would start new tracked runs")

    def epoch(self, row: dict) -> None:
        """An epoch's step points (from ``trace``, kept in steps.jsonl) and figures, to every
        tracker that lacks them."""
        if not self.fanout:
            return
        e, trace = int(row["epoch"]), self.trace or {}
        self.state["steps"] = len(trace.get("loss", ())) or self.state.get("steps", 0)
        points = step_points(trace.get("loss", []), trace.get("lr", []), (e - 1) * self.state["steps"], self.every)
        figures = epoch_metrics(row)
        if trace.get("seconds"):  # training throughput (the epoch's evaluation not counted)
            figures["epoch/segments_per_s"] = trace["segments"] / trace["seconds"]
        try:  # what a later process needs to send this epoch again (a tracker that lost it to a kill)
            with (self.run_dir / STEPS).open("a") as fh:
                fh.write(json.dumps({"epoch": e, "points": points}) + "\n")
        except OSError as err:
            self.warn(f"{self.run_dir / STEPS}: not written ({err}); a resumed run could not resend them")
        self._catch_up(e - 1)
        for name in list(self.fanout.backends):
            self._send(name, e, points, figures)
        self._save()
        trace.clear()

    def _send(self, name: str, e: int, points: list, figures: dict[str, float]) -> None:
        held_epoch, held_step = self._held(name)
        if held_epoch >= e:
            return
        fresh = [(s, v) for s, v in points if s > held_step]
        if fresh:
            self.fanout.call("log", fresh, only=name)
        self.fanout.call("log", [(e * self.state["steps"], figures)], epoch=e, only=name)
        if name in self.fanout.backends:
            self.state["backends"][name].update(epoch=e, step=e * self.state["steps"])

    def _catch_up(self, upto: int) -> None:
        """Epochs up to ``upto`` that a tracker does not hold (a kill before it had them on disk,
        or a tracker added on --resume): their rows of metrics.jsonl and points of steps.jsonl."""
        if all(self._held(n)[0] >= upto for n in self.fanout.backends):
            return
        from ekx.heads.runlog import read_metrics, row_of

        lines = (self.run_dir / STEPS).read_text().splitlines() if (self.run_dir / STEPS).is_file() else []
        kept = {int(r["epoch"]): r["points"] for line in lines if (r := row_of(line))}
        for row in read_metrics(self.run_dir):
            e = int(row["epoch"])
            if e <= upto:
                for name in list(self.fanout.backends):
                    self._send(name, e, [tuple(p) for p in kept.get(e, [])], epoch_metrics(row))

    def finish(self, status: str, best: dict | None = None, upto: int | None = None) -> None:
        """``best``: the best epoch's row (marked: a tag and the run's summary); ``upto``: the last
        epoch of metrics.jsonl (a resumed run that had nothing left to train catches up)."""
        if not self.fanout:
            return
        if upto:
            self._catch_up(upto)
            self._save()
        if best:
            self.fanout.call("tags", {"best_epoch": str(best.get("epoch"))})
            self.fanout.call("summary", {f"best/{k}": float(v) for k, v in best.items() if isinstance(v, int | float)})
        for name in ARTEFACTS:
            if (self.run_dir / name).is_file():
                self.fanout.call("artifact", self.run_dir / name)
        self.fanout.call("finish", status)


def status_of(error: BaseException) -> str:
    """A run's end as trackers say it: an exception may name its own (a pruned trial: pruned)."""
    if isinstance(error, KeyboardInterrupt):
        return "killed"
    return str(getattr(error, "track_status", "failed"))


def open_run(
    track: str,
    params: dict[str, Any],
    run_dir: Path,
    start_epoch: int = 0,
    tags: Callable[[], dict[str, str]] = dict,
    group_dir: Path | None = None,
    kind: str = "train-head",
    enabled: bool = True,
    warn: Callable[[str], None] = warn_stderr,
) -> Session:
    """The run's trackers (``track``: the run's setting, see ekx.track.names), started, or with
    track.json from an earlier process continued; ``start_epoch``: the epoch its checkpoint
    holds (0: a new run); ``tags``: what it trains on, asked only when a tracker is on.
    ``enabled`` False (a rank other than 0): a session that does nothing."""
    run_dir = Path(run_dir)
    names = require(track) if enabled else ()
    if not names:
        return Session(Fanout({}), run_dir, {}, warn)
    path = run_dir / STATE
    saved = json.loads(path.read_text()) if start_epoch > 0 and path.is_file() else {}
    _trim_steps(run_dir / STEPS, start_epoch, warn)
    steps = int(saved.get("steps", 0))
    state: dict[str, Any] = {"steps": steps, "backends": {}}
    root = (group_dir.parent if group_dir else run_dir.parent).parent
    fan, described = Fanout({}, warn), None  # described: the tags, asked once
    for name in names:
        before = saved.get("backends", {}).get(name)
        held = min(int(before.get("epoch", 0)), start_epoch) if before else 0
        info = RunInfo(run_dir.name, run_dir, root, group_dir.name if group_dir else "", group_dir, kind, before)
        info.first_step = held * steps + 1 if before else 0  # later steps are dropped (TensorBoard)
        one = Fanout({name: backend(name)()}, warn)
        got = one.call("start", info).get(name)
        if got is None:
            continue
        # a tracker that can say what it really holds (W&B's offline files after a kill) is believed
        held_step = min(int(got.pop("held_step", held * steps)), held * steps) if before else -1
        if before and steps:
            held = min(held, held_step // steps)
        state["backends"][name] = {**got, "epoch": held, "step": held_step}
        if not before:  # a tracked run's description, once (a resumed one has it)
            one.call("params", flat(params))
            described = tags() if described is None else described
            one.call("tags", described)
        fan.backends.update(one.backends)
    session = Session(fan, run_dir, state, warn)
    session._save()  # the ids, at once: a kill in the first epoch still resumes these runs
    return session


def _trim_steps(path: Path, start_epoch: int, warn: Callable[[str], None]) -> None:
    """steps.jsonl of a run continuing from its epoch-``start_epoch`` checkpoint (0: a new run):
    the epochs after it are trained again."""
    from ekx.heads.runlog import row_of, write_atomic

    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if (r := row_of(line)) and r["epoch"] <= start_epoch]
    try:
        write_atomic(path, "".join(line + "\n" for line in lines))
    except Exception as e:
        warn(f"{path}: not trimmed ({e})")
