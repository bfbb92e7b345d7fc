"""`ekx demo`: the whole pipeline on built-in synthetic data, in a fresh workspace."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from ekx import epic
from ekx.synth import SynthConfig, synthesize


def run(workdir: Path, videos: int = 16, segments: int = 20, console: Console | None = None) -> dict:
    console = console or Console()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    t0 = time.perf_counter()
    console.rule(f"[bold]ekx demo[/bold] in {workdir}")
    console.print("1/3 synthesising an EPIC-format dataset ...")
    summary = synthesize(data, SynthConfig(videos=videos, segments=segments))
    ann = epic.Annotations(data / "annotations")
    counts = {s: len(ann.segments(s)) for s in ("train", "validation")}
    console.print(f"    {summary['videos']} videos, {summary['frames']} frames, "
                  f"{counts['train']} train / {counts['validation']} validation segments "
                  f"({time.perf_counter() - t0:.1f} s)")
    console.print("[yellow]2/3 feature extraction (ekx extract) is not built yet: the demo stops here.[/yellow]")
    return {"workdir": workdir, "segments": counts}
