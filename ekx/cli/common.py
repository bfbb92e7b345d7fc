"""What every command module shares: the app and its groups, the consoles, options used
by several commands, the error wrapper and the dataclass -> flags generator.

Nothing heavy is imported here (no torch): `ekx --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ekx import EkxError, __version__, epic
from ekx import config as wsconfig
from ekx.cli.helpstyle import Command
from ekx.extract.config import BACKBONES, DEVICE, SOURCES
from ekx.heads.config import HEADS
from ekx.options import Names, Valid

# Help texts are plain text (no Rich markup: "[optuna]" and "ekx[torchcodec]" stay as written)
app = typer.Typer(
    help="ekx: EPIC-KITCHENS-100 action recognition on cached backbone features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Inspect, check and join feature caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")
slurm_app = typer.Typer(
    help="Submit sharded extraction or sweeps to a SLURM cluster.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(slurm_app, name="slurm")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": bool(os.environ.get("EKX_DEBUG"))}


def say(message: str) -> None:
    """A choice made for the user (e.g. the precision `auto` picked): one dim line on stderr."""
    err_console.print(escape(message), style="dim", highlight=False)


def refuse(message: str) -> NoReturn:
    """A user error: one red line and exit code 1."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def check_with(valid: Valid, flag: str):
    """A parse-time callback: the value against what it admits (a name comes back in its
    registry's spelling); a mistake is refused before the command starts."""

    def callback(ctx: typer.Context, value):
        if ctx.resilient_parsing or value is None:  # shell completion parses leniently
            return value
        try:
            return valid.check(value, flag)
        except EkxError as e:
            refuse(str(e))

    return callback


def check_split(ctx: typer.Context, value: str | None) -> str | None:
    """--split: a split name (the closest one offered for a slip) or a CSV, checked at parse time."""
    if ctx.resilient_parsing or value is None:
        return value
    try:
        return epic.check_split(value, "--split")
    except EkxError as e:
        refuse(str(e))


def names_option(names: Names, flag: str, help: str, several: bool = False) -> typer.models.OptionInfo:
    """An option naming registry entries: checked at parse time, its names in --help and completed."""
    valid = Valid(choices=names, several=several)
    return typer.Option(
        flag, help=f"{help} ({valid.describe()}).", callback=check_with(valid, flag), autocompletion=names.complete
    )


def completer(choices: tuple[str, ...] | Names):
    """Shell completion of a flag's choices."""
    if isinstance(choices, Names):
        return choices.complete

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


