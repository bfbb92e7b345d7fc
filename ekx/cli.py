"""The `ekx` command line: thin. Options -> config -> one library call.

Each command is one function here; a new issue adds its command in this file and
its work in the library. Errors reach the user as one red line and exit code 1
(`--debug` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ekx import EkxError, __version__
from ekx import config as wsconfig

app = typer.Typer(help="ekx: EPIC-KITCHENS-100 action recognition on cached backbone features.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
cache_app = typer.Typer(help="Inspect, check and join feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

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


def command(target: typer.Typer = app, name: str | None = None):
    """Register a command whose errors become one red line and exit code 1."""
    def wrap(fn):
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
        return target.command(name=name)(run)
    return wrap


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
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Workspace to use (default: a new temp dir).")] = None,
    videos: Annotated[int, typer.Option(help="Synthetic videos.")] = 16,
    segments: Annotated[int, typer.Option(help="Segments per video.")] = 20,
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
