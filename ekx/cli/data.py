"""Workspace and data commands: config, synth, split, demo, import."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ekx import EkxError, tables
from ekx.cli.common import (
    AnnotationsOpt,
    DeviceOpt,
    FeaturesOpt,
    FramesRootOpt,
    LateProgress,
    RunsOpt,
    VideosOpt,
    check_split,
    check_with,
    command,
    console,
    err_console,
    workspace,
)
from ekx.extract.config import PRECISIONS
from ekx.options import Valid


@command()
def config(
    annotations: AnnotationsOpt = None,
    videos: VideosOpt = None,
    frames_root: FramesRootOpt = None,
    features: FeaturesOpt = None,
    runs: RunsOpt = None,
    device: DeviceOpt = None,
):
    """Print the resolved workspace settings and where each came from.

    Example: ekx config --videos /data/EPIC-KITCHENS
    """
    ws = workspace(
        annotations=annotations, videos=videos, frames=frames_root, features=features, runs=runs, device=device
    )
    rows = [[key, str(getattr(ws, key)), source] for key, source in ws.sources.items()]
    tables.show(console, ["setting", "value", "source"], rows, title="ekx workspace")


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
    context: Annotated[
        bool,
        typer.Option(help="Add rinse/wipe: a verb pair only the second before the segment tells apart."),
    ] = False,
    audio_pair: Annotated[
        bool, typer.Option(help="Add pour/stir: a verb pair that looks the same and only its sound tells apart.")
    ] = False,
    sound: Annotated[bool, typer.Option(help="A sound track in every video (each segment's from its labels).")] = True,
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
        raise EkxError(
            "--videos must be >= 2 (train and validation), --segments >= 1, --width/--height >= 64, --fps >= 1"
        )
    cfg = SynthConfig(
        videos=videos, segments=segments, width=width, height=height, fps=rates, seed=seed, workers=workers,
        context=context, audio_pair=audio_pair, sound=sound,
    )  # fmt: skip
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("encoding videos", total=videos)
        summary = synthesize(out, cfg, progress=lambda: bar.advance(task))
    console.print(
        f"wrote {summary['videos']} videos ({summary['frames']} frames), {summary['segments']} segments to {out}"
    )
    console.print(f"  annotations: {summary['annotations']}\n  videos:      {summary['video_root']}")


@command()
def split(
    out: Annotated[Path, typer.Argument(help="Directory for the new EPIC_100_train/validation CSVs.")],
    fraction: Annotated[float, typer.Option(help="Share of the segments held out.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 0,
    annotations: AnnotationsOpt = None,
):
    """Hold out part of the training annotations by video: a true validation set (videos no
    model trained on) to choose models on, keeping the official validation split for the final figures.

    Example: ekx split data/annotations-holdout --fraction 0.15 && ekx extract --annotations data/annotations-holdout
    """
    from ekx.split import write_split

    ws = workspace(annotations=annotations)
    r = write_split(ws.annotations, out, fraction, seed)
    console.print(
        f"held out {r['segments']} segments from {r['videos']} videos ({r['train_segments']} left to train); "
        f"verb-distribution distance {r['verb_tv_distance']:.3f} -> {out}"
    )


@command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Workspace to use (default: a new temp dir).")] = None,
    videos: Annotated[int, typer.Option(help="Synthetic videos.")] = 12,
    segments: Annotated[int, typer.Option(help="Segments per video.")] = 16,
    precision: Annotated[
        str,
        typer.Option(
            help="Both stages: auto (bf16 on CPUs with AMX or AVX512-BF16, else fp32), fp32, bf16 or fp16.",
            callback=check_with(Valid(choices=PRECISIONS), "--precision"),
        ),
    ] = "auto",
):
    """Run the whole pipeline on built-in synthetic data.

    Example: ekx demo --workdir /tmp/ekx-demo
    """
    from ekx import demo as demo_mod

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ekx-demo-"))
    demo_mod.run(workdir, videos=videos, segments=segments, console=console, precision=precision)


@command(name="import")
def import_(
    fmt: Annotated[
        str, typer.Argument(metavar="FORMAT", help="npy-dir, pickle, lmdb, tim, tim-audio or actionformer.")
    ],
    src: Annotated[Path, typer.Argument(help="The published features: a folder, or one file (pickle).")],
    split: Annotated[
        str,
        typer.Option(help="train, validation, test, or an annotation CSV: the videos to import.", callback=check_split),
    ] = "train",
    name: Annotated[
        str, typer.Option(help="What the features are (e.g. rulstm-tsn-rgb); the store's backbone is imported:NAME.")
    ] = "",
    out: Annotated[
        Path | None, typer.Option(help="Dense store to write (default features/imported:NAME/<split>.dense.h5).")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="npy-dir (plain <video>.npy), pickle: features per second; row j at (j+0.5)/rate s."),
    ] = None,
    fps: Annotated[
        str | None,
        typer.Option(
            help="The rate of the frames the features were computed on: lmdb (default 30, RULSTM's), actionformer "
            "(default 30), video_features r21d/s3d (required). A number, or video for EPIC_100_video_info.csv's."
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="npy-dir: video_features' feature type, <video>_<KEY>.npy (rgb or flow for i3d); "
            "actionformer: the .npz array (default feats)."
        ),
    ] = None,
    stack_size: Annotated[
        int | None, typer.Option(help="video_features i3d, r21d, s3d: frames per stack (required; not guessed).")
    ] = None,
    step_size: Annotated[
        int | None, typer.Option(help="video_features r21d, s3d: frames between stacks (default: the stack size).")
    ] = None,
    stride: Annotated[int | None, typer.Option(help="actionformer: frames between features (default 16).")] = None,
    num_frames: Annotated[int | None, typer.Option(help="actionformer: frames per feature (default 32).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="actionformer: its YAML config (dataset: feat_stride, num_frames, default_fps).")
    ] = None,
    times: Annotated[
        Path | None, typer.Option(help="tim: its feature-interval table, CSV (video_id, start_sec, stop_sec).")
    ] = None,
    describe: Annotated[str, typer.Option(help="A description kept in the store (where the features came from).")] = "",
    annotations: AnnotationsOpt = None,
    features: FeaturesOpt = None,
):
    """Turn published per-video features into a dense store that stage 2 reads like a cache.
    Each format's times are read in its publisher's convention and stored as ekx's: the centre
    of what a feature covers (docs/dense.md, "Importing published features").

    Example: ekx import lmdb rulstm/rgb --name rulstm-tsn-rgb --split validation
    """
    from ekx.cache.import_formats import Options, parse_fps
    from ekx.cache.imports import check_flags

    options = Options(
        rate=rate, fps=parse_fps(fps), key=key, stack_size=stack_size, step_size=step_size, stride=stride,
        num_frames=num_frames, times=times, config=config,
    )  # fmt: skip
    check_flags(fmt, options)
    if not src.exists():
        raise EkxError(f"{src}: no such file or folder")
    ws = workspace(annotations=annotations, features=features)
    label = name or Path(src).stem
    if not label or any(c in label for c in "/\\\0") or ".." in label:
        raise EkxError(f"--name {label!r}: a plain name, it names a folder")
    split_name = Path(split).stem if split.endswith(".csv") else split
    dest = out or Path(ws.features) / f"imported:{label}" / f"{split_name}.dense.h5"

    from rich.progress import BarColumn, TextColumn

    from ekx.cache.imports import import_features

    with LateProgress(TextColumn("[bold]import[/bold]"), BarColumn(), TextColumn("{task.completed:,} vectors"),
                      console=err_console) as bar:  # fmt: skip
        task = bar.add_task("import", total=None)
        summary = import_features(
            fmt, src, Path(ws.annotations), split, dest, label, describe=describe,
            on_progress=lambda n: bar.update(task, advance=n), options=options,
        )  # fmt: skip
    console.print(
        f"{dest}: {summary['videos']} videos, {summary['vectors']:,} vectors of {summary['dim']} "
        f"({summary['rows']} rows); train on it with --train-features/--val-features {dest}",
        soft_wrap=True,
    )
