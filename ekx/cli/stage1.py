"""Stage 1 commands: extract, and cache info / verify / merge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ekx import EkxError, tables
from ekx.cli.common import (
    AnnotationsOpt,
    DecodeDeviceOpt,
    DeviceOpt,
    FeaturesOpt,
    FramesRootOpt,
    LateProgress,
    SourceOpt,
    VideosOpt,
    cache_app,
    check_split,
    command,
    console,
    err_console,
    existing,
    names_option,
    say,
    workspace,
)
from ekx.extract.config import BACKBONES


@command()
def extract(
    backbone: Annotated[
        str,
        names_option(
            BACKBONES, "--backbone", "Backbone, or several separated by commas (one decode, one cache each)", True
        ),
    ] = "resnet50",
    split: Annotated[
        str, typer.Option(help="train, validation, test, or a path to an annotation CSV.", callback=check_split)
    ] = "train",
    weights: Annotated[
        str,
        typer.Option(
            help="DEFAULT (the pretrained weights: torchvision's, or a family's library's), a weights file "
            "(state dict or .safetensors), or none (random)."
        ),
    ] = "DEFAULT",
    frames: Annotated[int, typer.Option(help="Frames K sampled per segment.")] = 16,
    views: Annotated[int, typer.Option(help="Views per segment: view 0 clean, the others augmented.")] = 1,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Backbone batch size in images (clips for 3D); default 16 on CPU, 64 on GPU.", show_default=False
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 2,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 autocast.")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Only the first N segments (for trials).")] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: this process's 1/N of the videos (I from 0).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of random weights (--weights none) and augmented views.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Cache file (default features/<backbone>/<split>.h5).")] = None,
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="--weights none: if the cache's BatchNorm calibration differs from this run's "
            "(a calibration video restored or broken since), redo every row instead of refusing."
        ),
    ] = False,
    skip_errors: Annotated[bool, typer.Option(help="Exit 0 even if some segments failed.")] = False,
    source: SourceOpt = "auto",
    decode_device: DecodeDeviceOpt = "cpu",
    resize: Annotated[
        str,
        typer.Option(
            help="decoder: the decoder's scaler resizes at decode (fast; features ~0.98 cosine to torchvision's "
            "resize on random weights); torchvision: full-size frames and the weights' own resize (exact, "
            "~2-5x more decode work). Recorded in the cache."
        ),
    ] = "decoder",
    decode_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds without a decoded segment before a video's decoder is killed and its segments "
            "marked failed (0: no watchdog)."
        ),
    ] = 600.0,
    dense: Annotated[
        str | None,
        typer.Option(
            help="Write a dense store instead: features at RATE positions per second over each video "
            "(e.g. 4), or every:N (one per N frames), usable with any annotation file in stage 2 "
            "(features/<backbone>/<split>.dense-<rate>.h5; see docs/dense.md)."
        ),
    ] = None,
    dense_span: Annotated[
        str,
        typer.Option(help="--dense over whole videos, or only around the split's segments (annotated)."),
    ] = "video",
    dense_margin: Annotated[
        float, typer.Option(help="Seconds kept before and after each segment with --dense-span annotated.")
    ] = 2.0,
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    frames_root: FramesRootOpt = None,
    features: FeaturesOpt = None,
    device: DeviceOpt = None,
):
    """Stage 1: decode every segment, run a frozen backbone, cache features in HDF5 (resumable).

    Example: ekx extract --backbone resnet50 --split validation --limit 100
    (several backbones, each segment decoded once: ekx extract --backbone resnet50,efficientnet_b3,r2plus1d_18)
    """
    from ekx import options
    from ekx.extract.config import ExtractConfig, parse_shard

    ws = workspace(annotations=annotations, videos=videos, frames=frames_root, features=features, device=device)
    cfg = options.checked(
        ExtractConfig(
            backbone=backbone,
            split=split,
            weights=weights,
            frames=frames,
            views=views,
            batch_size=batch_size,
            workers=workers,
            device=ws.device,
            precision=precision,
            limit=limit,
            shard=parse_shard(shard) if shard else None,
            seed=seed,
            recalibrate=recalibrate,
            out=out,
            source=source,
            decode_device=decode_device,
            decode_timeout=decode_timeout,
            resize=resize,
            dense=dense or "",
            dense_span=dense_span,
            dense_margin=dense_margin,
        )
    )
    if dense is not None:  # given, even as '' (which would quietly mean a per-segment cache)
        from ekx.cache.dense import Rate

        Rate.parse(dense)  # a bad rate is said before anything loads
    existing("--annotations", annotations)
    if cfg.source == "frames":
        existing("--frames-root", frames_root)
    elif cfg.source != "auto" or not Path(ws.frames).is_dir():  # auto falls back on the frames where they are
        existing("--videos", videos)

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ekx.extract.pipeline import extract_many  # torch and the decoders: only once the arguments hold

    columns = [
        TextColumn("[bold]extract[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        # a dense store's rows are runs of --frames positions of a video (docs/dense.md)
        TextColumn(("runs" if cfg.dense else "segments") + " {task.fields[fps]:>6.1f} frames/s"),
        TimeRemainingColumn(),
    ]
    with LateProgress(*columns, console=err_console) as bar:
        task = bar.add_task("extract", total=None, fps=0.0)
        clock: dict[str, float] = {}

        def on_start(total, done):
            bar.update(task, total=total, completed=done)
            clock.update(t=time.perf_counter(), frames=0)

        def on_progress(segments, nframes):
            clock["frames"] += nframes
            bar.update(task, advance=segments, fps=clock["frames"] / max(time.perf_counter() - clock["t"], 1e-9))

        summaries = extract_many(
            cfg,
            ws.annotations,
            ws.videos,
            ws.features,
            on_start,
            on_progress,
            warn=lambda m: err_console.print(f"[yellow]warning:[/yellow] {escape(m)}"),
            frames_root=ws.frames,
            info=say,
        )
    failed = 0
    for summary in summaries:
        console.print(
            f"{summary.path}: {summary.done}/{summary.total} {'runs' if cfg.dense else 'segments'} done, "
            f"{summary.failed} failed "
            f"({summary.processed} this run, {summary.frames} frames, {summary.seconds:.1f} s)",
            soft_wrap=True,
        )
        for nid, reason in summary.failures[:10]:
            err_console.print(f"  [red]failed[/red] {nid}: {reason}")
        if len(summary.failures) > 10:
            err_console.print(f"  ... and {len(summary.failures) - 10} more (ekx cache info {summary.path})")
        failed = max(failed, summary.failed)
    if summaries[0].missing_videos:
        err_console.print(f"[yellow]warning:[/yellow] {summaries[0].missing_videos}")
    if failed and not skip_errors:
        err_console.print(
            f"[red]error:[/red] {failed} segments failed; fix them and re-run to retry "
            "only those, or pass --skip-errors to accept"
        )
        raise typer.Exit(1)


@command(cache_app, "info")
def cache_info(path: Annotated[Path, typer.Argument(help="A feature cache (.h5).")]):
    """Print a cache's attributes, segment counts and size.

    Example: ekx cache info features/resnet50/train.h5
    """
    from ekx.cache import tools
    from ekx.cache.reader import failures
    from ekx.extract.sources import ffmpeg_log

    meta = tools.info(path)
    tables.show(console, ["attribute", "value"], [[k, str(v)] for k, v in sorted(meta["attrs"].items())], str(path))
    c = meta["counts"]
    console.print(
        f"shape {meta['shape']} (N, V, K, D); done {c['done']}, failed {c['failed']}, "
        f"pending {c['pending']}; {meta['bytes'] / 2**20:.1f} MiB"
    )
    for nid, reason in failures(path)[:20]:
        console.print(f"  failed {nid}: {reason}")
    if line := ffmpeg_log.summary(meta["attrs"]):
        console.print(line, soft_wrap=True)


@command(cache_app, "verify")
def cache_verify(
    path: Annotated[Path, typer.Argument(help="A feature cache (.h5).")],
    annotations_csv: Annotated[
        Path | None, typer.Option("--annotations-csv", help="Check the cache was made from this CSV.")
    ] = None,
    repair: Annotated[
        bool, typer.Option(help="Mark segments whose features fail their checksum pending (extract redoes them).")
    ] = False,
):
    """Check checksums, shapes, NaN/Inf, degenerate features, status and annotation hash; exit 1 on a problem.

    Example: ekx cache verify features/resnet50/train.h5 --annotations-csv data/annotations/EPIC_100_train.csv
    """
    from ekx.cache import tools

    problems, warnings = tools.verify(path, annotations_csv, repair=repair)
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


@command()
def prepare(
    src: Annotated[Path, typer.Argument(help="Folder of the original videos (any layout ekx reads).")],
    dst: Annotated[Path, typer.Argument(help="Folder for the prepared copy (same layout); then use --videos DST.")],
    split: Annotated[
        str | None,
        typer.Option(
            help="Only the videos of this split (train, validation, test or a CSV); default: every video.",
            callback=check_split,
        ),
    ] = None,
    short_side: Annotated[
        int | None,
        typer.Option(
            help="Short side in pixels (default: the largest resize of the registered backbones).", show_default=False
        ),
    ] = None,
    keyframe_seconds: Annotated[float, typer.Option(help="Seconds between keyframes.")] = 0.5,
    crf: Annotated[int, typer.Option(help="x264 quality (lower: better, bigger).")] = 23,
    preset: Annotated[str, typer.Option(help="x264 speed preset.")] = "veryfast",
    workers: Annotated[int, typer.Option(help="Videos transcoded at once (processes).")] = 2,
    shard: Annotated[str | None, typer.Option(help="I/N: this process's 1/N of the videos (I from 0).")] = None,
    verify_: Annotated[
        bool, typer.Option("--verify", help="Afterwards, decode every copy and check its frame count and time span.")
    ] = False,
    annotations: AnnotationsOpt = None,
):
    """Transcode the videos once into a low-resolution, short-GOP training copy (resumable).

    Example: ekx prepare data/videos data/videos-320 --workers 8 --verify
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ekx import prepare as pp
    from ekx.extract.config import parse_shard

    ws = workspace(annotations=annotations)
    settings = pp.Settings(
        short_side=short_side or pp.default_short_side(), keyframe_seconds=keyframe_seconds, crf=crf, preset=preset
    )
    if settings.short_side < 16 or keyframe_seconds <= 0 or workers < 1:
        raise EkxError("--short-side must be >= 16, --keyframe-seconds > 0, --workers >= 1")
    videos = pp.videos_to_prepare(src, ws.annotations if split else None, split)
    if not videos:
        raise EkxError(f"{src}: no videos found ({', '.join(sorted(pp.epic.VIDEO_EXTENSIONS))})")
    columns = [
        TextColumn("[bold]prepare[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("videos {task.fields[fps]:>6.0f} frames/s"),
        TimeRemainingColumn(),
    ]
    failed: list[pp.Outcome] = []
    frames, t0 = 0, time.perf_counter()
    with LateProgress(*columns, console=err_console) as bar:
        task = bar.add_task("prepare", total=None, fps=0.0)

        def on_done(o: pp.Outcome) -> None:
            nonlocal frames
            frames += o.frames
            if o.status == "failed":
                failed.append(o)
            bar.update(task, advance=1, fps=frames / max(time.perf_counter() - t0, 1e-9))

        outcomes = pp.prepare(
            src,
            dst,
            settings,
            videos,
            workers,
            parse_shard(shard) if shard else None,
            on_start=lambda total, done: bar.update(task, total=total, completed=done),
            on_done=on_done,
        )
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    console.print(
        f"{dst}: {done} videos transcoded ({frames} frames, {time.perf_counter() - t0:.1f} s), "
        f"{skipped} already there, {len(failed)} failed; {settings.describe()}"
    )
    for o in failed:
        err_console.print(f"  [red]failed[/red] {o.src}: {o.error}", highlight=False, soft_wrap=True)
    problems = pp.verify_many([(o.src, o.dst) for o in outcomes if o.status != "failed"], workers) if verify_ else []
    for p in problems:
        err_console.print(f"[red]problem:[/red] {p}", highlight=False, soft_wrap=True)
    if verify_ and not problems:
        console.print(f"verified: every copy has its source's frame count and time span ({len(outcomes)} videos)")
    if failed or problems:
        raise typer.Exit(1)
