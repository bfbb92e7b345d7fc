"""`[optuna]` sweep files: a model-based search with pruning, on Optuna.

    [base]                                    # shared by every trial, as in other sweep files
    head = "transformer"
    epochs = 20

    [optuna]
    trials = 40                               # finished trials (complete, pruned or failed)
    seed = 0
    sampler = "tpe"                           # tpe | random
    pruner = "successive-halving"             # successive-halving | hyperband | none
    objective = "val_action_top1"             # any metrics.jsonl column; *_loss is minimised
    min_epochs = 1                            # pruner: epochs before the first decision
    reduction_factor = 3                      # pruner: keep 1/reduction_factor at each rung
    lr = { log_uniform = [1e-5, 1e-3] }       # the space, in the [random] style
    backbone = { choice = ["resnet50", "efficientnet_b3"] }

Each trial is a normal run directory `runs/<sweep>/trial-0007/`. The study lives in a
journal file next to the sweep directory (`runs/<sweep>.journal`), which any number of
processes - `--jobs N` here, `ekx slurm sweep --workers N` on a cluster - append to without
a database server. Intermediate values are reported once per epoch (after the epoch's
checkpoint and metrics row are written); the pruner decides between epochs, so a pruned
trial keeps its partial curve and checkpoints and is marked by `pruned.json`.

Resume: a trial whose worker died (no live owner.json, see heads.runlock) is taken over by
the next worker and continues from its last.pt, so a kill -9 loses at most the epoch that
was running; workers keep asking for new trials until `trials` are finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ekx import EkxError
from ekx.config import load_toml
from ekx.heads import runlock
from ekx.heads.config import TrainConfig, check_space
from ekx.heads.sweep import SEARCH, with_caches
from ekx.options import check_values, opt

SAMPLERS = ("tpe", "random")
PRUNERS = ("successive-halving", "hyperband", "none")
OPTIONS = ("trials", "seed", "sampler", "pruner", "objective", "min_epochs", "reduction_factor")


@dataclass
class Search:
    base: dict[str, Any]
    space: dict[str, dict]
    trials: int = opt(MISSING, "finished trials (complete, pruned or failed)", ge=1)
    seed: int = opt(0, "the sampler's random seed", ge=0)
    sampler: str = opt("tpe", "how parameters are proposed", choices=SAMPLERS)
    pruner: str = opt("successive-halving", "how trials are stopped early", choices=PRUNERS)
    objective: str = opt("val_action_top1", "a metrics.jsonl column; *_loss is minimised")
    min_epochs: int = opt(1, "pruner: epochs before the first decision", ge=1)
    reduction_factor: int = opt(3, "pruner: keep 1/reduction_factor at each rung", ge=2)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set, applied last

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "minimize" if self.objective.endswith("loss") else "maximize"


def parse(data: dict, where: str = "sweep file") -> Search:
    unknown = sorted(set(data) - {"base", SEARCH})
    if unknown:
        raise EkxError(f"{where}: an [{SEARCH}] search takes only [base] and [{SEARCH}]; found {', '.join(unknown)}")
    base = dict(data.get("base", {}))
    TrainConfig.from_dict(base, f"{where} [base]")  # unknown keys and wrong types, named
    section = dict(data[SEARCH])
    opts = {k: section.pop(k) for k in OPTIONS if k in section}
    search = Search(base, section, **{"trials": None, **opts})  # no trials: said below, not a TypeError
    if not isinstance(search.trials, int) or search.trials < 1:
        raise EkxError(f"{where} [{SEARCH}]: 'trials' must be a positive integer")
    if search.sampler not in SAMPLERS:
        raise EkxError(f"{where} [{SEARCH}]: sampler {search.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if search.pruner not in PRUNERS:
        raise EkxError(f"{where} [{SEARCH}]: pruner {search.pruner!r}; use one of {', '.join(PRUNERS)}")
    check_values(Search, opts, f"{where} [{SEARCH}]")
    unknown = sorted(set(section) - set(TrainConfig.keys()))
    if unknown:
        raise EkxError(
            f"{where} [{SEARCH}]: unknown key(s) {', '.join(unknown)}; options: {', '.join(OPTIONS)}; "
            f"searchable: {', '.join(TrainConfig.keys())}"
        )
    check_space(section, f"{where} [{SEARCH}]")
    return search


def load(path: Path) -> Search:
    return parse(load_toml(path, "sweep file"), str(path))


def journal_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir).parent / f"{Path(sweep_dir).name}.journal"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"trial-{number:04d}"


def open_study(sweep_dir: Path, search: Search | None = None, worker: int = 0, create: bool = True):
    """The study of a sweep directory (created on first use); `worker` offsets the sampler's
    seed so that parallel workers do not propose the same parameters in lockstep."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = journal_path(sweep_dir)
    if not create and not path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    if search is None:
        return optuna.load_study(study_name=Path(sweep_dir).name, storage=storage)
    seed = search.seed + 1000 * worker
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=seed) if search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    )
    epochs = int({**search.base, **search.overrides}.get("epochs", TrainConfig().epochs))
    pruner: optuna.pruners.BasePruner
    if search.pruner == "successive-halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=search.min_epochs, reduction_factor=search.reduction_factor
        )
    elif search.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=search.min_epochs, max_resource=epochs, reduction_factor=search.reduction_factor
        )
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=Path(sweep_dir).name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=search.direction,
        load_if_exists=True,
    )
    if study.user_attrs.get("objective", search.objective) != search.objective:
        raise EkxError(
            f"{path} holds a study of {study.user_attrs['objective']}, not {search.objective}: "
            "choose another --name for a search with another objective"
        )
    study.set_user_attr("objective", search.objective)
    return study


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, list(args))
        elif kind == "int_uniform":
            out[key] = trial.suggest_int(key, int(args[0]), int(args[1]))
        else:
            out[key] = trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "log_uniform")
    return out


