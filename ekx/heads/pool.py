"""Workers of a search: each takes trials from the study (a dead worker's first, else a new
one) until `trials` are settled, and runs them as ordinary runs with pruning between epochs;
`--jobs N` runs N of them in processes that die with this one.

Resume: a trial whose worker died (no live owner.json, see heads.runlock) is taken over by
the next worker and continues from its last.pt, so a kill -9 loses at most the epoch that
was running; workers keep asking for new trials until `trials` are finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ekx import EkxError
from ekx.heads import runlock
from ekx.heads.config import TrainConfig
from ekx.heads.journal import open_study, trial_dir, warn_stderr
from ekx.heads.runlog import best_row
from ekx.heads.sweep import with_caches

if TYPE_CHECKING:
    from ekx.heads.search import Search


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

    track_status = "pruned"  # what the run's trackers are told (ekx.track.session.status_of)


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
    allow_missing: bool = False,
    warn: Callable[[str], None] = warn_stderr,
) -> dict[str, dict]:
    """Take trials from the study until `trials` are settled; returns {trial: result} of this
    worker. ``worker`` is the number asked for: one another live process holds is not shared
    (runlock.slot) - the next free one is taken, with its own sampler seed."""
    from ekx.heads import train as tr

    with runlock.slot(Path(sweep_dir) / ".worker", worker) as me:
        if me != worker:
            warn(f"worker {worker} of {sweep_dir} is held by another live process: this one is worker {me}")
        study = open_study(sweep_dir, search, me, warn=warn)
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
                    search,
                    study,
                    trial,
                    run_dir,
                    features_root,
                    device,
                    (tails, unseen, allow_missing),
                    tr,
                    loaded,
                    emit,
                    resumed,
                )


def _objective(rows: list[dict], search: Search) -> float:
    """The trial's value: its best epoch's (the epoch of its best.pt, runlog.best_row)."""
    best = best_row([r for r in rows if r["epoch"] > 0], search.objective)
    if not best:
        raise EkxError(f"objective {search.objective!r} is not a metrics column; e.g. val_action_top1, val_loss")
    return float(best[search.objective])


def _run_trial(search, study, trial, run_dir, features_root, device, data_args, tr, loaded, emit, resumed) -> dict:
    import optuna

    from ekx.heads.runlog import read_metrics

    name = run_dir.name
    if (run_dir / "pruned.json").is_file():  # pruned, then killed before the study heard of it
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return {"status": "pruned", **json.loads((run_dir / "pruned.json").read_text())}
    cfg = trial_config(search, trial.number, suggest(trial, search.space), features_root)
    key = (cfg.train_features, cfg.val_features)
    if key not in loaded:  # a missing cache stops the worker, not the trial: it stays resumable
        loaded[key] = tr.load_data(Path(key[0]), Path(key[1]), device, *data_args)
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

        best = tr.run(cfg, run_dir, loaded[key], resume, on_epoch, objective=search.objective, group_dir=run_dir.parent)
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
        (run_dir / runlock.FAILED).write_text(json.dumps({"error": error[:2000]}))  # `ekx compare`: failed
        trial.set_user_attr("error", error[:500])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit("failed", name, {"error": error})
        return {"status": "failed", "error": error}


def run_processes(search, sweep_dir, features_root, device, jobs, tails, unseen, worker, on_event, allow_missing):
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
                allow_missing,
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


def _process(search, sweep_dir, features_root, device, tails, unseen, worker, jobs, events, parent, allow) -> None:
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
        allow,
    )
    for name, res in results.items():
        events.put(("result", name, res))
