from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SESSION_ENV = "EKX_TESTS_SESSION_DIR"  # the session folder (`pytest_configure`)

# `make test` runs the suite on two pytest-xdist workers (one per core): each worker and the
# processes its tests start (decode workers, `ekx` subprocesses) then use one torch/OpenMP
# thread, so the two workers do not fight over the cores. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):
    """One folder for the whole session, made in the controller before xdist starts its
    workers (they inherit the environment) and removed at the end:
    - bn/: calibrated BatchNorm statistics (ekx.extract.bn_cache): ~150 extractions with
      random weights calibrate the same few networks on the same synthetic segments, and
      only the first of each measures them;
    - demo/: the demo workspace, built by one background process (`demo_workspace`)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(SESSION_ENV):
        return
    import tempfile

    config._ekx_session = tempfile.mkdtemp(prefix="ekx-tests-")
    os.environ[SESSION_ENV] = config._ekx_session
    os.environ.setdefault("EKX_CALIBRATION_CACHE", str(Path(config._ekx_session) / "bn"))


def pytest_unconfigure(config):
    import shutil

    if path := getattr(config, "_ekx_session", None):  # the controller, after every worker
        _stop_demo()  # a session stopped early (-x, Ctrl-C) leaves no `ekx demo` running
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(SESSION_ENV, None)


def pytest_itemcollected(item):
    """A test on the demo workspace is slow (it waits for `ekx demo`), also where unmarked."""
    if "demo_workspace" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.slow)


# seconds each module's tests took in `make test` (quiet 2-core run, 2026-12-07): the order
# xdist hands modules out in. A module missing here runs after these; a stale figure costs
# only some packing at the end, never a result.
MODULE_SECONDS = {
    "test_finetune.py": 216, "test_cache.py": 159, "test_slurm.py": 152, "test_dense.py": 144,
    "test_multi_backbone.py": 141, "test_extract.py": 138, "test_families.py": 131, "test_identity.py": 124,
    "test_ddp.py": 105, "test_sources_pipeline.py": 83, "test_audio_extract.py": 61, "test_search.py": 59,
    "test_prepare.py": 52, "test_sweep.py": 48, "test_heads.py": 44, "test_checksum.py": 42,
    "test_kill_resume.py": 35, "test_first_hour.py": 30, "test_sources.py": 30,
}  # fmt: skip


@pytest.hookimpl(trylast=True)  # after -m / -k deselected what does not run
def pytest_collection_modifyitems(session, config, items):
    """The order xdist hands tests out in: the longest modules first (each kept together, so
    its module fixtures are built once per worker), so the run ends on short tests that fill
    both cores; the demo workspace's tests last, so the build started here in the background
    (one process, one thread) overlaps every other test and both workers then share them."""
    demo = {id(i) for i in items if "demo_workspace" in getattr(i, "fixturenames", ())}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda i: (id(i) in demo, -MODULE_SECONDS.get(i.path.name, 0), order[id(i)]))
    if demo and not os.environ.get("EKX_TEST_DEMO_DIR") and not config.option.collectonly:
        _start_demo()


def _demo_dir() -> Path:
    return Path(os.environ[SESSION_ENV]) / "demo"


def _start_demo() -> None:
    """`ekx demo` in a process of its own, once per session whichever worker asks first
    (a lock in the session folder); it writes its exit code beside its output when done."""
    import fcntl
    import subprocess
    import sys

    root = _demo_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "started").exists():
            return
        env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        builder = subprocess.Popen(
            [sys.executable, "-c", DEMO_BUILD, str(root / "workdir"), str(root / "output.txt"), str(root / "rc")],
            env=env,
            start_new_session=True,  # outlives the worker that started it; stopped as a group (`_stop_demo`)
        )
        (root / "started").write_text(str(builder.pid))


# run by the background builder: `ekx demo`, then its exit code, written atomically
DEMO_BUILD = """
import os, subprocess, sys
workdir, output, rc = sys.argv[1:]
with open(output, "w") as f:
    cmd = [sys.executable, "-m", "ekx", "demo", "--workdir", workdir]
    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
with open(rc + ".tmp", "w") as f:
    f.write(str(code))
os.replace(rc + ".tmp", rc)
"""


def _stop_demo() -> None:
    import signal

    root = _demo_dir()
    if (root / "started").exists() and not (root / "rc").exists():
        try:
            os.killpg(int((root / "started").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


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


@dataclass
class DemoResult:
    """What the tests read of the `ekx demo` run (as typer's CliRunner result has them)."""

    exit_code: int
    output: str


@pytest.fixture(scope="session")
def demo_workspace(request):
    """`ekx demo`, run once per session by a background process started at collection
    (`pytest_collection_modifyitems`): (workdir, DemoResult). Its synthetic data, resnet50
    caches and runs are shared by the tests that need real extracted data."""
    if os.environ.get("EKX_TEST_DEMO_DIR"):  # developer shortcut: reuse a finished `ekx demo --workdir`
        workdir = Path(os.environ["EKX_TEST_DEMO_DIR"])  # (its printed output, if kept, in output.txt there)
        output = workdir / "output.txt"
        return workdir, DemoResult(0, output.read_text() if output.is_file() else "")
    _start_demo()  # already running unless collection skipped it
    root, say = _demo_dir(), _say(request)
    t0 = time.perf_counter()
    if not (root / "rc").exists():
        # pytest -q prints nothing until a test ends: say what the silence is
        say(f"waiting for the demo workspace (`ekx demo --workdir {root / 'workdir'}`, started with the session)")
    while not (root / "rc").exists():
        if time.perf_counter() - t0 > 3600:
            pytest.fail(f"`ekx demo` did not finish in an hour; its output so far: {root / 'output.txt'}")
        time.sleep(1)
    result = DemoResult(int((root / "rc").read_text()), (root / "output.txt").read_text())
    if time.perf_counter() - t0 > 1:
        say(f"demo workspace ready after {time.perf_counter() - t0:.0f} s of waiting (exit {result.exit_code})")
    return root / "workdir", result


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