def trial_config(search: Search, number: int, params: dict, features_root: Path) -> TrainConfig:
    values = {**search.base, **params, **search.overrides, "name": f"trial-{number:04d}"}
    return with_caches(TrainConfig.from_dict(values, f"trial {number}"), features_root)


class Pruned(Exception):
    """Raised from a run's on_epoch callback: the pruner stopped this trial after an epoch."""


def _settled(state) -> bool:
    import optuna

    return state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _next_trial(study, search: Search, sweep_dir: Path):
    """Under the sweep's mutex: a dead worker's trial to take over, else a new one, else None."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    for ft in trials:
        if ft.state == optuna.trial.TrialState.RUNNING:
            lock = runlock.take(trial_dir(sweep_dir, ft.number))
            if lock is not None:
                return optuna.Trial(study, ft._trial_id), lock, True
    settled = sum(_settled(ft.state) for ft in trials)
    running = sum(ft.state == optuna.trial.TrialState.RUNNING for ft in trials)
    if settled + running >= search.trials:
        return None
    trial = study.ask()
    suggest(trial, search.space)  # sampled now, inside the mutex: the next ask sees it running
    lock = runlock.take(trial_dir(sweep_dir, trial.number))
    assert lock is not None  # a new number: nobody else can hold its directory
    return trial, lock, False


def run_worker(
    search: Search,
    sweep_dir: Path,
    features_root: Path,
    device: str,
    tails=None,
    unseen=None,
    worker: int = 0,
    on_event: Callable[[str, str, dict], None] | None = None,
) -> dict[str, dict]:
    """Take trials from the study until `trials` are settled; returns {trial: result} of this worker."""
    from ekx.heads import train as tr

    study = open_study(sweep_dir, search, worker)
    loaded: dict[tuple[str, str], Any] = {}  # each cache loaded once per worker
    results: dict[str, dict] = {}
    emit = on_event or (lambda kind, name, row: None)
    while True:
        with runlock.mutex(Path(sweep_dir) / ".claim.lock"):
            nxt = _next_trial(study, search, sweep_dir)
        if nxt is None:
            return results
        trial, lock, resumed = nxt
        run_dir = trial_dir(sweep_dir, trial.number)
        with lock:
            results[run_dir.name] = _run_trial(
                search, study, trial, run_dir, features_root, device, tails, unseen, tr, loaded, emit, resumed
            )


def _objective(rows: list[dict], search: Search) -> float:
    values = [float(r[search.objective]) for r in rows if search.objective in r]
    if not values:
        raise EkxError(f"objective {search.objective!r} is not a metrics column; e.g. val_action_top1, val_loss")
    return min(values) if search.direction == "minimize" else max(values)


def _run_trial(search, study, trial, run_dir, features_root, device, tails, unseen, tr, loaded, emit, resumed) -> dict:
    import optuna

    from ekx.heads.runlog import read_metrics

    name = run_dir.name
    if (run_dir / "pruned.json").is_file():  # pruned, then killed before the study heard of it
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return {"status": "pruned", **json.loads((run_dir / "pruned.json").read_text())}
    cfg = trial_config(search, trial.number, suggest(trial, search.space), features_root)
    key = (cfg.train_features, cfg.val_features)
    if key not in loaded:  # a missing cache stops the worker, not the trial: it stays resumable
        loaded[key] = tr.load_data(Path(key[0]), Path(key[1]), device, tails, unseen)
    try:
        resume = (run_dir / "last.pt").is_file()
        reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
        for row in read_metrics(run_dir) if resume else []:  # epochs the dead worker logged but never reported
            if row["epoch"] > 0 and row["epoch"] not in reported and search.objective in row:
                trial.report(float(row[search.objective]), row["epoch"])
        emit("resume" if resumed else "start", name, {"params": trial.params, "epochs": cfg.epochs})

        def on_epoch(row: dict) -> None:
            emit("epoch", name, row)
            if row["epoch"] < 1 or search.objective not in row:
                return
            trial.report(float(row[search.objective]), row["epoch"])
            if row["epoch"] < cfg.epochs and trial.should_prune():
                raise Pruned(row["epoch"])

        best = tr.run(cfg, run_dir, loaded[key], resume=resume, on_epoch=on_epoch)
        value = _objective(read_metrics(run_dir), search)
        (run_dir / "done.json").write_text(json.dumps({"epochs": cfg.epochs, "best": best, "value": value}))
        study.tell(trial, value)
        emit("done", name, {"value": value})
        return {"status": "done", "value": value}
    except Pruned as p:
        rows = read_metrics(run_dir)
        mark = {"epoch": int(p.args[0]), "value": _objective(rows, search)}
        (run_dir / "pruned.json").write_text(json.dumps(mark))  # the run stays: curve and checkpoints
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        emit("pruned", name, mark)
        return {"status": "pruned", **mark}
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", error[:500])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit("failed", name, {"error": error})
        return {"status": "failed", "error": error}


# ---------------------------------------------------------------- several workers on this machine


def run_search(
    search: Search,
    sweep_dir: Path,
    features_root: Path,
    device: str,
    jobs: int = 1,
    tails=None,
    unseen=None,
    worker: int = 0,
    on_event: Callable[[str, str, dict], None] | None = None,
) -> dict[str, dict]:
    """`jobs` workers on the study (jobs == 1: this process); returns {trial: result}."""
    if jobs <= 1:
        return run_worker(search, sweep_dir, features_root, device, tails, unseen, worker, on_event)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    me = os.getpid()
    procs = [
        ctx.Process(
            target=_process,
            args=(
                search,
                str(sweep_dir),
                str(features_root),
                device,
                tails,
                unseen,
                worker * jobs + j,
                jobs,
                events,
                me,
            ),
        )
        for j in range(jobs)
    ]
    for p in procs:
        p.start()
    results: dict[str, dict] = {}
    while any(p.is_alive() for p in procs) or not events.empty():
        try:
            kind, name, row = events.get(timeout=0.2)
        except Exception:  # queue.Empty
            continue
        if kind == "result":
            results[name] = row
        elif on_event:
            on_event(kind, name, row)
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise EkxError(f"{len(bad)} of {jobs} search workers exited with {bad}; re-run the same command to continue")
    return results


def _process(search, sweep_dir, features_root, device, tails, unseen, worker, jobs, events, parent) -> None:
    from ekx.heads.sweep import die_with_parent

    die_with_parent(parent)
    import torch

    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // jobs))
    results = run_worker(
        search,
        Path(sweep_dir),
        Path(features_root),
        device,
        tails,
        unseen,
        worker,
        lambda kind, name, row: events.put((kind, name, row)),
    )
    for name, res in results.items():
        events.put(("result", name, res))


def summary(sweep_dir: Path) -> dict[str, int]:
    """Trials of the study by state (COMPLETE, PRUNED, FAIL, RUNNING)."""
    study = open_study(sweep_dir, create=False)
    counts: dict[str, int] = {}
    for ft in study.get_trials(deepcopy=False) if study else []:
        counts[ft.state.name] = counts.get(ft.state.name, 0) + 1
    return counts
