"""Workspace settings and their precedence: flag > EKX_* environment > ekx.toml > default.

Every resolved value remembers where it came from, so `ekx config` can say why a
path is what it is.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ekx import EkxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "ekx.toml"
ENV_PREFIX = "EKX_"


@dataclass
class Workspace:
    """Where ekx reads and writes; relative paths are relative to the working directory."""

    annotations: Path = Path("data/annotations")
    videos: Path = Path("data/videos")
    frames: Path = Path("data/frames")  # official RGB frames: <pid>/rgb_frames/<vid>.tar or folders
    features: Path = Path("features")
    runs: Path = Path("runs")
    device: str = "auto"
    track: str = ""  # experiment trackers of every run (ekx.track): tensorboard, wandb, mlflow, comma-separated
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def cache_path(self, backbone: str, split: str) -> Path:
        """The cache contract's location: features/<backbone>/<split>.h5."""
        return self.features / backbone_folder(backbone) / f"{split}.h5"


def default_cache(features: Path, backbone: str, split: str) -> str:
    """A backbone's cache of a split under the features root; a fused ``a+b`` names each
    part's cache, joined by ``+`` (stage 2 reads them as one, features concatenated)."""
    return "+".join(str(Path(features) / backbone_folder(b) / f"{split}.h5") for b in backbone.split("+"))


def backbone_folder(backbone: str) -> str:
    """The folder of a backbone's caches under the features root: its name, with the slashes
    of a family's model (OpenCLIP tags, Hugging Face repos and local directories) as ``--``,
    as the Hugging Face cache names repos: ``hf:MCG-NJU/videomae-base`` ->
    ``hf:MCG-NJU--videomae-base``, ``hf:/models/vmae`` -> ``hf:models--vmae``."""
    family, colon, model = backbone.partition(":")
    return family + colon + model.strip("/").replace("/", "--") if colon else backbone


def _keys() -> list[str]:
    return [f.name for f in fields(Workspace) if f.name != "sources"]


def _coerce(key: str, value: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(Workspace)}[key]
    if not isinstance(value, str):
        raise EkxError(f"{origin}: '{key}' must be a string, got {value!r}")
    return Path(value) if kind in ("Path", Path) else value


def load_toml(path: Path, what: str = "file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is one clear error naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EkxError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise EkxError(f"{path}: not valid TOML ({e}); fix the file") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read ekx.toml's [workspace] table (top-level keys are accepted too)."""
    data = load_toml(path, "workspace config")
    table = data.get("workspace", {k: v for k, v in data.items() if not isinstance(v, dict)})
    unknown = sorted(set(table) - set(_keys()))
    if unknown:
        raise EkxError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_keys())}")
    return table


def resolve(
    flags: dict[str, Any] | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Workspace:
    """Resolve the workspace: defaults, then ekx.toml, then EKX_* variables, then flags."""
    cwd = Path.cwd() if cwd is None else cwd
    env = dict(os.environ) if env is None else env
    ws = Workspace()
    ws.sources = {k: "default" for k in _keys()}
    layers: list[tuple[str, dict[str, Any]]] = []
    toml_path = cwd / CONFIG_FILE
    if toml_path.is_file():
        layers.append((CONFIG_FILE, read_toml(toml_path)))
    layers.append(("env", {k: env[ENV_PREFIX + k.upper()] for k in _keys() if env.get(ENV_PREFIX + k.upper())}))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    for origin, values in layers:
        for key, value in values.items():
            source = f"{ENV_PREFIX}{key.upper()}" if origin == "env" else origin
            setattr(ws, key, _coerce(key, str(value) if isinstance(value, Path) else value, source))
            ws.sources[key] = source
    return ws
