"""Sweep files and `ekx sweep`: many configurations on caches loaded once.

A sweep file (TOML) has up to four parts; every key is a TrainConfig key:

    [base]                      # shared by every configuration
    head = "transformer"
    epochs = 20

    [[config]]                  # explicit configurations (phase2.toml: the seed's eight)
    name = "config1"
    lr = 5e-5

    [grid]                      # cartesian product of lists
    head = ["lstm", "transformer"]
    lr = [1e-4, 3e-4]

    [random]                    # random search
    trials = 8
    seed = 0
    lr = { log_uniform = [1e-5, 1e-3] }
    dropout = { uniform = [0.3, 0.6] }
    batch_size = { choice = [16, 24, 32] }

Configurations are numbered in that order (explicit, grid, random), deterministically,
so `--index I` (one SLURM array task) picks the same one everywhere. `backbone` (or the
cache paths) may differ between configurations: the runner groups them by cache and
loads each cache once. An `[optuna]` section instead makes the file a search (heads.search).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ekx import EkxError
from ekx.config import default_cache, load_toml, tomllib
from ekx.heads import runlock
from ekx.heads.config import TrainConfig, check_space
from ekx.heads.runlog import write_atomic

SECTIONS = ("base", "config", "grid", "random")
SEARCH = "optuna"  # the section that makes a file an Optuna search (heads.search)


@dataclass
class SweepConfig:
    index: int
    name: str
    cfg: TrainConfig
    overrides: dict[str, Any]  # what differs from [base]


def _check_keys(values: dict, where: str, extra: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(values) - set(TrainConfig.keys()) - set(extra))
    if unknown:
        raise EkxError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TrainConfig.keys())}")


def _sample(spec: dict, rng: np.random.Generator) -> Any:
    kind, args = next(iter(spec.items()))  # checked by check_space
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    lo, hi = args
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(rng.integers(lo, hi + 1))


def _name(i: int, over: dict) -> str:
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in over.items() if k != "name"]
    return f"{i:03d}-" + ("_".join(parts) or "base").replace("/", "-")


def expand(data: dict, where: str = "sweep file") -> list[SweepConfig]:
    """The ordered list of configurations of a parsed sweep file."""
    if SEARCH in data:
        raise EkxError(f"{where}: an [{SEARCH}] search has no fixed list of configurations; run it with `ekx sweep`")
    unknown = sorted(set(data) - set(SECTIONS) - {SEARCH})
    if unknown:
        raise EkxError(f"{where}: unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}")
    base = dict(data.get("base", {}))
    _check_keys(base, f"{where} [base]")
    TrainConfig.from_dict(base, f"{where} [base]")  # its values, named by section before any configuration
    overrides: list[dict] = []
    for j, c in enumerate(data.get("config", [])):
        _check_keys(c, f"{where} [[config]] #{j + 1}", ("name",))
        overrides.append(dict(c))
    grid = data.get("grid", {})
    _check_keys(grid, f"{where} [grid]")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise EkxError(f"{where} [grid]: '{k}' must be a non-empty list")
    if grid:
        keys = list(grid)
        overrides += [dict(zip(keys, combo, strict=False)) for combo in itertools.product(*(grid[k] for k in keys))]
    rand = dict(data.get("random", {}))
    if rand:
        trials, seed = rand.pop("trials", None), rand.pop("seed", 0)
        if not isinstance(trials, int) or trials < 1:
            raise EkxError(f"{where} [random]: 'trials' must be a positive integer")
        _check_keys(rand, f"{where} [random]")
        check_space(rand, f"{where} [random]")
        rng = np.random.default_rng(seed)
        overrides += [
            {"name": f"{len(overrides) + t:03d}-random{t:02d}", **{k: _sample(spec, rng) for k, spec in rand.items()}}
            for t in range(trials)
        ]
    if not overrides:
        overrides = [{}]
    out = []
    for i, over in enumerate(overrides):
        values = {**base, **{k: v for k, v in over.items() if k != "name"}}
        name = over.get("name") or _name(i, {k: v for k, v in over.items()})
        cfg = TrainConfig.from_dict({**values, "name": name}, f"{where} configuration {i} ({name})")
        out.append(SweepConfig(i, name, cfg, over))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise EkxError(f"{where}: configuration names repeat; give each [[config]] a unique name")
    return out


def apply_overrides(configs: list[SweepConfig], settings: list[str]) -> list[SweepConfig]:
    """`--set KEY=VALUE` (TOML values) on every configuration, e.g. a quick `--set epochs=2`."""
    values = parse_settings(settings)
    return [
        SweepConfig(
            sc.index, sc.name, TrainConfig.from_dict({**asdict(sc.cfg), **values}, f"--set ({sc.name})"), sc.overrides
        )
        for sc in configs
    ]


def parse_settings(settings: list[str]) -> dict[str, Any]:
    values = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise EkxError(f"--set {item!r}: expected KEY=VALUE, e.g. epochs=2")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text.strip()  # a bare string
    _check_keys(values, "--set")
    return values


def load(path: Path) -> list[SweepConfig]:
    return expand(load_toml(path, "sweep file"), str(path))


def is_search(path: Path) -> bool:
    return SEARCH in load_toml(path, "sweep file")


def with_caches(cfg: TrainConfig, features_root: Path) -> TrainConfig:
    """The configuration with its cache paths resolved (the backbone's default caches unless set)."""
    root = Path(features_root)
    return TrainConfig.from_dict(
        {
            **asdict(cfg),
            "train_features": cfg.train_features or default_cache(root, cfg.backbone, "train"),
            "val_features": cfg.val_features or default_cache(root, cfg.backbone, "validation"),
        },
        cfg.name,
    )


def cache_key(cfg: TrainConfig) -> tuple[str, str]:
    return (cfg.train_features, cfg.val_features)


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (even by SIGKILL), so pool workers
    never go on training and writing runs that nobody waits for; exit now if it already died."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


# ---------------------------------------------------------------- running


def is_finished(run_dir: Path, cfg: TrainConfig) -> bool:
    done = run_dir / "done.json"
    return done.is_file() and json.loads(done.read_text()).get("epochs") == cfg.epochs


def _run_one(sc: SweepConfig, run_dir: Path, data, on_epoch=None) -> dict:
    from ekx.heads import train as tr

    cfg = TrainConfig.from_dict(
        {**asdict(sc.cfg), "train_features": str(data.train.path), "val_features": str(data.val.path)}, sc.name
    )
    with runlock.claim_or_refuse(run_dir, run_dir.parent / ".claim.lock"):  # never two trainers on one run
        resume = (run_dir / "last.pt").is_file()
        best = tr.run(cfg, run_dir, data, resume=resume, on_epoch=on_epoch, group_dir=run_dir.parent)
        write_atomic(run_dir / "done.json", json.dumps({"epochs": cfg.epochs, "best": best}))
    return best


def run_sweep(
    configs: list[SweepConfig],
    sweep_dir: Path,
    train_path: Path | None,
    val_path: Path | None,
    device: str,
    jobs: int = 1,
    tails=None,
    unseen=None,
    on_event: Callable[[str, SweepConfig, dict], None] | None = None,
    features_root: Path = Path("features"),
    allow_missing: bool = False,
    warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
) -> dict[str, dict]:
    """Run every unfinished configuration; returns {name: {"status": ..., "best"/"error": ...}}.

    Configurations are grouped by cache (train_path/val_path when given, else each
    configuration's own paths or its backbone's caches under features_root); each group's
    caches are loaded once. With jobs == 1 in this process; with jobs > 1 by worker
    processes that each memory-map the cache (the OS shares the pages) and die with us.
    A validation cache with failed or pending rows refuses the whole sweep before its first
    run, unless ``allow_missing`` (then they count as wrong, see heads.missing).
    """
    from ekx.track import require

    for sc in configs:  # a tracker asked for and not installed: said before the first run
        require(sc.cfg.track, f"{sc.name}: track")
    results: dict[str, dict] = {}
    groups: dict[tuple[str, str], list[SweepConfig]] = {}
    for sc in configs:
        if is_finished(sweep_dir / sc.name, sc.cfg):
            results[sc.name] = {
                "status": "skipped",
                "best": json.loads((sweep_dir / sc.name / "done.json").read_text())["best"],
            }
            if on_event:
                on_event("skipped", sc, results[sc.name]["best"])
            continue
        cfg = sc.cfg
        if train_path is not None:
            cfg = TrainConfig.from_dict({**asdict(cfg), "train_features": str(train_path)}, sc.name)
        if val_path is not None:
            cfg = TrainConfig.from_dict({**asdict(cfg), "val_features": str(val_path)}, sc.name)
        cfg = with_caches(cfg, features_root)
        groups.setdefault(cache_key(cfg), []).append(SweepConfig(sc.index, sc.name, cfg, sc.overrides))
    from ekx.heads import missing  # torch: a sweep file is checked without it

    for _, val_p in groups:  # every validation cache, before the first run of any
        note = missing.check_validation_file(val_p, allow_missing)
        if note:
            warn(note)
    for (train_p, val_p), todo in groups.items():
        where = (sweep_dir, Path(train_p), Path(val_p), device)
        if jobs <= 1:
            results |= _run_serial(todo, *where, tails, unseen, on_event, allow_missing)
        else:
            results |= _run_pool(todo, *where, jobs, tails, unseen, on_event, allow_missing)
    return results


def _run_serial(todo, sweep_dir, train_path, val_path, device, tails, unseen, on_event, allow) -> dict[str, dict]:
    from ekx.heads import train as tr

    results: dict[str, dict] = {}
    try:
        data = tr.load_data(train_path, val_path, device, tails, unseen, allow)
    except EkxError as e:  # a missing cache fails its configurations, not the other groups
        for sc in todo:
            results[sc.name] = {"status": "failed", "error": str(e)}
            if on_event:
                on_event("failed", sc, results[sc.name])
        return results
    for sc in todo:
        if on_event:
            on_event("start", sc, {})
        try:
            best = _run_one(
                sc,
                sweep_dir / sc.name,
                data,
                on_epoch=(lambda row, sc=sc: on_event("epoch", sc, row)) if on_event else None,
            )
            results[sc.name] = {"status": "done", "best": best}
            if on_event:
                on_event("done", sc, best)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            results[sc.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if on_event:
                on_event("failed", sc, results[sc.name])
    return results


def _run_pool(todo, sweep_dir, train_path, val_path, device, jobs, tails, unseen, on_event, allow) -> dict[str, dict]:
    results: dict[str, dict] = {}
    ctx = mp.get_context("spawn")
    events = ctx.Queue()  # a plain queue, not a Manager: no extra process to outlive us
    jobs = min(jobs, len(todo))
    initargs = (str(train_path), str(val_path), device, tails, unseen, events, jobs, os.getpid(), allow)
    with ctx.Pool(jobs, initializer=_worker_init, initargs=initargs) as pool:
        pending = {sc.name: pool.apply_async(_worker_run, (sc, str(sweep_dir / sc.name))) for sc in todo}
        by_name = {sc.name: sc for sc in todo}
        while pending:
            _drain(events, by_name, on_event)
            for name in [n for n, r in pending.items() if r.ready()]:
                results[name] = pending.pop(name).get()
                _drain(events, by_name, on_event)
                if on_event:
                    on_event(results[name]["status"], by_name[name], results[name].get("best", results[name]))
            if pending:
                next(iter(pending.values())).wait(0.2)
    return results


def _drain(events, by_name, on_event) -> None:
    while not events.empty():
        kind, name, row = events.get()
        if on_event:
            on_event(kind, by_name[name], row)


_WORKER: dict = {}


def _worker_init(train_path, val_path, device, tails, unseen, events, jobs, parent, allow) -> None:
    die_with_parent(parent)
    import torch

    from ekx import runtime
    from ekx.heads import train as tr
    from ekx.heads.data import feature_stats, load_split

    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // jobs))
    dev = runtime.resolve_device(device)
    try:
        train = load_split(Path(train_path), dev, mmap=True)
        val = train if val_path == train_path else load_split(Path(val_path), dev, mmap=True)
        note = tr.validation_note(val, allow, train)  # as tr.load_data: the same refusal, the same scoring
    except EkxError as e:
        _WORKER.update(error=str(e), events=events)
        return
    mean, std = feature_stats(train)
    data = tr.Loaded(train, val, (mean.to(dev), std.to(dev)), dev, tails, unseen, note)
    _WORKER.update(data=data, events=events)


def _worker_run(sc: SweepConfig, run_dir: str) -> dict:
    events = _WORKER["events"]
    if "error" in _WORKER:
        return {"status": "failed", "error": _WORKER["error"]}
    events.put(("start", sc.name, {}))
    try:
        best = _run_one(sc, Path(run_dir), _WORKER["data"], on_epoch=lambda row: events.put(("epoch", sc.name, row)))
        return {"status": "done", "best": best}
    except Exception as e:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
