"""Experiment trackers: `--track tensorboard,wandb,mlflow` sends a run's figures where its
user already looks, beside ekx's own metrics.jsonl / curves.png (which stay the record).

    TRACKERS (the registry: name -> module, library, extra)
    session.open_run(...)  -> a Session: the run's trackers behind one fan-out (session.Fanout)
        each backend (base.Backend): start / log / params / tags / artifact / table / finish

Torch-free and free of every tracker library: this module only names them (importlib's
find_spec, nothing imported), so `ekx --help` and a run without --track load none of them.
Which trackers: the run's ``track`` setting (flag or --config key), else the workspace's
(EKX_TRACK, ekx.toml's ``track``); ``none`` turns a workspace default off.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ekx import EkxError

if TYPE_CHECKING:
    from ekx.track.base import Backend


@dataclass(frozen=True)
class Tracker:
    module: str  # the backend, imported only when a run asks for it
    library: str  # what it imports (checked present before any work)
    extra: str  # pip install 'ekx[extra]'


TRACKERS = {
    "tensorboard": Tracker("ekx.track.to_tensorboard", "tensorboard", "tensorboard"),
    "wandb": Tracker("ekx.track.to_wandb", "wandb", "wandb"),
    "mlflow": Tracker("ekx.track.to_mlflow", "mlflow", "mlflow"),
}
OFF = "none"
# what TrainConfig's `track` admits: empty (the workspace's setting), none, or names joined by commas
PATTERN = rf"|{OFF}|({'|'.join(TRACKERS)})(,({'|'.join(TRACKERS)}))*"


def names(value: str = "", origin: str = "--track") -> tuple[str, ...]:
    """The trackers a run uses: ``value`` (a run's setting), else the workspace's EKX_TRACK or
    ekx.toml ``track``; each known, each once."""
    if not value:
        from ekx.config import resolve

        ws = resolve()
        value, origin = ws.track, ws.sources.get("track", "track")
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    if parts == [OFF] or not parts:
        return ()
    unknown = [p for p in parts if p not in TRACKERS]
    if unknown:
        raise EkxError(f"{origin} {value!r}: unknown tracker {unknown[0]!r}; use {', '.join(TRACKERS)} (or none)")
    return tuple(dict.fromkeys(parts))


def require(value: str = "", origin: str = "--track") -> tuple[str, ...]:
    """``names``, each tracker's library checked installed (found, not imported): a missing
    one is one line naming its extra, said before any work starts."""
    chosen = names(value, origin)
    for name in chosen:
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.library) is None:
            raise EkxError(
                f"--track {name}: {spec.library} is not installed; pip install 'ekx[{spec.extra}]' "
                f"(or run without --track {name})"
            )
    return chosen


def backend(name: str) -> type[Backend]:
    """The backend class of a registered tracker (its module imports the library lazily too)."""
    return importlib.import_module(TRACKERS[name].module).Backend
