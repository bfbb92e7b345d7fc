from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"

# `make test` runs the suite on two pytest-xdist workers (one per core): each worker and the
# processes its tests start (decode workers, `ekx` subprocesses) then use one torch/OpenMP
# thread, so the two workers do not fight over the cores. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_itemcollected(item):
    """Tests that share a session fixture built at great cost run on one xdist worker
    (`--dist loadgroup`), so it is built once: `ekx demo` (about 5 quiet minutes) above all.
    Marked as each test is collected, before xdist's own hook turns groups into node ids."""
    if "demo_workspace" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group("demo"))


def shared_dir(name: str) -> Path:
    """../shared/<name> beside the project root; skip (saying why) where it is absent."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(
            f"{path} is absent: the shared EPIC annotation files and clips live beside the "
            "project root in CI and the team's workspace, not in a user's own clone"
        )
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


def make_cache(
    path: Path,
    n: int = 64,
    views: int = 1,
    k: int = 8,
    dim: int = 32,
    num_verbs: int = 5,
    num_nouns: int = 7,
    seed: int = 0,
    labelled: bool = True,
    backbone: str = "resnet50",
    split: str = "train",
) -> Path:
    """A small random feature cache in the real format (labels weakly encoded in the features)."""
    import numpy as np

    from ekx.cache import store

    rng = np.random.default_rng(seed)
    verbs = rng.integers(num_verbs, size=n)
    nouns = rng.integers(num_nouns, size=n)
    feats = rng.normal(size=(n, views, k, dim)).astype(np.float32)
    feats[np.arange(n), :, :, verbs % dim] += 2.0  # a little signal, so training can move
    feats[np.arange(n), :, :, (num_verbs + nouns) % dim] += 2.0
    rows = store.Rows(
        [f"P{1 + i % 3:02d}_{i // 3:02d}_{i}" for i in range(n)],
        [f"P{1 + i % 3:02d}_{i // 3:02d}" for i in range(n)],
        verbs if labelled else np.full(n, -1),
        nouns if labelled else np.full(n, -1),
        np.arange(n),
    )
    attrs = {
        "format": store.FORMAT,
        "format_version": store.VERSION,
        "backbone": backbone,
        "weights": "none",
        "feature_dim": dim,
        "frames_per_segment": k,
        "views": views,
        "num_verbs": num_verbs,
        "num_nouns": num_nouns,
        "verb_classes": [f"v{i}" for i in range(num_verbs)],
        "noun_classes": [f"n{i}" for i in range(num_nouns)],
        "split": split,
        "bn_calibration": "",
    }
    store.create(path, attrs, rows, views, k, dim)
    w = store.Writer(path)
    w.write([(i, feats[i].astype(np.float16), np.arange(k)) for i in range(n)], [])
    w.close()
    return path


def fail_rows(path: Path, rows) -> None:
    """Mark rows of a cache failed, as an extraction whose segments did not decode leaves them."""
    import h5py

    from ekx.cache import store

    with h5py.File(path, "r+") as f:
        status = f["status"][...]
        status[rows] = store.FAILED
        f["status"][...] = status


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory, request):
    """`ekx demo` run once through the CLI: (workdir, CLI result). Its synthetic data,
    resnet50 caches and four runs are shared by the tests that need real extracted data."""
    import os

    from typer.testing import CliRunner

    from ekx.cli import app

    if os.environ.get("EKX_TEST_DEMO_DIR"):  # developer shortcut: reuse a finished `ekx demo --workdir`
        return Path(os.environ["EKX_TEST_DEMO_DIR"]), None
    workdir = tmp_path_factory.mktemp("demo")
    # pytest -q prints nothing until a test ends: say what the long silence is
    say = _say(request)
    say(
        f"building the demo workspace once for the tests that need it (`ekx demo --workdir {workdir}`): "
        "about 5 min on 2 quiet cores, up to 30 on a busy machine"
    )
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir)], terminal_width=200)
    say(f"demo workspace ready in {time.perf_counter() - t0:.0f} s (exit {result.exit_code})")
    return workdir, result


def _say(request):
    """A line on the terminal even under -q and output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return lambda line: None
    return lambda line: reporter.write_line(f"[ekx tests] {line}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running SLURM cluster (.ci/run starts one with slurm/cluster.sh); skip, saying how, if none."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip(
            "SLURM is not installed here: `slurm/cluster.sh start` (root, Debian) installs and starts "
            "a one-node cluster; .ci/run does it in CI"
        )
    res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if res.returncode != 0 or not any(s.strip() in ("idle", "mix", "alloc") for s in res.stdout.split()):
        pytest.skip(
            f"no SLURM cluster answers (sinfo: {(res.stderr or res.stdout).strip()[:120]}); start one with "
            "`slurm/cluster.sh start` and export SLURM_CONF as it prints"
        )
    return True


def save_tiny_videomae(out: Path, seed: int, **processor) -> Path:
    """A local VideoMAE directory as save_pretrained writes it (config, processor, weights):
    4 frames, 64 px, 2 layers of width 48 - the shape of videomae-base, made tiny; ``processor``
    adds to the image processor's settings (64 px shortest edge and crop)."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(
        image_size=64, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=96,
    )  # fmt: skip
    VideoMAEModel(cfg).save_pretrained(out)
    VideoMAEImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, **processor
    ).save_pretrained(out)
    return out
