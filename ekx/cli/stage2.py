"""Stage 2 commands: train-head, evaluate, score, sweep, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ekx import EkxError, tables
from ekx.cli.common import (
    AllowMissingOpt,
    AnnotationsOpt,
    BackboneOpt,
    ConfigOpt,
    DeviceOpt,
    FeaturesOpt,
    HeadArg,
    LateProgress,
    ResumeOpt,
    RunsOpt,
    TrackOpt,
    VideosOpt,
    check_metric_annotations,
    check_split,
    command,
    console,
    dataclass_options,
    err_console,
    existing,
    print_row,
    say,
    workspace,
)
from ekx.heads.config import TrainConfig


@command(name="train-head")
@dataclass_options(TrainConfig, exclude=("head",))
def train_head(
    head: HeadArg,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    features: FeaturesOpt = None,
    runs: RunsOpt = None,
    annotations: AnnotationsOpt = None,
    allow_missing: AllowMissingOpt = False,
    **overrides,
):
    """Stage 2: train a temporal head on cached features -> runs/<name>/.

    Example: ekx train-head lstm --epochs 30 --lr 1e-4 --name lstm-a
    """
    from ekx.heads.config import given_keys, resolve_config

    cfg = resolve_config(config, {"head": head, **overrides}, TrainConfig)
    given = given_keys(config, {"head": head, **overrides})
    ws = workspace(features=features, runs=runs, annotations=annotations)
    check_metric_annotations(annotations, ws.annotations)
    if cfg.device == "auto" and ws.device != "auto":
        cfg.device = ws.device

    from rich.progress import BarColumn, TextColumn

    from ekx.heads import train as tr  # torch: only once the arguments hold

    def warn(message: str) -> None:
        err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    columns = [
        TextColumn("[bold]{task.fields[name]}[/bold] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  best val action {task.fields[best]:.1f}"),
    ]
    with LateProgress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=1, name=cfg.head, epoch=1, epochs=cfg.epochs, loss=0.0, best=0.0)
        state = {"best": 0.0}

        def on_step(step, steps, loss):
            bar.update(task, completed=step, total=steps, loss=loss)

        def on_epoch(row):
            state["best"] = max(state["best"], row["val_action_top1"])
            bar.update(task, epoch=row["epoch"], best=state["best"])
            bar.console.print(end="")
            print_row(row)

        run_dir, best = tr.main(
            cfg, ws.features, ws.runs, ws.annotations, resume, on_epoch, on_step, given, warn, allow_missing, say
        )
    console.print(
        f"best epoch {best.get('epoch')}: val action top-1 {best.get('val_action_top1', 0):.1f} "
        f"(verb {best.get('val_verb_top1', 0):.1f}, noun {best.get('val_noun_top1', 0):.1f}) -> {run_dir}"
    )


@command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory (holds best.pt).")],
    features_file: Annotated[
        Path | None, typer.Option("--features", help="Cache to evaluate on (default: the run's validation cache).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics as JSON here.")] = None,
    submission: Annotated[
        Path | None, typer.Option("--submission", help="Write the challenge submission JSON here.")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    split_name: Annotated[
        str,
        typer.Option(
            "--split", help="Fine-tuned runs: the annotation split whose videos to decode.", callback=check_split
        ),
    ] = "validation",
    allow_missing: AllowMissingOpt = False,
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    device: DeviceOpt = None,
):
    """Official EPIC-100 metrics of a run on a cache (a fine-tuned run: on decoded video);
    --submission writes the challenge JSON. Every segment of the split counts: a segment
    without scores is refused, or counted as wrong with --allow-missing.

    Example: ekx evaluate runs/lstm-a --features features/resnet50/test.h5 --submission test.json
    """
    from ekx.heads import evaluate as ev
    from ekx.heads.checkpoint import load_checkpoint

    ws = workspace(annotations=annotations, videos=videos, device=device)
    check_metric_annotations(annotations, ws.annotations)
    ckpt = load_checkpoint(run / checkpoint)
    if "backbone" in ckpt:  # fine-tuned: backbone + head on decoded video
        from ekx.finetune import run as ft

        if features_file is not None:
            raise EkxError(
                f"{run} is a fine-tuned run: it is evaluated on decoded video (--split, --videos), "
                "not on a feature cache"
            )

        result = ft.evaluate_video(
            run, ws.annotations, ws.videos, split_name, ws.device, checkpoint, allow_missing=allow_missing
        )
        features_file = result["features"]
        for e in result["errors"]:
            err_console.print(f"[yellow]warning:[/yellow] {e}", highlight=False)
    else:
        features_file = features_file or Path(ckpt["config"]["val_features"])
        result = ev.evaluate_run(run, features_file, ws.annotations, ws.device, checkpoint, allow_missing)
    m = result.get("metrics")
    if m and result["missing_ids"]:
        err_console.print(
            f"[yellow]warning:[/yellow] {len(result['missing_ids'])} of {result['segments']} segments have no "
            "scores and count as wrong in every metric (--allow-missing)",
            highlight=False,
        )
    if m:
        title = f"{run} on {features_file} ({result['segments']} segments)"
        tables.show(console, ["metric", "value"], [[k, f"{v:.2f}"] for k, v in m.items()], title=title)
    else:
        console.print(f"{features_file}: unlabelled ({result['segments']} segments): no metrics")
    if json_out:
        ev.write_json(
            json_out,
            {k: result[k] for k in ("run", "features", "segments", "epoch")}
            | {"missing": len(result["missing_ids"]), "metrics": m or {}},
        )
        console.print(f"metrics -> {json_out}")
    if submission:
        ev.check_complete(result, ws.annotations)
        ev.write_json(submission, ev.submission(result))
        console.print(f"submission ({result['segments']} segments) -> {submission}")


@command()
def score(
    submission: Annotated[Path, typer.Argument(help="A challenge submission JSON (or the official zip holding one).")],
    split_name: Annotated[
        str,
        typer.Option(
            "--split", help="Labelled split to score against (validation, train or a CSV path).", callback=check_split
        ),
    ] = "validation",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    annotations: AnnotationsOpt = None,
):
    """Score any submission file against a labelled split exactly as the official evaluation
    does (action = product of softmaxes over each segment's top-100 verb and noun scores).

    Example: ekx score val-submission.json --annotations data/annotations --split validation
    """
    if not submission.is_file():  # said first: before the annotations are read, before torch loads
        raise EkxError(f"{submission}: submission file not found")
    from ekx import scoring
    from ekx.heads.evaluate import write_json

    ws = workspace(annotations=annotations)
    result = scoring.score(submission, ws.annotations, split_name)
    title = f"{submission} on {result['annotations']} ({result['segments']} segments)"
    tables.show(console, ["metric", "value"], [[k, f"{v:.2f}"] for k, v in result["metrics"].items()], title=title)
    if json_out:
        write_json(json_out, result)
        console.print(f"figures -> {json_out}")


@command()
def sweep(
    file: Annotated[Path, typer.Argument(help="A sweep TOML file (see configs/sweeps/).")],
    jobs: Annotated[
        int, typer.Option(help="Configurations (or search workers) at once, in processes that die with this one.")
    ] = 1,
    index: Annotated[int | None, typer.Option(help="Run only configuration I (0-based; one SLURM array task).")] = None,
    allow_missing: AllowMissingOpt = False,
    worker: Annotated[
        int, typer.Option(help="[optuna] files: this process is worker I of the shared study (seeds its sampler).")
    ] = 0,
    select: Annotated[
        str | None,
        typer.Option(
            help="[optuna] files: the objective - a metrics column (val_verb_top1, val_loss, ...) or the "
            "held-out cache (.h5, from `ekx split` + extract) that trials are validated and selected on.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Sweep directory under runs/ (default: the file's stem).")] = None,
    backbone: BackboneOpt = None,
    train_features: Annotated[
        Path | None, typer.Option(help="Train cache (default <features>/<backbone>/train.h5).")
    ] = None,
    val_features: Annotated[
        Path | None, typer.Option(help="Validation cache (default <features>/<backbone>/validation.h5).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Applied to every configuration (repeatable), e.g. --set epochs=2."
        ),
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Print the numbered configurations and exit.")] = False,
    features: FeaturesOpt = None,
    runs: RunsOpt = None,
    annotations: AnnotationsOpt = None,
    device: DeviceOpt = None,
    track: TrackOpt = None,
):
    """Train every configuration of a sweep file, each cache loaded once; or run an [optuna]
    search (pruned, model-based, many workers on one study). Resumable: run it again.

    Example: ekx sweep configs/sweeps/phase2.toml --jobs 2
    """
    from ekx.epic import subsets
    from ekx.heads import sweep as sw  # torch-free: the file is checked whole before anything runs

    ws = workspace(features=features, runs=runs, annotations=annotations, device=device)
    existing("--annotations", annotations)
    settings = [*(set_ or []), *(f"{k}={v}" for k, v in (("backbone", backbone), ("track", track)) if v)]
    if select and select.endswith(".h5"):
        val_features, select = Path(select), None
    existing("--train-features", train_features, "file")
    existing("--val-features", val_features, "file")
    sweep_dir = ws.runs / (name or file.stem)
    if sw.is_search(file):
        from ekx.heads import search as se

        spec = se.load(file)
        spec.overrides = sw.parse_settings(settings)
        if train_features:
            spec.overrides["train_features"] = str(train_features)
        if val_features:
            spec.overrides["val_features"] = str(val_features)
        if select:
            spec.objective = select
        if list_only or index is not None:
            raise EkxError(f"{file} is an [optuna] search: trials are sampled as it runs (no --list, no --index)")
        tails, unseen = subsets(ws.annotations, "validation")
        _search(spec, sweep_dir, ws, jobs, tails, unseen, worker, allow_missing)
        return
    if select:
        raise EkxError("--select applies to [optuna] files (the grid/random runner trains every configuration)")
    configs = sw.apply_overrides(sw.load(file), settings)
    tails, unseen = subsets(ws.annotations, "validation")
    if list_only:
        for sc in configs:
            over = {k: v for k, v in sc.overrides.items() if k != "name"}
            console.print(f"{sc.index:3d}  {sc.name:<12} {over}", highlight=False, soft_wrap=True)
        return
    if index is not None:
        if not 0 <= index < len(configs):
            raise EkxError(f"--index {index}: {file} has configurations 0..{len(configs) - 1}")
        configs = [configs[index]]
    _grid(configs, sweep_dir, ws, jobs, train_features, val_features, tails, unseen, allow_missing)


def _grid(configs, sweep_dir, ws, jobs, train_features, val_features, tails, unseen, allow_missing) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ekx.heads import sweep as sw

    columns = [
        TextColumn("{task.description:<28}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console) as bar:
        overall = bar.add_task("[bold]sweep", total=len(configs), status="")
        tasks = {sc.name: bar.add_task(sc.name[:28], total=sc.cfg.epochs, status="waiting") for sc in configs}
        best: dict[str, float] = {}

        def on_event(kind, sc, row):
            t = tasks[sc.name]
            if kind == "epoch":
                best[sc.name] = max(best.get(sc.name, 0.0), row["val_action_top1"])
                bar.update(t, completed=row["epoch"], status=f"best val action {best[sc.name]:.1f}")
            elif kind == "start":
                bar.update(t, status="training")
            elif kind in ("done", "skipped"):
                bar.update(
                    t, completed=sc.cfg.epochs, status=f"{kind}: best val action {row.get('val_action_top1', 0):.1f}"
                )
                bar.advance(overall)
            elif kind == "failed":
                bar.update(t, status=f"[red]failed[/red]: {row['error'][:60]}")
                bar.advance(overall)

        where = (train_features, val_features, ws.device, jobs, tails, unseen, on_event, ws.features)
        results = sw.run_sweep(configs, sweep_dir, *where, allow_missing=allow_missing)
    failed = {n: r for n, r in results.items() if r["status"] == "failed"}
    console.print(
        f"{len(results) - len(failed)}/{len(results)} configurations finished -> {sweep_dir}  "
        f"(compare: ekx compare {sweep_dir})"
    )
    for n, r in failed.items():
        err_console.print(f"[red]failed[/red] {n}: {r['error']}")
    if failed:
        raise typer.Exit(1)


def _search(spec, sweep_dir, ws, jobs, tails, unseen, worker, allow_missing) -> None:
    from ekx.heads import search as se

    def on_event(kind, name, row):
        if kind == "epoch":
            return
        if kind in ("start", "resume"):
            detail = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
            text = f"{name} {'resumed' if kind == 'resume' else 'started'}: {detail}"
        elif kind == "done":
            text = f"{name} done: {spec.objective} {row['value']:.2f}"
        elif kind == "pruned":
            text = f"{name} pruned after epoch {row['epoch']} ({spec.objective} {row['value']:.2f})"
        else:
            text = f"[red]{name} failed[/red]: {row['error'][:200]}"
        console.print(text, highlight=False, soft_wrap=True)

    se.run_search(spec, sweep_dir, ws.features, ws.device, jobs, tails, unseen, worker, on_event, allow_missing)
    counts = se.summary(sweep_dir)
    console.print(
        f"study {se.journal_path(sweep_dir)}: "
        + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
        + f" of {spec.trials} trials -> {sweep_dir}  (compare: ekx compare {sweep_dir})",
        highlight=False,
    )