# Options shared by several commands, defined once.
HeadArg = Annotated[
    str,
    typer.Argument(
        metavar="HEAD",
        help=f"The temporal head: {HEADS} (also spelt cross_attention).",
        callback=check_with(Valid(choices=HEADS), ""),
        autocompletion=HEADS.complete,
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file of hyperparameters (top level or a [train] table; flags win).", show_default=False
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run --name from its last.pt (only --epochs may change).")
]
BackboneOpt = Annotated[str | None, names_option(BACKBONES, "--backbone", "Backbone of every configuration")]
AnnotationsOpt = Annotated[
    Path | None,
    typer.Option("--annotations", help="Annotation directory (default from ekx config).", show_default=False),
]
VideosOpt = Annotated[
    Path | None, typer.Option("--videos", help="Video root: <vid>.mp4 or <pid>/videos/<vid>.MP4.", show_default=False)
]
FramesRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--frames-root",
        help="Official RGB frames root: <pid>/rgb_frames/<vid>.tar or folders (default from ekx config).",
        show_default=False,
    ),
]
SourceOpt = Annotated[
    str,
    typer.Option(
        "--source",
        help="Frame source: decord, torchcodec (pip install 'ekx[torchcodec]'), frames (the official JPEGs), "
        f"or auto: the videos where present, else the frames ({SOURCES}).",
        callback=check_with(Valid(choices=SOURCES), "--source"),
        autocompletion=SOURCES.complete,
    ),
]
DecodeDeviceOpt = Annotated[
    str,
    typer.Option(
        "--decode-device",
        help="cpu, or cuda[:N] to decode on the GPU (torchcodec: NVDEC; frames: nvJPEG); "
        "falls back to the CPU, saying so, where that is missing.",
    ),
]
FeaturesOpt = Annotated[
    Path | None, typer.Option("--features", help="Feature cache root (default from ekx config).", show_default=False)
]
RunsOpt = Annotated[
    Path | None, typer.Option("--runs", help="Run directory root (default from ekx config).", show_default=False)
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda[:N].", show_default=False)]
TrackOpt = Annotated[  # ekx.track
    str | None,
    typer.Option(
        help="Experiment trackers: tensorboard, wandb, mlflow (comma-separated; none: off).", show_default=False
    ),
]


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
        except Exception as e:
            if _state["debug"]:
                raise
            if isinstance(e, EkxError):
                refuse(str(e))
            refuse(f"{type(e).__name__}: {e} (run with --debug for the traceback)")

    return run


def command(target: typer.Typer = app, name: str | None = None, **settings):
    """Register a command whose errors become one red line and exit code 1."""

    def wrap(fn):
        return target.command(name=name, cls=Command, **settings)(command_body(fn))

    return wrap


class LateProgress(Progress):
    """A progress display drawn from its first update on: never above an error that comes
    before the work starts (a bad path, a missing cache)."""

    def __enter__(self) -> LateProgress:
        return self  # not started: `update` starts it; `__exit__` stops it if it did

    def update(self, *args, **kwargs) -> None:
        self.start()  # once: a started display returns at once
        super().update(*args, **kwargs)


def median(values: list[float]) -> float:
    values = sorted(values) or [0.0]
    return values[len(values) // 2]


def workspace(**flags) -> wsconfig.Workspace:
    ws = wsconfig.resolve(flags)
    source = ws.sources["device"]
    Valid(**DEVICE).check(ws.device, "--device" if source == "flag" else f"device (from {source})")
    return ws


def existing(flag: str, path: Path | None, kind: str = "directory") -> None:
    """A path the user gave by flag must be there: said now, not after the heavy imports.
    Caches fused with ``+`` (``a.h5+b.h5``): each part."""
    if path is None:
        return
    for part in str(path).split("+") if kind == "file" else [str(path)]:
        if not (Path(part).is_dir() if kind == "directory" else Path(part).is_file()):
            raise EkxError(f"{flag} {part}: no such {kind}")


def check_metric_annotations(flag: Path | None, resolved: Path | None) -> None:
    """train-head / evaluate read the tail-class and unseen-participant lists from the
    annotations directory: an explicit --annotations pointing nowhere is an error (the
    user asked for those metrics); the workspace default being absent only warns."""
    if flag is not None and not Path(flag).is_dir():
        raise EkxError(
            f"--annotations {flag}: no such directory; the tail-class and unseen-participant metrics "
            "need the official lists there (omit the flag to use the workspace's, see ekx config)"
        )
    if resolved is not None and not Path(resolved).is_dir():
        err_console.print(
            f"[yellow]warning:[/yellow] annotations directory {resolved} not found: tail-class and "
            "unseen-participant metrics are left out (pass --annotations DIR)",
            highlight=False,
        )


def _print_version(value: bool) -> None:
    # eager: answered while parsing, before the group asks for a command (`ekx --version` alone)
    if value:
        console.print(f"ekx {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
):
    _state["debug"] = _state["debug"] or debug


def dataclass_options(cls, exclude: tuple[str, ...] = ()):
    """Give a command one --flag per dataclass field (default None = not given), so a new
    hyperparameter is a flag the moment it is a field; help and what it admits (checked at
    parse time) come from the field's declaration."""

    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)  # the command's own parameters keep their Annotated help
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            kind = type(f.default)
            flag = f"--{f.name.replace('_', '-')}"
            valid: Valid | None = f.metadata.get("valid")
            if kind is bool:  # an on and an off switch
                flag = f"{flag}/--no-{flag[2:]}"
            shown = ("on" if f.default else "off") if kind is bool else repr(f.default)  # not Python's True
            notes = [f"default: {shown}"] if f.default != "" else []
            notes += [valid.describe()] if valid else []
            opt = typer.Option(
                flag,
                help=f"{f.metadata.get('help', '')}" + (f" ({'; '.join(notes)})" if notes else ""),
                show_default=False,
                callback=check_with(valid, flag) if valid else None,
                autocompletion=completer(valid.choices) if valid and valid.choices else None,
            )
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, opt]
                )
            )
        fn.__signature__ = sig.replace(parameters=params)
        return fn

    return wrap


def print_row(row: dict) -> None:
    console.print(
        f"epoch {row['epoch']:>3}  loss {row['train_loss']:.3f}/{row['val_loss']:.3f}  "
        f"train action {row['train_action_top1']:5.1f}  val verb {row['val_verb_top1']:5.1f} "
        f"noun {row['val_noun_top1']:5.1f} action {row['val_action_top1']:5.1f}  gap {row['gap']:+.1f}  "
        f"{row['seconds']:.1f}s",
        highlight=False,
    )


PartitionOpt = Annotated[str | None, typer.Option(help="SLURM partition.", show_default=False)]
GpusOpt = Annotated[int | None, typer.Option(help="GPUs per task (--gres=gpu:N).", show_default=False)]
TimeOpt = Annotated[str | None, typer.Option(help="Time limit per task, e.g. 4:00:00.", show_default=False)]
MemOpt = Annotated[str | None, typer.Option(help="Memory per task, e.g. 32G.", show_default=False)]
CpusOpt = Annotated[int | None, typer.Option(help="CPUs per task.", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the sbatch commands instead of submitting.")]
ScriptsOpt = Annotated[
    Path | None, typer.Option(help="Folder of the job files (default: the repository's slurm/).", show_default=False)
]
LogsOpt = Annotated[
    Path | None,
    typer.Option(help="Folder for the jobs' output files (default: the submit directory).", show_default=False),
]
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


# failed/pending (or undecodable) segments: refused unless asked, then wrong in every figure
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing",
        help="Count failed/pending (or undecodable) segments as wrong in every figure instead of refusing "
        "(a submission still needs every segment).",
    ),
]
