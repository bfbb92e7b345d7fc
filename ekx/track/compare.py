"""`ekx compare --track`: the comparison table as a tracked run of its own - a W&B table, an
MLflow run with comparison.md and .csv as artefacts (nested under a sweep's parent run when
the comparison is of one tracked sweep), a TensorBoard text summary. Its local files go to
a hidden directory beside comparison.md (so `ekx compare runs/*` never reads them as a run)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from ekx.track import backend, require
from ekx.track.base import RunInfo
from ekx.track.session import Fanout, warn_stderr


def send(
    track: str,
    base: Path,
    markdown: str,
    table_csv: str,
    workspace: Path,
    group_dir: Path | None = None,
    warn: Callable[[str], None] = warn_stderr,
) -> list[str]:
    """The comparison (``base``: its path without suffix, as written) to each tracker of ``track``;
    ``workspace``: where the runs' local stores are (the parent of their runs root); returns
    where each went. A tracker that fails is a warning, as in a run."""
    base = Path(base)
    rows = list(csv.reader(io.StringIO(table_csv)))
    columns, data = rows[0], rows[1:]
    where = base.parent / f".{base.name}-track"
    name = f"comparison-{(group_dir or base.parent).name}"
    info = RunInfo(name, where, Path(workspace), group_dir.name if group_dir else "", group_dir, "compare")
    where.mkdir(parents=True, exist_ok=True)
    said = []
    for tracker in require(track):
        fan = Fanout({tracker: backend(tracker)()}, warn)
        started = fan.call("start", info).get(tracker)
        fan.call("table", "comparison", columns, data, markdown)
        fan.call("finish", "finished")
        if fan:
            said.append(f"{tracker}: {started}")
    return said
