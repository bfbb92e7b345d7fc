"""TrainConfig: every hyperparameter of a head run, each a CLI flag and a key of a
--config TOML file. Torch-free on purpose: the CLI builds its flags from these fields
without importing the trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from ekx import EkxError
from ekx.config import load_toml


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


T = TypeVar("T", bound="TrainConfig")


@dataclass
class TrainConfig:
    """Every hyperparameter of the seed's phase-2 table is here (lr, batch_size, dropout,
    label_smoothing, drop_path), each a flag and a key of a --config TOML file."""

    head: str = opt("lstm", "head: pooling, lstm, transformer, cross-attention")
    backbone: str = opt("resnet50", "backbone whose cache to train on")
    train_features: str = opt("", "train cache (default <features>/<backbone>/train.h5)")
    val_features: str = opt("", "validation cache (default <features>/<backbone>/validation.h5)")
    name: str = opt("", "run directory name under runs/ (default <head>-<backbone>-<time>)")
    epochs: int = opt(20, "epochs")
    batch_size: int = opt(24, "batch size (seed phase 2: 16-32)")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    dropout: float = opt(0.5, "dropout (seed phase 2: 0.3-0.6)")
    drop_path: float = opt(0.1, "stochastic depth rate (transformer heads)")
    label_smoothing: float = opt(0.1, "label smoothing of both losses")
    warmup_epochs: float = opt(1.0, "linear warm-up epochs")
    restart_epochs: int = opt(10, "cosine warm restarts: first cycle, epochs")
    restart_mult: int = opt(1, "cosine warm restarts: cycle growth factor")
    min_lr_ratio: float = opt(0.01, "lowest lr as a fraction of --lr")
    grad_clip: float = opt(1.0, "gradient clipping max-norm")
    frames: int = opt(0, "frames T per sample (0: all K cached)")
    seed: int = opt(0, "random seed (same seed and device, same metrics)")
    device: str = opt("auto", "auto, cpu or cuda[:N]")
    precision: str = opt("auto", "auto, fp32, bf16 or fp16")
    eval_batch_size: int = opt(1024, "batch size of evaluation")

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
            if not isinstance(v, kind):
                raise EkxError(f"{origin}: '{k}' must be {kind.__name__}, got {v!r}")
            setattr(cfg, k, v)
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
    extend the run, any other given value that differs from the run's is refused - a resume
    that silently changed lr or batch size would no longer be the run it continues."""
    cls = type(cfg)
    run = cls.from_dict({k: v for k, v in saved.items() if k in cls.keys()}, origin)
    keys = set(cls.keys()) if given is None else set(given)
    differ = sorted(k for k in keys - {"epochs"} if k in cls.keys() and getattr(cfg, k) != getattr(run, k))
    if differ:
        shown = ", ".join(f"{k} (run: {getattr(run, k)!r}, given: {getattr(cfg, k)!r})" for k in differ)
        raise EkxError(
            f"--resume continues the run with its own configuration ({origin}); these differ: {shown}. "
            "Only --epochs may change on resume: drop the other flags, or start a new run with another --name"
        )
    if "epochs" in keys and cfg.epochs != run.epochs:
        if cfg.epochs < done_epochs:
            raise EkxError(
                f"--epochs {cfg.epochs}: {origin} has already trained {done_epochs} epochs; "
                f"give --epochs {done_epochs} or more"
            )
        run.epochs = cfg.epochs
    return run


def given_keys(config_file: Path | None, flags: dict[str, Any], tables: tuple[str, ...] = ("train",)) -> set[str]:
    """The keys a command line really set: those of its --config file and its non-None flags
    (the CLI passes None for a flag not given, see cli.common.dataclass_options)."""
    keys = {k for k, v in flags.items() if v is not None}
    if config_file is not None:
        data = load_toml(config_file, "config file")
        keys |= set(next((data[t] for t in tables if t in data), data))
    return keys
