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
    HeadArg,
    LogsOpt,
    MemOpt,
    PartitionOpt,
    RunsOpt,
    ScriptsOpt,
    VideosOpt,
    check_split,
    command,
    console,
    names_option,
    slurm_app,
    workspace,
)
from ekx.extract.config import BACKBONES


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
    backbone: Annotated[
        str, names_option(BACKBONES, "--backbone", "Backbone to extract, or several separated by commas", True)
    ] = "resnet50",
    split: Annotated[str, typer.Option(help="train, validation, test or a CSV.", callback=check_split)] = "train",
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
    workers: Annotated[
        int | None,
        typer.Option(
            help="[optuna] files: array tasks sharing the study (default 1); other files: at most N tasks at once.",
            show_default=False,
        ),
    ] = None,
):
    """Submit a sweep as an array job plus the dependent compare; extra flags go to ekx sweep.
    One task per configuration, or for an [optuna] search N workers on one study (resumable:
    submit again to continue it).

    Example: ekx slurm sweep configs/sweeps/search.toml --workers 8 --partition gpu --gpus 1 --time 2:00:00
    """
    from ekx.slurm import Resources, submit_sweep

    ws = workspace(runs=runs)
    result = submit_sweep(
        file,
        list(ctx.args),
        Resources(partition, gpus, time_limit, mem, cpus),
        dry_run,
        scripts,
        ws.runs,
        logs,
        workers,
    )
    print_submission(result, dry_run, ("sweep", "compare"))


@command(slurm_app, "prepare", context_settings=EXTRA)
def slurm_prepare(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="Folder of the original videos.")],
    dst: Annotated[Path, typer.Argument(help="Folder for the prepared copy.")],
    shards: Annotated[int, typer.Option(help="Array tasks N (each transcodes every N-th video).")] = 8,
    partition: PartitionOpt = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit per task, e.g. 4:00:00.", show_default=False)
    ] = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    dry_run: DryRunOpt = False,
    scripts: ScriptsOpt = None,
    logs: LogsOpt = None,
):
    """Submit `ekx prepare` as an array job (CPU only); extra flags go to ekx prepare.

    Example: ekx slurm prepare /data/EPIC-KITCHENS /scratch/epic-320 --shards 16 --cpus 8 --time 4:00:00
    """
    from ekx.slurm import Resources, submit_prepare

    result = submit_prepare(
        src, dst, shards, list(ctx.args), Resources(partition, None, time_limit, mem, cpus), dry_run, scripts, logs
    )
    if dry_run:
        for argv in result["commands"]:
            console.print(show_argv(argv), highlight=False, soft_wrap=True)
        return
    console.print(f"submitted prepare array job {result['array']} (afterwards: squeue -j {result['array']})")


@command(slurm_app, "finetune", context_settings=EXTRA)
def slurm_finetune(
    ctx: typer.Context,
    head: HeadArg,
    name: Annotated[str, typer.Option("--name", help="Run name under runs/ (the job resumes under it).")],
    nodes: Annotated[int, typer.Option(help="Nodes of the allocation.")] = 1,
    nproc_per_node: Annotated[int, typer.Option(help="Processes per node (one per GPU).")] = 1,
    partition: PartitionOpt = None,
    gpus: GpusOpt = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit, e.g. 24:00:00.", show_default=False)
    ] = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    dry_run: DryRunOpt = False,
    scripts: ScriptsOpt = None,
    logs: LogsOpt = None,
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    runs: RunsOpt = None,
):
    """Submit `ekx finetune` under torchrun over nodes and GPUs (resumes if requeued); extra flags go to it.

    Example: ekx slurm finetune lstm --name ft-lstm --nodes 8 --gpus 1 --videos /scratch/epic-320 --init-head lstm-a
    """
    from ekx.slurm import Resources, submit_finetune

    ws = workspace(annotations=annotations, videos=videos, runs=runs)
    result = submit_finetune(
        head,
        name,
        nodes,
        nproc_per_node,
        list(ctx.args),
        ws.annotations,
        ws.videos,
        ws.runs,
        Resources(partition, gpus, time_limit, mem, cpus),
        dry_run,
        scripts,
        logs,
    )
    if dry_run:
        for argv in result["commands"]:
            console.print(show_argv(argv), highlight=False, soft_wrap=True)
        return
    console.print(f"submitted finetune job {result['job']} -> {result['run']} (afterwards: squeue -j {result['job']})")


def show_argv(argv: list[str]) -> str:
    from ekx.slurm import show

    return show(argv)
