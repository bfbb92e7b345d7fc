"""The one interface every tracker backend implements, and what a backend is told of a run.

A backend maps these calls onto its library's own idiom (TensorBoard scalars and text,
W&B history/config/summary/artifacts, MLflow metrics/params/tags/artifacts). It may raise:
the fan-out (session.Fanout) turns any failure into one warning and stops using it, so a
tracker never stops or corrupts training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunInfo:
    name: str  # the run directory's name
    run_dir: Path
    workspace: Path  # where a local store lives (MLflow's mlruns/): the runs root's parent
    group: str = ""  # the sweep or search the run is a trial of ("" for a single run)
    group_dir: Path | None = None  # the sweep directory (MLflow keeps its parent run's id there)
    kind: str = "train-head"  # train-head, finetune, sweep trial, compare
    resume: dict[str, Any] | None = None  # what start() returned when this run began (its ids)
    first_step: int = 0  # the global step the run continues from: later ones are dropped (TensorBoard)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """One tracker's run. ``start`` returns what to keep in the run directory (track.json)
    so that a resumed run continues the same tracked run."""

    def start(self, run: RunInfo) -> dict[str, Any]:
        raise NotImplementedError

    def log(self, metrics: list[tuple[int, dict[str, float]]], epoch: int | None = None) -> None:
        """Scalars, each (global training step, {key: value}); ``epoch``: an epoch's figures (after
        it ended; a tracker whose steps may be per key puts them at the epoch number)."""
        raise NotImplementedError

    def params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def tags(self, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def artifact(self, path: Path) -> None:
        raise NotImplementedError

    def summary(self, values: dict[str, float]) -> None:
        """The run's final figures (its best epoch's), beside the series."""
        raise NotImplementedError

    def table(self, key: str, columns: list[str], rows: list[list[Any]], markdown: str) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        """``status``: finished, pruned, failed or killed."""
        raise NotImplementedError


def flat(values: dict[str, Any]) -> dict[str, str | float | int | bool]:
    """Parameters as every tracker stores them: scalars kept, anything else as text."""
    return {k: v if isinstance(v, str | float | int | bool) else str(v) for k, v in values.items()}
