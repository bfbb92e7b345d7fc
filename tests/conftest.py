from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_dir(name: str) -> Path:
    """../shared/<name> beside the project root; skip (saying why) where it is absent."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared EPIC annotation files and clips live beside the "
                    "project root in CI and the team's workspace, not in a user's own clone")
    return path


@pytest.fixture(scope="session")
def epic100() -> Path:
    return shared_dir("epic100")


@pytest.fixture(scope="session")
def clips() -> Path:
    return shared_dir("clips")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic dataset shared by the tests (4 videos x 6 segments)."""
    from ekx.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, SynthConfig(videos=4, segments=6, width=128, height=96, seed=3))
    return out
