from __future__ import annotations

from pathlib import Path

import pytest

from ekx import EkxError
from ekx.config import resolve


def test_defaults(tmp_path):
    ws = resolve(cwd=tmp_path, env={})
    assert ws.annotations == Path("data/annotations") and ws.videos == Path("data/videos")
    assert ws.cache_path("resnet50", "train") == Path("features/resnet50/train.h5")
    assert set(ws.sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    (tmp_path / "ekx.toml").write_text(
        '[workspace]\nvideos = "/file/videos"\nruns = "/file/runs"\nfeatures = "/file/f"\n'
    )
    env = {"EKX_RUNS": "/env/runs", "EKX_FEATURES": "/env/f"}
    ws = resolve({"features": Path("/flag/f")}, cwd=tmp_path, env=env)
    assert ws.videos == Path("/file/videos") and ws.sources["videos"] == "ekx.toml"
    assert ws.runs == Path("/env/runs") and ws.sources["runs"] == "EKX_RUNS"
    assert ws.features == Path("/flag/f") and ws.sources["features"] == "flag"
    assert ws.annotations == Path("data/annotations") and ws.sources["annotations"] == "default"


def test_bad_config_file_is_named(tmp_path):
    (tmp_path / "ekx.toml").write_text("videos = \n")
    with pytest.raises(EkxError, match=r"ekx.toml: not valid TOML"):
        resolve(cwd=tmp_path, env={})
    (tmp_path / "ekx.toml").write_text('[workspace]\nvidoes = "x"\n')
    with pytest.raises(EkxError, match=r"unknown key.*vidoes"):
        resolve(cwd=tmp_path, env={})
