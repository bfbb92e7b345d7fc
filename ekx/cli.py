"""The `ekx` command line: thin. Options -> config -> one library call.

Each command is one function here; a new issue adds its command in this file and
its work in the library. Errors reach the user as one red line and exit code 1
(`--debug` shows the traceback).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ekx import EkxError, __version__
from ekx import config as wsconfig
from ekx.finetune import FinetuneConfig
from ekx.heads.train import TrainConfig

app = typer.Typer(help="ekx: EPIC-KITCHENS-100 action recognition on cached backbone features.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
cache_app = typer.Typer(help="Inspect, check and join feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
slurm_app = typer.Typer(help="Submit sharded extraction or sweeps to a SLURM cluster.", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": bool(os.environ.get("EKX_DEBUG"))}

# Options shared by several commands, defined once.
AnnotationsOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Annotation directory (default from ekx config).", show_default=False)]
VideosOpt = Annotated[Optional[Path], typer.Option(
    "--videos", help="Video root: <vid>.mp4 or <pid>/videos/<vid>.MP4.", show_default=False)]
FeaturesOpt = Annotated[Optional[Path], typer.Option(
    "--features", help="Feature cache root (default from ekx config).", show_default=False)]
RunsOpt = Annotated[Optional[Path], typer.Option(
    "--runs", help="Run directory root (default from ekx config).", show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto, cpu or cuda[:N].", show_default=False)]


def command_body(fn):
    """Wrap a function so its errors become one red line and exit code 1."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]: everything written so far is kept")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the one place errors meet the user
            if _state["debug"]:
                raise
            msg = str(e) if isinstance(e, EkxError) else f"{type(e).__name__}: {e} (run with --debug for the traceback)"
            err_console.print(f"[red]error:[/red] {msg}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return run


def command(target: typer.Typer = app, name: str | None = None, **settings):
    """Register a command whose errors become one red line and exit code 1."""
    def wrap(fn):
        return target.command(name=name, **settings)(command_body(fn))
    return wrap


def _median(values: list[float]) -> float:
    values = sorted(values) or [0.0]
    return values[len(values) // 2]


def workspace(**flags) -> wsconfig.Workspace:
    return wsconfig.resolve(flags)


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
):
    if version:
        console.print(f"ekx {__version__}")
        raise typer.Exit()
    _state["debug"] = _state["debug"] or debug


@command()
def config(annotations: AnnotationsOpt = None, videos: VideosOpt = None,
           features: FeaturesOpt = None, runs: RunsOpt = None, device: DeviceOpt = None):
    """Print the resolved workspace settings and where each came from.

    Example: ekx config --videos /data/EPIC-KITCHENS
    """
    ws = workspace(annotations=annotations, videos=videos, features=features, runs=runs, device=device)
    table = Table("setting", "value", "source", title="ekx workspace")
    for key, source in ws.sources.items():
        table.add_row(key, str(getattr(ws, key)), source)
    console.print(table)


@command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory (annotations/ and videos/ inside).")],
    videos: Annotated[int, typer.Option(help="Number of videos.")] = 16,
    segments: Annotated[int, typer.Option(help="Action segments per video.")] = 20,
    width: Annotated[int, typer.Option(help="Frame width in pixels.")] = 256,
    height: Annotated[int, typer.Option(help="Frame height in pixels.")] = 192,
    fps: Annotated[str, typer.Option(help="Frame rates cycled over videos, comma-separated.")] = "30,60",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same dataset.")] = 0,
    workers: Annotated[int, typer.Option(help="Parallel encoder processes.")] = 2,
):
    """Write a synthetic dataset in the official EPIC-100 formats (H.264 videos + CSVs).

    Example: ekx synth data/synth --videos 4 --segments 10 --seed 1
    """
    from rich.progress import Progress

    from ekx.synth import SynthConfig, synthesize

    try:
        rates = tuple(int(x) for x in fps.split(","))
    except ValueError:
        raise EkxError(f"--fps {fps!r}: expected integers separated by commas, e.g. 30,60") from None
    if videos < 2 or segments < 1 or width < 64 or height < 64 or min(rates) < 1:
        raise EkxError("--videos must be >= 2 (train and validation), --segments >= 1, "
                       "--width/--height >= 64, --fps >= 1")
    cfg = SynthConfig(videos=videos, segments=segments, width=width, height=height, fps=rates,
                      seed=seed, workers=workers)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("encoding videos", total=videos)
        summary = synthesize(out, cfg, progress=lambda: bar.advance(task))
    console.print(f"wrote {summary['videos']} videos ({summary['frames']} frames), "
                  f"{summary['segments']} segments to {out}")
    console.print(f"  annotations: {summary['annotations']}\n  videos:      {summary['video_root']}")


