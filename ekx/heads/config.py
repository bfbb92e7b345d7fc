"""TrainConfig: every hyperparameter of a head run, each a CLI flag and a key of a
--config TOML file. Torch-free on purpose: the CLI builds its flags from these fields
without importing the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ekx import EkxError
from ekx.config import load_toml
from ekx.extract.config import BACKBONES, DEVICE, PRECISIONS
from ekx.options import Names, label, opt
from ekx.track import PATTERN as TRACK_PATTERN
from ekx.track import TRACKERS

__all__ = ["ATTENTION_HEADS", "DISTRIBUTIONS", "HEADS", "MAX_WINDOW", "TrainConfig", "check_space", "opt"]

# the head registry's names (ekx.heads.models), torch-free for the CLI; a test keeps them equal
HEADS = Names("head", ("pooling", "lstm", "transformer", "cross-attention", "context"))
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")  # of [random] and [optuna] spaces
# attention heads of the transformer, cross-attention and context heads (ekx.heads.models):
# their width (d_model) splits evenly among them
ATTENTION_HEADS = 8
# the longest context window: W / 2 + W / 4 (the training shift) must stay far inside the
# gap between two videos on heads.context's timeline key (OFFSET = 1e5 s, videos under 27 h)
MAX_WINDOW = 3600.0

T = TypeVar("T", bound="TrainConfig")


@dataclass
class TrainConfig:
    """Every hyperparameter of the architecture document's phase-2 table is here (lr,
    batch_size, dropout, label_smoothing, drop_path), each a flag and a key of a --config TOML
    file, with what it admits declared beside its default."""

    head: str = opt("lstm", "temporal head", choices=HEADS)
    backbone: str = opt(
        "resnet50", "backbone whose cache to train on; several joined by + are fused", choices=BACKBONES, several="+"
    )
    train_features: str = opt("", "train cache (default <features>/<backbone>/train.h5)")
    val_features: str = opt("", "validation cache (default <features>/<backbone>/validation.h5)")
    name: str = opt("", "run directory name under runs/ (default <head>-<backbone>-<time>)")
    epochs: int = opt(20, "epochs", ge=1)
    batch_size: int = opt(24, "batch size (16-32 in the phase-2 configurations, configs/sweeps/phase2.toml)", ge=1)
    lr: float = opt(3e-4, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", ge=0)
    dropout: float = opt(0.5, "dropout (0.3-0.6 in the phase-2 configurations, configs/sweeps/phase2.toml)", ge=0, lt=1)
    drop_path: float = opt(0.1, "stochastic depth rate (transformer heads)", ge=0, lt=1)
    label_smoothing: float = opt(0.1, "label smoothing of both losses", ge=0, lt=1)
    warmup_epochs: float = opt(1.0, "linear warm-up epochs", ge=0)
    restart_epochs: int = opt(10, "cosine warm restarts: first cycle, epochs", ge=1)
    restart_mult: int = opt(1, "cosine warm restarts: cycle growth factor", ge=1)
    min_lr_ratio: float = opt(0.01, "lowest lr as a fraction of --lr", ge=0, le=1)
    grad_clip: float = opt(1.0, "gradient clipping max-norm", gt=0)
    frames: int = opt(0, "frames T per sample (0: all K cached)", ge=0)
    seed: int = opt(0, "random seed (same seed and device, same metrics)", ge=0)
    device: str = opt("auto", "device to train on", **DEVICE)
    precision: str = opt("auto", "autocast precision", choices=PRECISIONS)
    eval_batch_size: int = opt(1024, "batch size of evaluation", ge=1)
    # the context head (dense stores only): W s of video around each segment, TIM's 30 s
    window: float = opt(30.0, "context head: seconds of dense features around each segment", gt=0, le=MAX_WINDOW)
    layers: int = opt(0, "encoder layers of the transformer and context heads (0: the head's own)", ge=0)
    width: int = opt(
        0,
        f"model width (d_model) of the attention heads, split among their {ATTENTION_HEADS} (0: the head's own)",
        ge=0,
        multiple=ATTENTION_HEADS,
    )
    # where the figures also go (ekx.track); "": the workspace's EKX_TRACK / ekx.toml track
    track: str = opt(
        "",
        "experiment trackers (default: EKX_TRACK, ekx.toml's track; docs/tracking.md)",
        pattern=TRACK_PATTERN,
        shown=f"{', '.join(TRACKERS)} joined by commas, or none",
    )

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any], origin: str) -> T:
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise EkxError(f"{origin}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(cls.keys())}")
        cfg = cls()
        for k, v in values.items():
            kind = type(getattr(cfg, k))
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
                raise EkxError(f"{origin}: '{k}' must be {kind.__name__}, got {v!r}")
            valid = next(f for f in fields(cls) if f.name == k).metadata.get("valid")
            setattr(cfg, k, valid.check(v, label(origin, k)) if valid else v)
        return cfg


def resolve_config(
    config_file: Path | None,
    flags: dict[str, Any],
    cls: type[T] = TrainConfig,  # type: ignore[assignment]
    tables: tuple[str, ...] = ("train",),
) -> T:
    """Defaults < --config TOML (top level, or the first of ``tables`` it has) < flags."""
    values: dict[str, Any] = {}
    origin = "flags"
    if config_file is not None:
        data = load_toml(config_file, "config file")
        values = next((data[t] for t in tables if t in data), data)
        origin = str(config_file)
    cfg = cls.from_dict(values, origin)
    return cls.from_dict({**asdict(cfg), **{k: v for k, v in flags.items() if v is not None}}, "flags")


def resumed_config(saved: dict[str, Any], cfg: T, given: set[str] | None, done_epochs: int, origin: str) -> T:
    """The configuration a resumed run continues with: the run's own (``saved``, from its
    checkpoint), never the defaults. Of ``cfg``, only the keys in ``given`` (the flags and
    --config keys the user actually gave; None: every key) are looked at: ``epochs`` may
    extend the run, ``track`` may change (where the figures go, not what the run is), any other
    given value that differs from the run's is refused - a resume that silently changed lr or
    batch size would no longer be the run it continues."""
    cls = type(cfg)
    run = cls.from_dict({k: v for k, v in saved.items() if k in cls.keys()}, origin)
    keys = set(cls.keys()) if given is None else set(given)
    free = {"epochs", "track"}
    differ = sorted(k for k in keys - free if k in cls.keys() and getattr(cfg, k) != getattr(run, k))
    if differ:
        shown = ", ".join(f"{k} (run: {getattr(run, k)!r}, given: {getattr(cfg, k)!r})" for k in differ)
        raise EkxError(
            f"--resume continues the run with its own configuration ({origin}); these differ: {shown}. "
            "Only --epochs and --track may change on resume: drop the other flags, or start a new run with "
            "another --name"
        )
    if "epochs" in keys and cfg.epochs != run.epochs:
        if cfg.epochs < done_epochs:
            raise EkxError(
                f"--epochs {cfg.epochs}: {origin} has already trained {done_epochs} epochs; "
                f"give --epochs {done_epochs} or more"
            )
        run.epochs = cfg.epochs
    if "track" in keys and "track" in cls.keys():
        run.track = cfg.track
    return run


def given_keys(config_file: Path | None, flags: dict[str, Any], tables: tuple[str, ...] = ("train",)) -> set[str]:
    """The keys a command line really set: those of its --config file and its non-None flags
    (the CLI passes None for a flag not given, see cli.common.dataclass_options)."""
    keys = {k for k, v in flags.items() if v is not None}
    if config_file is not None:
        data = load_toml(config_file, "config file")
        keys |= set(next((data[t] for t in tables if t in data), data))
    return keys


def check_space(space: dict[str, Any], where: str, cls: type[TrainConfig] = TrainConfig) -> None:
    """A [random] or [optuna] search space, before anything is drawn: each key a distribution
    of values its field admits - a range [low, high] with low not above high, a log range above
    0, integers drawn for an integer field, every choice valid. A range's ends decide: what a
    field admits is an interval."""
    for k, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise EkxError(
                f"{where}: '{k}' must be one of {{uniform|log_uniform|int_uniform|choice = [...]}}, got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        shown = f"{where}: '{k}' = {{ {kind} = {args!r} }}"
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise EkxError(f"{shown}: choose from a non-empty list")
        else:
            numbers = isinstance(args, list) and len(args) == 2
            if not numbers or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
                raise EkxError(f"{shown}: a range is [low, high], two numbers")
            low, high = args
            if low > high:
                raise EkxError(f"{shown}: low {low} is above high {high}")
            if kind == "log_uniform" and low <= 0:
                raise EkxError(f"{shown}: a log range must lie above 0")
            if kind != "int_uniform" and type(getattr(cls(), k, None)) is int:
                raise EkxError(f"{shown}: '{k}' takes integers; use int_uniform")
        for v in args:
            cls.from_dict({k: v}, where)  # the type and what the field admits
