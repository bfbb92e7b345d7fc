"""SLURM commands: ekx slurm extract / sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ekx.cli.common import (
    EXTRA,
    AnnotationsOpt,
    CpusOpt,
    DryRunOpt,
    FeaturesOpt,
    GpusOpt,
    LogsOpt,
    MemOpt,
    PartitionOpt,
    RunsOpt,
    ScriptsOpt,
    VideosOpt,
    command,
    console,
    slurm_app,
    workspace,
)


def print_submission(result: dict, dry_run: bool, names: tuple[str, str]) -> None:
    from ekx.slurm import show

    if dry_run:
        for argv in result["commands"]:
            console.print(show(argv), highlight=False, soft_wrap=True)
        return
    console.print(
        f"submitted {names[0]} array job {result['array']} and {names[1]} job {result[names[1]]} "
        f"(afterwards: squeue -j {result['array']},{result[names[1]]})",
        highlight=False,
    )


@command(slurm_app, "extract", context_settings=EXTRA)
def slurm_extract(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="Backbone to extract.")] = "resnet50",
    split: Annotated[str, typer.Option(help="train, validation, test or a CSV.")] = "train",
    shards: Annotated[int, typer.Option(help="Array tasks N (each extracts shard I/N).")] = 4,
    partition: PartitionOpt = None,
    gpus: GpusOpt = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit per task, e.g. 4:00:00.", show_default=False)
    ] = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    dry_run: DryRunOpt = False,
    scripts: ScriptsOpt = None,
    logs: LogsOpt = None,
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    features: FeaturesOpt = None,
):
    """Submit sharded extraction as an array job plus the dependent merge; extra flags go to ekx extract.

    Example: ekx slurm extract --backbone resnet50 --split train --shards 8 --partition gpu --gpus 1 --weights DEFAULT
    """
    from ekx.slurm import Resources, submit_extract

    ws = workspace(annotations=annotations, videos=videos, features=features)
    result = submit_extract(
        backbone,
        split,
        shards,
        list(ctx.args),
        ws.annotations,
        ws.videos,
        ws.features,
        Resources(partition, gpus, time_limit, mem, cpus),
        dry_run,
        scripts,
        logs,
    )
    print_submission(result, dry_run, ("extract", "merge"))
    if not dry_run:
        console.print(f"merged cache when done: {result['out']}")


@command(slurm_app, "sweep", context_settings=EXTRA)
def slurm_sweep(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A sweep TOML file.")],
    partition: PartitionOpt = None,
    gpus: GpusOpt = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit per task, e.g. 4:00:00.", show_default=False)
    ] = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    dry_run: DryRunOpt = False,
    scripts: ScriptsOpt = None,
    logs: LogsOpt = None,
    runs: RunsOpt = None,
):
    """Submit one array task per sweep configuration plus the dependent compare; extra flags go to ekx sweep.

    Example: ekx slurm sweep configs/sweeps/phase2.toml --partition gpu --gpus 1 --time 2:00:00
    """
    from ekx.slurm import Resources, submit_sweep

    ws = workspace(runs=runs)
    result = submit_sweep(
        file, list(ctx.args), Resources(partition, gpus, time_limit, mem, cpus), dry_run, scripts, ws.runs, logs
    )
    print_submission(result, dry_run, ("sweep", "compare"))