@command()
def extract(
    backbone: Annotated[str, typer.Option(help="resnet50, efficientnet_b3 or r2plus1d_18.")] = "resnet50",
    split: Annotated[str, typer.Option(help="train, validation, test, or a path to an annotation CSV.")] = "train",
    weights: Annotated[str, typer.Option(help="DEFAULT (torchvision pretrained), a state-dict path, or none.")] = "DEFAULT",
    frames: Annotated[int, typer.Option(help="Frames K sampled per segment.")] = 16,
    views: Annotated[int, typer.Option(help="Views per segment: view 0 clean, the others augmented.")] = 1,
    batch_size: Annotated[Optional[int], typer.Option(help="Backbone batch size in images (clips for 3D); default 16 on CPU, 64 on GPU.", show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 2,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 autocast.")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N segments (for trials).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: this process's 1/N of the videos (I from 0).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of random weights (--weights none) and augmented views.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Cache file (default features/<backbone>/<split>.h5).")] = None,
    skip_errors: Annotated[bool, typer.Option(help="Exit 0 even if some segments failed.")] = False,
    annotations: AnnotationsOpt = None, videos: VideosOpt = None, features: FeaturesOpt = None,
    device: DeviceOpt = None,
):
    """Stage 1: decode every segment, run a frozen backbone, cache features in HDF5 (resumable).

    Example: ekx extract --backbone resnet50 --split validation --limit 100
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ekx.extract.pipeline import ExtractConfig, extract as run_extract, parse_shard

    ws = workspace(annotations=annotations, videos=videos, features=features, device=device)
    cfg = ExtractConfig(backbone=backbone, split=split, weights=weights, frames=frames, views=views,
                        batch_size=batch_size, workers=workers, device=ws.device, precision=precision,
                        limit=limit, shard=parse_shard(shard) if shard else None, seed=seed, out=out)
    columns = [TextColumn("[bold]extract[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("segments {task.fields[fps]:>6.1f} frames/s"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("extract", total=None, fps=0.0)
        clock = {}

        def on_start(total, done):
            bar.update(task, total=total, completed=done)
            clock.update(t=time.perf_counter(), frames=0)

        def on_progress(segments, nframes):
            clock["frames"] += nframes
            bar.update(task, advance=segments, fps=clock["frames"] / max(time.perf_counter() - clock["t"], 1e-9))

        summary = run_extract(cfg, ws.annotations, ws.videos, ws.features, on_start, on_progress,
                              warn=lambda m: err_console.print(f"[yellow]warning:[/yellow] {m}"))
    console.print(f"{summary.path}: {summary.done}/{summary.total} segments done, {summary.failed} failed "
                  f"({summary.processed} this run, {summary.frames} frames, {summary.seconds:.1f} s)")
    if summary.missing_videos:
        err_console.print(f"[yellow]warning:[/yellow] {summary.missing_videos}")
    for nid, reason in summary.failures[:10]:
        err_console.print(f"  [red]failed[/red] {nid}: {reason}")
    if len(summary.failures) > 10:
        err_console.print(f"  ... and {len(summary.failures) - 10} more (ekx cache info {summary.path})")
    if summary.failed and not skip_errors:
        err_console.print(f"[red]error:[/red] {summary.failed} segments failed; fix them and re-run to retry "
                          "only those, or pass --skip-errors to accept")
        raise typer.Exit(1)


@command(cache_app, "info")
def cache_info(path: Annotated[Path, typer.Argument(help="A feature cache (.h5).")]):
    """Print a cache's attributes, segment counts and size.

    Example: ekx cache info features/resnet50/train.h5
    """
    from ekx.cache import tools
    from ekx.cache.reader import failures

    meta = tools.info(path)
    table = Table("attribute", "value", title=str(path))
    for k, v in sorted(meta["attrs"].items()):
        table.add_row(k, str(v))
    console.print(table)
    c = meta["counts"]
    console.print(f"shape {meta['shape']} (N, V, K, D); done {c['done']}, failed {c['failed']}, "
                  f"pending {c['pending']}; {meta['bytes'] / 2**20:.1f} MiB")
    for nid, reason in failures(path)[:20]:
        console.print(f"  failed {nid}: {reason}")


@command(cache_app, "verify")
def cache_verify(
    path: Annotated[Path, typer.Argument(help="A feature cache (.h5).")],
    annotations_csv: Annotated[Optional[Path], typer.Option("--annotations-csv", help="Check the cache was made from this CSV.")] = None,
):
    """Check shapes, NaN/Inf, degenerate features, status and annotation hash; exit 1 on a problem.

    Example: ekx cache verify features/resnet50/train.h5 --annotations-csv data/annotations/EPIC_100_train.csv
    """
    from ekx.cache import tools

    problems, warnings = tools.verify(path, annotations_csv)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}")
    for p in problems:
        err_console.print(f"[red]problem:[/red] {p}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{path}: ok")


@command(cache_app, "merge")
def cache_merge(
    out: Annotated[Path, typer.Argument(help="The merged cache to write.")],
    shards: Annotated[list[Path], typer.Argument(help="Shard files from ekx extract --shard I/N.")],
):
    """Join shard caches into one file, in the unsharded row order.

    Example: ekx cache merge features/resnet50/train.h5 features/resnet50/train.shard*of4.h5
    """
    from ekx.cache import tools

    result = tools.merge(out, shards)
    console.print(f"merged {result['shards']} shards, {result['rows']} segments -> {out}")


def dataclass_options(cls, exclude: tuple[str, ...] = ()):
    """Give a command one --flag per dataclass field (default None = not given), so a new
    hyperparameter is a flag the moment it is a field; help comes from field metadata."""
    def wrap(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            kind = type(f.default)
            flag = f"--{f.name.replace('_', '-')}"
            if kind is bool:  # an on and an off switch
                flag = f"{flag}/--no-{flag[2:]}"
            opt = typer.Option(flag, help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
                               show_default=False)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[kind], opt]))
        fn.__signature__ = sig.replace(parameters=params)
        return fn
    return wrap


def _print_row(row: dict) -> None:
    console.print(f"epoch {row['epoch']:>3}  loss {row['train_loss']:.3f}/{row['val_loss']:.3f}  "
                  f"train action {row['train_action_top1']:5.1f}  val verb {row['val_verb_top1']:5.1f} "
                  f"noun {row['val_noun_top1']:5.1f} action {row['val_action_top1']:5.1f}  gap {row['gap']:+.1f}  "
                  f"{row['seconds']:.1f}s", highlight=False)


@command(name="train-head")
@dataclass_options(TrainConfig, exclude=("head",))
def train_head(
    head: Annotated[str, typer.Argument(help="pooling, lstm, transformer or cross-attention.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of hyperparameters (flags win).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue runs/<name> from its last.pt.")] = False,
    features: FeaturesOpt = None, runs: RunsOpt = None, annotations: AnnotationsOpt = None,
    **overrides,
):
    """Stage 2: train a temporal head on cached features -> runs/<name>/.

    Example: ekx train-head lstm --epochs 30 --lr 1e-4 --name lstm-a
    """
    from rich.progress import BarColumn, Progress, TextColumn

    from ekx.heads import train as tr

    ws = workspace(features=features, runs=runs, annotations=annotations)
    cfg = tr.resolve_config(config, {"head": head, **overrides})
    if cfg.device == "auto" and ws.device != "auto":
        cfg.device = ws.device
    columns = [TextColumn("[bold]{task.fields[name]}[/bold] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
               BarColumn(), TextColumn("loss {task.fields[loss]:.3f}  best val action {task.fields[best]:.1f}")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=1, name=cfg.head, epoch=0, epochs=cfg.epochs, loss=0.0, best=0.0)
        state = {"best": 0.0}

        def on_step(step, steps, loss):
            bar.update(task, completed=step, total=steps, loss=loss)

        def on_epoch(row):
            state["best"] = max(state["best"], row["val_action_top1"])
            bar.update(task, epoch=row["epoch"], best=state["best"])
            bar.console.print(end="")
            _print_row(row)

        bar.update(task, epoch=1)
        run_dir, best = tr.main(cfg, ws.features, ws.runs, ws.annotations, resume, on_epoch, on_step)
    console.print(f"best epoch {best.get('epoch')}: val action top-1 {best.get('val_action_top1', 0):.1f} "
                  f"(verb {best.get('val_verb_top1', 0):.1f}, noun {best.get('val_noun_top1', 0):.1f}) -> {run_dir}")


@command()
@dataclass_options(FinetuneConfig, exclude=("head", "train_features", "val_features"))
def finetune(
    head: Annotated[str, typer.Argument(help="pooling, lstm, transformer or cross-attention.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of hyperparameters (flags win).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue runs/<name> from its last.pt.")] = False,
    annotations: AnnotationsOpt = None, videos: VideosOpt = None, runs: RunsOpt = None,
    **overrides,
):
    """End-to-end: backbone + head on decoded video (the slow path); torchrun for several GPUs.

    Example: ekx finetune lstm --init-head lstm-a --epochs 5 --accumulate 4
    (several GPUs: torchrun --nproc-per-node 4 -m ekx finetune lstm --init-head lstm-a)
    """
    from ekx import finetune as ft

    from ekx.heads.train import resolve_config

    ws = workspace(runs=runs, annotations=annotations, videos=videos)
    cfg = resolve_config(config, {"head": head, **overrides}, ft.FinetuneConfig, ("finetune", "train"))
    if cfg.device == "auto" and ws.device != "auto":
        cfg.device = ws.device
    rank0 = os.environ.get("RANK", "0") == "0"
    out = console if rank0 else Console(quiet=True)
    warn = (lambda m: err_console.print(f"[yellow]warning:[/yellow] {m}", highlight=False)) if rank0 else (lambda m: None)
    from rich.progress import BarColumn, Progress, TextColumn

    columns = [TextColumn("[bold]finetune {task.fields[name]}[/bold] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
               BarColumn(), TextColumn("loss {task.fields[loss]:.3f}")]
    with Progress(*columns, console=out, disable=not rank0) as bar:
        task = bar.add_task("finetune", total=1, name=cfg.head, epoch=1, epochs=cfg.epochs, loss=0.0)

        def on_epoch(row):
            bar.update(task, epoch=min(row["epoch"] + 1, cfg.epochs))
            if row["epoch"] == 0:
                out.print(f"epoch   0  (start) val verb {row['val_verb_top1']:5.1f} noun {row['val_noun_top1']:5.1f} "
                          f"action {row['val_action_top1']:5.1f}", highlight=False)
            else:
                _print_row(row)

        run_dir, best = ft.main(cfg, ws.annotations, ws.videos, ws.runs, resume, on_epoch,
                                lambda step, steps, loss: bar.update(task, completed=step, total=steps, loss=loss), warn)
    out.print(f"best epoch {best.get('epoch')}: val action top-1 {best.get('val_action_top1', 0):.1f} "
              f"(verb {best.get('val_verb_top1', 0):.1f}, noun {best.get('val_noun_top1', 0):.1f}) -> {run_dir}")


@command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory (holds best.pt).")],
    features_file: Annotated[Optional[Path], typer.Option("--features", help="Cache to evaluate on (default: the run's validation cache).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write metrics as JSON here.")] = None,
    submission: Annotated[Optional[Path], typer.Option("--submission", help="Write the challenge submission JSON here.")] = None,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    split_name: Annotated[str, typer.Option("--split", help="Fine-tuned runs: the annotation split whose videos to decode.")] = "validation",
    annotations: AnnotationsOpt = None, videos: VideosOpt = None, device: DeviceOpt = None,
):
    """Official EPIC-100 metrics of a run on a cache (a fine-tuned run: on decoded video);
    --submission writes the challenge JSON.

    Example: ekx evaluate runs/lstm-a --features features/resnet50/test.h5 --submission test.json
    """
    from ekx.heads import evaluate as ev
    from ekx.heads.train import load_checkpoint

    ws = workspace(annotations=annotations, videos=videos, device=device)
    ckpt = load_checkpoint(run / checkpoint)
    if "backbone" in ckpt:  # fine-tuned: backbone + head on decoded video
        from ekx import finetune as ft

        if features_file is not None:
            raise EkxError(f"{run} is a fine-tuned run: it is evaluated on decoded video (--split, --videos), "
                           "not on a feature cache")

        result = ft.evaluate_video(run, ws.annotations, ws.videos, split_name, ws.device, checkpoint)
        features_file = result["features"]
        for e in result["errors"]:
            err_console.print(f"[yellow]warning:[/yellow] {e}", highlight=False)
    else:
        features_file = features_file or Path(ckpt["config"]["val_features"])
        result = ev.evaluate_run(run, features_file, ws.annotations, ws.device, checkpoint)
    m = result.get("metrics")
    if m:
        table = Table("metric", "value", title=f"{run} on {features_file} ({result['segments']} segments)")
        for k, v in m.items():
            table.add_row(k, f"{v:.2f}")
        console.print(table)
    else:
        console.print(f"{features_file}: unlabelled ({result['segments']} segments): no metrics")
    if json_out:
        ev.write_json(json_out, {k: result[k] for k in ("run", "features", "segments", "epoch")} | {"metrics": m or {}})
        console.print(f"metrics -> {json_out}")
    if submission:
        ev.write_json(submission, ev.submission(result))
        console.print(f"submission ({result['segments']} segments) -> {submission}")


@command()
def score(
    submission: Annotated[Path, typer.Argument(help="A challenge submission JSON (or the official zip holding one).")],
    split_name: Annotated[str, typer.Option("--split", help="Labelled split to score against (validation, train or a CSV path).")] = "validation",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    annotations: AnnotationsOpt = None,
):
    """Score any submission file against a labelled split exactly as the official evaluation
    does (action = product of softmaxes over each segment's top-100 verb and noun scores).

    Example: ekx score val-submission.json --annotations data/annotations --split validation
    """
    from ekx import scoring
    from ekx.heads.evaluate import write_json

    ws = workspace(annotations=annotations)
    result = scoring.score(submission, ws.annotations, split_name)
    table = Table("metric", "value", title=f"{submission} on {result['annotations']} ({result['segments']} segments)")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.2f}")
    console.print(table)
    if json_out:
        write_json(json_out, result)
        console.print(f"figures -> {json_out}")


@command()
def sweep(
    file: Annotated[Path, typer.Argument(help="A sweep TOML file (see configs/sweeps/).")],
    jobs: Annotated[int, typer.Option(help="Configurations trained at once (processes sharing the memory-mapped cache).")] = 1,
    index: Annotated[Optional[int], typer.Option(help="Run only configuration I (0-based; one SLURM array task).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Sweep directory under runs/ (default: the file's stem).")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone whose caches to use.")] = "resnet50",
    train_features: Annotated[Optional[Path], typer.Option(help="Train cache (default <features>/<backbone>/train.h5).")] = None,
    val_features: Annotated[Optional[Path], typer.Option(help="Validation cache (default <features>/<backbone>/validation.h5).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE applied to every configuration (repeatable), e.g. --set epochs=2.")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Print the numbered configurations and exit.")] = False,
    features: FeaturesOpt = None, runs: RunsOpt = None, annotations: AnnotationsOpt = None, device: DeviceOpt = None,
):
    """Train every configuration of a sweep file on caches loaded once; resumable.

    Example: ekx sweep configs/sweeps/phase2.toml --jobs 2
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ekx.heads import sweep as sw
    from ekx.heads.evaluate import subsets

    ws = workspace(features=features, runs=runs, annotations=annotations, device=device)
    configs = sw.apply_overrides(sw.load(file), set_ or [])
    if list_only:
        for sc in configs:
            over = {k: v for k, v in sc.overrides.items() if k != "name"}
            console.print(f"{sc.index:3d}  {sc.name:<12} {over}", highlight=False, soft_wrap=True)
        return
    if index is not None:
        if not 0 <= index < len(configs):
            raise EkxError(f"--index {index}: {file} has configurations 0..{len(configs) - 1}")
        configs = [configs[index]]
    sweep_dir = ws.runs / (name or file.stem)
    train_p = train_features or ws.features / backbone / "train.h5"
    val_p = val_features or ws.features / backbone / "validation.h5"
    tails, unseen = subsets(ws.annotations, "validation")
    columns = [TextColumn("{task.description:<28}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}")]
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
                bar.update(t, completed=sc.cfg.epochs,
                           status=f"{kind}: best val action {row.get('val_action_top1', 0):.1f}")
                bar.advance(overall)
            elif kind == "failed":
                bar.update(t, status=f"[red]failed[/red]: {row['error'][:60]}")
                bar.advance(overall)

        results = sw.run_sweep(configs, sweep_dir, train_p, val_p, ws.device, jobs, tails, unseen, on_event)
    failed = {n: r for n, r in results.items() if r["status"] == "failed"}
    console.print(f"{len(results) - len(failed)}/{len(results)} configurations finished -> {sweep_dir}  "
                  f"(compare: ekx compare {sweep_dir})")
    for n, r in failed.items():
        err_console.print(f"[red]failed[/red] {n}: {r['error']}")
    if failed:
        raise typer.Exit(1)


@command()
def split(
    out: Annotated[Path, typer.Argument(help="Directory for the new EPIC_100_train/validation CSVs.")],
    fraction: Annotated[float, typer.Option(help="Share of the segments held out.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 0,
    annotations: AnnotationsOpt = None,
):
    """Hold out part of the training annotations by video (the seed's true validation set).

    Example: ekx split data/annotations-holdout --fraction 0.15 && ekx extract --annotations data/annotations-holdout
    """
    from ekx.split import write_split

    ws = workspace(annotations=annotations)
    r = write_split(ws.annotations, out, fraction, seed)
    console.print(f"held out {r['segments']} segments from {r['videos']} videos ({r['train_segments']} left to train); "
                  f"verb-distribution distance {r['verb_tv_distance']:.3f} -> {out}")


@command()
def compare(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUNS...", help="Run directories or sweep directories.")],
    out: Annotated[Optional[Path], typer.Option(help="Write OUT.md and OUT.csv (default: comparison.* beside the first run).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write validation curves and the gap chart to this PNG.")] = None,
):
    """The seed's model-comparison table, sorted by validation action top-1; Markdown and CSV.

    Example: ekx compare runs/phase2 --plot phase2.png
    """
    from ekx.heads import compare as cmp

    rows = cmp.collect(runs_)
    table = Table(*[c for c, _ in cmp.COLUMNS], title="model comparison (best epoch by val action top-1)")
    for r in cmp.table_rows(rows):
        table.add_row(*r)
    console.print(table)
    base = out or (Path(runs_[0]) if Path(runs_[0]).is_dir() and not (Path(runs_[0]) / "metrics.jsonl").is_file()
                   else Path(runs_[0]).parent) / "comparison"
    base.with_suffix(".md").write_text(cmp.markdown(rows))
    base.with_suffix(".csv").write_text(cmp.to_csv(rows))
    console.print(f"-> {base.with_suffix('.md')}, {base.with_suffix('.csv')}")
    if plot:
        console.print(f"-> {cmp.plot(rows, plot)}")
    top = rows[0]
    console.print(f"best: [bold]{top['run']}[/bold] (val action top-1 {top['val_action_top1']:.1f}); reproduce with:")
    console.print(f"  {cmp.reproduce_command(top)}", soft_wrap=True, highlight=False)  # never wrapped: copy-pasteable


PartitionOpt = Annotated[Optional[str], typer.Option(help="SLURM partition.", show_default=False)]
GpusOpt = Annotated[Optional[int], typer.Option(help="GPUs per task (--gres=gpu:N).", show_default=False)]
TimeOpt = Annotated[Optional[str], typer.Option(help="Time limit per task, e.g. 4:00:00.", show_default=False)]
MemOpt = Annotated[Optional[str], typer.Option(help="Memory per task, e.g. 32G.", show_default=False)]
CpusOpt = Annotated[Optional[int], typer.Option(help="CPUs per task.", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the sbatch commands instead of submitting.")]
ScriptsOpt = Annotated[Optional[Path], typer.Option(help="Folder of the job files (default: the repository's slurm/).", show_default=False)]
LogsOpt = Annotated[Optional[Path], typer.Option(help="Folder for the jobs' output files (default: the submit directory).", show_default=False)]
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _print_submission(result: dict, dry_run: bool, names: tuple[str, str]) -> None:
    from ekx.slurm import show

    if dry_run:
        for argv in result["commands"]:
            console.print(show(argv), highlight=False, soft_wrap=True)
        return
    console.print(f"submitted {names[0]} array job {result['array']} and {names[1]} job {result[names[1]]} "
                  f"(afterwards: squeue -j {result['array']},{result[names[1]]})", highlight=False)


@command(slurm_app, "extract", context_settings=EXTRA)
def slurm_extract(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="Backbone to extract.")] = "resnet50",
    split: Annotated[str, typer.Option(help="train, validation, test or a CSV.")] = "train",
    shards: Annotated[int, typer.Option(help="Array tasks N (each extracts shard I/N).")] = 4,
    partition: PartitionOpt = None, gpus: GpusOpt = None, time_limit: Annotated[Optional[str], typer.Option("--time", help="Time limit per task, e.g. 4:00:00.", show_default=False)] = None,
    mem: MemOpt = None, cpus: CpusOpt = None, dry_run: DryRunOpt = False, scripts: ScriptsOpt = None,
    logs: LogsOpt = None, annotations: AnnotationsOpt = None, videos: VideosOpt = None, features: FeaturesOpt = None,
):
    """Submit sharded extraction as an array job plus the dependent merge; extra flags go to ekx extract.

    Example: ekx slurm extract --backbone resnet50 --split train --shards 8 --partition gpu --gpus 1 --weights DEFAULT
    """
    from ekx.slurm import Resources, submit_extract

    ws = workspace(annotations=annotations, videos=videos, features=features)
    result = submit_extract(backbone, split, shards, list(ctx.args), ws.annotations, ws.videos, ws.features,
                            Resources(partition, gpus, time_limit, mem, cpus), dry_run, scripts, logs)
    _print_submission(result, dry_run, ("extract", "merge"))
    if not dry_run:
        console.print(f"merged cache when done: {result['out']}")


@command(slurm_app, "sweep", context_settings=EXTRA)
def slurm_sweep(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A sweep TOML file.")],
    partition: PartitionOpt = None, gpus: GpusOpt = None, time_limit: Annotated[Optional[str], typer.Option("--time", help="Time limit per task, e.g. 4:00:00.", show_default=False)] = None,
    mem: MemOpt = None, cpus: CpusOpt = None, dry_run: DryRunOpt = False, scripts: ScriptsOpt = None,
    logs: LogsOpt = None, runs: RunsOpt = None,
):
    """Submit one array task per sweep configuration plus the dependent compare; extra flags go to ekx sweep.

    Example: ekx slurm sweep configs/sweeps/phase2.toml --partition gpu --gpus 1 --time 2:00:00
    """
    from ekx.slurm import Resources, submit_sweep

    ws = workspace(runs=runs)
    result = submit_sweep(file, list(ctx.args), Resources(partition, gpus, time_limit, mem, cpus), dry_run,
                          scripts, ws.runs, logs)
    _print_submission(result, dry_run, ("sweep", "compare"))


@command()
def predict(
    video: Annotated[Path, typer.Argument(help="A video file.")],
    run: Annotated[str, typer.Option("--run", help="Run directory, or a run name under runs/.")],
    window: Annotated[float, typer.Option(help="Window length in seconds (the head sees K frames of it).")] = 2.0,
    stride: Annotated[float, typer.Option(help="Seconds between window starts.")] = 0.5,
    top: Annotated[int, typer.Option(help="Actions listed per window.")] = 5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the windows as JSON here.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per window and rank here.")] = None,
    timeline_out: Annotated[Optional[Path], typer.Option("--timeline", help="Draw the predicted actions along time (PNG).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    runs: RunsOpt = None, device: DeviceOpt = None,
):
    """Actions along a whole video: sliding windows, top-k (verb, noun) per window.

    Example: ekx predict P01_11.MP4 --run lstm-a --window 2 --stride 0.5 --timeline P01_11.png
    """
    import csv

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ekx import predict as pr

    if top < 1:
        raise EkxError("--top must be >= 1")
    ws = workspace(runs=runs, device=device)
    model = pr.load_run(pr.resolve_run(run, ws.runs), ws.device, checkpoint)
    with Progress(TextColumn(f"[bold]{video.name}[/bold] frames"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("frames", total=None)
        result = pr.predict_video(model, video, window, stride, top,
                                  on_start=lambda n: bar.update(task, total=n),
                                  on_progress=lambda n: bar.advance(task, n))
    named = [w.named(model.verbs, model.nouns) for w in result.windows]
    table = Table("window (s)", *[f"#{i + 1}" for i in range(min(top, 3))],
                  title=f"{video.name}: {len(named)} windows of {window:g} s every {stride:g} s "
                        f"({result.grid_frames} frames through the backbone, each once)")
    for w in named:
        table.add_row(f"{w['start']:7.2f}-{w['end']:.2f}",
                      *[f"{a['verb']} {a['noun']} {100 * a['probability']:.0f}%" for a in w["top"][:3]])
    console.print(table)
    if json_out:
        from ekx.heads.evaluate import write_json

        write_json(json_out, {"video": str(video), "run": run, "fps": result.fps, "duration": result.duration,
                              "window": window, "stride": stride, "windows": named})
        console.print(f"windows -> {json_out}")
    if csv_out:
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_out, "w", newline="") as fh:
            rows = list(pr.iter_rows(result, model.verbs, model.nouns))
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        console.print(f"rows -> {csv_out}")
    if timeline_out:
        console.print(f"timeline -> {pr.timeline(result, model.verbs, model.nouns, timeline_out)}")


@command()
def live(
    run: Annotated[str, typer.Option("--run", help="Run directory, or a run name under runs/.")],
    camera: Annotated[Optional[int], typer.Option(help="Camera index (OpenCV).", show_default=False)] = None,
    video: Annotated[Optional[Path], typer.Option(help="A video file instead of a camera.", show_default=False)] = None,
    realtime: Annotated[bool, typer.Option("--realtime", help="Play --video at its native rate, as a camera (frames are dropped when inference is behind).")] = False,
    headless: Annotated[bool, typer.Option("--headless", help="Print predictions instead of drawing them on the frames.")] = False,
    window: Annotated[float, typer.Option(help="Seconds the head sees (K frames over it).")] = 2.0,
    stride: Annotated[float, typer.Option(help="Seconds between head evaluations.")] = 0.5,
    top: Annotated[int, typer.Option(help="Actions shown.")] = 3,
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this many seconds of video.", show_default=False)] = None,
    delay_ms: Annotated[float, typer.Option("--delay-ms", hidden=True, help="Make the backbone this much slower (testing).")] = 0.0,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    runs: RunsOpt = None, device: DeviceOpt = None,
):
    """Real-time actions from a camera (or a file played as one): top-3, fps and latency on the frame.

    Example: ekx live --run lstm-a --camera 0
    """
    from ekx import live as lv
    from ekx import predict as pr

    lv.cv2_module()  # the missing-extra error before the model loads
    ws = workspace(runs=runs, device=device)
    model = pr.load_run(pr.resolve_run(run, ws.runs), ws.device, checkpoint)
    summary = lv.run_live(model, camera, video, realtime, window, stride, top, headless, delay_ms, seconds,
                          on_report=(lambda r: console.print(r.line(), highlight=False, soft_wrap=True)) if headless else None)
    console.print(f"{summary.samples} frames through the backbone in {summary.seconds:.1f} s ({summary.fps:.1f} fps), "
                  f"{summary.dropped} dropped, {summary.reports} predictions; latency median "
                  f"{_median(summary.latency_ms):.0f} ms, max {max(summary.latency_ms, default=0):.0f} ms; backbone "
                  f"{_median(summary.backbone_ms):.0f} ms/frame, head {_median(summary.head_ms):.1f} ms",
                  highlight=False)


@command()
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Workspace to use (default: a new temp dir).")] = None,
    videos: Annotated[int, typer.Option(help="Synthetic videos.")] = 12,
    segments: Annotated[int, typer.Option(help="Segments per video.")] = 16,
):
    """Run the whole pipeline on built-in synthetic data.

    Example: ekx demo --workdir /tmp/ekx-demo
    """
    from ekx import demo as demo_mod

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ekx-demo-"))
    demo_mod.run(workdir, videos=videos, segments=segments, console=console)


def main() -> None:
    """Console-script entry point."""
    app()
