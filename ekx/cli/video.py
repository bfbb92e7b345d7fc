"""Commands on decoded video: finetune (the slow path), predict, live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ekx import EkxError, tables
from ekx.cli.common import (
    AnnotationsOpt,
    ConfigOpt,
    DeviceOpt,
    HeadArg,
    LateProgress,
    ResumeOpt,
    RunsOpt,
    VideosOpt,
    command,
    console,
    dataclass_options,
    err_console,
    existing,
    median,
    print_row,
    workspace,
)
from ekx.finetune.config import FinetuneConfig


@command()
@dataclass_options(FinetuneConfig, exclude=("head", "train_features", "val_features"))
def finetune(
    head: HeadArg,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    runs: RunsOpt = None,
    **overrides,
):
    """End-to-end: backbone + head on decoded video (the slow path); torchrun for several GPUs.

    Example: ekx finetune lstm --init-head lstm-a --epochs 5 --accumulate 4
    (several GPUs: torchrun --nproc-per-node 4 -m ekx finetune lstm --init-head lstm-a)
    """
    from ekx.heads.config import given_keys, resolve_config

    tables = ("finetune", "train")
    cfg = resolve_config(config, {"head": head, **overrides}, FinetuneConfig, tables)
    given = given_keys(config, {"head": head, **overrides}, tables)
    existing("--annotations", annotations)
    existing("--videos", videos)
    ws = workspace(runs=runs, annotations=annotations, videos=videos)
    if cfg.device == "auto" and ws.device != "auto":
        cfg.device = ws.device

    from ekx.finetune import run as ft  # torch: only once the arguments hold

    rank0 = os.environ.get("RANK", "0") == "0"
    out = console if rank0 else Console(quiet=True)
    warn = (
        (lambda m: err_console.print(f"[yellow]warning:[/yellow] {escape(m)}", highlight=False))
        if rank0
        else (lambda m: None)
    )
    from rich.progress import BarColumn, TextColumn

    columns = [
        TextColumn("[bold]finetune {task.fields[name]}[/bold] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
    ]
    with LateProgress(*columns, console=out, disable=not rank0) as bar:
        task = bar.add_task("finetune", total=1, name=cfg.head, epoch=1, epochs=cfg.epochs, loss=0.0)

        def on_epoch(row):
            bar.update(task, epoch=min(row["epoch"] + 1, cfg.epochs))
            if row["epoch"] == 0:
                out.print(
                    f"epoch   0  (start) val verb {row['val_verb_top1']:5.1f} noun {row['val_noun_top1']:5.1f} "
                    f"action {row['val_action_top1']:5.1f}",
                    highlight=False,
                )
            else:
                print_row(row)

        def on_step(step, steps, loss):
            bar.update(task, completed=step, total=steps, loss=loss)

        run_dir, best = ft.main(cfg, ws.annotations, ws.videos, ws.runs, resume, on_epoch, on_step, warn, given)
    out.print(
        f"best epoch {best.get('epoch')}: val action top-1 {best.get('val_action_top1', 0):.1f} "
        f"(verb {best.get('val_verb_top1', 0):.1f}, noun {best.get('val_noun_top1', 0):.1f}) -> {run_dir}"
    )


@command()
def predict(
    video: Annotated[Path, typer.Argument(help="A video file.")],
    run: Annotated[str, typer.Option("--run", help="Run directory, or a run name under runs/.")],
    window: Annotated[float, typer.Option(help="Window length in seconds (the head sees K frames of it).")] = 2.0,
    stride: Annotated[float, typer.Option(help="Seconds between window starts.")] = 0.5,
    top: Annotated[int, typer.Option(help="Actions listed per window.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the windows as JSON here.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one row per window and rank here.")] = None,
    timeline_out: Annotated[
        Path | None, typer.Option("--timeline", help="Draw the predicted actions along time (PNG).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    runs: RunsOpt = None,
    device: DeviceOpt = None,
):
    """Actions along a whole video: sliding windows, top-k (verb, noun) per window.

    Example: ekx predict P01_11.MP4 --run lstm-a --window 2 --stride 0.5 --timeline P01_11.png
    """
    import csv

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from ekx import predict as pr

    if top < 1:
        raise EkxError("--top must be >= 1")
    ws = workspace(runs=runs, device=device)
    model = pr.load_run(pr.resolve_run(run, ws.runs), ws.device, checkpoint)
    with Progress(
        TextColumn(f"[bold]{video.name}[/bold] frames"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("frames", total=None)
        result = pr.predict_video(
            model,
            video,
            window,
            stride,
            top,
            on_start=lambda n: bar.update(task, total=n),
            on_progress=lambda n: bar.advance(task, n),
        )
    named = [w.named(model.verbs, model.nouns) for w in result.windows]
    title = (
        f"{video.name}: {len(named)} windows of {window:g} s every {stride:g} s "
        f"({result.grid_frames} frames through the backbone, each once)"
    )
    cells = [
        [f"{w['start']:.2f}-{w['end']:.2f}"]
        + [f"{a['verb']} {a['noun']} {100 * a['probability']:.0f}%" for a in w["top"][:3]]
        for w in named
    ]
    tables.show(console, ["window (s)", *[f"#{i + 1}" for i in range(min(top, 3))]], cells, title=title)
    if json_out:
        from ekx.heads.evaluate import write_json

        write_json(
            json_out,
            {
                "video": str(video),
                "run": run,
                "fps": result.fps,
                "duration": result.duration,
                "window": window,
                "stride": stride,
                "windows": named,
            },
        )
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
    camera: Annotated[int | None, typer.Option(help="Camera index (OpenCV).", show_default=False)] = None,
    video: Annotated[Path | None, typer.Option(help="A video file instead of a camera.", show_default=False)] = None,
    realtime: Annotated[
        bool,
        typer.Option(
            "--realtime",
            help="Play --video at its native rate, as a camera (frames are dropped when inference is behind).",
        ),
    ] = False,
    headless: Annotated[
        bool, typer.Option("--headless", help="Print predictions instead of drawing them on the frames.")
    ] = False,
    window: Annotated[float, typer.Option(help="Seconds the head sees (K frames over it).")] = 2.0,
    stride: Annotated[float, typer.Option(help="Seconds between head evaluations.")] = 0.5,
    top: Annotated[int, typer.Option(help="Actions shown.")] = 3,
    seconds: Annotated[
        float | None, typer.Option(help="Stop after this many seconds of video.", show_default=False)
    ] = None,
    delay_ms: Annotated[
        float, typer.Option("--delay-ms", hidden=True, help="Make the backbone this much slower (testing).")
    ] = 0.0,
    checkpoint: Annotated[str, typer.Option(help="best.pt or last.pt.")] = "best.pt",
    runs: RunsOpt = None,
    device: DeviceOpt = None,
):
    """Real-time actions from a camera (or a file played as one): top-3, fps and latency on the frame.

    Example: ekx live --run lstm-a --camera 0
    """
    from ekx import live as lv
    from ekx import predict as pr

    lv.cv2_module()  # the missing-extra error before the model loads
    ws = workspace(runs=runs, device=device)
    model = pr.load_run(pr.resolve_run(run, ws.runs), ws.device, checkpoint)
    if note := lv.resize_note(model):
        console.print(note, style="yellow", highlight=False)
    summary = lv.run_live(
        model,
        camera,
        video,
        realtime,
        window,
        stride,
        top,
        headless,
        delay_ms,
        seconds,
        on_report=(lambda r: console.print(r.line(), highlight=False, soft_wrap=True)) if headless else None,
    )
    console.print(
        f"{summary.samples} frames through the backbone in {summary.seconds:.1f} s ({summary.fps:.1f} fps), "
        f"{summary.dropped} dropped, {summary.reports} predictions; latency median "
        f"{median(summary.latency_ms):.0f} ms, max {max(summary.latency_ms, default=0):.0f} ms; backbone "
        f"{median(summary.backbone_ms):.0f} ms/frame, head {median(summary.head_ms):.1f} ms",
        highlight=False,
    )
